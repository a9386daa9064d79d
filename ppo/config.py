"""PPO's configuration: every hyperparameter with its default and one line of help (the string under
each field, read by annotation.runs.field_help for `rlhf ppo-options`, --set, the PPO page and job
params), its validation, and the batch arithmetic worked out once. No torch here, so the CLI can
show options without loading it.

    config = PPOConfig.from_yaml("ppo.yaml", ["learning_rate=3e-6", "kl_penalty=k3"])
    sizes = config.sizes(num_processes=2)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ppo.errors import PPOError
from reward.precision import MODES as PRECISION_MODES

DEFAULT_JUDGE_EVERY = 10
SAMPLING = ("auto", "copy", "policy")
# Earlier runs' config.yaml (and users' configs) name the sampling option the LoRA-only way.
LEGACY_SAMPLING = {"merged": "copy", "adapters": "policy", "auto": "auto"}


@dataclass
class PPOConfig:
    """Every PPO hyperparameter, with the names TRL and lm-human-preferences use."""

    # --- run
    steps: int = 100
    """PPO steps; each samples batch_size prompts, scores the responses and updates once."""
    seed: int = 0
    """Seed for prompt order, sampling, mini-batch shuffles and initialisation."""
    # --- batch arithmetic
    batch_size: int = 16
    """Episodes (prompt + sampled response) per PPO step, summed over all processes."""
    mini_batch_size: int = 4
    """Episodes per optimiser step; batch_size / mini_batch_size optimiser steps per PPO epoch."""
    gradient_accumulation_steps: int = 1
    """Forward/backward passes per optimiser step; a pass sees mini_batch_size / this episodes."""
    ppo_epochs: int = 4
    """Passes over each batch of episodes."""
    # --- optimiser
    learning_rate: float = 1e-5
    """AdamW learning rate at the top of the schedule."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule over PPO steps: constant, linear (to 0) or cosine."""
    warmup_steps: int = 0
    """PPO steps of linear warm-up before the schedule."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip per optimiser step. With adam_eps 1e-5 it keeps updates small:
    TRL 1.12's PPO (no clip, eps 1e-8) moved about 3x the KL per step in ppo_bench; set 1e6 and
    adam_eps 1e-8 for its update size."""
    adam_eps: float = 1e-5
    """AdamW epsilon (1e-5 as in CleanRL and lm-human-preferences; TRL uses 1e-8)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    # --- sampling
    max_prompt_length: int = 256
    """Prompt tokens kept (the end of longer prompts)."""
    max_new_tokens: int = 53
    """Longest response in tokens; responses without EOS by then are cut there."""
    temperature: float = 0.7
    """Sampling temperature; the training log-probs use the same temperature."""
    use_chat_template: bool = True
    """Wrap prompts in the policy tokenizer's chat template when it has one."""
    # --- reward
    missing_eos_penalty: float = 0.0
    """Subtracted from the score (after normalisation) of responses that end without EOS (0: off)."""
    normalize_reward: bool = False
    """Normalise scores by the running mean and std of all scores so far."""
    ensemble_spread_coef: float = 0.0
    """With a reward-model ensemble: reward = mean - this * spread across members."""
    # --- judges: reward models PPO does not train on, scoring held-out prompts
    judge_every: int = 0
    """PPO steps between evaluations on held-out prompts by the proxy and the judges (0: every 10 steps when judges are given, else off); the last step is always judged."""
    judge_prompts: int = 32
    """Held-out prompts split off the prompts (seeded) for the judges when none are given; training uses the rest."""
    keep_best: str = "last"
    """Which policy becomes policy/: last (the final step) or judge (the judged step with the highest mean judge reward)."""
    # --- KL penalty
    kl_penalty: str = "k1"
    """Per-token KL estimator in the reward: k1 (log ratio) or k3 (non-negative, lower variance)."""
    init_kl_coef: float = 0.05
    """KL coefficient (beta) at the start; fixed when adap_kl_ctrl is false."""
    adap_kl_ctrl: bool = True
    """Adapt the KL coefficient towards `target` (Ziegler et al.'s controller)."""
    target: float = 6.0
    """KL target per response, in nats, for the adaptive controller."""
    horizon: int = 10000
    """Episodes over which the adaptive controller corrects a KL error."""
    kl_hard_limit: float = 0.0
    """KL per response (nats) above which diagnostics flag divergence; 0: 3 x target."""
    # --- PPO
    cliprange: float = 0.2
    """Policy ratio clip epsilon."""
    cliprange_value: float = 0.2
    """How far the value prediction may move from the rollout's value before it is clipped."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    gamma: float = 1.0
    """Discount per token."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over each batch's response tokens."""
    approx_kl_stop: Optional[float] = None
    """Stop a step's update early once a mini-batch's approx KL to the rollout policy exceeds this."""
    value_init: str = "policy"
    """Value model from the policy's backbone or from the reward model (when it shares the tokenizer)."""
    value_model: str = "separate"
    """separate: a second model (a copy of the policy's backbone, or the reward model) with a scalar
    head; shared: one scalar head on the policy's own last hidden state (one backbone, two heads:
    one forward for both, no second copy; the value loss then also moves the policy's weights)."""
    # --- precision
    precision: str = "auto"
    """Compute precision: auto (bf16 autocast per stage where native and measured to pay), fp32, or bf16
    (forced). Trained weights and optimiser state are fp32 in every mode."""
    # --- LoRA
    lora: bool = False
    """Train LoRA adapters instead of all weights; the reference is the policy with adapters off."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_target_modules: str = "all-linear"
    """Modules given adapters: 'all-linear' or a comma-separated list of names."""
    sampling: str = "auto"
    """What responses are sampled from. copy: a copy of the policy refreshed before each rollout (LoRA:
    the adapters merged into its weights, generation 2x faster on CPU; full fine-tuning: a bf16 copy,
    made only where generation runs in bf16, 12% faster on CPU; measured; costs one more copy of the
    weights); policy: the policy itself; auto: copy on CPU, the policy elsewhere (not measured on GPUs,
    where the copy's memory matters more). Log-probs always come from the policy. Older configs'
    lora_sampling (merged, adapters) still reads."""
    # --- output
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    samples_every: int = 10
    """Write sample responses to samples.jsonl every N steps."""
    tensorboard: bool = True
    """Also log to TensorBoard under tb/ when the tensorboard package is installed."""
    mlflow: bool = False
    """Also log to MLflow when the mlflow package is installed."""

    # ----------------------------------------------------------------------------------
    def validate(self) -> "PPOConfig":
        """Raise PPOError naming every field that is out of range or inconsistent."""
        problems = []

        def need(ok: bool, message: str):
            if not ok:
                problems.append(message)

        for name in ("steps", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                     "max_new_tokens", "max_prompt_length", "horizon", "keep_checkpoints", "samples_every", "lora_r",
                     "judge_prompts"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "warmup_steps", "missing_eos_penalty", "ensemble_spread_coef", "weight_decay",
                     "init_kl_coef", "vf_coef", "kl_hard_limit", "lora_dropout", "judge_every"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "temperature", "cliprange", "cliprange_value", "max_grad_norm", "adam_eps", "target"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        need(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}")
        need(self.kl_penalty in ("k1", "k3"), f"kl_penalty must be 'k1' or 'k3', got {self.kl_penalty!r}")
        need(self.lr_scheduler in ("constant", "linear", "cosine"),
             f"lr_scheduler must be constant, linear or cosine, got {self.lr_scheduler!r}")
        need(self.value_init in ("policy", "reward"), f"value_init must be 'policy' or 'reward', got {self.value_init!r}")
        need(self.value_model in ("separate", "shared"), f"value_model must be 'separate' or 'shared', got {self.value_model!r}")
        need(not (self.value_model == "shared" and self.value_init == "reward"),
             "value_init=reward needs value_model=separate (a shared value head sits on the policy, not on the reward model)")
        need(self.sampling in SAMPLING, f"sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        need(self.keep_best in ("last", "judge"), f"keep_best must be 'last' or 'judge', got {self.keep_best!r}")
        need(self.precision in PRECISION_MODES, f"precision must be one of {', '.join(PRECISION_MODES)}, got {self.precision!r}")
        need(self.approx_kl_stop is None or self.approx_kl_stop > 0,
             f"approx_kl_stop must be > 0 or null (off), got {self.approx_kl_stop}")
        if self.batch_size >= 1 and self.mini_batch_size >= 1 and self.batch_size % self.mini_batch_size:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.mini_batch_size >= 1 and self.gradient_accumulation_steps >= 1 and self.mini_batch_size % self.gradient_accumulation_steps:
            problems.append(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                            f"gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        if problems:
            raise PPOError("invalid PPO config: " + "; ".join(problems))
        return self

    def sizes(self, num_processes: int = 1) -> "Sizes":
        """The batch arithmetic, worked out once (exact divisions or an error)."""
        self.validate()
        local = exact_div(self.batch_size, num_processes, "batch_size", "the number of processes")
        mini = exact_div(self.mini_batch_size, num_processes, "mini_batch_size", "the number of processes")
        return Sizes(
            local_batch_size=local,
            local_mini_batch_size=mini,
            num_mini_batches=exact_div(self.batch_size, self.mini_batch_size, "batch_size", "mini_batch_size"),
            micro_batch_size=exact_div(mini, self.gradient_accumulation_steps, "mini_batch_size per process",
                                       "gradient_accumulation_steps"),
        )

    @property
    def kl_limit(self) -> float:
        return self.kl_hard_limit or 3.0 * self.target

    def judge_interval(self, has_judges: bool) -> int:
        """Steps between judge evaluations: judge_every, or DEFAULT_JUDGE_EVERY when judges are given."""
        return self.judge_every or (DEFAULT_JUDGE_EVERY if has_judges else 0)

    def sampling_copy(self, device_type: str) -> bool:
        """Whether sampling goes through a copy of the policy (`sampling`) on this device type."""
        return self.sampling == "copy" or (self.sampling == "auto" and device_type == "cpu")

    def lora_options(self) -> dict:
        modules = self.lora_target_modules
        targets = modules if modules == "all-linear" else [m.strip() for m in modules.split(",") if m.strip()]
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout, "target_modules": targets}

    # ----------------------------------------------------------------------------------
    @classmethod
    def coerce(cls, values: dict, source: str = "config") -> dict:
        """Field values checked against the field types; an unknown key names itself and `source`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        out = {}
        for key, value in values.items():
            if key == "lora_sampling" and "sampling" not in values and value in LEGACY_SAMPLING:
                key, value = "sampling", LEGACY_SAMPLING[value]
            if key not in fields:
                raise PPOError(f"{source}: unknown key '{key}'; known keys: {', '.join(sorted(fields))}")
            out[key] = _coerce(key, value, hints[key], source)
        return out

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "PPOConfig":
        return cls(**cls.coerce(values, source))

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "PPOConfig":
        """A config from a YAML mapping of field names, then `key=value` overrides (CLI --set)."""
        import yaml

        values: dict = {}
        if path is not None:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise PPOError(f"config {path}: cannot read: {exc.strerror}") from None
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark else ""
                raise PPOError(f"config {path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise PPOError(f"config {path}: expected a mapping of PPO options (key: value), got {type(loaded).__name__}")
            values.update(cls.coerce(loaded, f"config {path}"))
        for item in overrides or []:
            if "=" not in item:
                raise PPOError(f"--set {item!r}: expected key=value, e.g. --set learning_rate=3e-6")
            key, raw = item.split("=", 1)
            key = key.strip()
            try:
                parsed = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError:
                parsed = raw
            values.update(cls.coerce({key: parsed}, f"--set {key}"))
        return cls(**values).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_docs(cls=PPOConfig) -> dict[str, str]:
    """Each field's one-line docstring: the options are documented once, on the class."""
    from annotation.runs import field_help

    return dict(field_help(cls))


@dataclass(frozen=True)
class Sizes:
    local_batch_size: int
    """Episodes per PPO step on this process."""
    local_mini_batch_size: int
    """Episodes per optimiser step on this process."""
    num_mini_batches: int
    """Optimiser steps per PPO epoch."""
    micro_batch_size: int
    """Episodes per forward/backward pass."""


def exact_div(a: int, b: int, a_name: str, b_name: str) -> int:
    if b <= 0 or a % b:
        raise PPOError(f"{a_name} ({a}) must be a multiple of {b_name} ({b})")
    return a // b


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise PPOError(f"{source}: '{key}' cannot be empty; expected {base.__name__}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise PPOError(f"{source}: '{key}' must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise PPOError(f"{source}: '{key}' must be a whole number, got {value!r}")
        return int(value)
    if base is float:
        if isinstance(value, bool):
            raise PPOError(f"{source}: '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PPOError(f"{source}: '{key}' must be a number, got {value!r}") from None
    if base is str:
        if not isinstance(value, str):
            raise PPOError(f"{source}: '{key}' must be text, got {value!r}")
        return value
    return value
