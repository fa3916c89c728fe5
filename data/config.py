"""Typed configs that round-trip through JSON.

Every component has one dataclass config that inherits :class:`JsonConfig`. Fields are documented in the
class docstring (``Attributes:``) and validated in ``__post_init__`` with :class:`~data.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import Self

from data.errors import ConfigError

C = TypeVar("C", bound="JsonConfig")


class JsonConfig:
    """Mixin for dataclass configs: ``to_dict``/``from_dict`` and ``to_json``/``from_json``.

    ``from_dict`` rejects unknown keys (a typo must not be silently ignored) and converts lists back to
    tuples for tuple-typed fields, so ``from_json(cfg.to_json()) == cfg`` holds.
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        if not isinstance(values, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            kwargs[name] = _coerce(hints.get(name), value)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong arity etc.
            raise ConfigError(f"{cls.__name__}: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__}: config is not valid JSON ({exc})") from exc

    def save(self, path: str | Path) -> None:
        from data.io import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.from_json(Path(path).read_text())


def _coerce(hint: Any, value: Any) -> Any:
    """Turn JSON values back into the dataclass field's type (lists -> tuples, dicts -> nested configs)."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, JsonConfig) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(hint):
            if arg is type(None) and value is None:
                return None
            if isinstance(arg, type) and issubclass(arg, JsonConfig) and isinstance(value, dict):
                return arg.from_dict(value)
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return _coerce(arg, value)
    return value


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (never use ``assert``)."""
    if not condition:
        raise ConfigError(message)
