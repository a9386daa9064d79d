"""Reward-model training with TRL's RewardTrainer (Bradley-Terry loss), single models and bootstrap ensembles.

    from reward.train import TrainParams, train_reward_model
    result = train_reward_model(train_pairs, Path("runs/rm-1"), TrainParams(base="minilm"), eval_pairs=held_out,
                                settings=settings)  # the caller's settings: "minilm" is fetched under their model_dir

What we set on top of TRL's defaults, and why:
- precision by plan (reward.precision): fp32 weights always, bf16 autocast only where it is native
  and measured to pay; gradient checkpointing only on GPUs (`hardware_plan`);
- every core: torch threads = os.cpu_count() (recorded from inside the trainer), tokenizers in
  parallel for the one batched tokenization pass;
- our own tokenization (reward.data.PairEncoder): long pairs are cut from the left of the prompt
  instead of dropped, and BERT-style bases get [CLS] prompt [SEP] response [SEP] instead of an EOS
  they do not have; batches are padded dynamically and grouped by length.

A run directory holds the model and tokenizer, reward_config.json (the encoder layout scoring
must reuse), params.json (seeds included), data.json (sha256 of the canonical pairs and counts),
training_curve.jsonl (the trainer's log history) and metrics.json. An ensemble directory holds
member_0..member_{N-1} (each a run directory) and ensemble.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import time
from pathlib import Path
from typing import Callable, Sequence

from reward.data import PairEncoder, build_dataset, pairs_hash
from reward.errors import RewardError
from reward.precision import MODES, precision_plan
from reward.reporting import trainer_reporting

BASE_ALIASES = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}


@dataclasses.dataclass
class TrainParams:
    """Everything that decides a reward model besides its data; recorded in params.json."""

    base: str = "minilm"
    """minilm (all-MiniLM-L6-v2), smollm2 (SmolLM2-135M-Instruct with a score head), a local model dir or a hub id."""
    epochs: float = 2.0
    """Passes over the training pairs."""
    lr: float = 1e-4
    """Peak AdamW learning rate (linear decay after warmup). At 5e-5 MiniLM barely moved off
    log(2) on the HH pairs in a 1-epoch run; 1e-4 with 2 epochs learns (benchmarks/rm_bench.py)."""
    batch_size: int = 16
    """Pairs per optimizer step (each pair is two sequences)."""
    max_length: int = 128
    """Tokens per sequence; longer ones lose the start of the prompt (the response is kept whole)."""
    seed: int = 42
    """Seed of the head's initialisation, the data order and (ensembles) the bootstrap draws."""
    ensemble: int = 1
    """Members trained on bootstrap resamples with seeds seed..seed+N-1; 1 means a single model."""
    center_rewards: float | None = None
    """Coefficient of TRL's reward-centring penalty (mean squared reward); 0.01 is the paper's value."""
    margin: bool = False
    """Use each pair's margin (preference strength or aggregation confidence) in the loss."""
    lora: bool = False
    """Train LoRA adapters (merged into the saved model) instead of every weight; for large backbones."""
    lora_r: int = 16
    """LoRA rank."""
    warmup: float = 0.1
    """Warmup as a fraction of the optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    threads: int | None = None
    """Torch threads; None means every core (os.cpu_count())."""
    dataloader_workers: int = 0
    """DataLoader worker processes. Batches are pre-tokenized and collation is a pad, so workers
    would only take cores from the matrix multiplies; raise it on a GPU machine."""
    logging_steps: int = 0
    """Steps between training-curve points; 0 picks about 50 points per run."""
    precision: str = "auto"
    """auto (bf16 autocast where native and measured to pay), fp32, or bf16 (forced); weights stay fp32."""
    report_to: str = "none"
    """Also log the training curve to: none, or a comma-separated list of tensorboard, mlflow, trackio (when installed)."""
    length_balance: bool = False
    """Train on as many pairs whose chosen response is the longer as the shorter (a seeded subsample):
    a length-debiasing option; compare the length-bias gap in eval-rm with and without it."""

    def validate(self) -> "TrainParams":
        from reward.reporting import check_report_to

        check_report_to(self.report_to)
        checks = [
            (self.epochs > 0, "--epochs", "a positive number"),
            (self.lr > 0, "--lr", "a positive number"),
            (self.batch_size >= 1, "--batch-size", "at least 1"),
            (self.max_length >= 8, "--max-length", "at least 8"),
            (self.ensemble >= 1, "--ensemble", "at least 1"),
            (self.center_rewards is None or self.center_rewards >= 0, "--center-rewards", "0 or more"),
            (0 <= self.warmup < 1, "--warmup", "a fraction in [0, 1)"),
            (self.lora_r >= 1, "--lora-r", "at least 1"),
            (self.threads is None or self.threads >= 1, "--threads", "at least 1"),
            (self.dataloader_workers >= 0, "--dataloader-workers", "0 or more"),
            (self.precision in MODES, "--precision", "one of " + ", ".join(MODES)),
        ]
        for ok, option, expected in checks:
            if not ok:
                raise RewardError(f"{option} {getattr(self, _field_of(option))!r} is invalid; expected {expected}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def main_process() -> bool:
    """False in every process but the first under `accelerate launch` (torchrun sets RANK): those
    train alongside it, data-parallel, and leave writing and evaluating the run to it."""
    return int(os.environ.get("RANK", "0")) == 0


def _field_of(option: str) -> str:
    return {"--center-rewards": "center_rewards", "--batch-size": "batch_size", "--max-length": "max_length",
            "--lora-r": "lora_r", "--dataloader-workers": "dataloader_workers",
            "--precision": "precision"}.get(option, option.lstrip("-"))


# --------------------------------------------------------------------------- hardware and models


def hardware_plan(precision: str = "auto") -> dict:
    """Device, compute precision and checkpointing for reward training. Weights stay fp32; bf16
    is the Trainer's autocast, where reward.precision says it pays. Checkpointing only on GPUs,
    where memory is the limit (on a CPU it only adds a second forward pass)."""
    plan = precision_plan(precision)
    cuda = plan.device_type == "cuda"
    return {"device": plan.device_type, "bf16": plan.bf16("reward"), "precision": plan.label("reward"),
            "gradient_checkpointing": cuda}


def resolve_base(name: str, settings=None) -> str:
    """A base model name (minilm, smollm2), a local directory or a hub id, as something from_pretrained loads."""
    if name in BASE_ALIASES:
        if settings is None:  # the app's settings come in as an argument (DESIGN.md, Layers)
            raise RewardError(f"base '{name}' is a fetched model's name; resolve_base needs the settings to find it under their model_dir")
        path = Path(settings.model_dir) / BASE_ALIASES[name]
        if not (path / "config.json").is_file():
            raise RewardError(f"base '{name}' is not fetched: {path} has no config.json; run `rlhf models fetch` first")
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise RewardError(f"--base {name}: the directory has no config.json; expected a model directory")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; from_pretrained reports it if it is not in the local cache
    raise RewardError(f"--base {name}: not minilm, smollm2, an existing model directory or a hub id (owner/name)")


def load_base(base_path: str, lora: bool = False, lora_r: int = 16):
    """(model, tokenizer, peft_config) with a one-output score head, fp32 weights and a pad token set."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward.data import ensure_pad_token

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
    except OSError as exc:
        raise RewardError(f"cannot load base model '{base_path}': {exc}") from None
    ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if lora:
        from peft import LoraConfig, TaskType

        # SEQ_CLS makes peft train and save the fresh score head in full next to the adapters.
        peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                 target_modules="all-linear")
    return model, tokenizer, peft_config


