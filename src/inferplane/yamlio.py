"""Reading the YAML files users write (fleet, calibrated profile, simulator mix and fault files),
and the JSON ones (a fault file may be JSON).

A leaf module (PyYAML, the standard library's ``json`` and `inferplane.errors` only), so that
every package may read its files the same way: ``physics`` (calibrated profiles) sits below
``config`` and may not import it.

- `load_yaml`: ``yaml.safe_load``, except that a key repeated in one mapping is refused (PyYAML
  keeps the last one silently, hiding a typo or a pasted duplicate).
- `parse_yaml`: `load_yaml` with every YAML problem a `ConfigError` naming the file and the line
  and column: ``fleet.yaml: line 6, column 5: invalid YAML: duplicate key 'region'``.
- `parse_json`: ``json.loads`` with a repeated key refused too, and every problem a
  `ConfigError` naming the file, as `parse_yaml` does: ``faults.json: invalid JSON: duplicate key
  "for_s"`` (the standard library's parser does not tell where a key is, so that one has no line;
  a syntax error has its line and column).
- `read_text`: a file's text, or a `ConfigError` naming it (unreadable, not UTF-8).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from inferplane.errors import ConfigError

__all__ = ["load_yaml", "parse_json", "parse_yaml", "read_text", "read_yaml"]


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


class _DuplicateJSONKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {json.dumps(key, ensure_ascii=False)}")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members as a dict, unless a key is repeated (``json`` keeps the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateJSONKey(key)
        out[key] = value
    return out


def parse_json(text: str, file: str) -> Any:
    """``json.loads(text)``, except that a key repeated in one object is refused; every problem
    a `ConfigError` naming ``file`` (and, for a syntax error, the line and column), including
    an integer past the interpreter's digit limit and arrays or objects nested too deeply."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateJSONKey as exc:
        raise ConfigError(file, [("", f"invalid JSON: {exc}")]) from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ConfigError(file, [(where, f"invalid JSON: {exc.msg}")]) from None
    except ValueError as exc:  # an integer past the interpreter's digit limit
        raise ConfigError(file, [("", f"invalid JSON: {exc}")]) from None
    except RecursionError:
        raise ConfigError(file, [("", "invalid JSON: nested too deeply")]) from None


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
