"""`rlhf plan-memory`: memory per GPU for PPO, DPO or GRPO at a model size, and the GPUs it fits on.

    rlhf plan-memory --algo ppo --model-size 70b --accounting textbook     # 280/280/140/140 GB, ~12 A100s
    rlhf plan-memory --algo ppo --model-size 70b --zero 3 --gpus 64 --grad-checkpointing
    rlhf plan-memory --algo dpo --model-size 7b --lora --lora-r 16 --json

The arithmetic is ppo.memory.plan_memory; this module only prints it. No torch is imported.
"""

from __future__ import annotations

from typing import Optional

import typer

from app.cli import JsonOpt, cli, emit
from ppo.memory import GB, GPU_SIZES_GB, MemorySpec, plan_memory, plan_rows

DEFAULTS = MemorySpec()
_SHORT = {"master_weights": "master", "optimizer_state": "optim", "activations": "activ", "kv_cache": "kv",
          "gradients": "grads", "params (B)": "params"}


def _gb(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _table(rows: list[dict]) -> list[str]:
    keys = list(rows[0])
    head = [_SHORT.get(k, k) for k in keys]
    cells = [[r[k] if isinstance(r[k], str) else (f"{r[k]:g}B" if k == "params (B)" else _gb(r[k])) for k in keys]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return [fmt(head)] + [fmt(c) for c in cells]


def _fits(plan: dict) -> str:
    return ", ".join(f"{size} GB {'yes' if plan['fits'][str(size)] else 'no'}" for size in GPU_SIZES_GB)


def render_text(plan: dict) -> str:
    """The plan for people: the table, the per-GPU total, where it fits, and what is not counted."""
    usable = f"usable {plan['usable_fraction']:.1%} of each GPU"
    if plan["accounting"] == "textbook":
        left = plan["left_out"]
        lines = [f"{plan['algo'].upper()} memory, textbook accounting (GB = 1e9 bytes, whole models):"]
        lines += _table(plan_rows(plan))
        lines += [
            f"per GPU over {plan['gpus']}: {_gb(plan['per_gpu']['total'] / GB)} GB; fits ({usable}): {_fits(plan)}",
            f"80 GB GPUs needed: {plan['gpus_needed_80gb']} ({_gb(plan['total'] / GB)} GB / "
            f"{80 * plan['usable_fraction']:.0f} GB usable, rounded up); smallest power of two: {plan['min_gpus_80gb']}",
            "left out by this accounting (16 B per trained parameter under mixed precision, not 4):",
            f"  fp32 master weights {_gb(left['master_weights'] / GB)} GB + Adam moments "
            f"{_gb(left['optimizer_state'] / GB)} GB -> {_gb(plan['total_with_left_out'] / GB)} GB, "
            f"{plan['gpus_needed_80gb_with_left_out']} GPUs of 80 GB",
            f"  activations of the trained models: {_gb(left['activations_per_gpu'] / GB)} GB per GPU per micro-batch",
            f"  (ignores {', '.join(plan['ignores'])}; --accounting mixed-precision counts them)",
        ]
        return "\n".join(lines)
    per_gpu = plan["per_gpu"]
    lines = [
        f"{plan['algo'].upper()} memory per GPU: {plan['precision']}, {'LoRA' if plan['lora'] else 'full'} fine-tuning, "
        f"{plan['sharding']} over {plan['gpus']} GPU(s), seq {plan['seq_len']} x micro-batch {plan['micro_batch']}, "
        f"checkpointing {'on' if plan['grad_checkpointing'] else 'off'} (GB = 1e9 bytes)",
    ]
    lines += _table(plan_rows(plan))
    lines += [f"note: {m['name']}: {m['note']}" for m in plan["models"] if m.get("note")]
    lines += [
        f"peak per GPU: {_gb(per_gpu['total'] / GB)} GB = model states {_gb(per_gpu['model_states'] / GB)} + "
        f"max(activations {_gb(per_gpu['activations'] / GB)}, KV cache {_gb(per_gpu['kv_cache'] / GB)})",
        f"fits ({usable}): {_fits(plan)}",
        f"smallest power-of-two GPU count on 80 GB GPUs ({plan['sharding']}): {plan['min_gpus_80gb'] or 'none up to 64'}",
    ]
    lines += [f"hint: {h}" for h in plan.get("hints", [])]
    lines += [f"note: {n}" for n in plan["notes"][1:]]
    return "\n".join(lines)


@cli.command("plan-memory")
def plan_memory_command(
    algo: str = typer.Option(DEFAULTS.algo, "--algo", help=MemorySpec.help("algo")),
    model_size: str = typer.Option(DEFAULTS.model_size, "--model-size", help=MemorySpec.help("model_size")),
    reward_size: Optional[str] = typer.Option(None, "--reward-size", help=MemorySpec.help("reward_size")),
    value_size: Optional[str] = typer.Option(None, "--value-size", help=MemorySpec.help("value_size")),
    precision: str = typer.Option(DEFAULTS.precision, "--precision", help=MemorySpec.help("precision")),
    lora: bool = typer.Option(DEFAULTS.lora, "--lora", help=MemorySpec.help("lora")),
    lora_r: int = typer.Option(DEFAULTS.lora_r, "--lora-r", help=MemorySpec.help("lora_r")),
    zero: int = typer.Option(DEFAULTS.zero, "--zero", help=MemorySpec.help("zero")),
    fsdp: bool = typer.Option(DEFAULTS.fsdp, "--fsdp", help=MemorySpec.help("fsdp")),
    gpus: int = typer.Option(DEFAULTS.gpus, "--gpus", help=MemorySpec.help("gpus")),
    grad_checkpointing: bool = typer.Option(DEFAULTS.grad_checkpointing, "--grad-checkpointing", help=MemorySpec.help("grad_checkpointing")),
    seq_len: int = typer.Option(DEFAULTS.seq_len, "--seq-len", help=MemorySpec.help("seq_len")),
    micro_batch: int = typer.Option(DEFAULTS.micro_batch, "--micro-batch", help=MemorySpec.help("micro_batch")),
    beta: float = typer.Option(DEFAULTS.beta, "--beta", help=MemorySpec.help("beta")),
    accounting: str = typer.Option(DEFAULTS.accounting, "--accounting", help=MemorySpec.help("accounting")),
    as_json: bool = JsonOpt,
) -> None:
    """Memory per GPU for PPO, DPO or GRPO: weights, gradients, master weights, optimizer state,
    activations and KV cache per model; the GPU sizes it fits on; the GPU count it needs."""
    spec = MemorySpec(algo=algo, model_size=model_size, reward_size=reward_size, value_size=value_size,
                      precision=precision, lora=lora, lora_r=lora_r, zero=zero, fsdp=fsdp, gpus=gpus,
                      grad_checkpointing=grad_checkpointing, seq_len=seq_len, micro_batch=micro_batch, beta=beta,
                      accounting=accounting)
    plan = plan_memory(spec)
    emit(plan, as_json, render_text(plan))
