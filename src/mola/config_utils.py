"""Typed-dataclass config helpers: build a dataclass from a plain dict, with unknown-key and type errors."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

C = TypeVar("C")


def _unknown_key(cls: type, key: str, where: str) -> ValueError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown config key {where + key!r}.{hint} Valid keys: {', '.join(names)}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert_union(tp: Any, value: Any, where: str) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _convert(a, value, where)
        except (ValueError, TypeError) as err:
            errors.append(err)
    if len(errors) == 1:  # one real alternative (X | None): its own message is the most precise
        raise errors[0]
    raise ValueError(f"config key {where!r}: {value!r} does not match type {tp}")


def _convert_generic(tp: Any, origin: Any, value: Any, where: str) -> Any:
    """Literal, list/tuple and dict types."""
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ValueError(f"config key {where!r}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {where!r} must be a list, got {value!r}")
        args = get_args(tp)
        out = [_convert(args[0] if args else Any, v, where) for v in value]
        return out if origin is list else tuple(out)
    if not isinstance(value, dict):
        raise ValueError(f"config key {where!r} must be a mapping, got {value!r}")
    kt, vt = get_args(tp) or (Any, Any)
    return {_convert(kt, k, where): _convert(vt, v, where) for k, v in value.items()}


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"config key {where!r} must be true/false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config key {where!r} must be an integer, got {value!r}")
    return value


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config key {where!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"config key {where!r} must be a finite number, got {value!r}")
    return float(value)


def _to_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"config key {where!r} must be a string, got {value!r}")
    return value


#: the scalar types a config field may have, and their checked conversion
_SCALARS: dict[Any, Any] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against (and converted to) type ``tp``; a ValueError naming the key ``where``."""
    origin = get_origin(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config key {where!r} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, where)
    if origin in (typing.Literal, list, tuple, dict):
        return _convert_generic(tp, origin, value, where)
    convert = _SCALARS.get(tp)
    return convert(value, where) if convert is not None else value


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names the same key twice."""


class AliasBombError(yaml.YAMLError):
    """A YAML document whose anchors/aliases expand to more values than a config can sensibly hold."""


MAX_EXPANDED_NODES = 100_000
"""Most values a YAML document may hold once its aliases are expanded (a real config holds a few hundred)."""

_SCIENTIFIC = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
"""``1e-3``, ``1.0e12``: numbers in scientific notation that YAML 1.1 reads as strings (it wants a dot and a
signed exponent)."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Number of nodes of ``root`` with every alias expanded, counted on the composed graph (each distinct node
    once, memoized), so an alias bomb is measured without being built; stops counting past ``limit``."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = limit + 1  # a node reached again while being counted is a cycle: count it as too big
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(root)


def safe_load_unique(text: str, max_nodes: int = MAX_EXPANDED_NODES) -> Any:
    """``yaml.safe_load`` that refuses a mapping with the same key twice (plain YAML keeps the last silently):
    a ``yaml.YAMLError`` naming the key and both lines. Anchors/aliases that expand to more than ``max_nodes``
    values (an alias bomb) are an ``AliasBombError``, found on the composed node graph before any value is
    built. ``1e-3`` reads as a number."""
    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(f"duplicate key {key!r} (lines {seen[key]} and {line}); YAML would "
                                        "silently keep only the last value")
            seen[key] = line
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _SCIENTIFIC, list("-+0123456789"))
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, max_nodes) > max_nodes:
            raise AliasBombError(f"its anchors/aliases expand to more than {max_nodes} values (an alias bomb?); "
                                 "write the values out instead of nesting aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from a plain dict, checking key names and value types recursively."""
    hints = get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, key, prefix)
        kwargs[key] = _convert(hints[key], value, prefix + key)
    return cls(**kwargs)
