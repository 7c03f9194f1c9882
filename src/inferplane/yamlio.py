"""Reading the YAML files users write (fleet, calibrated profile, simulator mix and fault files).

A leaf module (PyYAML and `inferplane.errors` only), so that every package may read its files the
same way: ``physics`` (calibrated profiles) sits below ``config`` and may not import it.

- `load_yaml`: ``yaml.safe_load``, except that a key repeated in one mapping is refused (PyYAML
  keeps the last one silently, hiding a typo or a pasted duplicate).
- `parse_yaml`: `load_yaml` with every YAML problem a `ConfigError` naming the file and the line
  and column: ``fleet.yaml: line 6, column 5: invalid YAML: duplicate key 'region'``.
- `read_text`: a file's text, or a `ConfigError` naming it (unreadable, not UTF-8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from inferplane.errors import ConfigError

__all__ = ["load_yaml", "parse_yaml", "read_text", "read_yaml"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps
    the last one silently, hiding a typo or a pasted duplicate)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden by explicit keys
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the constructor reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, except that a key repeated in one mapping is refused: it
    raises ``yaml.constructor.ConstructorError`` ("duplicate key …", a ``yaml.MarkedYAMLError``
    with the key's line and column), as for any other invalid YAML."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader


def parse_yaml(text: str, file: str) -> Any:
    """`load_yaml`, or a `ConfigError` naming ``file`` and, where PyYAML knows it, the line and
    column of the problem."""
    try:
        return load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(file, [(where, f"invalid YAML: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, [("", f"invalid YAML: {exc}")]) from None


def read_text(p: Path) -> str:
    """A configuration file's text; `ConfigError` naming ``p`` if unreadable, or ``p`` and the
    line of the first bad byte if not UTF-8."""
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(str(p), [(f"line {line}", "not UTF-8 text")]) from None


def read_yaml(p: Path) -> Any:
    """`parse_yaml` of the file ``p`` (`read_text`): its data, or a `ConfigError` naming it."""
    return parse_yaml(read_text(p), str(p))
