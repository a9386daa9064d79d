"""Memory planning for RLHF training past one machine: how many bytes each GPU holds for PPO's four
models, DPO's two and GRPO's three, and which GPUs (and how many) that fits on.

    from ppo.memory import MemorySpec, plan_memory
    plan = plan_memory(MemorySpec(algo="ppo", model_size="70b", zero=3, gpus=32))
    rlhf plan-memory --algo ppo --model-size 70b --zero 3 --gpus 32

Pure arithmetic, no torch: the CLI's `rlhf plan-memory` and the PPO page's planner call the same
`plan_memory`. Two accountings:

- `mixed-precision` (default): what a trainer really holds. Per trained parameter under bf16 mixed
  precision with Adam: 2 B bf16 weights + 2 B bf16 gradients + 4 B fp32 master weights + 8 B fp32
  Adam moments = 16 B (ZeRO paper, Rajbhandari et al. 2020, section 3.1); frozen models 2 B. ZeRO
  stage 1 shards the 12 B of optimizer state (master + moments) over the GPUs, stage 2 also the
  gradients, stage 3 (and FSDP full shard) also the parameters, frozen models' included. Plus the
  activations of the trained models and the KV cache of generation (PPO, GRPO).
- `textbook`: the RLHF-book accounting of a 70B PPO run: bf16 weights (2 B) for every model and
  bf16 gradients (2 B) for the trained ones, nothing else: 280 + 280 + 140 + 140 = 840 GB, "about
  12 A100 80 GB". The result names what it leaves out.

GB here are 10^9 bytes, as the textbook counts (70e9 parameters x 4 B = 280 GB). A GPU sold as
"80 GB" has 80 GiB (85.9e9 B); counting it as 80e9 errs on the safe side.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ppo.errors import PPOError

GB = 1e9
GPU_SIZES_GB = (24, 40, 48, 80, 141)
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
# Of each GPU's memory, this much is planned for; the rest goes to the CUDA context, NCCL buffers
# and allocator fragmentation. 0.875 of 80 GB is 70 GB, the convention that gives the textbook's
# "about 12 A100s" for 840 GB exactly (840 / 70 = 12); dividing by the full 80 GB would give 10.5,
# so 11, and a flat 10% overhead would give 840 x 1.1 / 80 = 11.55, so 12 as well.
USABLE_FRACTION = 0.875

ALGOS = ("ppo", "dpo", "grpo")
PRECISIONS = ("bf16-mixed", "bf16", "fp32")
ACCOUNTINGS = ("mixed-precision", "textbook")


@dataclass(frozen=True)
class ModelShape:
    """A transformer's size and the shape the activation, KV-cache and LoRA estimates read."""

    params: float
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    name: str = ""  # the preset the shape came from

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Parameter counts are the nominal ones (70b is 70e9, as the textbook counts); the shapes are those
# of a well-known model of that size: SmolLM2-135M, Llama-3.2-1B, Llama-2-7B/13B/70B.
PRESETS = {
    "135m": ModelShape(135e6, hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, name="135m"),
    "1b": ModelShape(1e9, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, name="1b"),
    "7b": ModelShape(7e9, hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, name="7b"),
    "13b": ModelShape(13e9, hidden=5120, layers=40, heads=40, kv_heads=40, ffn=13824, name="13b"),
    "70b": ModelShape(70e9, hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672, name="70b"),
}
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_model_size(value: Any, option: str = "--model-size") -> ModelShape:
    """A preset name (135m, 1b, 7b, 13b, 70b), or a parameter count (70e9, 3b, 350m) whose shape is
    that of the preset nearest in size."""
    text = str(value).strip().lower()
    if text in PRESETS:
        return PRESETS[text]
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e\+?[0-9]+)?)\s*([kmbt]?)", text)
    params = float(match.group(1)) * _SUFFIX[match.group(2)] if match else 0.0
    if not match or params < 1e6:
        raise PPOError(f"{option} {value!r}: expected a preset ({', '.join(PRESETS)}) or a parameter count "
                       "of at least 1m, such as 70e9 or 3b")
    nearest = min(PRESETS.values(), key=lambda s: abs(math.log(params / s.params)))
    return dataclasses.replace(nearest, params=params, name=f"{nearest.name}-shaped")


