"""Command-line options generated from the config dataclasses, and the one precedence rule.

A command names the fields it offers as flags; everything about each flag comes from the field:

    @options_from(DescribeConfig, "generate.max_new_tokens", Flag("batch_size", "-b"), …)

- the name: ``--max-new-tokens`` (the last part of the key), or the spelling a ``Flag`` gives;
- the type: int/float/str, ``Literal`` → a choice, ``bool`` → a switch that flips the field's default
  (``--sample`` when the default is false, ``--no-stream`` when it is true);
- the help: the field's ``doc``, the dotted key it sets and the dataclass default, so help text cannot
  drift from the code.

**Precedence**, the same in every command (lowest first):

    dataclass defaults  <  --config RECIPE  <  KEY=VALUE arguments  <  explicit flags

A flag is the most specific thing a user types, so it wins; ``KEY=VALUE`` reaches every setting,
including those without a flag. ``config_overrides`` returns the list in that order for
``load_config``, whose later entries win.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import click

FLAGS_KEY = "mgpt4.flags"  # ctx.meta: {target: {dotted key: value}} of the flags given


class Flag:
    """A field offered under another spelling than ``--last-part-of-the-key``.

    ``names`` are the option's spellings (``"--out", "-o"``); a lone short name (``"-b"``) keeps the
    generated long one. ``type`` and ``metavar`` override what the annotation gives (a path that must
    exist, a pattern such as ``none|rules|openai|hf:PATH``).
    """

    def __init__(self, key: str, *names: str, type: Any = None, metavar: str | None = None) -> None:  # noqa: A002
        self.key = key
        self.names = names
        self.type = type
        self.metavar = metavar


def options_from(cls: type, *fields: str | Flag, target: str = "config") -> Callable[[Callable], Callable]:
    """Click options for ``fields`` of dataclass ``cls`` (dotted keys, or ``Flag``s), in that order.

    The values of the flags a user gives are kept in ``ctx.meta`` under ``target`` (read them with
    ``given_flags`` or ``config_overrides``); the command function does not receive them as arguments.
    """
    specs = [f if isinstance(f, Flag) else Flag(f) for f in fields]
    options = [_option(cls, spec, target) for spec in specs]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def given_flags(ctx: click.Context, target: str = "config") -> dict[str, Any]:
    """The dotted keys and values of the generated flags given on this command line."""
    return dict(ctx.find_root().meta.get(FLAGS_KEY, {}).get(target, {}))


def config_overrides(ctx: click.Context, key_values: Sequence[str], target: str = "config") -> list[str]:
    """``KEY=VALUE`` overrides for ``load_config``, in precedence order: ``key_values``, then the flags."""
    flags = [f"{key}={json.dumps(value)}" for key, value in given_flags(ctx, target).items()]
    return [*key_values, *flags]


def config_option(fn: Callable) -> Callable:
    """``--config/-c RECIPE``: a recipe YAML (a path, or a built-in name from ``mgpt4 recipes``)."""
    return click.option(
        "--config",
        "-c",
        "config_path",
        default=None,
        metavar="RECIPE",
        help="recipe YAML: a path, or a built-in name from `mgpt4 recipes` (lowest precedence)",
    )(fn)


def output_options(fn: Callable) -> Callable:
    """``--json`` (the result as JSON on stdout) and ``--quiet/-q`` (warnings only) for commands whose
    config does not carry them."""
    fn = click.option("--quiet", "-q", is_flag=True, help="warnings only on stderr, no summary")(fn)
    return click.option("--json", "as_json", is_flag=True, help="print the result as JSON on stdout")(fn)


def split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Positional arguments → (inputs, ``key.sub=value`` overrides); an existing path is always an input."""
    inputs, overrides = [], []
    for arg in args:
        is_override = "=" in arg and arg.partition("=")[0].replace(".", "").replace("_", "").isalnum()
        (overrides if is_override and not os.path.exists(arg) else inputs).append(arg)
    return inputs, overrides


