"""CLI options read from a use case's spec: the default and the help of an option are the spec
field's, so they are written once (in reward.usecases / ppo.usecases), as TRL's CLI reads its
options from its config dataclasses.

    epochs: float = spec_option(TrainRMSpec, "epochs")          # --epochs, default and help from the spec
"""

from __future__ import annotations

import dataclasses
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


def spec_option(spec_cls, name: str, *flags: str, **kwargs) -> Any:
    """typer.Option for the field `name` of `spec_cls`: flag --field-name unless given, default and help from the field."""
    flags = flags or (f"--{name.replace('_', '-')}",)
    return typer.Option(spec_default(spec_cls, name), *flags, help=field_help(spec_cls).get(name, ""), **kwargs)