def lora_params(shape: ModelShape, r: int) -> int:
    """Adapter parameters of LoRA rank r on every linear layer of a Llama-style block: each
    (d_in x d_out) linear gains r x (d_in + d_out). q and o are h x h, k and v h x kv, gate and up
    h x ffn, down ffn x h."""
    h, kv, f = shape.hidden, shape.kv_heads * shape.head_dim, shape.ffn
    per_layer = r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + f))
    return shape.layers * per_layer


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, checkpointing: bool,
                     bytes_per_value: int = 2) -> int:
    """Activations kept for the backward pass of one micro-batch, all layers.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    eq. (1) with no tensor parallelism: s*b*h*(34 + 5*a*s/h) bytes per layer for 16-bit activations
    (s sequence length, b micro-batch, h hidden size, a attention heads); with full activation
    recomputation (gradient checkpointing) only each layer's 16-bit input stays, 2*s*b*h bytes.
    Fused attention (FlashAttention) drops the 5*a*s/h term; the logits and embeddings are left
    out, as in the paper. fp32 activations are counted at twice the 16-bit figure."""
    s, b, h, a = seq_len, micro_batch, shape.hidden, shape.heads
    per_layer = 2 * s * b * h if checkpointing else 34 * s * b * h + 5 * a * s * s * b
    return shape.layers * per_layer * bytes_per_value // 2


