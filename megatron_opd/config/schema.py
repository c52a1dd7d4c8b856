"""Typed config: dataclasses built from plain dicts (YAML), validated at load.

Every error names the field by its dotted path, the value given and what is allowed,
so a bad config fails before any process group or model is created.

Written by hand rather than with pydantic or OmegaConf: configs are plain
dataclasses that Megatron-style code passes around, and the checks we need (unknown
keys, exact types without silent coercion, ranges, cross-field rules) fit in this
one small module.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union

from megatron_opd.config.errors import ConfigError

T = TypeVar("T")


def fail(field: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{field}={value!r} is invalid: {allowed}")


def is_int(value: object) -> bool:
    """An integer and not a bool (YAML and JSON give `true` where a count was meant)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check(condition: bool, field: str, value: Any, allowed: str) -> None:
    if not condition:
        fail(field, value, allowed)


def _coerce(field: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own, more precise error
            return _coerce(field, value, candidates[0])
        for candidate in candidates:
            try:
                return _coerce(field, value, candidate)
            except ConfigError:
                continue
        fail(field, value, " or ".join(_describe(c) for c in candidates))
    if origin is Literal:
        check(value in args, field, value, f"one of {list(args)}")
        return value
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), field, value, f"a list of {_describe(args[0])}")
        return [_coerce(f"{field}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        check(isinstance(value, Mapping), field, value, f"a mapping of {annotation.__name__} fields")
        return from_dict(annotation, value, prefix=field)
    if annotation is float:
        # YAML writes 1e-6 as a string in some dumpers and 1 as an int: accept ints, not strings.
        check(isinstance(value, (int, float)) and not isinstance(value, bool), field, value, "a number")
        return float(value)
    if annotation is int:
        check(isinstance(value, int) and not isinstance(value, bool), field, value, "an integer")
        return value
    if annotation is bool:
        check(isinstance(value, bool), field, value, "true or false")
        return value
    if annotation is str:
        check(isinstance(value, str), field, value, "a string")
        return value
    if annotation is Any:
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {field}")


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return f"one of {list(typing.get_args(annotation))}"
    return getattr(annotation, "__name__", str(annotation))


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, type-checking every field and rejecting unknown keys.

    The dataclass's own `__post_init__` then runs its range and cross-field checks.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(dotted(k) for k in unknown)}; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(dotted(name), data[name], hints[name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {dotted(name)}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


__all__ = ["ConfigError", "check", "fail", "from_dict", "is_int", "to_dict"]
