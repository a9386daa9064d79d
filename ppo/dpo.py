"""Direct preference optimisation of a policy on preference pairs, with TRL's DPOTrainer.

    rlhf dpo --data pairs.jsonl --output runs/dpo-1 [--base PATH] [--lora] [--beta 0.1] [--loss-type sigmoid]
    rlhf dpo --project demo --output runs/dpo-2          # the aggregated pairs of a project

Pairs come from a TRL preference file (standard {"prompt", "chosen", "rejected"} strings, or
conversational message lists; anything `rlhf import` reads as labelled) or from a project's
aggregated labels. When the base tokenizer has a chat template the pairs are put in TRL's
conversational form, so training sees the template that generation uses later.

The reference is what TRL makes it: a frozen copy of the base (loaded again from its directory),
or, with LoRA, the same model with its adapters switched off, so no second copy is held. The
trained model (adapters merged in) is written to a run directory that appears only when training
has finished, like ppo.sft's. The run plumbing shared with ppo.grpo (staging, the callback that
logs, reports progress and stops, saving on the main process only) lives here too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ppo.errors import PPOError
from ppo.options import OfflineTrainerOptions
from ppo.sft import SFTResult, _fresh_output_dir, as_messages, check_messages, data_hash
from reward import reporting
from reward.precision import precision_plan
from reward.reporting import report_to_arg
from reward.train import main_process

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""DPO losses by TRL's names (trl.DPOConfig.loss_type); sigmoid is the DPO paper's."""
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
"""The losses TRL 1.16 applies label_smoothing to."""


@dataclasses.dataclass
class DPOOptions(OfflineTrainerOptions):
    """Hyperparameters of one DPO run: ppo.options.OfflineTrainerOptions with DPO's defaults, and its loss."""

    TRAINER = "DPO"
    LEARNING_RATE = 1e-6
    LORA_LEARNING_RATE = 1e-5

    beta: float = 0.1
    """Strength of the pull towards the reference: higher stays closer (TRL's default; tau for ipo)."""
    loss_type: str = "sigmoid"
    """The DPO loss by TRL's name: sigmoid (DPO), ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot,
    aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm."""
    label_smoothing: float = 0.0
    """Assumed label-flip probability, in [0, 0.5), for the robust, exo_pair and aot losses; 0 for plain DPO."""
    learning_rate: float | None = None
    """Peak AdamW learning rate; default 1e-6 (TRL's DPO default), or 1e-5 with lora."""
    batch_size: int = 4
    """Pairs per forward pass (each pair is two sequences: chosen and rejected)."""

    def own_checks(self) -> list:
        return [
            (self.beta > 0, "beta", "a positive number", self.beta),
            (self.loss_type in LOSS_TYPES, "loss_type", "one of " + ", ".join(LOSS_TYPES), self.loss_type),
            (0 <= self.label_smoothing < 0.5, "label_smoothing", "a number in [0, 0.5)", self.label_smoothing),
            *super().own_checks(),
        ]

    def validate(self) -> "DPOOptions":
        super().validate()
        if self.label_smoothing and self.loss_type not in SMOOTHED_LOSSES:
            raise PPOError(f"DPO option label_smoothing={self.label_smoothing!r} (--label-smoothing) applies to loss_type "
                           f"{', '.join(SMOOTHED_LOSSES)} only, not {self.loss_type}; set it to 0")
        if self.loss_type == "exo_pair" and not self.label_smoothing:
            raise PPOError("DPO option label_smoothing=0 (--label-smoothing) is invalid with loss_type exo_pair; "
                           "expected a small positive number (the EXO paper uses 1e-3)")
        return self


PolicyResult = SFTResult
"""What a finished TRL policy run (DPO, GRPO, RLOO, as SFT) produced; `registration()` gives its models-table row."""


# --------------------------------------------------------------------------- data


def _field(pair: Any, name: str) -> Any:
    return pair[name] if isinstance(pair, dict) else getattr(pair, name)


def _response_text(value: Any, where: str) -> str:
    if isinstance(value, list):
        messages = check_messages(value, where=where)
        return "".join(m["content"] for m in messages if m["role"] == "assistant")
    if not isinstance(value, str):
        raise PPOError(f"{where}: expected a string or a list of assistant messages, got {type(value).__name__}")
    return value


