"""Typed configs: frozen dataclasses read from and written to YAML, every key and value checked against the
declared type (:class:`ConfigError` naming the key, the value and what is allowed). Generic: the model's
config tree is :mod:`almtok_jax.config`, the training one :mod:`almtok_jax.train.config`."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from etils import epath

T = TypeVar("T")

class ConfigError(ValueError):
    """A config key or value that its dataclass does not allow; the message names key, value and what is
    allowed."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _allowed(tp: Any) -> str:
    """What a value of annotation ``tp`` may be, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_dataclass_type(tp):
        return f"a mapping of {tp.__name__} keys"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _allowed(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_allowed(args[0])})"
        return f"a list of {len(args)} values ({', '.join(_allowed(a) for a in args)})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _build(tp: Any, value: Any, where: str) -> Any:
    """Turn plain YAML data into a value of annotation ``tp`` (dataclasses, tuples, optionals, literals,
    scalars), raising :class:`ConfigError` naming ``where``, the value and what is allowed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{where}: {value!r} is not allowed; expected {_allowed(tp)}")

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad()
        return from_dict(tp, value, where)
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool):
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{where}: unsupported config annotation {tp}")
        try:
            return _build(inner[0], value, where)
        except ConfigError:
            raise bad() from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad()
        return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"{where}: unsupported config annotation {tp}")


def from_dict(cls: type[T], data: Mapping, where: str | None = None, *, complete: bool = False) -> T:
    """Build dataclass ``cls`` from plain nested data, checking every key and every value against its
    declared type (:class:`ConfigError` naming the key). Missing keys keep their defaults, unless
    ``complete``: then every field must be given (files whose reader has no defaults, e.g. ``sq_config.yaml``)."""
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {data!r} is not allowed; expected a mapping of {cls.__name__} keys")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown} (known: {sorted(fields)})")
    missing = [f for f in fields if f not in data]
    if complete and missing:
        raise ConfigError(f"{where}: missing config keys {missing}; every one of {fields} is needed")
    kwargs = {k: _build(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own consistency check (__post_init__)
        raise ConfigError(f"{where}: {e}") from None


def to_dict(config: Any) -> Any:
    """Plain nested dicts/lists, ready for YAML."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    return config


def read_yaml(path: str | Path) -> Any:
    """The plain data of a YAML file; a missing file or bad YAML is a :class:`ConfigError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid YAML (not UTF-8 text: {e.reason} at byte {e.start})") from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a config of type ``cls`` from a YAML file."""
    return from_dict(cls, read_yaml(path), where=str(path))


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a config as YAML (keys in field order, every value); ``path`` may be a URI (``etils.epath``)."""
    with epath.Path(path).open("w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)


def override(config: T, assignments: list[str]) -> T:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars, then type-checked) to a nested
    dataclass."""
    data = to_dict(config)
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"override {item!r}: no config section {p!r}")
            node = node[p]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"override {item!r}: no config key {leaf!r}")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    return from_dict(type(config), data)
