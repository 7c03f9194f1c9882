"""Errors raised by the physics module.

``UnknownProfileError`` is a ``LookupError``: a name was asked for that no registry holds.
A model that does not fit its hardware raises a plain ``ValueError`` from ``Roofline``.
Both are configuration errors; the config layer maps them to start-up errors with the path
of the offending entry.
"""

from __future__ import annotations

from collections.abc import Iterable


class UnknownProfileError(LookupError):
    """A hardware or model profile name that is not in its registry.

    The message names what was asked for and lists every known name, sorted.
    """

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.known = tuple(sorted(known))
        super().__init__(
            f"unknown {kind} profile {name!r}; known {kind} profiles: {', '.join(self.known)}"
        )

    def __str__(self) -> str:
        # LookupError.__str__ would repr() a single argument; keep the message readable.
        return str(self.args[0])
