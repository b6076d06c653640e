"""Typed, frozen configs loaded from TOML recipes.

A recipe is a TOML file whose tables map one to one onto nested frozen dataclasses. Every field is
declared with :func:`option`, whose ``help`` text documents the recipe key (``protoclip train
--explain`` prints it) and, for a stage's config, the command-line option generated from it.
Unknown keys and wrong types are errors naming the file, the key and the allowed names; values a
type cannot rule out are checked by each config's ``__post_init__`` with :func:`require` and
:func:`check_choices`, so no invalid config can be built. ``--set section.key=value`` overrides any field, the value parsed as TOML
(``--set optim.lr=1e-4``, ``--set data.dataset=cc3m``; a bare word is taken as a string).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from protoclip_cli.errors import ProtoclipError

T = TypeVar("T")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and the help text of its recipe key."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


class ConfigError(ProtoclipError):
    pass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}.")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}.")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}.")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [_coerce(v, item, where) for v in value]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table [{where.split(': ')[-1]}], got {value!r}.")
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}.")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}.")
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    return cls(**check_values(cls, data, where))


def check_values(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data``'s values for fields of ``cls``, type-checked and coerced (nested tables built);
    an unknown key or a wrong type is a :class:`ConfigError` naming ``where`` and the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = where.split(": ", 1)
    source, path = (prefix[0], prefix[1] + ".") if len(prefix) == 2 else (where, "")
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{path}{unknown[0]}'; allowed in "
            f"{'[' + path.rstrip('.') + ']' if path else 'the top level'}: {', '.join(fields)}."
        )
    return {k: _coerce(v, hints[k], f"{source}: {path}{k}") for k, v in data.items()}


# -- validation: every config checks itself in __post_init__ with these ---------------------------


def require(condition: bool, message: str) -> None:
    """Raise a :class:`ConfigError` with ``message`` (one sentence naming the setting) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def check_choices(config: Any, label: Callable[[str], str] = lambda name: "--" + name.replace("_", "-")) -> None:
    """Every ``Literal`` field of ``config`` holds one of its values; the error names the field by
    ``label(name)`` (a stage's command-line option by default)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        if typing.get_origin(hints[field.name]) is typing.Literal:
            allowed = typing.get_args(hints[field.name])
            value = getattr(config, field.name)
            require(value in allowed, f"{label(field.name)} {value!r} is not one of {', '.join(map(str, allowed))}.")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>") -> T:
    """Build the dataclass ``cls`` from plain data, validating keys and types."""
    return _build(cls, data, source)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set optim.lr=1e-4.")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` override set."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{key}' is a value, not a section.")
        node[keys[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Recipe {path} is a folder; pass a TOML file such as recipes/synthetic.toml.")
    if not path.is_file():
        raise ConfigError(f"Recipe {path} does not exist; pass a TOML file such as recipes/synthetic.toml.")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not a text file (byte {exc.start} is not UTF-8); pass a TOML recipe such as recipes/synthetic.toml."
        ) from exc


def load(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load a TOML recipe into ``cls``, with ``--set`` overrides applied."""
    data = apply_overrides(read_toml(path), overrides)
    return from_dict(cls, data, source=str(path))


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (TOML-serialisable: no None, tuples as lists)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(config))


def dumps(config: Any) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(config))


def explain(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field, nested tables flattened with dots."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(explain(tp, prefix=f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((prefix + f.name, _type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows
