"""Settings as dataclasses: what the engine's keyword mappings and the config groups become."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

C = TypeVar("C")


def to_config(cls: type[C], value: C | Mapping[str, Any] | None, what: str) -> C:
    """Build a config dataclass from a mapping, rejecting unknown keys by name; a class with
    a ``from_mapping`` classmethod (one schema per solver) builds itself."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping or {cls.__name__}, got {type(value).__name__}")
    if hasattr(cls, "from_mapping"):
        return cls.from_mapping(value, what)  # type: ignore[attr-defined]
    valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for key in value:
        if key not in valid:
            raise ValueError(f"unknown {what} key {key!r}; valid keys: {', '.join(valid)}")
    return cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items()})
