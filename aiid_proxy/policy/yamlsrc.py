"""YAML with line numbers and typed access to it, for errors that say ``file:line``.

A SafeLoader subclass that records the line of every mapping key and value and of every list
item, refuses duplicate keys and merge keys, and leaves timestamps as strings (``expires`` is
parsed by the validator, with its time zone required).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator
from typing import Any, NoReturn

import yaml

from aiid_proxy.errors import PolicyError


class YMap(dict[str, Any]):
    line: int
    key_lines: dict[str, int]
    value_lines: dict[str, int]


class YSeq(list[Any]):
    line: int
    lines: list[int]


class _NodeError(Exception):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


# libyaml's parser when available (several times faster), else the pure-Python one.
_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[valid-type,misc]
    pass


# Timestamps stay strings: `expires` is parsed by us, with its zone required.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Base.yaml_implicit_resolvers.items()
}


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[YMap]:
    m = YMap()
    m.line = node.start_mark.line + 1
    m.key_lines = {}
    m.value_lines = {}
    yield m
    for key_node, value_node in node.value:
        kline = key_node.start_mark.line + 1
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise _NodeError("YAML merge keys (<<) are not supported", kline)
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise _NodeError(f"mapping key {key_node.value!r} must be a string", kline)
        if key in m:
            raise _NodeError(f"duplicate key {key!r} (first on line {m.key_lines[key]})", kline)
        m[key] = loader.construct_object(value_node, deep=True)
        m.key_lines[key] = kline
        m.value_lines[key] = value_node.start_mark.line + 1


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> Iterator[YSeq]:
    s = YSeq()
    s.line = node.start_mark.line + 1
    s.lines = []
    yield s
    for item in node.value:
        s.append(loader.construct_object(item, deep=True))
        s.lines.append(item.start_mark.line + 1)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def parse_yaml(text: str, filename: str) -> object:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except _NodeError as e:
        raise PolicyError(e.message, filename, e.line) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        detail = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise PolicyError(f"YAML syntax error: {detail}", filename, line) from None
    except yaml.YAMLError as e:
        raise PolicyError(f"YAML error: {' '.join(str(e).split())}", filename, None) from None


def type_name(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(v), "a list" if isinstance(v, list) else "a mapping" if isinstance(v, dict) else "?"
    )


class Checker:
    """Typed access to a parsed YAML tree that fails with ``file:line``."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, message: str, line: int | None) -> NoReturn:
        raise PolicyError(message, self.file, line)

    # -- structure -------------------------------------------------------------------------------
    def mapping(self, v: object, what: str, line: int) -> YMap:
        if not isinstance(v, YMap):
            self.fail(f"{what} must be a mapping, got {type_name(v)}", line)
        return v

    def keys(
        self, m: YMap, allowed: tuple[str, ...], what: str, required: tuple[str, ...] = ()
    ) -> None:
        for k in m:
            if k not in allowed:
                self.unknown_key(m, k, allowed, what)
        for k in required:
            if k not in m:
                self.fail(f"{what} is missing required key {k!r}", m.line)

    def unknown_key(self, m: YMap, k: str, allowed: tuple[str, ...], what: str) -> NoReturn:
        hint = difflib.get_close_matches(k, allowed, n=1)
        tip = f" (did you mean {hint[0]!r}?)" if hint else f" (expected: {', '.join(allowed)})"
        self.fail(f"unknown key {k!r} in {what}{tip}", m.key_lines[k])

    def string(self, m: YMap, key: str, what: str) -> str:
        v = m[key]
        if not isinstance(v, str) or not v.strip():
            got = "an empty string" if isinstance(v, str) else type_name(v)
            self.fail(f"{what}.{key} must be a non-empty string, got {got}", m.value_lines[key])
        return v

    def boolean(self, m: YMap, key: str, what: str) -> bool:
        v = m[key]
        if not isinstance(v, bool):
            self.fail(f"{what}.{key} must be true or false, got {type_name(v)}", m.value_lines[key])
        return v

    def number(self, m: YMap, key: str, what: str, *, positive: bool = False) -> float:
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.fail(f"{what}.{key} must be a number, got {type_name(v)}", m.value_lines[key])
        if not math.isfinite(v):
            self.fail(f"{what}.{key} must be a finite number, got {v}", m.value_lines[key])
        if positive and v <= 0:
            self.fail(f"{what}.{key} must be positive, got {v}", m.value_lines[key])
        return v

    def str_list(self, m: YMap, key: str, what: str) -> list[tuple[str, int]]:
        v = m[key]
        line = m.value_lines[key]
        if v is None or (isinstance(v, YSeq) and not v):
            self.fail(f"{what}.{key} is empty; omit the key to match everything", line)
        if not isinstance(v, YSeq):
            self.fail(f"{what}.{key} must be a list of strings, got {type_name(v)}", line)
        out: list[tuple[str, int]] = []
        for item, item_line in zip(v, v.lines, strict=True):
            if not isinstance(item, str):
                self.fail(f"{what}.{key} items must be strings, got {type_name(item)}", item_line)
            out.append((item, item_line))
        return out
