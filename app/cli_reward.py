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
from reward.errors import RewardError
from reward.precision import HELP as PRECISION_HELP
from reward.train import TrainParams


# The defaults live on TrainParams, once; the options show them.
DEFAULTS = TrainParams()

@cli.command("train-rm")
def train_rm(
    data: Optional[str] = typer.Option(None, "--data", help="Labelled preference file (trl, trl-conversational, hh)."),
    project: Optional[str] = typer.Option(None, "--project", help="Train on a project's aggregated labels (its export train split)."),
    output: str = typer.Option(..., "--output", "-o", help="Run directory to create; must not exist yet."),
    base: str = typer.Option("minilm", "--base", help="minilm, smollm2, a local model directory or a hub id."),
    epochs: float = typer.Option(DEFAULTS.epochs, "--epochs", help="Passes over the training pairs."),
    lr: float = typer.Option(DEFAULTS.lr, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", help="Pairs per optimizer step."),
    max_length: int = typer.Option(DEFAULTS.max_length, "--max-length", help="Tokens per sequence; the start of long prompts is cut."),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Seed for head init, data order and bootstrap draws."),
    ensemble: int = typer.Option(1, "--ensemble", help="Train N members on bootstrap resamples (seeds seed..seed+N-1)."),
    center_rewards: Optional[float] = typer.Option(None, "--center-rewards", help="Reward-centring coefficient, e.g. 0.01."),
    margin: bool = typer.Option(False, "--margin", help="Use the pairs' margin (strength / aggregation confidence) in the loss."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (merged when saved) instead of all weights."),
    precision: str = typer.Option(DEFAULTS.precision, "--precision", help=PRECISION_HELP),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Share of a --data file held out for evaluation."),
    aggregation: str = typer.Option("majority", "--aggregation", help="Label aggregation for --project: majority or dawid-skene."),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name; default: the output directory's name."),
    register: bool = typer.Option(True, "--register/--no-register", help="Record the model in the registry."),
    as_json: bool = JsonOpt,
) -> None:
    """Train a reward model (TRL RewardTrainer, Bradley-Terry loss) and register it."""
    import logging

    from annotation.registry import register_model
    from annotation.store import transaction
    from app.settings import get_settings
    from reward.data import project_id_of, training_data
    from reward.train import main_process, train_reward_model

    from annotation.names import registry_name

    if register:
        name = registry_name(name, Path(output).name)  # refused now, not after training
    params = TrainParams(base=base, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                         ensemble=ensemble, center_rewards=center_rewards, margin=margin, lora=lora,
                         precision=precision).validate()
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RewardError(f"--output {output}: already exists; choose a new run directory")
    eng = engine() if (project or register) else None
    train, held = training_data(data=data, project=project, engine=eng, aggregation=aggregation, margin=margin,
                                eval_fraction=eval_fraction)
    project_id = project_id_of(eng, project) if eng is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    log = logging.getLogger("rlhf.train_rm")
    if not as_json:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = train_reward_model(train, tmp, params, eval_pairs=held or None, settings=get_settings(), log=log)
        if not main_process():
            return  # under accelerate launch the first process moves the run into place, registers and reports it
        if out.exists():
            out.rmdir()  # verified empty above
        if register:
            with transaction(eng) as session:
                row = register_model(
                    session, kind="reward", name=name or out.name, path=str(out.resolve()),
                    base_model=result["base_model"], project_id=project_id, data_hash=result["data_hash"],
                    data_rows=result["data_rows"], metrics=result["metrics"],
                    params={**result["params"], "source": {"project": project} if project else {"data": str(data)}},
                )
                tmp.rename(out)
                model_id = row.id
        else:
            tmp.rename(out)
            model_id = None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    m = result["metrics"]
    payload = {"model_id": model_id, "path": str(out), "data_hash": result["data_hash"], "train_pairs": len(train),
               "eval_pairs": len(held), "metrics": {k: v for k, v in m.items() if k != "eval"}}
    lines = [f"reward model trained: {out}" + (f" (model id {model_id})" if model_id else ""),
             f"train pairs {len(train)}, held out {len(held)}, loss {m['train_loss']:.4f}, "
             f"{m['pairs_per_s']:.1f} pairs/s on {m['torch_threads']} threads ({m['compute_precision']})",
             f"truncated: {m['prompt_truncated']} prompts cut from the left, {m['response_truncated']} responses cut"]
    if "eval_accuracy" in m:
        lines.append(f"held-out accuracy {m['eval_accuracy']:.3f}, log-loss {m['eval_log_loss']:.4f}, ECE {m['eval_ece']:.3f}")
    emit(payload, as_json, "\n".join(lines))


@cli.command("eval-rm")
def eval_rm(
    model: str = typer.Option(..., "--model", help="Run directory, ensemble directory, or registered model id/name."),
    data: Optional[str] = typer.Option(None, "--data", help="Labelled preference file (trl, trl-conversational, hh)."),
    project: Optional[str] = typer.Option(None, "--project", help="Evaluate on a project's pairs instead."),
    split: Optional[str] = typer.Option(None, "--split", help="With --project: train or test (default test)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Pairs scored per batch."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write the reliability diagram (.html or .json, Vega-Lite)."),
    as_json: bool = JsonOpt,
) -> None:
    """Accuracy, margin, Bradley-Terry log-loss, calibration (ECE), agreement and length-bias breakdowns."""
    from annotation.registry import get_model
    from annotation.store import transaction
    from reward.data import load_pairs
    from reward.evaluate import evaluate_model, save_reliability_plot

    eng = None
    if not Path(model).is_dir():
        eng = engine()
        with transaction(eng) as session:
            model = get_model(session, model).path
    if project is not None and eng is None:
        eng = engine()
    pairs = load_pairs(data=data, project=project, engine=eng, split=split or ("test" if project else None))
    metrics = evaluate_model(model, pairs, batch_size=batch_size)
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

    with transaction(engine()) as session:
        row = set_active(session, get_model(session, model).id)
        payload = {"id": row.id, "name": row.name, "project_id": row.project_id, "active": True}
    emit(payload, as_json, f"model {payload['id']} ({payload['name']}) is now the active reward model")
