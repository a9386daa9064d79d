"""The reward side's use cases, each written once for the CLI, the worker and the pages: train_rm,
eval_rm and score_queue.

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


# --------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalRMSpec:
    """Evaluate a reward model on labelled pairs (reward.evaluate): accuracy, margin, Bradley-Terry
    log-loss, calibration (ECE), agreement and length-bias breakdowns. The eval_rm job and `rlhf eval-rm`."""

    model: str = ""
    """Run directory, ensemble directory, or registered model id/name."""
    data: str | None = None
    """Labelled preference file (trl, trl-conversational, hh); give this or project."""
    project: str | None = None
    """Evaluate on a project's pairs instead."""
    split: str | None = None
    """With project: train or test (default test, the pairs a model trained on the project held out)."""
    aggregation: str = "majority"
    """Label aggregation for a project: majority or dawid-skene."""
    batch_size: int = 32
    """Pairs scored per batch."""

    def validate(self) -> "EvalRMSpec":
        if not self.model:
            raise RewardError("--model is required: a run directory, an ensemble directory, or a registered model's id or name")
        if bool(self.data) == bool(self.project):
            raise RewardError("give exactly one of --data FILE or --project NAME")
        if self.split not in (None, "train", "test"):
            raise RewardError(f"--split {self.split!r} is invalid; expected train or test")
        if self.aggregation not in AGGREGATIONS:
            raise RewardError(f"--aggregation {self.aggregation!r} is invalid; expected one of {', '.join(AGGREGATIONS)}")
        if self.batch_size < 1:
            raise RewardError(f"--batch-size must be at least 1, got {self.batch_size}")
        return self


