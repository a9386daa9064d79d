"""PPO for language models on a reward model (Ziegler et al. 2019; Huang et al. 2024), one file
that reads top to bottom like CleanRL's ppo.py: rollout, rewards and advantages, update, log.

    from ppo.train import PPOConfig, train
    result = train(PPOConfig(steps=100), load_policy(path), reward_fn, prompts, "runs/ppo-1")

`run_ppo(...)` does the same from paths (policy dir, reward model dir, prompts); the CLI
(`rlhf ppo`) and the job handler (`ppo.jobs.ppo`) call it. A run directory holds
metrics.jsonl (one line per step), samples.jsonl, config.yaml, checkpoints/step-N/state.pt
(everything needed to resume exactly), and, at the end, policy/ and value/ model directories.

Judges (`train(..., judges=..., heldout_prompts=...)`, `run_ppo(..., judges=[dirs])`) are reward
models PPO does not train on. Every `judge_every` steps the policy answers a fixed set of held-out
prompts and the proxy (the training reward) and each judge score the answers: the proxy keeps
rising as the policy exploits it while a judge's score peaks and falls (Gao, Schulman and Hilton
2022, "Scaling laws for reward model overoptimization"). With keep_best=judge, policy/ is the
policy of the step where the judges' mean peaked, and the last step's is kept in policy-last/.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ppo import core
from ppo.config import DEFAULT_JUDGE_EVERY, PPOConfig, Sizes, exact_div, field_docs  # noqa: F401  (re-exported)
from ppo.errors import PPOError
from reward.precision import precision_plan

logger = logging.getLogger("ppo.train")


BEST_DIR = "best-policy"  # the judges' best policy so far, while a keep_best=judge run goes on
LAST_DIR = "policy-last"  # the last step's policy when keep_best=judge kept an earlier one


class TrainingCancelled(Exception):
    """Raised between steps when the caller's `cancelled()` turns true; the last checkpoint stays."""


