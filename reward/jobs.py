"""Job handlers for the worker: train_rm, eval_rm and score_queue (named in app.jobs.JOB_TABLE).

    rlhf jobs submit train_rm --params-json '{"project": "sample", "base": "minilm", "epochs": 3}'
    rlhf jobs submit eval_rm --params-json '{"model": "7", "project": "sample"}'

Each builds its use case's spec from the params (reward.usecases: TrainRMSpec, EvalRMSpec,
ScoreQueueSpec; the spec's fields are the params) and runs the same function as the CLI command.
A model is written under the job's run dir and returned in "register"; the job runner inserts the
row when it marks the job succeeded, so a failed or cancelled run registers nothing.
"""

from __future__ import annotations

from pathlib import Path

from annotation.errors import JobCancelled
from reward.errors import RewardError


def _run(usecase, spec, ctx, output_dir: Path) -> dict:
    from annotation.runs import RunContext

    run = RunContext(output_dir=output_dir, engine=ctx.engine, settings=ctx.settings,
                     progress=ctx.progress, should_stop=ctx.cancelled, log=ctx.log)
    try:
        return usecase(spec, run).as_job_result()
    except JobCancelled:
        raise JobCancelled(f"job {ctx.job_id} cancelled") from None


def train_rm(params: dict, ctx) -> dict:
    """The train_rm job: reward.usecases.train_rm into the job's run dir (its model/ folder)."""
    from annotation.names import registry_name
    from annotation.runs import spec_from_params
    from reward.usecases import TrainRMSpec, train_rm as train_rm_usecase

    spec = spec_from_params(TrainRMSpec, params, "train_rm", RewardError)
    spec.name = registry_name(spec.name, f"rm-{spec.project or Path(str(spec.data)).stem}-job{ctx.job_id}",
                              "train_rm: param 'name'")
    return _run(train_rm_usecase, spec, ctx, Path(ctx.run_dir) / "model")


def eval_rm(params: dict, ctx) -> dict:
    """The eval_rm job: reward.usecases.eval_rm, eval.json in the job's run dir (params: its EvalRMSpec's fields)."""
    from annotation.runs import spec_from_params
    from reward.usecases import EvalRMSpec, eval_rm as eval_rm_usecase

    return _run(eval_rm_usecase, spec_from_params(EvalRMSpec, params, "eval_rm", RewardError), ctx, Path(ctx.run_dir))


def score_queue(params: dict, ctx) -> dict:
    """The score_queue job: reward.usecases.score_queue (params: its ScoreQueueSpec's fields)."""
    from annotation.runs import spec_from_params
    from reward.usecases import ScoreQueueSpec, score_queue as score_queue_usecase

    return _run(score_queue_usecase, spec_from_params(ScoreQueueSpec, params, "score_queue", RewardError), ctx,
                Path(ctx.run_dir))
