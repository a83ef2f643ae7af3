"""Typed configuration: keyword-only dataclasses with a type, a range and a doc per field, and one
validation layer that every config of the project goes through.

Why dataclasses and not pydantic: the method layer (schedules) must import with numpy/scipy only,
and the rules we need are few and strict — YAML's loose scalars (``true`` for an int, ``10.5`` for a
step count, ``.nan`` for a learning rate, ``"2"`` for a node count) are errors, not coercions; an
option that does not apply to a schedule is an error; and every message names the file, the key
path, the bad value and what is allowed. That is ~200 lines here, in one place, with no dependency
whose coercion rules change under us.

Declare a config::

    @dataclass(kw_only=True)
    class TrainConfig(Config):
        max_steps: int = option(300, doc="optimizer steps of the run", ge=1)

Fields are checked when the object is built, however it is built (``TrainConfig(max_steps=0)`` or
``TrainConfig.from_dict(raw, where="recipe.yaml")``); nested configs and lists are checked element by
element. A failure is a `ConfigError` (a `UserError`) whose message is
``<where>: <key.path>: <problem>; <what is allowed>``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Union

from .errors import UserError

__all__ = ["Config", "ConfigError", "option", "parse_overrides", "merge", "describe_fields"]

_NO_DEFAULT = dataclasses.MISSING


class ConfigError(UserError):
    """A config value is wrong. ``key`` is its path from the top of the config."""

    def __init__(self, key: tuple[str, ...], detail: str):
        self.key = tuple(key)
        self.detail = detail
        super().__init__(f"{_dotted(self.key)}: {detail}" if self.key else detail)

    def under(self, *prefix: str) -> "ConfigError":
        return ConfigError(tuple(prefix) + self.key, self.detail)


def _dotted(key: tuple[str, ...]) -> str:
    out = ""
    for part in key:
        out += part if part.startswith("[") else (("." if out else "") + part)
    return out


def option(
    default: Any = _NO_DEFAULT,
    *,
    doc: str,
    default_factory: Any = _NO_DEFAULT,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    repr: bool = True,
) -> Any:
    """A config field: its default, a one-line ``doc`` and an optional numeric range."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=default_factory, metadata=meta, repr=repr)
    return dataclasses.field(default=default, metadata=meta, repr=repr)


# ---------------------------------------------------------------------------------------------
# Checking one value against a type

# YAML 1.1 (PyYAML) reads 1e-3 (no dot) as a string; such strings are the one coercion we allow.
_YAML_EXP_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+$")


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, Config):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _check_range(value: float, meta: Mapping) -> str | None:
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    lo = f"[{ge}" if ge is not None else (f"({gt}" if gt is not None else "(-inf")
    hi = f"{le}]" if le is not None else (f"{lt})" if lt is not None else "inf)")
    bad = (ge is not None and value < ge) or (gt is not None and value <= gt) or (
        le is not None and value > le) or (lt is not None and value >= lt)
    return f"{_fmt(value)} is out of range; allowed: {lo}, {hi}" if bad else None


def check_value(value: Any, tp: Any, key: tuple[str, ...] = (), meta: Mapping | None = None) -> Any:
    """``value`` checked against the type ``tp`` (and ``meta``'s range); returns the value to store."""
    meta = meta or {}
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        alts = typing.get_args(tp)
        if value is None and type(None) in alts:
            return None
        errors = []
        for alt in alts:
            if alt is type(None):
                continue
            try:
                return check_value(value, alt, key, meta)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"{_fmt(value)} is not {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(key, f"{_fmt(value)} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"{_fmt(value)} is not a list; write a YAML list, e.g. [a, b]")
        (item_tp,) = typing.get_args(tp)
        return [check_value(v, item_tp, key + (f"[{i}]",), meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"{_fmt(value)} is not a mapping (key: value)")
        _, val_tp = typing.get_args(tp)
        return {str(k): check_value(v, val_tp, key + (str(k),), meta) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        try:
            return tp.from_dict(value)
        except ConfigError as e:
            raise e.under(*key) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"{_fmt(value)} is not true or false")
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"{_fmt(value)} is not an integer")
        problem = _check_range(value, meta)
        if problem:
            raise ConfigError(key, problem)
        return value
    if tp is float:
        if isinstance(value, str) and _YAML_EXP_FLOAT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"{_fmt(value)} is not a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, f"{value} is not a finite number")
        problem = _check_range(value, meta)
        if problem:
            raise ConfigError(key, problem)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"{_fmt(value)} is not a string")
        return value
    raise TypeError(f"configs: unsupported field type {tp!r}")  # a bug in a config class, not user input


# ---------------------------------------------------------------------------------------------
# Config classes


class Config:
    """Base of every config class: checked on construction, read from and written to plain dicts.

    Subclasses are ``@dataclass(kw_only=True)`` with `option` fields. A subclass may override
    ``validate()`` for checks across fields (raise `ConfigError` with the key).
    """

    _hints_cache: ClassVar[dict] = {}

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        hints = Config._hints_cache.get(cls)
        if hints is None:
            hints = typing.get_type_hints(cls)
            Config._hints_cache[cls] = hints
        return hints

    def __post_init__(self) -> None:
        hints = self._hints()
        for f in dataclasses.fields(self):
            checked = check_value(getattr(self, f.name), hints[f.name], (f.name,), f.metadata)
            object.__setattr__(self, f.name, checked)
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields (override in subclasses)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Any, *, where: str | None = None):
        """Build from a mapping (a YAML/JSON section). ``where`` (a file name) prefixes errors."""
        try:
            if isinstance(data, cls):
                return data
            if data is None:
                data = {}
            if not isinstance(data, Mapping):
                raise ConfigError((), f"{_fmt(data)} is not a mapping (key: value) for {cls.__name__}")
            names = cls.field_names()
            unknown = [k for k in data if k not in names]
            if unknown:
                raise ConfigError(
                    (str(unknown[0]),),
                    f"unknown key in {cls.__name__}; allowed: {', '.join(names) or '(none)'}",
                )
            return cls(**dict(data))
        except ConfigError as e:
            if where is None:
                raise
            raise UserError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        """A plain, JSON/YAML-ready dict that `from_dict` reads back to an equal config."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.repr:  # bulky derived data (e.g. a schedule's loaded multipliers) is not saved
                continue
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def replace(self, **changes):
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def describe_fields(cls: type[Config]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, doc) for each field: for generated docs and ``--help`` texts."""
    hints = cls._hints()
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not _NO_DEFAULT:
            default = repr(f.default)
        elif f.default_factory is not _NO_DEFAULT:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("doc", "")))
    return rows


# ---------------------------------------------------------------------------------------------
# Command-line overrides: parsed once, at the edge


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """``["train.max_steps=50", "schedule.name=cosine"]`` → ``{"train": {"max_steps": 50}, ...}``.

    Values are read as YAML scalars (``50`` an int, ``1e-3`` a string the float fields accept,
    ``[a, b]`` a list). The result is merged into the file's mapping with `merge` and validated
    with the rest, so an override is checked exactly like the same key in the file.
    """
    import yaml

    out: dict = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise UserError(f"override {item!r} is not key=value; write e.g. train.max_steps=50")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override {item!r}: {p!r} was set to a value above, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def merge(base: Mapping | None, update: Mapping | None) -> dict:
    """``base`` with ``update`` merged in, recursively for mappings (neither is modified)."""
    import copy

    out = copy.deepcopy(dict(base or {}))
    for k, v in (update or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