def make_optimizer(params, config: PPOConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the device (about 5x faster per step on
    CPU than the default multi-tensor version, measured on this machine for 20M parameters)."""
    kwargs = dict(lr=config.learning_rate, eps=config.adam_eps, weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def lr_factor(config: PPOConfig, completed_steps: int) -> float:
    """Multiplier of the learning rate for the PPO step after `completed_steps` steps."""
    if completed_steps < config.warmup_steps:
        return (completed_steps + 1) / config.warmup_steps
    progress = (completed_steps - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if config.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def step_seed(seed: int, step: int, process_index: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + process_index) % (2**63)


def rng_state() -> dict:
    import numpy as np

    # Plain tensors, ints and tuples only, so a checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PromptSampler:
    """Which prompts each step uses: a fresh seeded shuffle of all prompts per pass over them, so
    step s's batch depends only on (seed, s) and a resumed run samples the same prompts."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def indices(self, step: int, batch_size: int) -> list[int]:
        out = []
        for i in range((step - 1) * batch_size, step * batch_size):
            epoch = i // self.n
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
            out.append(self._perms[epoch][i % self.n])
        return out


def split_heldout(prompts: list, n: int, seed: int) -> tuple[list, list]:
    """(training prompts, n held-out prompts): a seeded choice, the same for the same prompts and
    seed (so a resumed run trains on the same prompts); both keep the prompts' order."""
    if n >= len(prompts):
        raise PPOError(f"judge_prompts={n} held-out prompts would leave none of the {len(prompts)} prompts to train on; "
                       "lower judge_prompts or give more prompts")
    chosen = set(random.Random(seed * 7919 + 17).sample(range(len(prompts)), n))
    return ([p for i, p in enumerate(prompts) if i not in chosen], [p for i, p in enumerate(prompts) if i in chosen])


def named_judges(judges) -> list[tuple[str, Callable]]:
    """(name, reward function) pairs from a {name: fn} mapping, (name, fn) pairs, or functions
    that carry a `name` (or `__name__`); a scorer object's .score is used. Names are made unique."""
    if not judges:
        return []
    items = list(judges.items()) if isinstance(judges, dict) else list(judges)
    out, seen = [], set()
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2:
            name, fn = item
        else:
            fn = item
            name = getattr(item, "name", None) or getattr(item, "__name__", None) or f"judge{i + 1}"
        if hasattr(fn, "score") and not callable(fn):
            fn = fn.score
        if not callable(fn):
            raise PPOError(f"judge {name!r} is not a reward function fn(prompts, responses) -> tensor")
        name, k = str(name), 2
        base = name
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        out.append((name, fn))
    return out


@torch.no_grad()
def judge_policy(inner, ref_model, tokenizer, prompts: list, prompt_rows: list[list[int]], reward_fn: Callable,
                 judges: list[tuple[str, Callable]], *, config: "PPOConfig", seed: int, batch_size: int, device,
                 plan) -> dict[str, list[float]]:
    """One response per held-out prompt from the current policy, with the training sampling
    settings, scored by the proxy (the training reward, raw) and each judge, and its KL to the
    reference (k1 sum). Batch b samples under `seed + b` at every evaluation, so two steps differ
    by the policy alone; the RNG is forked, so the training stream (and resume) is untouched."""
    from ppo.rollout import collect, score_responses

    texts, out = [], {"proxy": [], "kl": []}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for b, start in enumerate(range(0, len(prompt_rows), batch_size)):
            torch.manual_seed(seed + b)
            ro = collect(
                inner, ref_model, tokenizer, prompts[start:start + batch_size], prompt_rows[start:start + batch_size],
                reward_fn, max_new_tokens=config.max_new_tokens, temperature=config.temperature, device=device,
                generate_ctx=lambda: plan.autocast("ppo_generate"), forward_ctx=lambda: plan.autocast("ppo_update"),
            )
            texts += ro.responses_text
            out["proxy"] += ro.scores.tolist()
            kl = core.kl_per_token(ro.logprobs, ro.ref_logprobs, "k1") * ro.response_mask.float()
            out["kl"] += kl.sum(1).tolist()
    for name, fn in judges:
        out[f"judge/{name}"] = score_responses(fn, prompts, texts).tolist()
    return out


def judge_metrics(scores: dict[str, list[float]]) -> dict[str, float]:
    """The metrics.jsonl fields of one judge evaluation: proxy_reward_heldout, kl_heldout, and with
    judges judge_reward (the judges' mean), judge_reward_stderr (over prompts) and judge_reward/<name>."""
    n = len(scores["proxy"])
    row = {"proxy_reward_heldout": sum(scores["proxy"]) / n, "kl_heldout": sum(scores["kl"]) / n}
    judges = [k for k in scores if k.startswith("judge/")]
    if judges:
        per_prompt = [sum(scores[k][i] for k in judges) / len(judges) for i in range(n)]
        mean = sum(per_prompt) / n
        var = sum((x - mean) ** 2 for x in per_prompt) / max(n - 1, 1)
        row["judge_reward"] = mean
        row["judge_reward_stderr"] = math.sqrt(var / n)
        for k in judges:
            row[f"judge_reward/{k[len('judge/'):]}"] = sum(scores[k]) / n
    return row


class MetricsLog:
    """metrics.jsonl plus, when installed and asked for, TensorBoard and MLflow."""

    def __init__(self, out: Path, config: PPOConfig, keep_until: int):
        self.path = out / "metrics.jsonl"
        kept = []
        if keep_until and self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_until]
        self.history = [json.loads(line) for line in kept]
        self.fh = open(self.path, "w", encoding="utf-8")
        for line in kept:
            self.fh.write(line + "\n")
        self.fh.flush()
        self.tb = self.mlflow = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                pass
        if config.mlflow:
            try:
                import mlflow

                self.mlflow = mlflow
                mlflow.log_params({k: v for k, v in config.to_dict().items()})
            except ImportError:
                logger.warning("mlflow=true but the mlflow package is not installed; logging to metrics.jsonl only")

    def write(self, row: dict) -> None:
        self.history.append(row)
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=row["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


# ======================================================================================
def train(
    config: PPOConfig,
    policy,
    reward_fn: Callable,
    prompts: list,
    output_dir: str | Path,
    progress: Callable[[float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    *,
    value_model=None,
    ref_model=None,
    resume: str | Path | bool | None = None,
    judges=None,
    heldout_prompts: list | None = None,
) -> dict:
    """Run PPO and return a summary (paths, final metrics, diagnostics).

    policy: (model, tokenizer) as from ppo.models.load_policy; the model should be freshly
    loaded (with resume, the same initial weights as the interrupted run). value_model: a
    sequence-classification model sharing the policy's tokenizer, or None for one built from
    the policy. ref_model: the frozen reference, or None for a copy of the initial policy (no
    copy with LoRA: adapters off). resume: True for the newest checkpoint in output_dir, or a
    checkpoint directory. judges: reward functions `fn(prompts, responses) -> tensor` that PPO
    does not train on, each with a name (see named_judges); heldout_prompts: the fixed prompts
    they judge on, never trained on. Every config.judge_interval steps and at the last step the
    step's metrics row gets proxy_reward_heldout, kl_heldout, judge_reward, judge_reward_stderr
    and judge_reward/<name> (judge_metrics).
    """
    from accelerate import Accelerator

    from ppo import diagnostics
    from ppo.models import (PolicyAndValue, add_value_lora, get_lora_policy, is_peft, load_trainable_state,
                            trainable_state, value_model_from_policy)
    from ppo.rollout import collect, encode_prompts, ensemble_reward_fn, sequence_inputs

    config.validate()
    model, tokenizer = policy
    if not prompts:
        raise PPOError("no prompts to train on")
    judges = named_judges(judges)
    heldout_prompts = list(heldout_prompts or [])
    if judges and not heldout_prompts:
        raise PPOError("judges need held-out prompts (heldout_prompts) to score; none were given")
    if config.keep_best == "judge" and not judges:
        raise PPOError("keep_best=judge needs at least one judge (rlhf ppo --judge DIR, or judges=[...]); "
                       "without one use keep_best=last")
    judge_every = config.judge_interval(bool(judges)) if heldout_prompts else 0
    accelerator = Accelerator()
    sizes = config.sizes(accelerator.num_processes)
    device = accelerator.device
    # fp32 weights always; bf16 autocast around the stages the plan names (reward.precision).
    plan = precision_plan(config.precision, device.type)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    if hasattr(reward_fn, "score_with_spread") and config.ensemble_spread_coef > 0:
        reward_fn = ensemble_reward_fn(reward_fn, config.ensemble_spread_coef)
    elif hasattr(reward_fn, "score") and not callable(reward_fn):
        reward_fn = reward_fn.score

    # --- Models: policy, value, reference; one optimiser over everything trainable
    if value_model is None:
        value_model = value_model_from_policy(model.get_base_model() if is_peft(model) else model)
    if config.lora and not is_peft(model):
        model = get_lora_policy(model, config.lora_options())
    if is_peft(model) and not is_peft(value_model):
        value_model = add_value_lora(value_model, config.lora_options())
    if ref_model is None and not is_peft(model):
        ref_model = copy.deepcopy(model)
    if ref_model is not None:
        ref_model.requires_grad_(False).eval().to(device)
    # Dropout off everywhere: the rollout's log-probs and values must be what the update sees.
    model.eval()
    value_model.eval()
    wrapped = PolicyAndValue(model, value_model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    inner = accelerator.unwrap_model(wrapped)
    kl_ctl = (core.AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
              if config.adap_kl_ctrl else core.FixedKLController(config.init_kl_coef))
    reward_moments = core.RunningMoments()

    prompt_rows = encode_prompts(tokenizer, prompts, config.max_prompt_length, config.use_chat_template)
    sampler = PromptSampler(len(prompts), config.seed)
    ckpt_root = out / "checkpoints"
    # Each process judges its share of the held-out prompts; the rows are gathered before logging.
    rank, world = accelerator.process_index, accelerator.num_processes
    heldout_mine = heldout_prompts[rank::world]
    heldout_rows = encode_prompts(tokenizer, heldout_mine, config.max_prompt_length, config.use_chat_template)

    # --- Resume: weights, optimiser, schedule, KL coefficient, reward moments, RNG
    start_step = 0
    if resume:
        ckpt = latest_checkpoint(ckpt_root) if resume is True else Path(resume)
        if ckpt is None:
            raise PPOError(f"resume: no checkpoint under {ckpt_root}")
        # weights_only: a checkpoint is data (tensors, numbers, strings); nothing in it is unpickled
        # as code, whatever directory --resume names.
        try:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise PPOError(f"resume {ckpt}: state.pt is not a PPO checkpoint this version can read ({exc})") from None
        # Fields added since the checkpoint was written count as their defaults.
        saved_config = {**type(config)().to_dict(), **state["config"]}
        if saved_config != _resumable(config.to_dict(), saved_config):
            changed = sorted(k for k, v in saved_config.items() if config.to_dict().get(k) != v and k not in RESUME_MAY_CHANGE)
            raise PPOError(f"resume {ckpt}: config differs from the checkpoint's in {', '.join(changed)}")
        load_trainable_state(inner.policy, state["policy"])
        load_trainable_state(inner.value, state["value"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl_ctl"])
        reward_moments.load_state_dict(state["reward_moments"])
        set_rng_state(state["rng"])
        start_step = int(state["step"])
    (out / "config.yaml").write_text(_yaml(config.to_dict()), encoding="utf-8")
    log = MetricsLog(out, config, keep_until=start_step)
    _keep_samples(out, start_step)
    warned: set[str] = set()
    keeping_best = config.keep_best == "judge" and accelerator.is_main_process
    best = _best_so_far(out, start_step, log.history) if keeping_best else None

    for step in range(start_step + 1, config.steps + 1):
        if cancelled is not None and cancelled():
            log.close()
            raise TrainingCancelled(f"cancelled before step {step}")
        t_step = time.perf_counter()
        lr_now = optimizer.param_groups[0]["lr"]
        # Sampling draws from a stream fixed by (seed, step, process): each process samples
        # differently, and a resumed run (on any number of steps done) samples the same.
        torch.manual_seed(step_seed(config.seed, step, accelerator.process_index))

        # --- Rollout: sample, score, and the per-token numbers of the frozen models
        batch = sampler.indices(step, config.batch_size)
        batch = batch[accelerator.process_index * sizes.local_batch_size:][: sizes.local_batch_size]
        ro = collect(
            inner, ref_model, tokenizer, [prompts[i] for i in batch], [prompt_rows[i] for i in batch], reward_fn,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, device=device,
            generate_ctx=lambda: plan.autocast("ppo_generate"), forward_ctx=lambda: plan.autocast("ppo_update"),
        )
        mask = ro.response_mask.float()

        # --- Rewards: score (normalised, EOS penalty) on the last token, KL penalty on every token
        scores = ro.scores.clone()
        if config.normalize_reward:
            reward_moments.update(accelerator.gather(scores))
            scores = reward_moments.normalise(scores)
        scores = scores - config.missing_eos_penalty * (~ro.contains_eos).float()
        kl_tokens = core.kl_per_token(ro.logprobs, ro.ref_logprobs, config.kl_penalty) * mask
        rewards, non_score = core.penalised_rewards(scores, kl_tokens, kl_ctl.value, mask)

        # --- Advantages: GAE over the response tokens, then whitened over the batch
        advantages, returns = core.gae(ro.values, rewards, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)

        # --- Update: ppo_epochs passes over shuffled mini-batches, gradient accumulation inside
        t_update = time.perf_counter()
        shuffle = torch.Generator().manual_seed(config.seed * 104729 + step)
        T = ro.response_ids.shape[1]
        stats = {k: [] for k in ("policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl",
                                 "ratio", "grad_norm")}
        early_stopped, optimizer_steps = False, 0
        wrapped.train(False)
        for _epoch in range(config.ppo_epochs):
            order = torch.randperm(sizes.local_batch_size, generator=shuffle)
            for mb in range(sizes.num_mini_batches):
                mb_idx = order[mb * sizes.local_mini_batch_size:(mb + 1) * sizes.local_mini_batch_size]
                mb_stats = {k: 0.0 for k in stats if k != "grad_norm"}
                for micro in range(config.gradient_accumulation_steps):
                    idx = mb_idx[micro * sizes.micro_batch_size:(micro + 1) * sizes.micro_batch_size].to(device)
                    m = mask[idx]
                    sync = micro == config.gradient_accumulation_steps - 1
                    ctx = accelerator.no_sync(wrapped) if not sync else _null()
                    with ctx:
                        inputs = sequence_inputs(ro.prompt_ids[idx], ro.prompt_mask[idx], ro.response_ids[idx], ro.response_mask[idx])
                        with plan.autocast("ppo_update"):
                            logits, new_values = wrapped(*inputs, T)
                        logits = logits.float() / config.temperature
                        new_logprobs = core.logprobs_from_logits(logits, ro.response_ids[idx])
                        pg_loss, pg_clip, approx_kl = core.policy_loss(
                            new_logprobs, ro.logprobs[idx], advantages[idx], m, config.cliprange)
                        vf_loss, vf_clip = core.value_loss(new_values.float(), ro.values[idx], returns[idx], m, config.cliprange_value)
                        loss = pg_loss + config.vf_coef * vf_loss
                        accelerator.backward(loss / config.gradient_accumulation_steps)
                    ratio = core.masked_mean(torch.exp(new_logprobs - ro.logprobs[idx]), m)
                    for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("policy_clipfrac", pg_clip),
                                 ("value_clipfrac", vf_clip), ("approx_kl", approx_kl), ("ratio", ratio)):
                        mb_stats[k] += v.item() / config.gradient_accumulation_steps
                grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                optimizer_steps += 1
                for k, v in mb_stats.items():
                    stats[k].append(v)
                stats["grad_norm"].append(float(grad_norm))
                if config.approx_kl_stop is not None and _mean_all(accelerator, mb_stats["approx_kl"]) > config.approx_kl_stop:
                    early_stopped = True
                    break
            if early_stopped:
                break
        scheduler.step()
        t_end = time.perf_counter()

        # --- KL controller and logging
        kl_k1 = accelerator.gather((core.kl_per_token(ro.logprobs, ro.ref_logprobs, "k1") * mask).sum(1))
        kl_k3 = accelerator.gather((core.kl_per_token(ro.logprobs, ro.ref_logprobs, "k3") * mask).sum(1))
        mean_kl = (kl_k1 if config.kl_penalty == "k1" else kl_k3).mean().item()
        kl_coef_used = kl_ctl.value
        kl_ctl.update(mean_kl, n_steps=config.batch_size)
        all_scores = accelerator.gather(ro.scores)
        lengths = accelerator.gather(ro.response_mask.sum(1).float())
        eos = accelerator.gather(ro.contains_eos.float())
        row = {
            "step": step,
            "episodes": step * config.batch_size,
            "reward_mean": all_scores.mean().item(),
            "reward_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
            "reward_penalised_mean": accelerator.gather(scores).mean().item(),
            "rlhf_reward_mean": accelerator.gather(scores + non_score.sum(1)).mean().item(),
            "kl": mean_kl,
            "kl_k1": kl_k1.mean().item(),
            "kl_k3": kl_k3.mean().item(),
            "kl_coef": kl_coef_used,
            "entropy": _mean_all(accelerator, core.masked_mean(ro.entropy, mask).item()),
            "approx_kl": _avg(stats["approx_kl"]),
            "policy_clipfrac": _avg(stats["policy_clipfrac"]),
            "value_clipfrac": _avg(stats["value_clipfrac"]),
            "policy_loss": _avg(stats["policy_loss"]),
            "value_loss": _avg(stats["value_loss"]),
            "ratio": _avg(stats["ratio"]),
            "grad_norm": _avg(stats["grad_norm"]),
            "value_mean": _mean_all(accelerator, core.masked_mean(ro.values, mask).item()),
            "advantage_std": core.masked_var(advantages, mask).sqrt().item() if mask.sum() > 1 else 0.0,
            "response_length": lengths.mean().item(),
            "eos_fraction": eos.mean().item(),
            "truncated_fraction": 1.0 - eos.mean().item(),
            "optimizer_steps": optimizer_steps,
            "early_stopped": early_stopped,
            "lr": lr_now,
            "time_generate": ro.time_generate,
            "time_score": ro.time_score,
            "time_forward": ro.time_forward,
            "time_update": t_end - t_update,
            "time_step": t_end - t_step,
        }
        # --- Judges: the proxy and reward models PPO does not train on score held-out prompts
        if judge_every and (step % judge_every == 0 or step == config.steps):
            t_judge = time.perf_counter()
            scores = judge_policy(inner, ref_model, tokenizer, heldout_mine, heldout_rows, reward_fn, judges,
                                  config=config, seed=step_seed(config.seed, 0, rank), batch_size=sizes.local_batch_size,
                                  device=device, plan=plan)
            if world > 1:
                from accelerate.utils import gather_object

                shares = gather_object([scores])
                scores = {k: [x for share in shares for x in share[k]] for k in scores}
            row.update(judge_metrics(scores))
            row["time_judge"] = time.perf_counter() - t_judge
            if keeping_best and (best is None or row["judge_reward"] > best["judge_reward"]):
                best = {"step": step, "judge_reward": row["judge_reward"]}
                _save_best(out, inner, tokenizer, best)
        if accelerator.is_main_process:
            log.write(row)
            if step % config.samples_every == 0 or step == 1:
                _write_samples(out, step, ro)
            for w in diagnostics.check(log.history, config):
                if w["code"] not in warned:
                    warned.add(w["code"])
                    logger.warning("step %d: %s %s", step, w["message"], w["suggestion"])
        if progress is not None:
            judged = f", judge {row['judge_reward']:.3f}" if "judge_reward" in row else ""
            progress(step / config.steps, f"step {step}/{config.steps}: reward {row['reward_mean']:.3f}, KL {row['kl']:.2f}{judged}")

        # --- Checkpoint
        if (config.save_every and step % config.save_every == 0) or step == config.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(ckpt_root, step, config, inner, optimizer, scheduler, kl_ctl, reward_moments,
                                trainable_state)

    log.close()
    result = {"output_dir": str(out), "steps": config.steps, "config": config.to_dict()}
    if accelerator.is_main_process:
        result.update(_save_final(out, inner, tokenizer))
        result.update(_keep_best(out, config, best))
        result["judges"] = [name for name, _ in judges]
        result["heldout_prompts"] = len(heldout_prompts)
        result["metrics"] = summary_metrics(log.history)
        result["diagnostics"] = diagnostics.check(log.history, config)
        (out / "summary.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return result


# Fields a resumed run may change. Only `steps` touches training: a longer run re-stretches a
# linear or cosine schedule from the resumed step on (keep `steps` to get exactly the next step).
RESUME_MAY_CHANGE = {"steps", "save_every", "keep_checkpoints", "samples_every", "tensorboard", "mlflow", "judge_every"}


def _resumable(current: dict, saved: dict) -> dict:
    merged = dict(current)
    for k in RESUME_MAY_CHANGE:
        if k in saved:
            merged[k] = saved[k]
    return merged


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _avg(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _mean_all(accelerator, x: float) -> float:
    if accelerator.num_processes == 1:
        return x
    return accelerator.gather(torch.tensor([x], device=accelerator.device)).mean().item()


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def _keep_samples(out: Path, until_step: int) -> None:
    """Drop sample lines a resumed run will write again (all of them on a fresh start)."""
    path = out / "samples.jsonl"
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if until_step and line.strip() and json.loads(line)["step"] <= until_step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _write_samples(out: Path, step: int, ro, n: int = 4) -> None:
    with open(out / "samples.jsonl", "a", encoding="utf-8") as fh:
        for i in range(min(n, len(ro.responses_text))):
            prompt = ro.prompts[i]
            fh.write(json.dumps({"step": step, "prompt": prompt, "response": ro.responses_text[i],
                                 "score": ro.scores[i].item(), "ended_with_eos": bool(ro.contains_eos[i])}) + "\n")


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(root.glob("step-*/state.pt")) if root.exists() else []
    return found[-1].parent if found else None


def save_checkpoint(root: Path, step, config, inner, optimizer, scheduler, kl_ctl, reward_moments, trainable_state) -> Path:
    """Everything the next step depends on, written atomically (temp file, then rename)."""
    path = root / f"step-{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "config": config.to_dict(),
        "policy": trainable_state(inner.policy),
        "value": trainable_state(inner.value),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "kl_ctl": kl_ctl.state_dict(),
        "reward_moments": reward_moments.state_dict(),
        "rng": rng_state(),
    }
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")
    for old in sorted(root.glob("step-*"))[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _save_model(module, target: Path, tokenizer) -> None:
    """A plain model directory (LoRA merged in), loadable by load_policy."""
    from ppo.models import is_peft

    if is_peft(module):
        # Merged in place and unmerged after saving: a merged copy would add a whole model
        # to the peak memory that LoRA is there to keep low.
        from ppo.models import _base_weights

        base = module.get_base_model()
        module.merge_adapter()
        try:
            base.save_pretrained(target, state_dict=_base_weights(base.state_dict()))
        finally:
            module.unmerge_adapter()
    else:
        module.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _save_final(out: Path, inner, tokenizer) -> dict:
    """policy/ and value/ as plain model directories (LoRA merged in), loadable by load_policy."""
    paths = {}
    for name, module in (("policy", inner.policy), ("value", inner.value)):
        _save_model(module, out / name, tokenizer)
        paths[f"{name}_path"] = str(out / name)
    return paths


def _save_best(out: Path, inner, tokenizer, best: dict) -> None:
    """The policy of the best judged step so far in best-policy/, replaced whole (temp dir, then rename)."""
    tmp, target = out / (BEST_DIR + ".tmp"), out / BEST_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    _save_model(inner.policy, tmp, tokenizer)
    (tmp / "kept.json").write_text(json.dumps(best), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _best_so_far(out: Path, start_step: int, history: list[dict]) -> dict | None:
    """The best judged step a resumed keep_best=judge run starts from: best-policy/'s, unless it
    was written after the checkpoint resumed from (those steps run again and judge again)."""
    path = out / BEST_DIR / "kept.json"
    if start_step and path.is_file():
        best = json.loads(path.read_text(encoding="utf-8"))
        if best["step"] <= start_step:
            return best
    shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    judged = [r for r in history if "judge_reward" in r]
    if judged:
        peak = max(judged, key=lambda r: r["judge_reward"])
        logger.warning("keep_best=judge: the policy of judged step %d is not saved any more; the best is chosen among "
                       "the steps after %d", peak["step"], start_step)
    return None


def _keep_best(out: Path, config: PPOConfig, best: dict | None) -> dict:
    """With keep_best=judge, policy/ becomes the best judged step's policy and the last step's
    moves to policy-last/ (value/ stays the last step's). Says which step policy/ holds."""
    last = {"keep_best": config.keep_best, "kept_step": config.steps}
    if config.keep_best != "judge" or best is None or best["step"] == config.steps:
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
        return last
    shutil.rmtree(out / LAST_DIR, ignore_errors=True)
    os.replace(out / "policy", out / LAST_DIR)
    os.replace(out / BEST_DIR, out / "policy")
    logger.info("keep_best=judge: policy/ is step %d's (judge reward %.4f); the last step's is in %s/",
                best["step"], best["judge_reward"], LAST_DIR)
    return {"keep_best": "judge", "kept_step": best["step"], "kept_judge_reward": best["judge_reward"],
            "policy_last_path": str(out / LAST_DIR)}


SUMMARY_KEYS = ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "response_length", "value_loss")


def summary_metrics(history: list[dict], last: int = 5) -> dict:
    """Final metrics averaged over the last few steps (one step is noisy), plus the first step's
    reward for comparison."""
    if not history:
        return {}
    tail = history[-last:]
    summary = {k: sum(r[k] for r in tail) / len(tail) for k in SUMMARY_KEYS}
    summary["reward_mean_first"] = history[0]["reward_mean"]
    summary["steps"] = history[-1]["step"]
    judged = [r for r in history if "proxy_reward_heldout" in r]
    if judged:
        summary["proxy_reward_heldout"] = judged[-1]["proxy_reward_heldout"]
        summary["kl_heldout"] = judged[-1]["kl_heldout"]
    judged = [r for r in judged if "judge_reward" in r]
    if judged:
        peak = max(judged, key=lambda r: r["judge_reward"])
        summary.update(judge_reward=judged[-1]["judge_reward"], judge_reward_peak=peak["judge_reward"],
                       judge_peak_step=peak["step"])
    return summary


# ======================================================================================
def run_ppo(
    reward_model: str | Path,
    prompts: list,
    output_dir: str | Path,
    *,
    policy: str | Path,
    config: PPOConfig | None = None,
    progress=None,
    cancelled=None,
    resume=None,
    judges: list[str | Path] | None = None,
    heldout_prompts: list | None = None,
) -> dict:
    """PPO from paths: load the policy (LoRA per config), the reward model (reward.score), and the
    value model (from the reward model when config.value_init == 'reward' and it shares the
    policy's tokenizer, else from the policy); then train().

    judges: reward model directories PPO does not train on (never the proxy's), loaded like the
    reward model (each re-tokenizes the text, so any tokenizer will do). heldout_prompts: the
    prompts they judge on; when none are given and judging is on, config.judge_prompts of the
    prompts are split off (split_heldout, seeded) and PPO trains on the rest."""
    from ppo.models import load_policy, load_value_model, same_tokenizer

    config = (config or PPOConfig()).validate()
    try:
        from reward.score import load_reward_model
    except ImportError:
        raise PPOError("reward.score is not available; cannot load a reward model") from None
    judge_paths = [str(j) for j in judges or []]
    check_judges(config, reward_model, judge_paths)
    if heldout_prompts is None and (judge_paths or config.judge_every):
        prompts, heldout_prompts = split_heldout(list(prompts), config.judge_prompts, config.seed)
        logger.info("judges: %d held-out prompts split off (judge_prompts); training on the other %d",
                    len(heldout_prompts), len(prompts))
    judge_fns = [(judge_name(j, i, judge_paths), load_reward_model(j).score) for i, j in enumerate(judge_paths)]
    scorer = load_reward_model(str(reward_model))
    model, tokenizer = load_policy(policy)
    value_model = None
    if config.value_init == "reward":
        try:
            from transformers import AutoTokenizer

            if same_tokenizer(AutoTokenizer.from_pretrained(str(reward_model)), tokenizer):
                value_model = load_value_model(reward_model)
        except (OSError, PPOError, ValueError):
            value_model = None
        if value_model is None:
            logger.warning("value_init=reward: %s does not share the policy's tokenizer; value model built from the policy",
                           reward_model)
    if config.ensemble_spread_coef > 0 and hasattr(scorer, "score_with_spread"):
        reward_fn = scorer
    else:
        reward_fn = scorer.score
    result = train(config, (model, tokenizer), reward_fn, prompts, output_dir, progress, cancelled,
                   value_model=value_model, resume=resume, judges=judge_fns, heldout_prompts=heldout_prompts)
    result.update({"policy_base": str(policy), "reward_model": str(reward_model),
                   "judge_paths": dict(zip(result.get("judges", []), judge_paths))})
    summary = Path(output_dir) / "summary.json"
    if "policy_path" in result and summary.is_file():
        # Main process only. What the run was trained and judged on, for eval-policy's self_judged check.
        summary.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return result


def check_judges(config: PPOConfig, reward_model: str | Path, judges: list[str | Path]) -> None:
    """Raise PPOError for judges that make no sense: the proxy reward model itself (it would judge
    its own exploits), the same judge twice, or keep_best=judge without any judge."""
    proxy = Path(str(reward_model)).resolve()
    seen = set()
    for j in judges:
        path = Path(str(j)).resolve()
        if path == proxy:
            raise PPOError(f"--judge {j} (job param judges) is the reward model PPO trains on (--reward-model); "
                           "a judge must be a reward model PPO does not train on")
        if path in seen:
            raise PPOError(f"--judge {j} (job param judges) is given twice")
        seen.add(path)
    if config.keep_best == "judge" and not judges:
        raise PPOError("keep_best=judge needs at least one judge (--judge DIR, job param judges); "
                       "without one use keep_best=last")


def judge_name(path: str, index: int, paths: list[str]) -> str:
    """A judge's name in the metrics (judge_reward/<name>): its directory's name, or, for a
    model/ folder, its run's; the position is added where two names clash."""
    p = Path(path).resolve()
    name = p.parent.name if p.name in ("model", "policy") else p.name
    others = [Path(q).resolve() for i, q in enumerate(paths) if i != index]
    if any((o.parent.name if o.name in ("model", "policy") else o.name) == name for o in others):
        name = f"{name}-{index + 1}"
    return name
