"""Command-line options generated from a stage's config dataclass.

Every field of a stage's config (declared with :func:`protoclip_cli.config.option`) becomes one
option of its command: the name (``--field-name``), the type, the help text and the default shown
come from the field, so they are written once. A command module says only how the command line
presents a field (:class:`Flag`: a positional argument, a short alias, a flag pair, an older name)
and adds the options that are not config fields (``--tsv``, ``--imagenet-root``). Every stage
command also takes ``--set FIELD=VALUE`` (any field, the value parsed as TOML, as in a recipe) and
``--workspace``.

Options are built here without importing anything heavy: the config dataclasses live in the stage
modules, whose top-level imports stay light so that ``--help`` is fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from protoclip_cli.cli.common import WorkspaceOption

STAGE_SET = typer.Option(
    None, "--set", metavar="FIELD=VALUE",
    help="Set a field of the stage's config by name, e.g. --set batch_size=64 (repeatable; the value is TOML).",
)  # fmt: skip

WORKSPACE = "workspace_path"
SET = "overrides"


@dataclass(frozen=True)
class Flag:
    """How the command line presents one config field (everything else comes from the field)."""

    names: tuple[str, ...] = ()  # option names; default ("--field-name",); bools may use "--on/--off"
    argument: bool = False  # a positional argument instead of an option
    hidden: bool = False  # set from other options by the command (still settable with --set)
    note: str = ""  # appended to the field's help, e.g. another default the command applies


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _base_type(hint: Any) -> tuple[Any, tuple[str, ...] | None, bool]:
    """(type for the command line, choices of a Literal or None, repeatable) of a field's annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin is typing.Literal:
        return str, tuple(str(a) for a in typing.get_args(hint)), False
    if origin in (tuple, list):
        item = typing.get_args(hint)[0]
        return item, None, True
    return hint, None, False


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def parameters(cls: type, flags: dict[str, Flag]) -> list[inspect.Parameter]:
    """One parameter per field of ``cls`` (arguments first), each with the field's default."""
    hints = typing.get_type_hints(cls)
    arguments, options = [], []
    for field in dataclasses.fields(cls):
        flag = flags.get(field.name, Flag())
        if flag.hidden:
            continue
        kind, choices, repeatable = _base_type(hints[field.name])
        help_text = " ".join(part for part in (field.metadata.get("help", ""), flag.note) if part)
        default = _field_default(field)
        shown = default not in ("", None, ())
        if repeatable:
            annotation, default = Optional[List[kind]], list(default) or None
            help_text += " Repeatable."
        else:
            annotation = Optional[kind]
        if flag.argument:
            info = typer.Argument(default, help=help_text, show_default=shown, metavar=field.name.upper())
            arguments.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
            continue
        names = flag.names or (flag_name(field.name),)
        if kind is bool and default is True and not flag.names:
            names = (f"{names[0]}/--no-{names[0][2:]}",)
        info = typer.Option(
            default, *names, help=help_text, show_default=shown and not (kind is bool and default is False),
            metavar="[" + "|".join(choices) + "]" if choices else None,
        )  # fmt: skip
        options.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
    return arguments + options


def stage_command(
    cls: type,
    run: Callable[[dict[str, Any], list[str], Any], None],
    *,
    doc: str,
    flags: dict[str, Flag] | None = None,
    extra: tuple[inspect.Parameter, ...] = (),
) -> Callable[..., None]:
    """A Typer command whose options are the fields of ``cls`` plus ``extra``, ``--set`` and
    ``--workspace``. It calls ``run(values, overrides, workspace_path)``: ``values`` holds every
    field and extra parameter by name, None where the command line did not give it (so that
    :func:`build_config` can tell a default from a choice)."""

    def command(ctx: typer.Context, **values: Any) -> None:
        overrides = list(values.pop(SET) or ())
        workspace_path = values.pop(WORKSPACE)
        for name in values:
            # Compared by name: Typer may carry its own copy of click's ParameterSource enum.
            source = ctx.get_parameter_source(name)
            if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
                values[name] = None
        run(values, overrides, workspace_path)

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += parameters(cls, flags or {})
    params += list(extra)
    params += [
        inspect.Parameter(SET, inspect.Parameter.KEYWORD_ONLY, default=STAGE_SET, annotation=Optional[List[str]]),
        inspect.Parameter(WORKSPACE, inspect.Parameter.KEYWORD_ONLY, default=WorkspaceOption, annotation=Optional[Path]),
    ]
    # Typer reads the parameters from the signature; the annotations live there, not in the function.
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {}
    command.__doc__ = doc
    return command


def build_config(cls: type, values: dict[str, Any], overrides: list[str], base: dict[str, Any] | None = None):
    """The config ``cls`` from ``base`` (command defaults), the options given in ``values`` and the
    ``--set`` overrides, validated by the config itself. A field set twice is an error."""
    from protoclip_cli import config as config_io

    names = {f.name for f in dataclasses.fields(cls)}
    # Click has already typed the options; repeatable ones arrive as lists for tuple fields.
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names and v not in (None, [])}
    from_set = config_io.check_values(cls, config_io.apply_overrides({}, overrides), "--set")
    twice = sorted(set(given) & set(from_set))
    if twice:
        raise config_io.ConfigError(f"{twice[0]} is given both as an option and with --set; pass it once.")
    return cls(**{**(base or {}), **given, **from_set})
