"""The reward side's use cases, each written once for the CLI, the worker and the pages.

    spec = TrainRMSpec(project="demo", epochs=3).validate()
    result = train_rm(spec, RunContext(output_dir=Path("runs/rm-1"), engine=engine, settings=settings))

`rlhf train-rm` calls train_rm in process (into a staging directory it renames at the end), the
`train_rm` job calls it in the worker (into the job's run directory), and the Reward Models page
submits that job after validating the spec, so a bad value shows on the form.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from annotation.runs import RunContext, RunResult
from reward.errors import RewardError
from reward.train import TrainParams

AGGREGATIONS = ("majority", "dawid-skene")


@dataclasses.dataclass
class TrainRMSpec(TrainParams):
    """A reward-model training run: where the pairs come from, how the model is registered, and
    every TrainParams field."""

    data: str | None = None
    """Labelled preference file (trl, trl-conversational, hh); give this or project."""
    project: str | None = None
    """Train on a project's aggregated labels (its export's train split; the test split is held out)."""
    aggregation: str = "majority"
    """Label aggregation for a project: majority or dawid-skene."""
    eval_fraction: float = 0.1
    """Share of a data file's pairs held out for evaluation (split by pair hash, so it never changes)."""
    split: str = "train"
    """Which split of a project trains the model (the other is held out): train, or test for an
    independent judge that shares no pair with a model trained on train (see rlhf ppo --judge)."""
    name: str | None = None
    """Registry name of the model."""
    parent_id: int | None = None
    """Registry id of the model this one replaces; default: the project's active reward model."""

    def validate(self) -> "TrainRMSpec":
        super().validate()
        if bool(self.data) == bool(self.project):
            raise RewardError("give exactly one of --data FILE or --project NAME")
        if self.aggregation not in AGGREGATIONS:
            raise RewardError(f"--aggregation {self.aggregation!r} is invalid; expected one of {', '.join(AGGREGATIONS)}")
        if self.split not in ("train", "test"):
            raise RewardError(f"--split {self.split!r} is invalid; expected train or test")
        if self.split != "train" and not self.project:
            raise RewardError("--split applies to --project (a project's export split); a --data file is split by --eval-fraction")
        if not 0 < self.eval_fraction < 1:
            raise RewardError(f"--eval-fraction {self.eval_fraction!r} is invalid; expected a fraction in (0, 1)")
        if self.name is not None:
            from annotation.names import registry_name

            self.name = registry_name(self.name, self.name, "--name")
        return self

    def train_params(self) -> TrainParams:
        own = {f.name for f in dataclasses.fields(TrainParams)}
        return TrainParams(**{k: v for k, v in dataclasses.asdict(self).items() if k in own})

    def source(self) -> dict:
        return {"project": self.project, "split": self.split} if self.project else {"data": str(self.data)}


def train_rm(spec: TrainRMSpec, ctx: RunContext) -> RunResult:
    """Train (and evaluate) a reward model into ctx.output_dir; the result registers it."""
    from annotation.registry import active_model
    from annotation.store import reading
    from reward.data import project_id_of, training_data
    from reward.train import train_reward_model

    spec.validate()
    name = spec.name or Path(ctx.output_dir).name
    ctx.progress(0.0, f"loading pairs from {'project ' + repr(spec.project) if spec.project else spec.data}")
    train, held = training_data(data=spec.data, project=spec.project, engine=ctx.engine, aggregation=spec.aggregation,
                                margin=spec.margin, eval_fraction=spec.eval_fraction, split=spec.split)
    project_id = project_id_of(ctx.engine, spec.project)
    parent_id = spec.parent_id
    if parent_id is None and project_id is not None:
        with reading(ctx.engine) as session:
            current = active_model(session, project_id)
            parent_id = current.id if current else None
    ctx.log.info(f"{len(train)} training pairs, {len(held)} held out")
    ctx.stop_if_asked("reward-model training")
    result = train_reward_model(train, Path(ctx.output_dir), spec.train_params(), eval_pairs=held or None,
                                settings=ctx.settings, progress=lambda f, m: ctx.progress(0.02 + 0.97 * f, m),
                                check=lambda: ctx.stop_if_asked("reward-model training"), log=ctx.log)
    metrics = json.loads(json.dumps(result["metrics"], default=float))
    row = {"kind": "reward", "name": name, "path": str(Path(result["path"]).resolve()), "base_model": result["base_model"],
           "project_id": project_id, "data_hash": result["data_hash"], "data_rows": result["data_rows"],
           "params": {**result["params"], "aggregation": spec.aggregation, "source": spec.source()},
           "metrics": metrics, "parent_id": parent_id}
    return RunResult(register=[row], path=row["path"], metrics=metrics,
                     extra={"train_pairs": len(train), "eval_pairs": len(held), "data_hash": result["data_hash"]})
