"""Judges: reward models PPO does not train on, scoring held-out prompts as training goes on.

Every `judge_every` steps the policy answers a fixed set of held-out prompts and the proxy (the
training reward) and each judge score the answers: the proxy keeps rising as the policy exploits
it while a judge's score peaks and falls (Gao, Schulman and Hilton 2022, "Scaling laws for reward
model overoptimization"). ppo.train's loop calls judge_policy and judge_metrics; run_ppo and the
use case check the judges first (check_judges) and name them (judge_name).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import torch

from ppo import core
from ppo.config import PPOConfig
from ppo.errors import PPOError


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
                 judges: list[tuple[str, Callable]], *, config: PPOConfig, seed: int, batch_size: int, device,
                 plan, sampler: Callable | None = None) -> dict[str, list[float]]:
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
                sampler=sampler,
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

