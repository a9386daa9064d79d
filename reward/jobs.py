"""Job handlers for the worker: train_rm and eval_rm (named in app.jobs.HANDLERS).

    rlhf jobs submit train_rm --params-json '{"project": "sample", "base": "minilm", "epochs": 3}'
    rlhf jobs submit eval_rm --params-json '{"model": "7", "project": "sample"}'

train_rm params: project or data (one of them), name, parent_id, aggregation, eval_fraction and any
TrainParams field (base, epochs, lr, batch_size, max_length, seed, ensemble, center_rewards,
margin, lora, ...). The model is written under the job's run dir and returned in "register"; the
job runner inserts the row when it marks the job succeeded, so a failed or cancelled run
registers nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from annotation.errors import JobCancelled
from reward.errors import RewardError

SOURCE_KEYS = ("project", "data", "aggregation", "eval_fraction", "name", "parent_id")


def _train_params(params: dict):
    from reward.train import TrainParams

    known = {f.name for f in dataclasses.fields(TrainParams)}
    unknown = sorted(set(params) - known - set(SOURCE_KEYS))
    if unknown:
        raise RewardError(f"train_rm: unknown param(s) {', '.join(unknown)}; expected some of "
                          f"{', '.join(sorted(known | set(SOURCE_KEYS)))}")
    try:
        return TrainParams(**{k: v for k, v in params.items() if k in known}).validate()
    except TypeError as exc:
        raise RewardError(f"train_rm: {exc}") from None


def _checker(ctx):
    def check() -> None:
        if ctx.cancelled():
            raise JobCancelled(f"job {ctx.job_id} cancelled")

    return check


def train_rm(params: dict, ctx) -> dict:
    from annotation.registry import active_model
    from annotation.store import transaction
    from reward.data import project_id_of, training_data
    from reward.train import train_reward_model

    from annotation.names import registry_name

    tp = _train_params(params)
    project, data = params.get("project"), params.get("data")
    name = registry_name(params.get("name"), f"rm-{project or Path(str(data)).stem}-job{ctx.job_id}", "train_rm: param 'name'")
    ctx.progress(0.0, f"loading pairs from {'project ' + repr(project) if project else data}")
    train, held = training_data(data=data, project=project, engine=ctx.engine,
                                aggregation=params.get("aggregation", "majority"), margin=tp.margin,
                                eval_fraction=float(params.get("eval_fraction", 0.1)))
    project_id = project_id_of(ctx.engine, project)
    parent_id = params.get("parent_id")
    if parent_id is None and project_id is not None:
        with transaction(ctx.engine) as session:
            current = active_model(session, project_id)
            parent_id = current.id if current else None
    ctx.log.info(f"{len(train)} training pairs, {len(held)} held out")
    check = _checker(ctx)
    check()
    result = train_reward_model(train, Path(ctx.run_dir) / "model", tp, eval_pairs=held or None, settings=ctx.settings,
                                progress=lambda f, m: ctx.progress(0.02 + 0.97 * f, m), check=check, log=ctx.log)
    row = {"kind": "reward", "name": name, "path": result["path"], "base_model": result["base_model"],
           "project_id": project_id, "data_hash": result["data_hash"], "data_rows": result["data_rows"],
           "params": {**result["params"], "aggregation": params.get("aggregation", "majority"),
                      "source": {"project": project} if project else {"data": str(data)}},
           "metrics": _summary(result["metrics"]), "parent_id": parent_id}
    return {"register": [row], "path": result["path"], "metrics": row["metrics"]}


def _summary(metrics: dict) -> dict:
    """The metrics stored on the model row: everything but the long per-bin lists stay in metrics.json."""
    return json.loads(json.dumps(metrics, default=float))


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