# --------------------------------------------------------------------------- the trainer's callbacks


def _callbacks(progress, check, log, span: tuple[float, float], record: dict):
    from transformers import TrainerCallback

    lo, hi = span

    class RunCallback(TrainerCallback):
        """Reports progress, honours cancellation, and records the thread count the trainer really runs with."""

        def on_step_begin(self, args, state, control, **kwargs):
            if "torch_threads" not in record:
                import torch

                record["torch_threads"] = torch.get_num_threads()
            if check is not None:
                check()

        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None and state.max_steps:
                frac = lo + (hi - lo) * state.global_step / state.max_steps
                progress(frac, f"step {state.global_step}/{state.max_steps}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if log is not None and logs:
                log.info(json.dumps({"step": state.global_step, **logs}, default=float))

    return [RunCallback()]


# --------------------------------------------------------------------------- training


def _train_one(train_pairs: Sequence, out_dir: Path, params: TrainParams, base_path: str, seed: int, *,
               eval_pairs: Sequence | None, progress, check, log, span) -> dict:
    import torch
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    hf_logging.disable_progress_bar()
    hw = hardware_plan(params.precision)
    # Processes launched side by side on one host share its cores.
    threads = params.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    # The score head is initialised when the model loads: seed first, or two runs with the same
    # seed (a CLI run and a job, say) start from different heads and end with different models.
    from transformers import set_seed

    set_seed(seed)
    model, tokenizer, peft_config = load_base(base_path, params.lora, params.lora_r)
    encoder = PairEncoder(tokenizer, params.max_length)
    dataset, stats = build_dataset(train_pairs, encoder, use_margin=params.margin)
    steps = max(1, int(-(-len(dataset) // params.batch_size) * params.epochs))
    report_to, trackers = trainer_reporting(params.report_to, out_dir / "tb")
    config = RewardConfig(
        output_dir=str(out_dir / "_trainer"),
        num_train_epochs=params.epochs,
        learning_rate=params.lr,
        per_device_train_batch_size=params.batch_size,
        warmup_steps=params.warmup,
        weight_decay=params.weight_decay,
        lr_scheduler_type="linear",
        seed=seed,
        data_seed=seed,
        bf16=hw["bf16"],
        activation_checkpointing=hw["gradient_checkpointing"],  # the new name of gradient_checkpointing
        use_cpu=hw["device"] == "cpu",
        max_length=None,  # PairEncoder already truncated; TRL's filter would drop pairs instead
        center_rewards_coefficient=params.center_rewards,
        remove_unused_columns=False,  # keeps the `length` column for the length-grouped sampler
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=params.dataloader_workers,
        logging_steps=params.logging_steps or max(1, steps // 50),
        logging_first_step=True,
        save_strategy="no",
        report_to=report_to,
        disable_tqdm=True,
    )
    record: dict = {}
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config, callbacks=[*_callbacks(progress, check, log, span, record), *trackers])
    trainer.remove_callback(PrinterCallback)  # our callback logs each point once, to the run's logger
    started = time.perf_counter()
    output = trainer.train()
    runtime = time.perf_counter() - started

    trained = trainer.model
    if peft_config is not None:
        trained = trained.merge_and_unload()
    if main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        trained.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        encoder.save(out_dir, base=base_path)
        with open(out_dir / "training_curve.jsonl", "w") as fh:
            for row in trainer.state.log_history:
                fh.write(json.dumps(row, default=float) + "\n")
        _rm_tree(out_dir / "_trainer")

    n = len(train_pairs)
    metrics = {
        "train_loss": float(output.training_loss),
        "train_pairs": n,
        "epochs": params.epochs,
        "steps": trainer.state.global_step,
        "train_seconds": runtime,
        "pairs_per_s": n * params.epochs / runtime,
        "tokens_per_s": stats.tokens * params.epochs / runtime,
        "prompt_truncated": stats.prompt_truncated,
        "response_truncated": stats.response_truncated,
        "torch_threads": record.get("torch_threads"),
        "compute_precision": hw["precision"],
        "gradient_checkpointing": hw["gradient_checkpointing"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    first = next((r["loss"] for r in trainer.state.log_history if "loss" in r), None)
    last = next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None)
    metrics.update(first_logged_loss=first, last_logged_loss=last)
    if log is not None and (stats.prompt_truncated or stats.response_truncated):
        log.info(f"{stats.prompt_truncated} pairs had their prompt cut from the left, "
                 f"{stats.response_truncated} their response cut, to fit max_length {params.max_length}")
    del trainer, model, trained
    return metrics


def _rm_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def length_balanced(pairs: Sequence, seed: int) -> list:
    """The pairs with the larger of (chosen longer, chosen shorter) subsampled to the smaller's size,
    order kept: a model can then no longer win by preferring one length. Equal-length pairs stay."""
    longer = [i for i, p in enumerate(pairs) if len(p.chosen) > len(p.rejected)]
    shorter = [i for i, p in enumerate(pairs) if len(p.chosen) < len(p.rejected)]
    big, small = (longer, shorter) if len(longer) > len(shorter) else (shorter, longer)
    drop = set(random.Random(seed).sample(big, len(big) - len(small)))
    return [p for i, p in enumerate(pairs) if i not in drop]


def bootstrap(pairs: Sequence, seed: int) -> list:
    """A resample with replacement, the same size as `pairs`."""
    rng = random.Random(seed)
    return [pairs[rng.randrange(len(pairs))] for _ in range(len(pairs))]


def train_reward_model(train_pairs: Sequence, out_dir: Path, params: TrainParams, *, eval_pairs: Sequence | None = None,
                       settings=None, progress: Callable[[float, str], None] | None = None,
                       check: Callable[[], None] | None = None, log=None) -> dict:
    """Train a reward model (or an ensemble) into `out_dir` and evaluate it on `eval_pairs`.

    `progress(fraction, message)` is called after every step; `check()` before every step may raise
    to stop the run (jobs raise JobCancelled there). Returns {path, base_model, data_hash, data_rows,
    params, metrics}, the fields a registry row needs.
    """
    from reward.evaluate import evaluate_model

    params.validate()
    if not train_pairs:
        raise RewardError("no training pairs")
    base_path = resolve_base(params.base, settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if params.length_balance:
        before = len(train_pairs)
        train_pairs = length_balanced(train_pairs, params.seed)
        if log is not None:
            log.info(f"length balance: {len(train_pairs)} of {before} training pairs kept")
    n_members = params.ensemble
    members: list[dict] = []
    train_share = 0.9 if eval_pairs else 1.0
    for i in range(n_members):
        seed = params.seed + i
        span = (train_share * i / n_members, train_share * (i + 1) / n_members)
        if n_members == 1:
            member_dir, member_pairs = out_dir, list(train_pairs)
        else:
            member_dir, member_pairs = out_dir / f"member_{i}", bootstrap(train_pairs, seed)
        if log is not None:
            log.info(f"training {'member ' + str(i) + ' ' if n_members > 1 else ''}on {len(member_pairs)} pairs, seed {seed}")
        m = _train_one(member_pairs, member_dir, params, base_path, seed, eval_pairs=eval_pairs,
                       progress=progress, check=check, log=log, span=span)
        members.append({"dir": member_dir.name, "seed": seed, **m})
    if n_members > 1 and main_process():
        from reward.score import ENSEMBLE_FILE

        (out_dir / ENSEMBLE_FILE).write_text(json.dumps(
            {"members": [m["dir"] for m in members], "seeds": [m["seed"] for m in members], "bootstrap": True}, indent=2))

    metrics = {k: v for k, v in members[0].items() if k not in ("dir", "seed")}
    if n_members > 1:
        metrics["members"] = [{k: m[k] for k in ("dir", "seed", "train_loss", "train_seconds")} for m in members]
        metrics["train_loss"] = sum(m["train_loss"] for m in members) / n_members
        metrics["train_seconds"] = sum(m["train_seconds"] for m in members)
    if eval_pairs and main_process():
        if progress is not None:
            progress(train_share, f"evaluating on {len(eval_pairs)} held-out pairs")
        if check is not None:
            check()
        metrics["eval"] = evaluate_model(out_dir, eval_pairs)
        for key in ("accuracy", "log_loss", "ece", "mean_margin", "n_pairs"):
            metrics[f"eval_{key}"] = metrics["eval"][key]

    data = {"data_hash": pairs_hash(train_pairs), "data_rows": len(train_pairs),
            "eval_hash": pairs_hash(eval_pairs) if eval_pairs else None, "eval_rows": len(eval_pairs or [])}
    if main_process():
        (out_dir / "data.json").write_text(json.dumps(data, indent=2))
        (out_dir / "params.json").write_text(json.dumps({**params.to_dict(), "base_path": base_path}, indent=2))
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    if progress is not None:
        progress(1.0, "done")
    return {"path": str(out_dir), "base_model": params.base if params.base in BASE_ALIASES else base_path,
            "data_hash": data["data_hash"], "data_rows": data["data_rows"], "params": params.to_dict(),
            "metrics": metrics}
