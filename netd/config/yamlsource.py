"""YAML to plain values that remember where they came from (file and line).

PyYAML's composer gives a node tree with marks; this module turns it into `Mapping`
and `Sequence` values (dict and list subclasses) that carry the line of every key
and item, so validation can say `FILE:LINE: key: message`. Aliases are expanded with
a budget, so a "billion laughs" document is an error, not a hang.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

import yaml

MAX_NODES = 100_000
# libyaml's parser (in C, about 5x faster on a large config) where PyYAML was built
# with it, as Debian's python3-yaml and PyPI's wheels are; the pure-Python one else.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
STR_TAG = "tag:yaml.org,2002:str"


@dataclass(frozen=True)
class Where:
    """A place in a config file, printed as FILE:LINE."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class YamlError(Exception):
    """A file that is not readable YAML; `where` says where it went wrong."""

    def __init__(self, where: Where, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


class Mapping(dict[str, Any]):
    """A YAML mapping: a dict plus `where` (its own place) and `key_where` (each key's)."""

    where: Where
    key_where: dict[str, Where]


class Sequence(list[Any]):
    """A YAML sequence: a list plus `where` and `item_where` (each item's place)."""

    where: Where
    item_where: list[Where]


def located(value: Any, where: Where) -> Any:
    """Plain dicts and lists as Mapping and Sequence values that all sit at `where`: how a
    service read from another format (an inetd.conf line) goes through validation."""
    if isinstance(value, dict):
        mapping = Mapping((k, located(v, where)) for k, v in value.items())
        mapping.where, mapping.key_where = where, {k: where for k in value}
        return mapping
    if isinstance(value, list):
        seq = Sequence(located(v, where) for v in value)
        seq.where, seq.item_where = where, [where] * len(value)
        return seq
    return value


def load_file(path: str, only: str | None = None) -> Any:
    """Read and parse one YAML file into located values; raises YamlError or OSError.

    With `only`, just the top-level `only:` block is parsed, so that a mistake elsewhere
    in the file does not hide it.
    """
    with open(path, "rb") as f:
        check_trusted(path, os.fstat(f.fileno()))
        raw = f.read()
    try:
        text = raw.decode("utf-8", errors="strict" if only is None else "replace")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise YamlError(Where(path, line), f"not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    if only is not None:
        text = _only_block(text, only)
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise YamlError(Where(path, line), f"invalid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise YamlError(Where(path, 1), f"invalid YAML: {e}") from None
    except RecursionError:
        raise YamlError(Where(path, 1), "invalid YAML: nested too deeply") from None
    if node is None:
        return None
    try:
        return _Converter(path).convert(node)
    except RecursionError:
        raise YamlError(Where(path, 1), "nested too deeply") from None


def _only_block(text: str, key: str) -> str:
    """`text` with every line outside the top-level `key:` block blanked (so that line
    numbers stay true)."""
    lines = text.split("\n")
    inside = False
    for i, line in enumerate(lines):
        if line[:1] not in ("", " ", "\t", "#"):
            inside = line.startswith(key + ":")
        if not inside:
            lines[i] = ""
    return "\n".join(lines)


def check_trusted(path: str, info: os.stat_result) -> None:
    """Refuse a config someone other than its owner (root or netd's user) may change:
    whoever can write it can make netd run any program, often as root."""
    if info.st_uid not in (0, os.geteuid()):
        raise YamlError(Where(path, 1), f"owned by uid {info.st_uid}, neither root nor the "
                        "user netd runs as; refusing it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise YamlError(Where(path, 1), f"writable by others than its owner (mode "
                        f"{stat.S_IMODE(info.st_mode):04o}); refusing it: chmod go-w {path}")


class _Converter:
    def __init__(self, path: str) -> None:
        self.path = path
        self.budget = MAX_NODES
        self.scalars = yaml.SafeLoader("")
        self.places: dict[int, Where] = {}  # one Where per line, shared by what is on it

    def where(self, node: yaml.Node) -> Where:
        line = node.start_mark.line + 1
        place = self.places.get(line)
        if place is None:
            place = self.places[line] = Where(self.path, line)
        return place

    def convert(self, node: yaml.Node) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise YamlError(self.where(node), f"document expands to more than {MAX_NODES} "
                            "values (aliases nested too deep?)")
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node)
        if isinstance(node, yaml.SequenceNode):
            seq = Sequence(self.convert(item) for item in node.value)
            seq.where = self.where(node)
            seq.item_where = [self.where(item) for item in node.value]
            return seq
        if node.tag == STR_TAG:
            return node.value  # what construct_object would return, at a tenth of the cost
        try:
            return self.scalars.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise YamlError(self.where(node), f"invalid value: {e}") from None

    def mapping(self, node: yaml.MappingNode) -> Mapping:
        result = Mapping()
        result.where = self.where(node)
        result.key_where = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlError(self.where(key_node), "merge keys (<<) are not supported")
            key = self.convert(key_node)
            if not isinstance(key, str):
                raise YamlError(self.where(key_node), f"key {key!r} must be a string")
            if key in result:
                raise YamlError(self.where(key_node),
                                f"key '{key}' appears twice (first at line "
                                f"{result.key_where[key].line})")
            result.key_where[key] = self.where(key_node)
            result[key] = self.convert(value_node)
        return result
