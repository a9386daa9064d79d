"""Stage 1 of RLHF: supervised fine-tuning of a policy with TRL's SFTTrainer.

    rlhf sft --data instructions.jsonl --output runs/sft-1 [--base PATH] [--lora] [--epochs 1]
    rlhf sft --project demo --output runs/sft-2          # the chosen responses of a project

Training data is either an instruction file (JSONL, one object a line, all lines of one kind:
{"messages": [...]}, {"prompt", "completion"} or {"text"}) or the pairs of a project, whose
chosen responses become prompt/completion rows. Prompts and completions are put in chat form so
that the base model's chat template is applied, the same template that generation uses later.
The trained model (LoRA adapters merged in, so that every later stage loads a plain model
directory) is written to a run directory that appears only when training has finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from annotation.errors import InputError
from ppo.errors import PPOError
from ppo.options import OfflineTrainerOptions
from reward.precision import precision_plan
from reward.reporting import trainer_reporting

ROLES = ("system", "user", "assistant")
DEFAULT_POLICY = "SmolLM2-135M-Instruct"
"""The default base policy's directory under the model dir (`rlhf models fetch` puts it there)."""


def resolve_base(base: str | Path | None, model_dir: str | Path) -> str:
    """The base policy to start from: None or "smollm2" is the fetched default, anything else a path or hub id."""
    if base in (None, "", "smollm2"):
        path = Path(model_dir) / DEFAULT_POLICY
        if not (path / "config.json").is_file():
            raise PPOError(f"the default policy is not at {path}; run `rlhf models fetch`, or pass --base PATH")
        return str(path)
    return str(base)



@dataclasses.dataclass
class SFTOptions(OfflineTrainerOptions):
    """Hyperparameters of one SFT run (ppo.options.OfflineTrainerOptions, SFT's defaults); CLI flags and job params map onto these names."""

    TRAINER = "SFT"
    LEARNING_RATE = 2e-5
    LORA_LEARNING_RATE = 1e-4

    learning_rate: float | None = None
    """Peak AdamW learning rate; default 2e-5 (TRL's SFT default), or 1e-4 with lora."""
    batch_size: int = 4
    """Rows per forward pass."""


@dataclasses.dataclass
class SFTResult:
    """What a finished SFT run (or DPO, GRPO, RLOO run: ppo.dpo.PolicyResult) produced; `registration()` turns it into a models-table row."""

    output_dir: Path
    base_model: str
    rows: int
    data_hash: str
    params: dict[str, Any]
    metrics: dict[str, Any]

    def registration(self, name: str | None = None, project_id: int | None = None, parent_id: int | None = None) -> dict:
        return {
            "kind": "policy",
            "name": name or self.output_dir.name,
            "path": str(self.output_dir),
            "base_model": self.base_model,
            "project_id": project_id,
            "data_hash": self.data_hash,
            "data_rows": self.rows,
            "params": self.params,
            "metrics": self.metrics,
            "parent_id": parent_id,
        }


# --------------------------------------------------------------------------- data


def as_messages(prompt: str | list[dict], *, where: str = "prompt") -> list[dict[str, str]]:
    """A prompt as chat messages: messages pass through (validated); an HH transcript
    ("\n\nHuman: ... \n\nAssistant:") becomes its turns; any other text becomes one user message."""
    from annotation.io.formats import text_to_messages

    if isinstance(prompt, list):
        return check_messages(prompt, where=where)
    if not isinstance(prompt, str):
        raise PPOError(f"{where}: expected a string or a list of messages, got {type(prompt).__name__}")
    return text_to_messages(prompt)


