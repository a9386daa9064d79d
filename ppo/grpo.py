"""Online RL of a policy on a reward model with TRL's GRPOTrainer or RLOOTrainer.

    rlhf grpo --reward-model runs/rm-1 --prompts prompts.jsonl --output runs/grpo-1 [--policy DIR] [--steps 100]
    rlhf rloo --reward-model runs/rm-1 --prompts-project demo --output runs/rloo-1 [--lora]

Both sample `num_generations` completions per prompt and push the policy towards the ones that
score above their siblings: GRPO against the group's mean (scaled by its spread), RLOO against the
mean of the other completions (leave-one-out). Neither needs a value model, unlike ppo.train.

The reward is one of our reward models (`reward_model_function`): TRL hands over the completions
as text, decoded with the policy's tokenizer, and the scorer re-tokenizes prompt and text with its
own, so a reward model with another tokenizer than the policy's works (as in ppo.train). The
scorer sees each prompt as it was given (text or messages), the same as PPO's scoring, through a
`reward_prompt` column (JSON) that TRL passes to reward functions. An ensemble scores
mean - ensemble_spread_coef * spread. Any TRL reward function `f(prompts, completions, **kwargs)
-> list[float]` works too (rule-based rewards, in tests).

On a GPU: `use_vllm` (with `vllm_mode` colocate or server) has TRL generate with vLLM, which
must be installed; DeepSpeed or FSDP come from an accelerate config, e.g.
`accelerate launch --config_file configs/accelerate/zero2.yaml -m app.cli grpo ...`, or the
worker's accelerate_config setting (RLHF_ACCELERATE_CONFIG) for grpo/rloo jobs. On CPU both stay off.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ppo.dpo import (PolicyResult, load_policy_for_training, logged, lora_config, publish, staging_dir, tracker_callbacks,
                     train_and_save, trainer_args, trainer_hooks)
from ppo.errors import PPOError
from ppo.options import TrainerOptions
from ppo.sft import _fresh_output_dir, data_hash
from reward.precision import precision_plan

ALGORITHMS = ("grpo", "rloo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
"""GRPO's loss aggregations by TRL's names (trl.GRPOConfig.loss_type); dapo is TRL's default."""
VLLM_MODES = ("colocate", "server")
REWARD_PROMPT = "reward_prompt"
"""The dataset column holding each prompt as given (JSON), for the reward model to score."""


@dataclasses.dataclass
class GRPOOptions(TrainerOptions):
    """Hyperparameters of one GRPO or RLOO run: ppo.options.TrainerOptions with their defaults, and
    what online RL adds (steps, sampling, the reward model's batch, vLLM)."""

    TRAINER = "GRPO/RLOO"
    LEARNING_RATE = 1e-6
    LORA_LEARNING_RATE = 1e-5

    steps: int = 100
    """Optimizer steps."""
    num_generations: int = 4
    """Completions sampled per prompt; the group whose rewards are compared (at least 2)."""
    batch_size: int = 8
    """Completions per forward pass, per process: batch_size / num_generations prompts (a multiple of num_generations)."""
    max_completion_length: int = 64
    """Longest completion in tokens."""
    temperature: float = 1.0
    """Sampling temperature; the group needs varied completions to learn from."""
    learning_rate: float | None = None
    """Peak AdamW learning rate; default 1e-6 (TRL's), or 1e-5 with lora."""
    beta: float | None = None
    """KL coefficient to the reference; None: TRL's default (GRPO 0.0, no reference loaded; RLOO 0.05)."""
    loss_type: str | None = None
    """GRPO only: the loss aggregation by TRL's name (grpo, dr_grpo, dapo, bnpo, cispo, sapo, luspo, vespo); None: TRL's default (dapo)."""
    ensemble_spread_coef: float = 0.0
    """With a reward-model ensemble: reward = mean - this * spread across members (as in ppo.train)."""
    reward_batch_size: int = 32
    """Pairs per reward-model forward pass."""
    use_vllm: bool = False
    """GPU only, vllm installed: generate with vLLM instead of model.generate (TRL's use_vllm)."""
    vllm_mode: str = "colocate"
    """With use_vllm: colocate (vLLM in the training process, sharing its GPU) or server (a running `trl vllm-serve`)."""
    vllm_server_base_url: str | None = None
    """With vllm_mode=server: the server's URL, e.g. http://localhost:8000 (TRL's default host and port when unset)."""
    vllm_gpu_memory_utilization: float = 0.3
    """With vllm_mode=colocate: the share of GPU memory vLLM may take."""

    def own_checks(self) -> list:
        return [
            (self.steps >= 1, "steps", "an integer >= 1", self.steps),
            (self.num_generations >= 2, "num_generations", "an integer >= 2 (a group to compare)", self.num_generations),
            (self.max_completion_length >= 1, "max_completion_length", "an integer >= 1", self.max_completion_length),
            (self.temperature > 0, "temperature", "a positive number", self.temperature),
            (self.beta is None or self.beta >= 0, "beta", "a number >= 0, or None for TRL's default", self.beta),
            (self.loss_type is None or self.loss_type in GRPO_LOSS_TYPES, "loss_type",
             "one of " + ", ".join(GRPO_LOSS_TYPES), self.loss_type),
            (self.ensemble_spread_coef >= 0, "ensemble_spread_coef", "a number >= 0", self.ensemble_spread_coef),
            (self.reward_batch_size >= 1, "reward_batch_size", "an integer >= 1", self.reward_batch_size),
            (self.vllm_mode in VLLM_MODES, "vllm_mode", "one of " + ", ".join(VLLM_MODES), self.vllm_mode),
            (0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "a number in (0, 1]",
             self.vllm_gpu_memory_utilization),
        ]

    def validate(self) -> "GRPOOptions":
        super().validate()
        per_step = self.batch_size * self.gradient_accumulation_steps
        if per_step % self.num_generations:
            raise PPOError(f"GRPO/RLOO option batch_size={self.batch_size} (--batch-size) is invalid: batch_size x "
                           f"gradient_accumulation_steps ({per_step}) must be a multiple of num_generations "
                           f"({self.num_generations}), so every prompt's group is complete")
        return self

    def check_for(self, algorithm: str) -> "GRPOOptions":
        """The options for one algorithm: what only GRPO has is refused for RLOO."""
        self.validate()
        if algorithm == "rloo" and self.loss_type is not None:
            raise PPOError(f"RLOO option loss_type={self.loss_type!r} (--loss-type) is invalid: RLOO has one loss; leave it unset")
        return self


