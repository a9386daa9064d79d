"""The precision plan: which dtype each training stage computes in, on this machine.

    from reward.precision import precision_plan
    plan = precision_plan("auto")                 # or "fp32", or "bf16" to force mixed bf16
    with plan.autocast("ppo_generate"):
        ...

Every weight that trains, and its optimizer state, is fp32 on every device: an AdamW step of
lr 1e-5 is below half a bf16 ulp for most weights, so pure-bf16 weights mostly do not move.
bf16 is compute only (torch.autocast, or the Trainer's `bf16=True`, which is autocast too), and
only where the hardware computes bf16 natively and benchmarks/precision_bench.py measured it
faster than fp32 for that stage. `"bf16"` forces mixed bf16 compute for every stage, even on
hardware that emulates it (slow, but numerically the same plan): tests use it to set the plan
instead of depending on the machine they run on.

Frozen weights may be held in bf16 where every forward through them runs under bf16 autocast:
PPO does so for LoRA's base layers and its reference (ppo.models.hold_frozen_linears).

Stages:
    reward        reward-model training (TRL RewardTrainer)
    sft           supervised fine-tuning (TRL SFTTrainer)
    ppo_update    PPO's rollout forwards (log-probs, values) and its update; one dtype for both,
                  so the probability ratio starts at exactly 1
    ppo_generate  PPO's sampling
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

from reward.errors import RewardError

STAGES = ("reward", "sft", "ppo_update", "ppo_generate")
MODES = ("auto", "fp32", "bf16")
HELP = ("auto (bf16 autocast where the hardware has it and it was measured to pay), fp32, or bf16 (forced); "
        "trained weights stay fp32 in every mode.")

# What `auto` picks where bf16 is native, per device type, from benchmarks/precision_bench.py
# (README performance table). On this project's CPU (2 cores, AVX512-BF16, no AMX; fp32 s / bf16 s
# per call, best of 3): reward 1.38x, sft 1.09x, ppo_update 1.16x, ppo_generate 1.26x faster in
# bf16 autocast, so every stage. On CUDA GPUs with bf16, mixed bf16 is the standard choice
# (tensor cores); not measured here, since no GPU was lent. A CPU without native bf16 gets fp32.
AUTO_BF16_STAGES = {
    "cpu": frozenset(STAGES),
    "cuda": frozenset(STAGES),
}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX; elsewhere bf16 is emulated and several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls run in hardware on this device type."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return cpu_has_native_bf16()
    return False


def default_device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class PrecisionPlan:
    """Which stages compute in bf16 (autocast) on one device type; weights stay fp32 regardless."""

    device_type: str
    bf16_stages: frozenset
    mode: str

    def bf16(self, stage: str) -> bool:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        return stage in self.bf16_stages

    def label(self, stage: str) -> str:
        """What a run records: "bf16-mixed" (fp32 weights, bf16 compute) or "fp32"."""
        return "bf16-mixed" if self.bf16(stage) else "fp32"

    def autocast(self, stage: str):
        """A context that computes in bf16 for this stage, or does nothing."""
        if not self.bf16(stage):
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)


def check_mode(mode: str, option: str = "precision") -> str:
    if mode not in MODES:
        raise RewardError(f"{option} {mode!r} is invalid; expected one of {', '.join(MODES)}")
    return mode


def precision_plan(mode: str = "auto", device_type: str | None = None) -> PrecisionPlan:
    """The plan for `mode`: auto (measured per stage, bf16 only where native), fp32, or bf16 (forced)."""
    check_mode(mode)
    device_type = device_type or default_device_type()
    if mode == "fp32":
        stages = frozenset()
    elif mode == "bf16":
        stages = frozenset(STAGES)
    else:
        stages = AUTO_BF16_STAGES.get(device_type, frozenset()) if native_bf16(device_type) else frozenset()
    return PrecisionPlan(device_type=device_type, bf16_stages=stages, mode=mode)
