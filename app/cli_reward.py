"""Reward-model commands: train, evaluate, list and activate.

    rlhf train-rm --data pairs.jsonl --output runs/rm-1 [--base minilm|smollm2|PATH] [--epochs 2] [--json]
    rlhf train-rm --project demo --output runs/rm-demo --ensemble 3
    rlhf eval-rm --model runs/rm-1 --data held_out.jsonl [--json] [--plot reliability.html]
    rlhf models list [--kind reward] [--project demo] [--json]
    rlhf models activate 7

train-rm writes into a temporary directory next to --output and moves it into place and registers
it only once training and evaluation have finished: an interrupted run leaves no model behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import typer

from app.cli import JsonOpt, cli, emit, engine, models_cli
from app.options import spec_option, spec_options
from reward.usecases import EvalRMSpec, TrainRMSpec


S = TrainRMSpec  # options, defaults and help of train-rm are this spec's fields


@cli.command("train-rm")
def train_rm(
    data: Optional[str] = spec_option(S, "data"),
    project: Optional[str] = spec_option(S, "project"),
    output: str = typer.Option(..., "--output", "-o", help="Run directory to create; must not exist yet."),
    base: str = spec_option(S, "base"),
    epochs: float = spec_option(S, "epochs"),
    lr: float = spec_option(S, "lr"),
    batch_size: int = spec_option(S, "batch_size"),
    max_length: int = spec_option(S, "max_length"),
    seed: int = spec_option(S, "seed"),
    ensemble: int = spec_option(S, "ensemble"),
    center_rewards: Optional[float] = spec_option(S, "center_rewards"),
    margin: bool = spec_option(S, "margin"),
    lora: bool = spec_option(S, "lora"),
    precision: str = spec_option(S, "precision"),
    length_balance: bool = spec_option(S, "length_balance"),
    report_to: str = spec_option(S, "report_to"),
    eval_fraction: float = spec_option(S, "eval_fraction"),
    aggregation: str = spec_option(S, "aggregation"),
    split: str = spec_option(S, "split"),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name; default: the output directory's name."),
    register: bool = typer.Option(True, "--register/--no-register", help="Record the model in the registry."),
    as_json: bool = JsonOpt,
) -> None:
    """Train a reward model (TRL RewardTrainer, Bradley-Terry loss) and register it."""
    import logging

    from annotation.names import registry_name
    from annotation.runs import RunContext, fresh_output_dir, register_result
    from app.settings import get_settings
    from reward.train import main_process
    from reward.usecases import train_rm as train_rm_usecase

    out = Path(output)
    spec = TrainRMSpec(data=data, project=project, base=base, epochs=epochs, lr=lr, batch_size=batch_size,
                       max_length=max_length, seed=seed, ensemble=ensemble, center_rewards=center_rewards, margin=margin,
                       lora=lora, precision=precision, length_balance=length_balance, report_to=report_to, eval_fraction=eval_fraction, aggregation=aggregation, split=split,
                       name=registry_name(name, out.name) if register else name).validate()
    fresh_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    log = logging.getLogger("rlhf.train_rm")
    if not as_json:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    eng = engine() if (project or register) else None
    try:
        result = train_rm_usecase(spec, RunContext(output_dir=tmp, engine=eng, settings=get_settings(), log=log))
        if not main_process():
            return  # under accelerate launch the first process moves the run into place, registers and reports it
        if out.exists():
            out.rmdir()  # verified empty above
        tmp.rename(out)
        result = result.moved(tmp, out)
        model_id = register_result(eng, result)[0] if register else None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    m = result.metrics
    payload = {"model_id": model_id, "path": str(out), "data_hash": result.extra["data_hash"],
               "train_pairs": result.extra["train_pairs"], "eval_pairs": result.extra["eval_pairs"],
               "metrics": {k: v for k, v in m.items() if k != "eval"}}
    lines = [f"reward model trained: {out}" + (f" (model id {model_id})" if model_id else ""),
             f"train pairs {result.extra['train_pairs']}, held out {result.extra['eval_pairs']}, loss {m['train_loss']:.4f}, "
             f"{m['pairs_per_s']:.1f} pairs/s on {m['torch_threads']} threads ({m['compute_precision']})",
             f"truncated: {m['prompt_truncated']} prompts cut from the left, {m['response_truncated']} responses cut"]
    if "eval_accuracy" in m:
        lines.append(f"held-out accuracy {m['eval_accuracy']:.3f}, log-loss {m['eval_log_loss']:.4f}, ECE {m['eval_ece']:.3f}")
    emit(payload, as_json, "\n".join(lines))


@cli.command("eval-rm")
@spec_options(EvalRMSpec, "model", "data", "project", "split", "batch_size", required=("model",))
def eval_rm(
    plot: Optional[str] = typer.Option(None, "--plot", help="Write the reliability diagram (.html or .json, Vega-Lite)."),
    as_json: bool = JsonOpt,
    **options,
) -> None:
    """Accuracy, margin, Bradley-Terry log-loss, calibration (ECE), agreement and length-bias breakdowns."""
    import tempfile

    from annotation.runs import RunContext
    from reward.evaluate import save_reliability_plot
    from reward.usecases import eval_rm as eval_rm_usecase

    spec = EvalRMSpec(**options).validate()
    eng = engine() if (spec.project is not None or not Path(spec.model).is_dir()) else None
    with tempfile.TemporaryDirectory(prefix="rlhf-eval-rm-") as tmp:
        metrics = eval_rm_usecase(spec, RunContext(output_dir=Path(tmp), engine=eng)).metrics
    if plot:
        metrics["plot"] = str(save_reliability_plot(metrics["calibration"], plot))
    lb = metrics["length_bias"]
    lines = [f"{metrics['n_pairs']} pairs: accuracy {metrics['accuracy']:.3f}, mean margin {metrics['mean_margin']:.3f}, "
             f"log-loss {metrics['log_loss']:.4f}, ECE {metrics['ece']:.3f}",
             f"length bias: accuracy {_fmt(lb['chosen_longer']['accuracy'])} when chosen is longer "
             f"({lb['chosen_longer']['n_pairs']}), {_fmt(lb['chosen_shorter']['accuracy'])} when shorter "
             f"({lb['chosen_shorter']['n_pairs']}); prefers the longer response {_fmt(lb['prefers_longer_rate'])}"]
    for row in metrics["by_agreement"]:
        lines.append(f"agreement {row['bucket']}: accuracy {row['accuracy']:.3f} on {row['n_pairs']} pairs")
    if "plot" in metrics:
        lines.append(f"reliability diagram: {metrics['plot']}")
    emit(metrics, as_json, "\n".join(lines))


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


@models_cli.command("list")
def models_list(
    kind: Optional[str] = typer.Option(None, "--kind", help="reward or policy."),
    project: Optional[str] = typer.Option(None, "--project", help="Only this project's models."),
    as_json: bool = JsonOpt,
) -> None:
    """Registered models, newest first, with their key metrics."""
    from annotation.registry import list_models
    from annotation.store import transaction
    from reward.data import project_id_of

    eng = engine()
    pid = project_id_of(eng, project)
    with transaction(eng) as session:
        rows = [{"id": m.id, "kind": m.kind, "name": m.name, "path": m.path, "base_model": m.base_model,
                 "project_id": m.project_id, "parent_id": m.parent_id, "active": m.active, "data_rows": m.data_rows,
                 "accuracy": (m.metrics or {}).get("eval_accuracy"), "created_at": m.created_at.isoformat()}
                for m in list_models(session, kind=kind, project_id=pid)]
    text = "\n".join(f"{'*' if r['active'] else ' '} {r['id']:>4} {r['kind']:<7} {r['name']}  acc={_fmt(r['accuracy'])}  {r['path']}"
                     for r in rows) or "no models registered"
    emit({"models": rows}, as_json, text)


@models_cli.command("activate")
def models_activate(model: str = typer.Argument(..., help="Registered reward model id or name."), as_json: bool = JsonOpt) -> None:
    """Mark a reward model active for its project (the one PPO and the app use by default)."""
    from annotation.registry import get_model, set_active
    from annotation.store import transaction

    from annotation.store import Project

    from app.jobs import queue_rescore

    eng = engine()
    with transaction(eng) as session:
        row = set_active(session, get_model(session, model).id)
        project = session.get(Project, row.project_id) if row.project_id is not None else None
        payload = {"id": row.id, "name": row.name, "project_id": row.project_id, "active": True}
    payload["score_job"] = queue_rescore(eng, project.name) if project is not None else None
    text = f"model {payload['id']} ({payload['name']}) is now the active reward model"
    if payload["score_job"]:
        text += f"\nqueued job {payload['score_job']} to order project '{project.name}' by it (uncertainty selection)"
    emit(payload, as_json, text)
