"""CLI options read from a use case's spec: the default and the help of an option are the spec
field's, so they are written once (in reward.usecases / ppo.usecases), as TRL's CLI reads its
options from its config dataclasses.

    epochs: float = spec_option(TrainRMSpec, "epochs")          # --epochs, default and help from the spec

    @cli.command()
    @spec_options(DPOSpec, "data", "project", "beta", *TRAINER_OPTIONS, flags={"learning_rate": ("--lr",)})
    def dpo(output: str = OutputOpt, as_json: bool = JsonOpt, **options): spec = DPOSpec(**options).validate() ...
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import typer

from annotation.runs import field_help


def spec_default(spec_cls, name: str) -> Any:
    f = next(f for f in dataclasses.fields(spec_cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{spec_cls.__name__}.{name} has no default")


def spec_option(spec_cls, name: str, *flags: str, required: bool = False, **kwargs) -> Any:
    """typer.Option for the field `name` of `spec_cls`: flag --field-name unless given, default and help from the field
    (`required`: no default, the command needs the option, as for a spec field whose default only means "not given")."""
    flags = flags or (f"--{name.replace('_', '-')}",)
    default = ... if required else spec_default(spec_cls, name)
    return typer.Option(default, *flags, help=field_help(spec_cls).get(name, ""), **kwargs)


def spec_options(spec_cls, *names: str, flags: dict[str, tuple[str, ...]] | None = None, required: tuple[str, ...] = ()):
    """A command decorator (under @cli.command): one option per named field of `spec_cls`, with the
    field's type, default and help (`flags`: other flags than --field-name; `required`: fields the
    command needs), before the command's own parameters. The command takes them as **options, named
    like the fields, so `spec_cls(**options)` builds the spec: an option is written once, in the spec,
    as TRL's CLI reads its options from its config dataclasses."""
    flags = flags or {}
    hints = typing.get_type_hints(spec_cls)
    keyword = inspect.Parameter.KEYWORD_ONLY

    def decorate(command):
        signature = inspect.signature(command)
        added = [inspect.Parameter(name, keyword, annotation=hints[name],
                                   default=spec_option(spec_cls, name, *flags.get(name, ()), required=name in required))
                 for name in names]
        own = [p.replace(kind=keyword) for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        command.__signature__ = signature.replace(parameters=added + own)
        return command

    return decorate