# --------------------------------------------------------------------------- rewards


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """The text of each completion TRL passes to a reward function: a string, or (conversational
    prompts) a list of messages whose assistant contents are the completion."""
    out = []
    for c in completions:
        if isinstance(c, str):
            out.append(c)
        else:
            out.append("".join(m.get("content") or "" for m in c if m.get("role") == "assistant"))
    return out


def reward_model_function(scorer, *, spread_coef: float = 0.0, batch_size: int = 32) -> Callable[..., list[float]]:
    """A TRL reward function over one of our scorers (reward.score.load_reward_model): each
    completion's decoded text is scored with the prompt as it was given, re-tokenized by the
    scorer's own tokenizer. With an ensemble and spread_coef > 0: mean - spread_coef * spread."""
    use_spread = spread_coef > 0 and hasattr(scorer, "score_with_spread")

    def reward_model(prompts, completions, **kwargs) -> list[float]:
        given = kwargs.get(REWARD_PROMPT)
        originals = [json.loads(p) for p in given] if given is not None else list(prompts)
        texts = completion_texts(completions)
        if use_spread:
            mean, spread = scorer.score_with_spread(originals, texts, batch_size)
            scores = mean - spread_coef * spread
        else:
            scores = scorer.score(originals, texts, batch_size)
        return [float(s) for s in scores]

    return reward_model


def prompt_rows(prompts: Sequence[Any], has_chat_template: bool) -> list[dict]:
    """Dataset rows for TRL: the prompt as the policy sees it (chat messages through its template,
    as ppo.rollout encodes them, else text) and the prompt as given, for the reward model."""
    from ppo.rollout import prompt_text
    from ppo.sft import check_messages

    rows = []
    for i, prompt in enumerate(prompts, start=1):
        if isinstance(prompt, list):
            prompt = check_messages(prompt, where=f"prompt {i}")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise PPOError(f"prompt {i}: expected non-empty text or a list of messages, got {prompt!r:.60}")
        if has_chat_template:
            shown = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        else:
            shown = prompt_text(prompt)
        rows.append({"prompt": shown, REWARD_PROMPT: json.dumps(prompt, ensure_ascii=False)})
    return rows


def check_generation_backend(options: GRPOOptions) -> None:
    if not options.use_vllm:
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise PPOError("use_vllm (--use-vllm): vLLM generation needs a CUDA GPU; on CPU leave it off (TRL then generates with model.generate)")
    if importlib.util.find_spec("vllm") is None:
        raise PPOError("use_vllm (--use-vllm): the vllm package is not installed; `pip install vllm` (a version TRL supports) or leave it off")


# --------------------------------------------------------------------------- training


