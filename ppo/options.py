"""Options that several policy-side use cases share, each field with its default and one line of
help, validated once: TrainerOptions (every TRL policy trainer here: SFT, DPO, GRPO, RLOO),
OfflineTrainerOptions (the trainers that pass over a fixed data set: SFT, DPO) and SampleOptions
(sampling for eval-policy and generate). No torch here, so the CLI reads them for its --help.

    class DPOOptions(OfflineTrainerOptions):            # ppo.dpo: adds beta, loss_type, ...
        TRAINER = "DPO"
        LEARNING_RATE, LORA_LEARNING_RATE = 1e-6, 1e-5
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ppo.config import PPOConfig
from ppo.errors import PPOError
from reward.precision import MODES


def _reporters_ok(value: str) -> bool:
    from reward.errors import RewardError
    from reward.reporting import check_report_to

    try:
        check_report_to(value)
    except RewardError:
        return False
    return True


def flag(name: str) -> str:
    """The CLI option of a field: --field-name."""
    return "--" + name.replace("_", "-")


@dataclasses.dataclass
class TrainerOptions:
    """What every TRL policy trainer takes: optimiser, batch, LoRA, precision, seed and trackers.
    A subclass sets TRAINER (named in errors) and its learning rates, adds its own fields and checks
    (`own_checks`), and may give a field another default by declaring it again."""

    TRAINER: ClassVar[str] = "trainer"
    LEARNING_RATE: ClassVar[float] = 1e-6
    """The learning rate when none is given (TRL's default for the trainer)."""
    LORA_LEARNING_RATE: ClassVar[float] = 1e-5
    """The learning rate with lora when none is given (adapters want a larger step)."""

    learning_rate: float | None = None
    """Peak AdamW learning rate; default: the trainer's (TRL's), or a larger one with lora."""
    batch_size: int = 4
    """Examples per forward pass, per process."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step."""
    lora: bool = False
    """Train LoRA adapters instead of every weight (merged into the saved model at the end); a
    reference (DPO, GRPO/RLOO) is then the model with its adapters off."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass; None: on with a GPU, off on CPU, where it only costs time."""
    seed: int = 0
    """Seed for sampling, shuffling and adapter initialisation."""
    precision: str = "auto"
    """auto (bf16 autocast where native and measured to pay), fp32, or bf16 (forced); weights stay fp32."""
    report_to: str = "none"
    """Also log the training curve to: none, or a comma-separated list of tensorboard, mlflow, trackio (when installed)."""

    def own_checks(self) -> list[tuple[bool, str, str, Any]]:
        """(ok, field, what it expects, value) for the subclass's own fields; checked after the shared ones."""
        return []

    def validate(self):
        """Refuse a bad value naming the field and its CLI option; a missing learning rate becomes the trainer's."""
        if self.learning_rate is None:
            self.learning_rate = self.LORA_LEARNING_RATE if self.lora else self.LEARNING_RATE
        checks = [
            (self.learning_rate > 0, "learning_rate", "a positive number", self.learning_rate),
            (self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "an integer >= 1",
             self.gradient_accumulation_steps),
            (self.lora_r >= 1, "lora_r", "an integer >= 1", self.lora_r),
            (self.lora_alpha > 0, "lora_alpha", "a positive number", self.lora_alpha),
            (0 <= self.lora_dropout < 1, "lora_dropout", "a number in [0, 1)", self.lora_dropout),
            (self.precision in MODES, "precision", "one of " + ", ".join(MODES), self.precision),
            (_reporters_ok(self.report_to), "report_to", "none or installed trackers among tensorboard, mlflow, trackio",
             self.report_to),
            *self.own_checks(),
        ]
        for ok, name, expected, value in checks:
            if not ok:
                raise PPOError(f"{self.TRAINER} option {name}={value!r} ({flag(name)}) is invalid; expected {expected}")
        return self

    @classmethod
    def of(cls, spec) -> "TrainerOptions":
        """This class's fields of `spec` (a use case's spec, which extends it with where the data comes from), validated."""
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(cls)}).validate()


@dataclasses.dataclass
class OfflineTrainerOptions(TrainerOptions):
    """A trainer that passes over a fixed set of rows (SFT) or pairs (DPO)."""

    epochs: float = 1.0
    """Passes over the training rows or pairs."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run all epochs)."""
    max_length: int = 512
    """Tokens per prompt + response after the chat template; longer ones are cut at the end."""

    def own_checks(self) -> list[tuple[bool, str, str, Any]]:
        return [
            (self.epochs > 0, "epochs", "a positive number", self.epochs),
            (self.max_steps == -1 or self.max_steps > 0, "max_steps", "-1 or a positive integer", self.max_steps),
            (self.max_length >= 8, "max_length", "an integer >= 8", self.max_length),
        ]


@dataclasses.dataclass
class SampleOptions:
    """Sampling settings shared by both models (defaults taken from PPOConfig, so eval sees what PPO trained on)."""

    max_new_tokens: int = PPOConfig.max_new_tokens
    """Longest response in tokens."""
    temperature: float = PPOConfig.temperature
    """Sampling temperature (also the temperature of the log-probs in the KL)."""
    max_prompt_length: int = PPOConfig.max_prompt_length
    """Prompt tokens kept (the end of longer prompts)."""
    batch_size: int = 8
    """Prompts per generation batch."""
    seed: int = 0
    """Seed of each batch's sampling (the same for policy and reference); the same seed gives the same responses."""
    use_chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one."""

    def validate(self) -> "SampleOptions":
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
            (self.temperature > 0, "temperature", "a positive number"),
            (self.max_prompt_length >= 1, "max_prompt_length", "an integer >= 1"),
            (self.batch_size >= 1, "batch_size", "an integer >= 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise PPOError(f"{name}={getattr(self, name)} is invalid ({flag(name)}); expected {expected}")
        return self

    @classmethod
    def of(cls, spec) -> "SampleOptions":
        """The sampling fields of `spec` (eval-policy's or generate's), validated."""
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(cls)}).validate()