def check_messages(messages: Any, *, where: str = "messages") -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise PPOError(f"{where}: expected a non-empty list of {{\"role\", \"content\"}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PPOError(f"{where}[{i}]: expected {{\"role\": one of {', '.join(ROLES)}, \"content\": string}}, got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _row_kind(obj: dict) -> str | None:
    if "messages" in obj:
        return "messages"
    if "prompt" in obj and "completion" in obj:
        return "prompt-completion"
    if "text" in obj:
        return "text"
    return None


def read_sft_file(path: str | Path) -> list[dict]:
    """Rows of an instruction JSONL file, validated; InputError names the line and field of the first bad row."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(str(path), None, None, "file not found", "a JSONL file of SFT rows") from None
    except UnicodeDecodeError:
        raise InputError(str(path), None, None, "not UTF-8 text", "a UTF-8 JSONL file") from None
    rows: list[dict] = []
    kind = None
    expected = 'one JSON object a line with "messages", or "prompt" and "completion", or "text"'
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(str(path), n, None, f"not valid JSON ({exc.msg})", expected) from None
        if not isinstance(obj, dict):
            raise InputError(str(path), n, None, f"a JSON {type(obj).__name__}, not an object", expected)
        this = _row_kind(obj)
        if this is None:
            raise InputError(str(path), n, None, f"no SFT fields (keys: {', '.join(sorted(obj)) or 'none'})", expected)
        if kind is None:
            kind = this
        elif this != kind:
            raise InputError(str(path), n, None, f"a {this} row in a file whose first row is {kind}", f"every row of one kind ({kind})")
        try:
            if this == "messages":
                row = {"messages": check_messages(obj["messages"], where="messages")}
                if not any(m["role"] == "assistant" for m in row["messages"]):
                    raise PPOError("messages: no assistant message to learn from")
            elif this == "prompt-completion":
                row = {"prompt": obj["prompt"], "completion": obj["completion"]}
                as_messages(row["prompt"], where="prompt")
                if isinstance(row["completion"], list):
                    check_messages(row["completion"], where="completion")
                elif not isinstance(row["completion"], str) or not row["completion"].strip():
                    raise PPOError("completion: expected a non-empty string or a list of assistant messages")
            else:
                if not isinstance(obj["text"], str) or not obj["text"].strip():
                    raise PPOError("text: expected a non-empty string")
                row = {"text": obj["text"]}
        except PPOError as exc:
            field, _, problem = str(exc).partition(": ")
            raise InputError(str(path), n, field, problem) from None
        rows.append(row)
    if not rows:
        raise InputError(str(path), None, None, "no rows", expected)
    return rows


def rows_from_pairs(pairs: Iterable[Any]) -> list[dict]:
    """Prompt/completion rows from preference pairs (annotation.io.Pair): the chosen response is the target."""
    return [{"prompt": p.prompt, "completion": p.chosen} for p in pairs if str(p.chosen).strip()]


def to_chat_rows(rows: list[dict], has_chat_template: bool) -> list[dict]:
    """Prompt/completion rows in conversational form when the tokenizer has a chat template, so TRL applies it."""
    if not rows or "prompt" not in rows[0] or not has_chat_template:
        return rows
    out = []
    for row in rows:
        completion = row["completion"]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion.strip()}]
        out.append({"prompt": as_messages(row["prompt"]), "completion": completion})
    return out


def data_hash(rows: list[dict]) -> str:
    """A fingerprint of the training rows, recorded with the registered policy."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------- training


def _fresh_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise PPOError(f"--output {output_dir}: already exists and is not empty; choose a new run directory")


def train_sft(
    rows: list[dict],
    output_dir: str | Path,
    *,
    base: str | Path,
    options: SFTOptions | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SFTResult:
    """Fine-tune `base` on `rows` and save the model and tokenizer to `output_dir`.

    `progress(fraction, message)` is called after every optimizer step; when `should_stop()` turns
    true training ends after the current step, nothing is saved, and PPOError("stopped") is raised.
    The output directory is written under a temporary name and renamed at the end, so a failed or
    stopped run leaves nothing behind that looks like a model.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    options = (options or SFTOptions()).validate()
    output_dir = Path(output_dir)
    _fresh_output_dir(output_dir)
    log = log or (lambda message: None)
    if not rows:
        raise PPOError("no SFT rows to train on")

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError) as exc:
        raise PPOError(f"--base {base}: cannot load a tokenizer ({exc}); expected a model directory or hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = to_chat_rows(rows, has_chat_template=bool(tokenizer.chat_template))
    if "messages" in train_rows[0] and not tokenizer.chat_template:
        raise PPOError(f"--base {base}: the tokenizer has no chat template, so \"messages\" rows cannot be formatted")

    # Trained weights and AdamW state stay fp32; bf16, where the plan has it, is the Trainer's autocast.
    plan = precision_plan(options.precision)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    on_gpu = torch.cuda.is_available()
    checkpointing = on_gpu if options.gradient_checkpointing is None else options.gradient_checkpointing

    peft_config = None
    if options.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
            target_modules="all-linear", task_type="CAUSAL_LM",
        )

    staging = output_dir.with_name(f".{output_dir.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    metrics_log = staging / "metrics.jsonl"

    class _Hooks(TrainerCallback):
        def __init__(self):
            self.stopped = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                with open(metrics_log, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")
                log(f"step {state.global_step}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()))

        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None and state.max_steps:
                progress(state.global_step / state.max_steps, f"SFT step {state.global_step}/{state.max_steps}")
            if should_stop is not None and should_stop():
                self.stopped = True
                control.should_training_stop = True

    report_to, trackers = trainer_reporting(options.report_to, staging / "tb", "report_to")
    config = SFTConfig(
        output_dir=str(staging / "trainer"),
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        learning_rate=options.learning_rate,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        max_length=options.max_length,
        # TRL defaults to bf16 and checkpointing; on a CPU without native bf16 both make training ~9x slower.
        bf16=plan.bf16("sft"),
        fp16=False,
        activation_checkpointing=checkpointing,
        use_cpu=not on_gpu,
        seed=options.seed,
        data_seed=options.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    hooks = _Hooks()
    started = time.perf_counter()
    try:
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer,
            peft_config=peft_config, callbacks=[hooks, *trackers],
        )
        # Progress goes to the run's log through _Hooks; the default printer would duplicate it on stdout.
        trainer.remove_callback(PrinterCallback)
        output = trainer.train()
        if hooks.stopped:
            raise PPOError("stopped: SFT was cancelled before it finished; nothing was saved")
        trained = trainer.model
        if options.lora:
            trained = trained.merge_and_unload()
        trained.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging / "trainer", ignore_errors=True)

    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "train_loss": float(output.training_loss),
        "first_loss": float(history[0]["loss"]) if history else None,
        "final_loss": float(history[-1]["loss"]) if history else None,
        "mean_token_accuracy": history[-1].get("mean_token_accuracy") if history else None,
        "steps": int(output.global_step),
        "runtime_s": round(time.perf_counter() - started, 2),
    }
    params = {**dataclasses.asdict(options), "compute_precision": plan.label("sft"), "gradient_checkpointing": checkpointing}
    result = SFTResult(
        output_dir=output_dir, base_model=str(base), rows=len(rows), data_hash=data_hash(rows), params=params, metrics=metrics,
    )
    (staging / "sft.json").write_text(json.dumps({"base_model": str(base), "rows": len(rows), "data_hash": result.data_hash,
                                                   "params": params, "metrics": metrics}, indent=2), encoding="utf-8")
    if output_dir.exists():
        output_dir.rmdir()  # checked empty above
    staging.rename(output_dir)
    log(f"SFT done: {metrics['steps']} steps, loss {metrics['first_loss']} -> {metrics['final_loss']}, saved to {output_dir}")
    return result