def train_online(
    algorithm: str,
    prompts: Sequence[Any],
    output_dir: str | Path,
    *,
    base: str | Path,
    reward: Any,
    options: GRPOOptions | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PolicyResult:
    """GRPO or RLOO of `base` on `prompts`, scored by `reward`: a reward-model directory, a scorer
    (anything with .score), or a TRL reward function. The model and tokenizer are saved to
    `output_dir`; progress, stopping and staging as in ppo.sft.train_sft."""
    from datasets import Dataset

    if algorithm not in ALGORITHMS:
        raise PPOError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    options = (options or GRPOOptions()).check_for(algorithm)
    what = algorithm.upper()
    output_dir = Path(output_dir)
    _fresh_output_dir(output_dir)
    log = log or (lambda message: None)
    prompts = list(prompts)
    if not prompts:
        raise PPOError(f"no prompts to train {what} on")
    check_generation_backend(options)

    reward_path = None
    if isinstance(reward, (str, Path)):
        from reward.score import load_reward_model

        reward_path = str(reward)
        reward = load_reward_model(reward)
    reward_fn = (reward_model_function(reward, spread_coef=options.ensemble_spread_coef, batch_size=options.reward_batch_size)
                 if hasattr(reward, "score") else reward)
    if not callable(reward_fn):
        raise PPOError(f"reward: expected a reward model directory, a scorer or a reward function, got {type(reward).__name__}")

    tokenizer, model = load_policy_for_training(base)
    rows = prompt_rows(prompts, has_chat_template=bool(tokenizer.chat_template))

    # One trainer flag covers sampling and update; PPO's measurement for its update stage applies,
    # and one dtype for both keeps the importance ratio at exactly 1 on the first iteration.
    plan = precision_plan(options.precision)
    staging = staging_dir(output_dir)
    hooks = trainer_hooks(what, staging / "metrics.jsonl", log, progress, should_stop)
    args = trainer_args(options, staging, plan.bf16("ppo_update"))
    own = dict(max_steps=options.steps, num_generations=options.num_generations,
               max_completion_length=options.max_completion_length, temperature=options.temperature,
               use_vllm=options.use_vllm, vllm_mode=options.vllm_mode, vllm_server_base_url=options.vllm_server_base_url,
               vllm_gpu_memory_utilization=options.vllm_gpu_memory_utilization, log_completions=False)
    if options.beta is not None:
        own["beta"] = options.beta
    if options.loss_type is not None:
        own["loss_type"] = options.loss_type
    started = time.perf_counter()
    try:
        if algorithm == "grpo":
            from trl import GRPOConfig as Config, GRPOTrainer as Trainer
        else:
            from trl import RLOOConfig as Config, RLOOTrainer as Trainer
        config = Config(**args, **own)
        trainer = Trainer(model=model, reward_funcs=reward_fn, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=lora_config(options),
                          callbacks=[hooks, *tracker_callbacks(options, staging)])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    output = train_and_save(trainer, hooks, staging=staging, output_dir=output_dir, tokenizer=tokenizer,
                            merge_lora=options.lora, what=what)

    history = trainer.state.log_history
    rewards = logged(history, "reward")
    quarter = max(1, len(rewards) // 4)
    metrics = {
        "train_loss": float(output.training_loss),
        "first_reward": rewards[0] if rewards else None,
        "final_reward": rewards[-1] if rewards else None,
        "reward_first_quarter": sum(rewards[:quarter]) / quarter if rewards else None,
        "reward_last_quarter": sum(rewards[-quarter:]) / quarter if rewards else None,
        "final_reward_std": (logged(history, "reward_std") or [None])[-1],
        "final_kl": (logged(history, "kl") or [None])[-1],
        "final_completion_length": (logged(history, "completions/mean_length") or [None])[-1],
        "steps": int(output.global_step),
        "runtime_s": round(time.perf_counter() - started, 2),
    }
    params = {**dataclasses.asdict(options), "trainer": algorithm, "beta": float(config.beta),
              "compute_precision": plan.label("ppo_update"), "gradient_checkpointing": args["activation_checkpointing"],
              "reward_model": reward_path, "reward_function": getattr(reward_fn, "__name__", type(reward_fn).__name__)}
    if algorithm == "grpo":
        params["loss_type"] = config.loss_type

    # The fingerprint of the prompts as given: ppo.jobs.prompts_hash (what PPO records) is its first 16 characters.
    result = PolicyResult(output_dir=output_dir, base_model=str(base), rows=len(prompts), data_hash=data_hash(prompts),
                          params=params, metrics=metrics)
    publish(staging, output_dir, f"{algorithm}.json", {"base_model": str(base), "rows": len(prompts),
                                                       "data_hash": result.data_hash, "params": params, "metrics": metrics})
    log(f"{what} done: {metrics['steps']} steps, reward {metrics['reward_first_quarter']} -> "
        f"{metrics['reward_last_quarter']} (first/last quarter means), saved to {output_dir}")
    return result


def train_grpo(prompts, output_dir, *, base, reward, options=None, log=None, progress=None, should_stop=None) -> PolicyResult:
    """GRPO (TRL's GRPOTrainer): advantages are rewards relative to the prompt's group of completions."""
    return train_online("grpo", prompts, output_dir, base=base, reward=reward, options=options, log=log,
                        progress=progress, should_stop=should_stop)


def train_rloo(prompts, output_dir, *, base, reward, options=None, log=None, progress=None, should_stop=None) -> PolicyResult:
    """RLOO (TRL's RLOOTrainer): each completion's baseline is the mean reward of its siblings."""
    return train_online("rloo", prompts, output_dir, base=base, reward=reward, options=options, log=log,
                        progress=progress, should_stop=should_stop)