def dpo_rows(pairs: Iterable[Any], has_chat_template: bool) -> list[dict]:
    """TRL preference rows from pairs (annotation.io.Pair, or dicts with prompt/chosen/rejected as
    strings or messages): conversational when the tokenizer has a chat template, else standard text.
    Pairs with an empty side or two identical sides teach nothing and are left out."""
    from annotation.io.formats import pair_text

    rows = []
    for i, pair in enumerate(pairs, start=1):
        prompt = _field(pair, "prompt")
        chosen = _response_text(_field(pair, "chosen"), f"pair {i} chosen").strip()
        rejected = _response_text(_field(pair, "rejected"), f"pair {i} rejected").strip()
        if not chosen or not rejected or chosen == rejected:
            continue
        if has_chat_template:
            rows.append({"prompt": as_messages(prompt, where=f"pair {i} prompt"),
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            # TRL concatenates prompt and response as they are; keep a space between them.
            text = prompt if isinstance(prompt, str) else pair_text(check_messages(prompt, where=f"pair {i} prompt"))
            sep = "" if not text or text[-1].isspace() else " "
            rows.append({"prompt": text, "chosen": sep + chosen, "rejected": sep + rejected})
    return rows


# --------------------------------------------------------------------------- shared run plumbing


def load_policy_for_training(base: str | Path):
    """(tokenizer, fp32 model) of the starting policy; a clear PPOError when `base` is not a model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError) as exc:
        raise PPOError(f"--base {base}: cannot load a tokenizer ({exc}); expected a model directory or hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Trained weights and AdamW state stay fp32; bf16, where the plan has it, is the Trainer's autocast.
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return tokenizer, model


def lora_config(options):
    if not options.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def staging_dir(output_dir: Path) -> Path:
    """The run's temporary directory; each process under `accelerate launch` gets its own."""
    suffix = "" if main_process() else f"-rank{os.environ.get('RANK')}"
    staging = output_dir.with_name(f".{output_dir.name}.partial{suffix}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def trainer_args(options, staging: Path, bf16: bool) -> dict[str, Any]:
    """TrainingArguments every TRL policy trainer here shares (the trainer's own fields are added by the caller)."""
    import torch

    on_gpu = torch.cuda.is_available()
    checkpointing = on_gpu if options.gradient_checkpointing is None else options.gradient_checkpointing
    return dict(
        output_dir=str(staging / "trainer"),
        learning_rate=options.learning_rate,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        # TRL defaults to bf16 and checkpointing; on a CPU without native bf16 both make training several times slower.
        bf16=bf16,
        fp16=False,
        activation_checkpointing=checkpointing,
        use_cpu=not on_gpu,
        seed=options.seed,
        data_seed=options.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to_arg(getattr(options, "report_to", "none"), "report_to"),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def tracker_callbacks(options, staging: Path) -> list:
    """The TensorBoard callback (writing to the run's tb/) when the options ask for it."""
    return reporting.tracker_callbacks(getattr(options, "report_to", "none"), staging / "tb", "report_to")


def trainer_hooks(what: str, metrics_log: Path, log, progress, should_stop):
    """A TrainerCallback: each log line to metrics.jsonl and `log`, `progress` after every step, and
    a stop after the step where `should_stop()` turned true (agreed by every process, so none waits
    in a collective for one that left)."""
    from transformers import TrainerCallback

    class _Hooks(TrainerCallback):
        def __init__(self):
            self.stopped = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                with open(metrics_log, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}, default=float) + "\n")
                log(f"{what} step {state.global_step}: " + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()))

        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None and state.max_steps and state.is_world_process_zero:
                progress(state.global_step / state.max_steps, f"{what} step {state.global_step}/{state.max_steps}")
            stop = bool(should_stop is not None and should_stop())
            if args.world_size > 1:
                import torch
                import torch.distributed as dist

                flag = torch.tensor([float(stop)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                self.stopped = True
                control.should_training_stop = True

    return _Hooks()


def train_and_save(trainer, hooks, *, staging: Path, output_dir: Path, tokenizer, merge_lora: bool, what: str):
    """Train, then save the model (LoRA merged) and tokenizer into `staging` on the main process.
    Returns TrainOutput. A stop or a failure removes `staging` and raises."""
    from transformers import PrinterCallback

    try:
        # Progress goes to the run's log through the hooks; the default printer would duplicate it on stdout.
        trainer.remove_callback(PrinterCallback)
        output = trainer.train()
        if hooks.stopped:
            raise PPOError(f"stopped: {what} was cancelled before it finished; nothing was saved")
        if merge_lora:
            trained = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            if main_process():
                trained.save_pretrained(staging)
        else:
            # save_model gathers sharded weights (DeepSpeed ZeRO-3, FSDP) and writes on the main process only.
            trainer.save_model(str(staging))
        if main_process():
            tokenizer.save_pretrained(staging)
            (staging / "training_args.bin").unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging / "trainer", ignore_errors=True)
    return output


def publish(staging: Path, output_dir: Path, summary_name: str, summary: dict) -> None:
    """Write the run summary and move `staging` to `output_dir` (main process); other processes drop theirs."""
    if not main_process():
        shutil.rmtree(staging, ignore_errors=True)
        return
    (staging / summary_name).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    if output_dir.exists():
        output_dir.rmdir()  # checked empty at the start
    staging.rename(output_dir)


def logged(history: list[dict], key: str) -> list[float]:
    return [float(entry[key]) for entry in history if key in entry]


# --------------------------------------------------------------------------- training


def train_dpo(
    pairs: Iterable[Any],
    output_dir: str | Path,
    *,
    base: str | Path,
    options: DPOOptions | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PolicyResult:
    """DPO of `base` on preference pairs; the model and tokenizer are saved to `output_dir`.

    `progress(fraction, message)` is called after every optimizer step; when `should_stop()` turns
    true training ends after the current step, nothing is saved, and PPOError("stopped") is raised.
    The output directory is written under a temporary name and renamed at the end.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    options = (options or DPOOptions()).validate()
    output_dir = Path(output_dir)
    _fresh_output_dir(output_dir)
    log = log or (lambda message: None)
    pairs = list(pairs)

    tokenizer, model = load_policy_for_training(base)
    rows = dpo_rows(pairs, has_chat_template=bool(tokenizer.chat_template))
    if not rows:
        raise PPOError(f"no usable pairs to train on ({len(pairs)} given; pairs with an empty or identical side are left out)")
    if len(rows) < len(pairs):
        log(f"{len(pairs) - len(rows)} of {len(pairs)} pairs left out: an empty response or chosen == rejected")

    # DPO's work is SFT's (teacher-forced forwards and a backward over prompt + response), so the plan's
    # measured choice for "sft" applies.
    plan = precision_plan(options.precision)
    staging = staging_dir(output_dir)
    hooks = trainer_hooks("DPO", staging / "metrics.jsonl", log, progress, should_stop)
    args = trainer_args(options, staging, plan.bf16("sft"))
    config = DPOConfig(
        **args, num_train_epochs=options.epochs, max_steps=options.max_steps, max_length=options.max_length,
        beta=options.beta, loss_type=[options.loss_type], label_smoothing=options.label_smoothing,
    )
    started = time.perf_counter()
    try:
        # ref_model=None: TRL loads a frozen copy of the base, or (LoRA) turns the adapters off for the reference.
        trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora_config(options),
                             callbacks=[hooks, *tracker_callbacks(options, staging)])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    output = train_and_save(trainer, hooks, staging=staging, output_dir=output_dir, tokenizer=tokenizer,
                            merge_lora=options.lora, what="DPO")

    history = trainer.state.log_history
    losses, margins, accuracies = logged(history, "loss"), logged(history, "rewards/margins"), logged(history, "rewards/accuracies")
    metrics = {
        "train_loss": float(output.training_loss),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "first_reward_margin": margins[0] if margins else None,
        "final_reward_margin": margins[-1] if margins else None,
        "final_reward_accuracy": accuracies[-1] if accuracies else None,
        "final_rewards_chosen": (logged(history, "rewards/chosen") or [None])[-1],
        "final_rewards_rejected": (logged(history, "rewards/rejected") or [None])[-1],
        "steps": int(output.global_step),
        "runtime_s": round(time.perf_counter() - started, 2),
    }
    params = {**dataclasses.asdict(options), "trainer": "dpo", "compute_precision": plan.label("sft"),
              "gradient_checkpointing": args["activation_checkpointing"],
              "reference": "base with adapters off" if options.lora else "frozen copy of the base"}
    result = PolicyResult(output_dir=output_dir, base_model=str(base), rows=len(rows), data_hash=data_hash(rows),
                          params=params, metrics=metrics)
    publish(staging, output_dir, "dpo.json", {"base_model": str(base), "rows": len(rows), "data_hash": result.data_hash,
                                              "params": params, "metrics": metrics})
    log(f"DPO done: {metrics['steps']} steps, loss {metrics['first_loss']} -> {metrics['final_loss']}, "
        f"reward margin {metrics['first_reward_margin']} -> {metrics['final_reward_margin']}, saved to {output_dir}")
    return result
