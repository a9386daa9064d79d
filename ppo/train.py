"""PPO for language models on a reward model (Ziegler et al. 2019; Huang et al. 2024): the loop,
reading top to bottom like CleanRL's ppo.py: rollout, rewards and advantages, update, logging,
judges, checkpoint.

    from ppo.train import PPOConfig, train
    result = train(PPOConfig(steps=100), load_policy(path), reward_fn, prompts, "runs/ppo-1")

`run_ppo(...)` does the same from paths (policy dir, reward model dir, prompts); the `ppo` use
case (ppo.usecases.ppo, for `rlhf ppo` and the job) calls it. A run directory holds metrics.jsonl
(one line per step), samples.jsonl, config.yaml, checkpoints/step-N/state.pt (everything needed
to resume exactly), and, at the end, policy/ and value/ model directories.

What the loop calls lives beside it: the configuration in ppo.config, the losses and estimators
in ppo.core, sampling and scoring in ppo.rollout, checkpoints, seeding and the saved models in
ppo.checkpoint, the judges (reward models PPO does not train on, scoring held-out prompts every
judge_every steps) in ppo.judges, and the run directory's logs in ppo.runs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ppo import core
from ppo.checkpoint import (best_so_far, keep_best_policy, load_checkpoint, save_best, save_checkpoint,
                            save_final, set_rng_state, set_seed, step_seed)
from ppo.config import DEFAULT_JUDGE_EVERY, PPOConfig, Sizes, exact_div, field_docs  # noqa: F401  (re-exported)
from ppo.errors import PPOError
from ppo.judges import check_judges, judge_metrics, judge_name, judge_policy, named_judges, split_heldout  # noqa: F401
from ppo.runs import MetricsLog, summary_metrics, trim_samples, write_samples
from reward.precision import precision_plan

logger = logging.getLogger("ppo.train")


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
    loaded (with resume, the same initial weights as the interrupted run). Where the plan computes
    PPO in bf16, the frozen linear weights of the models passed in (LoRA's base layers, the
    reference) are held in bf16 from then on (ppo.models.hold_frozen_linears). value_model: a
    sequence-classification model sharing the policy's tokenizer, or None for one built from
    the policy. ref_model: the frozen reference, or None for a copy of the initial policy (no
    copy with LoRA: adapters off). resume: True for the newest checkpoint in output_dir, or a
    checkpoint directory. judges: reward functions `fn(prompts, responses) -> tensor` that PPO
    does not train on, each with a name (see named_judges); heldout_prompts: the fixed prompts
    they judge on, never trained on. Every config.judge_interval steps and at the last step the
    step's metrics row gets proxy_reward_heldout, kl_heldout, judge_reward, judge_reward_stderr
    and judge_reward/<name> (judge_metrics).
    """
    from accelerate import Accelerator, DistributedType

    from ppo import diagnostics
    from ppo.models import (PolicyAndValue, SamplingCopy, add_value_lora, get_lora_policy, hold_frozen_linears, is_peft,
                            load_trainable_state, trainable_state, value_head_for, value_model_from_policy)
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

    # --- Models: policy, value (a second model, or a head on the policy's backbone), reference;
    # one optimiser over everything trainable
    shared = config.value_model == "shared"
    if shared and value_model is not None:
        raise PPOError("value_model=shared puts the value head on the policy; do not pass a value model as well")
    if value_model is None and not shared:
        value_model = value_model_from_policy(model.get_base_model() if is_peft(model) else model)
    if config.lora and not is_peft(model):
        model = get_lora_policy(model, config.lora_options())
    if shared:
        value_model = value_head_for(model)
    elif is_peft(model) and not is_peft(value_model):
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
    # Frozen linear weights (LoRA's base layers, the reference) held in bf16 where all their
    # forwards compute in bf16 anyway: the same numbers without a cast at every forward
    # (hold_frozen_linears). Sharded training flattens parameters of one dtype, so it keeps fp32.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if plan.bf16("ppo_update") and not sharded:
        for frozen_in in (ref_model, value_model, model if plan.bf16("ppo_generate") else None):  # the policy also samples
            if frozen_in is not None:
                hold_frozen_linears(frozen_in, torch.bfloat16)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    inner = accelerator.unwrap_model(wrapped)
    # Sampling goes through a copy of the policy where `sampling` says so (SamplingCopy): LoRA's
    # adapters merged in, or a bf16 copy of a fully trained policy where generation runs in bf16
    # (an fp32 one would buy nothing). Sharded training (FSDP, DeepSpeed) samples from the policy,
    # since no process holds whole weights to copy.
    sampling_copy = None
    bf16_generate = plan.bf16("ppo_generate")
    if config.sampling_copy(device.type) and SamplingCopy.supports(inner.policy) and not sharded and (is_peft(inner.policy) or bf16_generate):
        sampling_copy = SamplingCopy(inner.policy, torch.bfloat16 if bf16_generate else None)
    elif config.sampling == "copy":
        logger.warning("sampling=copy: sampling from the policy instead (%s)",
                       "training is sharded" if sharded else
                       "the policy trains weights outside plain LoRA adapters" if is_peft(inner.policy) else
                       "generation runs in fp32, where a copy would be no faster")
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
        state, _ckpt = load_checkpoint(ckpt_root, resume, config)
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
    trim_samples(out, start_step)
    warned: set[str] = set()
    keeping_best = config.keep_best == "judge" and accelerator.is_main_process
    best = best_so_far(out, start_step, log.history) if keeping_best else None

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
            sampler=sampling_copy,
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
                                  device=device, plan=plan, sampler=sampling_copy)
            if world > 1:
                from accelerate.utils import gather_object

                shares = gather_object([scores])
                scores = {k: [x for share in shares for x in share[k]] for k in scores}
            row.update(judge_metrics(scores))
            row["time_judge"] = time.perf_counter() - t_judge
            if keeping_best and (best is None or row["judge_reward"] > best["judge_reward"]):
                best = {"step": step, "judge_reward": row["judge_reward"]}
                save_best(out, inner, tokenizer, best)
        if accelerator.is_main_process:
            log.write(row)
            if step % config.samples_every == 0 or step == 1:
                write_samples(out, step, ro)
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
        result.update(save_final(out, inner, tokenizer))
        result.update(keep_best_policy(out, config, best))
        result["judges"] = [name for name, _ in judges]
        result["heldout_prompts"] = len(heldout_prompts)
        result["metrics"] = summary_metrics(log.history)
        result["diagnostics"] = diagnostics.check(log.history, config)
        (out / "summary.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return result


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
    if config.value_init == "reward" and config.value_model == "separate":
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


