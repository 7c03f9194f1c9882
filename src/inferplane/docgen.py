"""Generated blocks in hand-written docs pages: the part scripts/gen_config_docs.py and
scripts/gen_metrics_docs.py share. A developer tool: only scripts/ and tests use it, never the
gateway.

A page is prose with blocks between marker comments::

    <!-- BEGIN GENERATED: name -->
    ...rewritten by the script...
    <!-- END GENERATED -->

Each script supplies its page, its blocks (name → a function returning the block's text) and the
errors its blocks raise for a table that cannot be generated; this module rewrites the blocks and
runs the command line (``--check``, ``--doc``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[a-z]+) -->\n).*?(<!-- END GENERATED -->)", re.DOTALL
)

Blocks = Mapping[str, Callable[[], str]]


def render(text: str, blocks: Blocks, doc: Path) -> str:
    """``text`` with every generated block rewritten; exits naming ``doc`` when ``text`` lacks
    one of ``blocks``."""
    found: set[str] = set()

    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        found.add(name)
        return m.group(1) + "\n" + blocks[name]() + "\n" + m.group(3)

    out = BLOCK.sub(sub, text)
    missing = set(blocks) - found
    if missing:
        raise SystemExit(f"{doc}: missing generated blocks: {', '.join(sorted(missing))}")
    return out


def main(
    argv: list[str] | None,
    *,
    description: str,
    doc: Path,
    render: Callable[[str], str],
    script: str,
    errors: tuple[type[Exception], ...],
) -> int:
    """The scripts' command line: rewrite ``--doc`` (default ``doc``) in place, or with
    ``--check`` exit 1 if it is out of date. An error of ``errors`` raised while rendering is
    printed and exits 2. ``script`` is the command the stale-page message tells to run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    parser.add_argument("--doc", type=Path, default=doc)
    args = parser.parse_args(argv)
    text = args.doc.read_text("utf-8")
    try:
        new = render(text)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.doc} is out of date: run python {script}")
            return 1
        return 0
    if new != text:
        args.doc.write_text(new, "utf-8")
        print(f"wrote {args.doc}")
    return 0
