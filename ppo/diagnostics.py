"""Warnings about a PPO run read from its metrics history (the rows of metrics.jsonl), each with
the change that usually helps. Every check is a small pure function of the history; `check`
runs them all. The CLI prints them after a run and the PPO page shows them live.

A warning is a dict: code, step (the latest step looked at), message, suggestion.
"""

from __future__ import annotations

import math
from statistics import median
from typing import Any, Callable

WINDOW = 5


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _warning(code: str, history: list[dict], message: str, suggestion: str) -> dict:
    return {"code": code, "step": history[-1]["step"], "message": message, "suggestion": suggestion}


def reward_hacking(history: list[dict], target: float, window: int = WINDOW) -> dict | None:
    """Reward still rising while the KL to the reference has run past its target: the policy is
    buying reward by moving away from the reference, which is how reward-model exploits look."""
    if len(history) < 2 * window:
        return None
    recent, before = history[-window:], history[-2 * window:-window]
    kl_recent = _mean(recent, "kl")
    rising = _mean(recent, "reward_mean") > _mean(before, "reward_mean")
    if rising and kl_recent > target and kl_recent > _mean(before, "kl"):
        return _warning(
            "reward_hacking", history,
            f"reward is rising while KL ({kl_recent:.2f} nats over the last {window} steps) is past its target ({target:g}) "
            "and growing: the policy may be exploiting the reward model",
            "read samples.jsonl for degenerate responses; raise init_kl_coef or lower target, or lower learning_rate",
        )
    return None


def divergence(history: list[dict], kl_limit: float) -> dict | None:
    """KL above a hard limit: the policy has left the region where the reward model means anything."""
    if not history:
        return None
    kl = history[-1]["kl"]
    if not math.isfinite(kl) or kl > kl_limit:
        return _warning(
            "divergence", history,
            f"KL to the reference is {kl:.2f} nats at step {history[-1]['step']}, above the hard limit {kl_limit:g}",
            "lower learning_rate, set approx_kl_stop (e.g. 0.1), raise init_kl_coef; restart from an earlier checkpoint",
        )
    return None


def mode_collapse(history: list[dict], window: int = WINDOW, ratio: float = 0.1) -> dict | None:
    """Reward spread across a batch has collapsed to a small share of what it was: the policy
    answers every prompt nearly the same way."""
    if len(history) < 2 * window:
        return None
    early, recent = _mean(history[:window], "reward_std"), _mean(history[-window:], "reward_std")
    if early > 0 and recent < ratio * early:
        return _warning(
            "mode_collapse", history,
            f"reward std fell from {early:.3g} to {recent:.3g} (under {ratio:.0%} of its start): responses are collapsing to one mode",
            "raise init_kl_coef (or use kl_penalty=k3), raise temperature, or lower learning_rate",
        )
    return None


def length_limit(history: list[dict], max_new_tokens: int | None = None, window: int = WINDOW, share: float = 0.5) -> dict | None:
    """Most responses hit max_new_tokens without EOS: rewards judge cut-off text."""
    if len(history) < window:
        return None
    truncated = _mean(history[-window:], "truncated_fraction")
    if truncated > share:
        limit = f" ({max_new_tokens} tokens)" if max_new_tokens else ""
        return _warning(
            "length_limit", history,
            f"{truncated:.0%} of responses over the last {window} steps hit the length limit{limit} without EOS",
            "raise max_new_tokens, or set missing_eos_penalty (e.g. 1.0) so that unfinished responses score lower",
        )
    return None


def value_loss_exploding(history: list[dict], window: int = WINDOW, factor: float = 10.0) -> dict | None:
    """Value loss far above where it started (or not finite): advantages become noise."""
    if not history:
        return None
    latest = history[-1]["value_loss"]
    if not math.isfinite(latest):
        return _warning("value_loss_exploding", history, f"value loss is {latest} at step {history[-1]['step']}",
                        "lower learning_rate, lower cliprange_value, set normalize_reward=true")
    if len(history) < 2 * window:
        return None
    baseline = median(r["value_loss"] for r in history[:window])
    recent = _mean(history[-window:], "value_loss")
    if baseline > 0 and recent > factor * baseline:
        return _warning(
            "value_loss_exploding", history,
            f"value loss over the last {window} steps ({recent:.3g}) is {recent / baseline:.0f}x its start ({baseline:.3g})",
            "set normalize_reward=true (reward scale), lower learning_rate or vf_coef, or lower cliprange_value",
        )
    return None


def over_optimisation(history: list[dict], share: float = 0.1, keep_best: str = "last") -> dict | None:
    """The judges' reward (models PPO does not train on) has fallen from its peak while the
    proxy's held-out reward kept rising: the policy now gains proxy reward by getting worse
    (Gao, Schulman and Hilton 2022). The fall must exceed one standard error of the difference
    (judge_reward_stderr at both steps) and `share` of the judges' rise to the peak."""
    judged = [r for r in history if "judge_reward" in r and "proxy_reward_heldout" in r]
    if len(judged) < 3:
        return None
    peak = max(judged, key=lambda r: r["judge_reward"])
    last = judged[-1]
    if peak is last:
        return None
    drop = peak["judge_reward"] - last["judge_reward"]
    noise = math.sqrt(peak.get("judge_reward_stderr", 0.0) ** 2 + last.get("judge_reward_stderr", 0.0) ** 2)
    rise = max(0.0, peak["judge_reward"] - judged[0]["judge_reward"])
    proxy_rose = last["proxy_reward_heldout"] > peak["proxy_reward_heldout"]
    if not (proxy_rose and drop > noise and drop > share * rise and drop > 0):
        return None
    kl = lambda r: r.get("kl_heldout", r.get("kl", float("nan")))
    keep = (f"keep_best=judge keeps the step-{peak['step']} policy as policy/" if keep_best == "judge"
            else f"set keep_best=judge to keep the step-{peak['step']} policy")
    return _warning(
        "over_optimisation", history,
        f"the judges' reward fell from {peak['judge_reward']:.4g} at step {peak['step']} (KL {kl(peak):.2f}) to "
        f"{last['judge_reward']:.4g} at step {last['step']} (KL {kl(last):.2f}) while the proxy's held-out reward rose "
        f"from {peak['proxy_reward_heldout']:.4g} to {last['proxy_reward_heldout']:.4g}: the policy is over-optimising "
        "the reward model it trains on",
        f"raise init_kl_coef or lower target (a smaller KL budget), stop earlier (steps={peak['step']}), or {keep}",
    )


def check(history: list[dict], config: Any) -> list[dict]:
    """All warnings that apply to the history now, for a run with this PPOConfig."""
    checks: list[Callable[[], dict | None]] = [
        lambda: reward_hacking(history, config.target),
        lambda: divergence(history, config.kl_limit),
        lambda: mode_collapse(history),
        lambda: length_limit(history, config.max_new_tokens),
        lambda: value_loss_exploding(history),
        lambda: over_optimisation(history, keep_best=getattr(config, "keep_best", "last")),
    ]
    return [w for w in (c() for c in checks) if w is not None]