def eval_rm(spec: EvalRMSpec, ctx: RunContext) -> RunResult:
    """Score spec's pairs with the reward model and compute every metric (reward.evaluate); writes
    eval.json into ctx.output_dir. A registered id or name is looked up in ctx.engine."""
    from annotation.registry import get_model
    from annotation.store import reading
    from reward.data import load_pairs
    from reward.evaluate import evaluate_model

    spec.validate()
    model = str(spec.model)
    if not Path(model).is_dir():
        if ctx.engine is None:
            raise RewardError(f"--model {model}: not a directory")
        with reading(ctx.engine) as session:
            model = get_model(session, model).path
    ctx.progress(0.0, "loading pairs")
    pairs = load_pairs(data=spec.data, project=spec.project, engine=ctx.engine,
                       split=spec.split or ("test" if spec.project else None), aggregation=spec.aggregation)
    ctx.stop_if_asked("reward-model evaluation")
    ctx.progress(0.1, f"scoring {len(pairs)} pairs")
    metrics = evaluate_model(model, pairs, batch_size=spec.batch_size)
    out = Path(ctx.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    ctx.log.info(f"accuracy {metrics['accuracy']:.3f} on {metrics['n_pairs']} pairs")
    return RunResult(register=[], path=str(out / "eval.json"), metrics=metrics)


# --------------------------------------------------------------------------- the annotation queue

QUEUE_MEASURES = ("auto", "margin", "disagreement")


@dataclasses.dataclass
class ScoreQueueSpec:
    """Score a project's open items with a reward model and order its annotation queue by how
    unsure the model is (annotation.selection): the score_queue job and `rlhf project score`."""

    project: str
    """The project whose queue is ordered (its selection should be uncertainty; random ignores keys)."""
    model: str | None = None
    """Registered reward model id or name, or a model directory; default: the project's active reward model."""
    measure: str = "auto"
    """margin (1 - confidence of the preferred response), disagreement (an ensemble's spread on
    r_A - r_B), or auto: disagreement for an ensemble, margin for a single model."""
    seed: int = 0
    """Which items the calibration share draws at random."""
    batch_size: int = 32
    """Responses scored per forward pass."""

    def validate(self) -> "ScoreQueueSpec":
        if not self.project:
            raise RewardError("score_queue needs a project")
        if self.measure not in QUEUE_MEASURES:
            raise RewardError(f"--measure {self.measure!r} is invalid; expected one of {', '.join(QUEUE_MEASURES)}")
        if self.batch_size < 1:
            raise RewardError(f"--batch-size must be at least 1, got {self.batch_size}")
        return self


def queue_scores(scorer, items, measure: str, batch_size: int = 32):
    """Per item (indexed like `items`: prompt, response_a, response_b, responses): p_a (pairs), top
    (rankings: the stored index the model ranks first) and uncertainty, larger = less sure.

    A pair's margin uncertainty is 1 - max(P(A), P(B)) with P(A) = sigmoid(r_A - r_B); a ranking's
    is that of its closest pair of responses (adjacent by reward), where a wrong order costs most.
    Disagreement is the ensemble members' standard deviation of the same reward difference."""
    import numpy as np
    import pandas as pd
    from scipy.special import expit

    from reward.second_opinion import member_rewards

    ensemble = hasattr(scorer, "member_scores")
    if measure == "disagreement" and not ensemble:
        raise RewardError("--measure disagreement needs an ensemble reward model (train-rm --ensemble N); this one is a single model")
    texts, prompts = [], []
    for row in items.itertuples(index=False):
        responses = [r["text"] for r in row.responses] if row.responses is not None else [row.response_a, row.response_b]
        texts += [str(r) for r in responses]
        prompts += [row.prompt] * len(responses)
    if not texts:
        return pd.DataFrame({"p_a": [], "top": [], "uncertainty": []}, index=items.index)
    members = member_rewards(scorer, prompts, texts, batch_size)
    out = {"p_a": [], "top": [], "uncertainty": []}
    start = 0
    for row in items.itertuples(index=False):
        k = len(row.responses) if row.responses is not None else 2
        block = members[:, start:start + k]
        start += k
        mean = block.mean(0)
        ranked = np.argsort(-mean, kind="stable")
        gaps = mean[ranked[:-1]] - mean[ranked[1:]]
        closest = int(np.argmin(gaps))
        i, j = ranked[closest], ranked[closest + 1]
        if measure == "disagreement":
            u = float((block[:, i] - block[:, j]).std())
        else:
            u = float(1.0 - expit(abs(mean[i] - mean[j])))
        out["uncertainty"].append(u)
        out["p_a"].append(float(expit(mean[0] - mean[1])) if row.responses is None else None)
        out["top"].append(int(ranked[0]) if row.responses is not None else None)
    frame = pd.DataFrame(out, index=items.index)
    frame["top"] = frame["top"].astype("Int64")
    return frame


def score_queue(spec: ScoreQueueSpec, ctx: RunContext, *, scorer=None) -> RunResult:
    """Score the open items of spec.project and, with uncertainty selection, write its queue order
    (annotation.selection); the scores are stored either way (suggestions read them).
    `scorer` (already loaded: tests, benchmarks/active_bench.py) skips loading spec.model."""
    from annotation.selection import open_items, write_queue
    from reward.score import load_reward_model
    from reward.second_opinion import resolve_model

    spec.validate()
    ref = resolve_model(ctx.engine, spec.project, spec.model) if scorer is None or spec.model is not None else None
    project, items = open_items(ctx.engine, spec.project)
    ctx.progress(0.0, f"scoring {len(items)} open items of project '{spec.project}'")
    if scorer is None:
        scorer = load_reward_model(ref.path)
    measure = spec.measure if spec.measure != "auto" else ("disagreement" if hasattr(scorer, "member_scores") else "margin")
    ctx.stop_if_asked("scoring the queue")
    scores = queue_scores(scorer, items, measure, spec.batch_size)
    ctx.stop_if_asked("scoring the queue")
    summary = write_queue(ctx.engine, project.id, scores, measure=measure, model_id=ref.id if ref else None,
                          random_share=project.random_share, seed=spec.seed, gold=items["gold"],
                          order=project.selection == "uncertainty")
    out = Path(ctx.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "queue.json").write_text(json.dumps({"project": spec.project, "model": ref.as_dict() if ref else None,
                                                "selection": project.selection, **summary}, indent=2))
    ctx.log.info(f"{summary['queued']} items ordered by {measure} ({summary['calibration']} drawn at random for calibration)")
    return RunResult(register=[], path=str(out / "queue.json"), metrics=summary,
                     extra={"model": ref.as_dict() if ref else None, "selection": project.selection})
