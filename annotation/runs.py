"""What every use case shares: its context (where to write, how to report and stop), its result
(what to register), and reading a spec's options from the plain dict a job or a form carries.

    result = train_rm(spec, RunContext(output_dir=..., engine=engine, settings=settings))
    register_result(engine, result)          # or the job runner does it, in the transaction that marks success

A use case is one function in its layer (reward.usecases, ppo.usecases); the CLI calls it in
process, the worker calls the same function for a job, and pages submit the job. So its options,
defaults, validation and the registry row it produces are written once.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import logging
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from annotation.errors import AnnotationError, JobCancelled


@dataclass
class RunContext:
    """Plain callables and places: no app objects, so every layer can take one."""

    output_dir: Path
    """Where the use case writes what it trains (created by it; must not hold files yet)."""
    engine: Any = None
    """The store's Engine, for reading projects and registered models; None when the run needs none."""
    settings: Any = None
    """The settings object (model_dir, runs_dir, ...), passed in: lower layers never read it themselves."""
    progress: Callable[[float, str], None] = lambda fraction, message: None
    should_stop: Callable[[], bool] = lambda: False
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("rlhf.run"))

    def stop_if_asked(self, what: str = "the run") -> None:
        if self.should_stop():
            raise JobCancelled(f"{what} was cancelled")


@dataclass
class RunResult:
    """What a use case produced: the registry rows to write (paths inside output_dir), the main path,
    metrics, and anything else its callers print."""

    register: list[dict]
    path: str
    metrics: dict
    extra: dict = field(default_factory=dict)

    def moved(self, old: Path, new: Path) -> "RunResult":
        """The same result after output_dir was renamed from `old` to `new` (the CLI's staging)."""
        old, new = Path(old), Path(new)

        def move(path: str) -> str:
            p = Path(path)
            try:
                return str(new.resolve() / p.resolve().relative_to(old.resolve()))
            except ValueError:
                return path

        rows = [{**row, "path": move(row["path"])} for row in self.register]
        return dataclasses.replace(self, register=rows, path=move(self.path))

    def as_job_result(self) -> dict:
        return {"register": self.register, "path": self.path, "metrics": self.metrics, **self.extra}


def register_result(engine, result: RunResult) -> list[int]:
    """Write the result's registry rows in one transaction; their ids."""
    from annotation.registry import register_model
    from annotation.store import transaction

    with transaction(engine) as session:
        return [register_model(session, **row).id for row in result.register]


# --------------------------------------------------------------------------- specs


@functools.lru_cache(maxsize=None)
def field_help(cls) -> dict[str, str]:
    """Each dataclass field's one-line docstring (the string under it in the class body, as CleanRL
    and lm-human-preferences write them), base classes included: the CLI's --help, `rlhf
    ppo-options`, the pages and the job docs all read the help from here, so it is written once."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def spec_from_params(cls, params: dict, what: str, error=AnnotationError):
    """A `cls` dataclass from a job's or a form's params: unknown keys and wrong types are refused
    naming the key, then the spec validates itself."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise error(f"{what}: unknown param(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    # JSON has one number type: 2 for a float field is 2.0, as the CLI would have parsed it.
    params = {k: float(v) if hints.get(k) in (float, float | None) and type(v) is int else v for k, v in params.items()}
    try:
        spec = cls(**params)
    except TypeError as exc:
        raise error(f"{what}: {exc}") from None
    return spec.validate() if hasattr(spec, "validate") else spec


def fresh_output_dir(path: Path, option: str = "--output") -> Path:
    """`path`, which must not exist or be an empty directory."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AnnotationError(f"{option} {path}: already exists; choose a new run directory")
    return path
