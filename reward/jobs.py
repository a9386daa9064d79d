"""Job handlers for the worker: train_rm and eval_rm (named in app.jobs.HANDLERS).

    rlhf jobs submit train_rm --params-json '{"project": "sample", "base": "minilm", "epochs": 3}'
    rlhf jobs submit eval_rm --params-json '{"model": "7", "project": "sample"}'

train_rm params: the fields of reward.usecases.TrainRMSpec (project or data, name, parent_id,
aggregation, eval_fraction, and every TrainParams field). The model is written under the job's run
dir and returned in "register"; the job runner inserts the row when it marks the job succeeded, so
a failed or cancelled run registers nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from annotation.errors import JobCancelled
from reward.errors import RewardError

def _checker(ctx):
    def check() -> None:
        if ctx.cancelled():
            raise JobCancelled(f"job {ctx.job_id} cancelled")

    return check


def train_rm(params: dict, ctx) -> dict:
    """The train_rm job: reward.usecases.train_rm into the job's run dir (its model/ folder)."""
    from annotation.names import registry_name
    from annotation.runs import RunContext, spec_from_params
    from reward.usecases import TrainRMSpec, train_rm as train_rm_usecase

    spec = spec_from_params(TrainRMSpec, params, "train_rm", RewardError)
    spec.name = registry_name(spec.name, f"rm-{spec.project or Path(str(spec.data)).stem}-job{ctx.job_id}",
                              "train_rm: param 'name'")
    run = RunContext(output_dir=Path(ctx.run_dir) / "model", engine=ctx.engine, settings=ctx.settings,
                     progress=ctx.progress, should_stop=ctx.cancelled, log=ctx.log)
    try:
        return train_rm_usecase(spec, run).as_job_result()
    except JobCancelled:
        raise JobCancelled(f"job {ctx.job_id} cancelled") from None


def eval_rm(params: dict, ctx) -> dict:
    from annotation.registry import get_model
    from annotation.store import transaction
    from reward.data import load_pairs
    from reward.evaluate import evaluate_model

    unknown = sorted(set(params) - {"model", "project", "data", "split", "aggregation"})
    if unknown:
        raise RewardError(f"eval_rm: unknown param(s) {', '.join(unknown)}; expected model, project or data, split, aggregation")
    if not params.get("model"):
        raise RewardError("eval_rm needs param 'model' (a registered model id or name, or a run directory)")
    model = str(params["model"])
    if not Path(model).is_dir():
        with transaction(ctx.engine) as session:
            model = get_model(session, model).path
    project = params.get("project")
    split = params.get("split", "test" if project else None)
    ctx.progress(0.0, "loading pairs")
    pairs = load_pairs(data=params.get("data"), project=project, engine=ctx.engine, split=split,
                       aggregation=params.get("aggregation", "majority"))
    _checker(ctx)()
    ctx.progress(0.1, f"scoring {len(pairs)} pairs")
    metrics = evaluate_model(model, pairs)
    (Path(ctx.run_dir) / "eval.json").write_text(json.dumps(metrics, indent=2))
    ctx.log.info(f"accuracy {metrics['accuracy']:.3f} on {metrics['n_pairs']} pairs")
    return {"metrics": metrics, "path": str(Path(ctx.run_dir) / "eval.json")}


def score_queue(params: dict, ctx) -> dict:
    """The score_queue job: reward.usecases.score_queue (params: its ScoreQueueSpec's fields)."""
    from annotation.runs import RunContext, spec_from_params
    from reward.usecases import ScoreQueueSpec, score_queue as score_queue_usecase

    spec = spec_from_params(ScoreQueueSpec, params, "score_queue", RewardError)
    run = RunContext(output_dir=Path(ctx.run_dir), engine=ctx.engine, settings=ctx.settings,
                     progress=ctx.progress, should_stop=ctx.cancelled, log=ctx.log)
    try:
        return score_queue_usecase(spec, run).as_job_result()
    except JobCancelled:
        raise JobCancelled(f"job {ctx.job_id} cancelled") from None