def kv_cache_bytes(shape: ModelShape, seq_len: int, batch: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for `batch` sequences of `seq_len` tokens during generation."""
    return 2 * shape.layers * batch * seq_len * shape.kv_heads * shape.head_dim * bytes_per_value


# Bytes per parameter: (weights, gradients, master weights, optimizer state) when trained with
# Adam, and weights when frozen. Pure bf16 keeps the Adam moments in bf16 and no master copy.
_TRAINED_BYTES = {"bf16-mixed": (2, 2, 4, 8), "bf16": (2, 2, 0, 4), "fp32": (4, 4, 0, 8)}
_FROZEN_BYTES = {"bf16-mixed": 2, "bf16": 2, "fp32": 4}
PARTS = ("weights", "gradients", "master_weights", "optimizer_state", "activations", "kv_cache")


def model_state_bytes(params: float, trained_params: float, precision: str, stage: int, gpus: int) -> dict[str, float]:
    """Weights, gradients, master weights and optimizer state per GPU of one model with `params`
    parameters of which `trained_params` are trained (the rest frozen), under ZeRO `stage` over `gpus`.

    ZeRO paper (Rajbhandari et al. 2020): stage 1 partitions the optimizer state (fp32 master and
    Adam moments, 12 B/param under mixed precision) over the N data-parallel GPUs, stage 2 also the
    gradients, stage 3 also the parameters: (2 + 2 + 12) / N B/param at stage 3."""
    w, g, m, o = _TRAINED_BYTES[precision]
    frozen = params - trained_params
    return {
        "weights": (trained_params * w + frozen * _FROZEN_BYTES[precision]) / (gpus if stage >= 3 else 1),
        "gradients": trained_params * g / (gpus if stage >= 2 else 1),
        "master_weights": trained_params * m / (gpus if stage >= 1 else 1),
        "optimizer_state": trained_params * o / (gpus if stage >= 1 else 1),
    }


@dataclass
class MemorySpec:
    """A training run to plan memory for. The CLI's options are read from these fields."""

    algo: str = field(default="ppo", metadata={"help": "ppo (policy, value, reference, reward), dpo (policy, reference) or grpo (policy, reference unless beta is 0, reward)."})
    model_size: str = field(default="7b", metadata={"help": "Policy size: a preset (135m, 1b, 7b, 13b, 70b) or a parameter count such as 70e9 or 3b."})
    reward_size: Optional[str] = field(default=None, metadata={"help": "Reward model size (default: the policy's)."})
    value_size: Optional[str] = field(default=None, metadata={"help": "PPO value model size (default: the reward model's, which it starts from)."})
    precision: str = field(default="bf16-mixed", metadata={"help": "bf16-mixed (bf16 weights and gradients, fp32 master weights and Adam moments: 16 B per trained parameter), bf16 (all bf16, 8 B) or fp32 (16 B)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on every linear layer; the base stays frozen, and the reference is the base with adapters off."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank, for the adapter parameter count."})
    zero: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage: 0 none, 1 optimizer state sharded, 2 also gradients, 3 also parameters."})
    fsdp: bool = field(default=False, metadata={"help": "FSDP full shard (counted as ZeRO-3)."})
    gpus: int = field(default=1, metadata={"help": "Data-parallel GPUs the states are sharded over."})
    grad_checkpointing: bool = field(default=False, metadata={"help": "Gradient checkpointing: keep each layer's input only, recompute the rest."})
    seq_len: int = field(default=1024, metadata={"help": "Tokens per sequence (prompt + response), for activations and KV cache."})
    micro_batch: int = field(default=1, metadata={"help": "Sequences per GPU per forward/backward (DPO: pairs, two sequences each)."})
    beta: float = field(default=0.04, metadata={"help": "GRPO's KL coefficient; at 0 no reference model is loaded."})
    accounting: str = field(default="mixed-precision", metadata={"help": "mixed-precision (everything a trainer holds) or textbook (bf16 weights and gradients only)."})

    @staticmethod
    def help(name: str) -> str:
        return next(f.metadata["help"] for f in dataclasses.fields(MemorySpec) if f.name == name)

    def validate(self) -> "MemorySpec":
        for name, allowed in (("algo", ALGOS), ("precision", PRECISIONS), ("accounting", ACCOUNTINGS)):
            if getattr(self, name) not in allowed:
                raise PPOError(f"--{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        for name in ("model_size", "reward_size", "value_size"):
            if getattr(self, name) is not None:
                parse_model_size(getattr(self, name), f"--{name.replace('_', '-')}")
        if self.zero not in (0, 1, 2, 3):
            raise PPOError(f"--zero {self.zero}: expected a ZeRO stage 0, 1, 2 or 3")
        if self.fsdp and self.zero not in (0, 3):
            raise PPOError(f"--fsdp with --zero {self.zero}: FSDP full shard is counted as ZeRO-3; give one of them")
        for name in ("gpus", "seq_len", "micro_batch", "lora_r"):
            if getattr(self, name) < 1:
                raise PPOError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a positive integer")
        if self.beta < 0:
            raise PPOError(f"--beta {self.beta}: expected 0 or more")
        return self

    @property
    def stage(self) -> int:
        return 3 if self.fsdp else self.zero


def _roles(spec: MemorySpec) -> list[tuple[str, ModelShape, bool]]:
    """(name, shape, trained) for each model the algorithm holds, in the textbook's order."""
    policy = parse_model_size(spec.model_size)
    reward = parse_model_size(spec.reward_size, "--reward-size") if spec.reward_size is not None else policy
    value = parse_model_size(spec.value_size, "--value-size") if spec.value_size is not None else reward
    if spec.algo == "ppo":
        return [("policy", policy, True), ("value", value, True), ("reference", policy, False), ("reward", reward, False)]
    if spec.algo == "dpo":
        return [("policy", policy, True), ("reference", policy, False)]
    roles = [("policy", policy, True)]
    if spec.beta > 0:
        roles.append(("reference", policy, False))
    return roles + [("reward", reward, False)]


def _fits(per_gpu: float) -> dict[str, bool]:
    return {str(size): per_gpu <= size * GB * USABLE_FRACTION for size in GPU_SIZES_GB}


def _textbook(spec: MemorySpec) -> dict[str, Any]:
    models = []
    for name, shape, trained in _roles(spec):
        parts = {"weights": 2 * shape.params, "gradients": 2 * shape.params if trained else 0.0}
        models.append({"name": name, "params": shape.params, "trained": trained, "shape": shape.name,
                       "bytes": parts, "total": sum(parts.values())})
    total = sum(m["total"] for m in models)
    per_gpu = total / spec.gpus  # the textbook spreads the total evenly over the GPUs
    usable_80 = 80 * GB * USABLE_FRACTION
    trained = [m for m in models if m["trained"]]
    trained_params = sum(m["params"] for m in trained)
    # What a mixed-precision trainer adds per trained parameter: fp32 master weights (4 B) and Adam's
    # two fp32 moments (8 B); with the 2 + 2 B counted above that is 16 B/param.
    left_out = {
        "master_weights": 4 * trained_params,
        "optimizer_state": 8 * trained_params,
        "activations_per_gpu": sum(activation_bytes(shape, spec.seq_len, _sequences(spec), spec.grad_checkpointing)
                                   for _, shape, t in _roles(spec) if t),
    }
    with_states = total + left_out["master_weights"] + left_out["optimizer_state"]
    return {
        "accounting": "textbook",
        "scope": "whole model",
        "algo": spec.algo,
        "models": models,
        "total": total,
        "gpus": spec.gpus,
        "per_gpu": {"total": per_gpu},
        "fits": _fits(per_gpu),
        "usable_fraction": USABLE_FRACTION,
        "gpus_needed_80gb": math.ceil(total / usable_80 - 1e-9),
        "min_gpus_80gb": next((n for n in GPU_COUNTS if total / n <= usable_80), None),
        "left_out": left_out,
        "total_with_left_out": with_states,
        "gpus_needed_80gb_with_left_out": math.ceil(with_states / usable_80 - 1e-9),
        "ignores": ["precision", "lora", "zero/fsdp", "activations", "kv cache"],
        "notes": [
            "textbook accounting: bf16 weights (2 B/param) for every model, bf16 gradients (2 B/param) for "
            "trained ones, spread evenly over the GPUs",
            f"GPUs needed: total / {usable_80 / GB:.0f} GB usable per 80 GB GPU ({1 - USABLE_FRACTION:.1%} held "
            "back for CUDA context, communication buffers and fragmentation), rounded up",
        ],
    }


def _sequences(spec: MemorySpec) -> int:
    # DPO runs chosen and rejected through the policy together: two sequences per pair.
    return 2 * spec.micro_batch if spec.algo == "dpo" else spec.micro_batch


def _mixed(spec: MemorySpec) -> dict[str, Any]:
    act_bytes = 4 if spec.precision == "fp32" else 2
    stage = spec.stage
    models = []
    for name, shape, trained in _roles(spec):
        note = ""
        if name == "reference" and spec.lora:
            # The reference is the policy with its adapters switched off: no second copy.
            parts = dict.fromkeys(PARTS, 0.0)
            note = "policy with adapters off"
        else:
            trained_params = (lora_params(shape, spec.lora_r) if spec.lora else shape.params) if trained else 0.0
            params = shape.params + (trained_params if spec.lora else 0.0)
            parts = model_state_bytes(params, trained_params, spec.precision, stage, spec.gpus)
            parts["activations"] = float(activation_bytes(shape, spec.seq_len, _sequences(spec), spec.grad_checkpointing,
                                                          act_bytes)) if trained else 0.0
            parts["kv_cache"] = float(kv_cache_bytes(shape, spec.seq_len, spec.micro_batch, act_bytes)) \
                if name == "policy" and spec.algo in ("ppo", "grpo") else 0.0
            if spec.lora and trained:
                note = f"LoRA r={spec.lora_r}: {trained_params / 1e6:.1f}M trained"
        models.append({"name": name, "params": shape.params, "trained": trained, "shape": shape.name,
                       "bytes": parts, "total": sum(parts.values()), "note": note})
    per_gpu = {part: sum(m["bytes"][part] for m in models) for part in PARTS}
    states = sum(per_gpu[p] for p in PARTS[:4])
    # Generation (KV cache) and the backward pass (activations) do not hold memory at the same time.
    per_gpu["model_states"] = states
    per_gpu["total"] = states + max(per_gpu["activations"], per_gpu["kv_cache"])
    for m in models:
        m["total"] = sum(m["bytes"][p] for p in PARTS[:4]) + max(m["bytes"]["activations"], m["bytes"]["kv_cache"])
    plan = {
        "accounting": "mixed-precision",
        "scope": "per GPU",
        "algo": spec.algo,
        "precision": spec.precision,
        "lora": spec.lora,
        "sharding": "fsdp (full shard)" if spec.fsdp else f"zero-{stage}",
        "gpus": spec.gpus,
        "seq_len": spec.seq_len,
        "micro_batch": spec.micro_batch,
        "grad_checkpointing": spec.grad_checkpointing,
        "models": models,
        "per_gpu": per_gpu,
        "fits": _fits(per_gpu["total"]),
        "usable_fraction": USABLE_FRACTION,
        "notes": [
            "peak per GPU = model states + the larger of activations (training) and KV cache (generation)",
            "activations: Korthikanti et al. 2022, s*b*h*(34 + 5*a*s/h) B per layer, 2*s*b*h with checkpointing",
            "not counted: CUDA context, communication buffers, fragmentation (the usable fraction holds "
            "them back), ZeRO-3's gathered layers, logits, frozen models' forward passes",
        ],
    }
    return plan


def plan_memory(spec: MemorySpec) -> dict[str, Any]:
    """The memory plan of `spec`: bytes per model and per GPU, the GPU sizes it fits on, and the
    smallest power-of-two GPU count (same sharding) that fits on 80 GB GPUs. JSON-ready."""
    spec.validate()
    if spec.accounting == "textbook":
        return _textbook(spec)
    plan = _mixed(spec)
    plan["min_gpus_80gb"] = _min_gpus(spec)
    if plan["min_gpus_80gb"] is None:
        # More GPUs shrink only what is sharded; say what else would make it fit.
        hints = []
        if spec.stage < 3:
            n = _min_gpus(dataclasses.replace(spec, zero=3, fsdp=False))
            hints.append(f"with --zero 3: {n} GPUs" if n else "not with --zero 3 either")
        if not spec.grad_checkpointing:
            n = _min_gpus(dataclasses.replace(spec, zero=3, fsdp=False, grad_checkpointing=True))
            hints.append(f"with --zero 3 --grad-checkpointing: {n} GPUs" if n else
                         "not with --zero 3 --grad-checkpointing either")
        if not hints or not any(h.startswith("with") for h in hints):
            hints.append(f"the activations alone are {plan['per_gpu']['activations'] / GB:.1f} GB per GPU: "
                         "try a shorter --seq-len, a smaller --micro-batch or --lora")
        plan["hints"] = hints
    return plan


def _min_gpus(spec: MemorySpec) -> Optional[int]:
    usable_80 = 80 * GB * USABLE_FRACTION
    return next((n for n in GPU_COUNTS if _mixed(dataclasses.replace(spec, gpus=n))["per_gpu"]["total"] <= usable_80), None)


def plan_rows(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model and a total row, in GB, for a table (the CLI's text and the PPO page)."""
    parts = ("weights", "gradients") if plan["accounting"] == "textbook" else PARTS
    rows = []
    for m in plan["models"]:
        row = {"model": m["name"], "role": "trained" if m["trained"] else "frozen", "params (B)": m["params"] / 1e9}
        row.update({part: m["bytes"][part] / GB for part in parts})
        row["total"] = m["total"] / GB
        rows.append(row)
    total = {"model": "total", "role": "", "params (B)": sum(m["params"] for m in plan["models"]) / 1e9}
    if plan["accounting"] == "textbook":
        total.update({part: sum(m["bytes"][part] for m in plan["models"]) / GB for part in parts})
        total["total"] = plan["total"] / GB
    else:
        total.update({part: plan["per_gpu"][part] / GB for part in parts})
        total["total"] = plan["per_gpu"]["total"] / GB
    rows.append(total)
    return rows


def plan_summary(plan: dict[str, Any]) -> str:
    """One line under the table: the total, where it fits and the GPU count it needs."""
    fits = [f"{size} GB" for size in GPU_SIZES_GB if plan["fits"][str(size)]] or ["none of the usual GPU sizes"]
    if plan["accounting"] == "textbook":
        left = plan["left_out"]
        return (f"{plan['total'] / GB:.0f} GB in all: {plan['gpus_needed_80gb']} GPUs of 80 GB "
                f"({80 * USABLE_FRACTION:.0f} GB usable each). Left out: fp32 master weights {left['master_weights'] / GB:.0f} GB "
                f"and Adam moments {left['optimizer_state'] / GB:.0f} GB ({plan['total_with_left_out'] / GB:.0f} GB, "
                f"{plan['gpus_needed_80gb_with_left_out']} GPUs), and activations.")
    needed = plan["min_gpus_80gb"]
    return (f"Peak per GPU {plan['per_gpu']['total'] / GB:.1f} GB over {plan['gpus']} GPU(s); fits on {', '.join(fits)} "
            f"(using {USABLE_FRACTION:.1%} of each). Smallest power-of-two count on 80 GB GPUs: "
            f"{needed if needed else 'none up to 64'}." + "".join(f" {h[0].upper()}{h[1:]}." for h in plan.get("hints", [])))