# --------------------------------------------------------------------------------------------------
# one option from one field
# --------------------------------------------------------------------------------------------------


def _option(cls: type, spec: Flag, target: str) -> Callable[[Callable], Callable]:
    field, hint, default = field_info(cls, spec.key)
    doc = field.metadata.get("doc", "")
    hint = _unwrap_optional(hint)
    # Config flags name the key they set (help teaches KEY=VALUE); other targets have no such key.
    shown_key = spec.key if target == "config" else ""
    long_names = [n for n in spec.names if n.startswith("--")]
    short_names = [n for n in spec.names if not n.startswith("--")]
    if hint is bool:
        # A switch that flips the default: --sample (default false), --no-stream (default true).
        value = not default
        name = long_names or [f"--{'' if value else 'no-'}{_dashed(spec.key)}"]
        help_text = f"{doc}  [sets {spec.key}={_yaml(value)}]" if shown_key else doc
        kwargs: dict[str, Any] = {"is_flag": True, "flag_value": value, "default": None}
    else:
        name = long_names or [f"--{_dashed(spec.key)}"]
        shown = [shown_key] + ([] if default is None else [f"default: {_yaml(default)}"])
        help_text = f"{doc}  [{'; '.join(s for s in shown if s)}]" if any(shown) else doc
        kwargs = {"type": spec.type or _click_type(hint, spec.key), "default": None}
        if spec.metavar:
            kwargs["metavar"] = spec.metavar

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.find_root().meta.setdefault(FLAGS_KEY, {}).setdefault(target, {})[spec.key] = value
        return value

    return click.option(
        *name, *short_names, cls=FieldOption, config_class=cls, key=spec.key, help=help_text,
        expose_value=False, callback=remember, **kwargs,
    )  # fmt: skip


class FieldOption(click.Option):
    """A flag generated from a config field: remembers which class and dotted key it sets."""

    def __init__(self, *args: Any, config_class: type, key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config_class = config_class
        self.key = key


def field_info(cls: type, key: str) -> tuple[dataclasses.Field, Any, Any]:
    """The field, its type hint and its default for dotted ``key`` of dataclass ``cls``.

    Raises:
        KeyError: no such field (a programming error in a command's option list).
    """
    defaults: Any = cls()
    parts = key.split(".")
    for part in parts[:-1]:
        cls = typing.get_type_hints(cls)[part]
        defaults = getattr(defaults, part)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if parts[-1] not in fields:
        raise KeyError(f"{cls.__name__} has no field {parts[-1]!r} (option for {key})")
    return fields[parts[-1]], typing.get_type_hints(cls)[parts[-1]], getattr(defaults, parts[-1])


def _unwrap_optional(hint: Any) -> Any:
    """``X | None`` → ``X`` (not giving the flag is how None is chosen)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _click_type(hint: Any, key: str) -> Any:
    if typing.get_origin(hint) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(hint)])
    if hint in (int, float, str):
        return hint
    raise TypeError(f"{key}: no command-line type for {hint!r}; set it with {key}=VALUE")


def _dashed(key: str) -> str:
    return key.rsplit(".", 1)[-1].replace("_", "-")


def _yaml(value: Any) -> str:
    """A default as a user would write it after ``KEY=`` (true, 0.9, a string as it is)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class RunByDefaultGroup(click.Group):
    """``mgpt4 CMD [OPTIONS]`` runs the subcommand ``run``; ``mgpt4 CMD NAME`` another one (``curate review``,
    ``download report``). A first argument that is an existing file stays an input of ``run``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not self.no_args_is_help:
            args = ["run"]
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, Any, list[str]]:
        if args and args[0] in self.commands and not os.path.exists(args[0]):
            return super().resolve_command(ctx, args)
        return "run", self.commands["run"], args

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        run_cmd = self.commands["run"]
        run_cmd.format_help(click.Context(run_cmd, info_name=ctx.info_name, parent=ctx.parent), formatter)
        self.format_commands(ctx, formatter)
