"""Evaluating a policy against its reference on held-out prompts, as judged by a reward model.

    rlhf eval-policy --policy runs/ppo-1/policy --reference data/models/SmolLM2-135M-Instruct \\
        --reward-model runs/rm-1 --prompts heldout.jsonl [--n 100] [--json]

For each prompt both models sample one response with the same settings and the same seed; the
reward model scores both. Reported: the win rate of the policy (ties count half), both mean
rewards, and the KL of the policy to the reference on the policy's own samples: the sum over
response tokens of log p_policy - log p_ref, averaged over prompts (a Monte-Carlo estimate of
KL(policy || reference) per response). Log-probs are taken at the sampling temperature, the
same quantity PPO's KL penalty and its target measure, so the two figures are comparable.

With judges (`--judge DIR`, repeatable) the same responses are also scored by each judge and
its win rate is reported beside the reward model's. A win rate by the reward model the policy
was trained on is self-judged (it rewards exploits of itself); `self_judged` says so, from the
policy's registry row or its run's summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ppo.errors import PPOError
from ppo.options import SampleOptions  # noqa: F401  (defined with the other torch-free options; imported from here too)

RewardFn = Callable[[list, list[str]], torch.Tensor]


def win_rate(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> dict[str, float]:
    """Share of prompts where the policy's reward beats the reference's, ties counting half,
    with the counts and a binomial standard error."""
    if len(policy_rewards) != len(reference_rewards) or not len(policy_rewards):
        raise PPOError("win rate needs the same, non-zero number of policy and reference rewards")
    wins = sum(p > r for p, r in zip(policy_rewards, reference_rewards))
    ties = sum(p == r for p, r in zip(policy_rewards, reference_rewards))
    n = len(policy_rewards)
    rate = (wins + 0.5 * ties) / n
    return {"win_rate": rate, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate_stderr": math.sqrt(rate * (1 - rate) / n)}


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def response_logprob_sums(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float) -> torch.Tensor:
    """Summed log-probability of each response under `model` at `temperature`: `[B]`."""
    from ppo import core
    from ppo.rollout import policy_logits, response_slice, sequence_inputs

    inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    logits = response_slice(policy_logits(model, *inputs), prompt_ids.shape[1], response_ids.shape[1]).float() / temperature
    logprobs = core.logprobs_from_logits(logits, response_ids)
    return (logprobs * response_mask).sum(1)


@dataclasses.dataclass
class Samples:
    """One response per prompt from one model, with what the KL needs."""

    texts: list[str]
    response_ids: list[list[int]]
    lengths: list[int]
    ended: list[bool]
    logprob_sums: list[float]
    ref_logprob_sums: list[float]


@torch.no_grad()
def sample_responses(
    model, tokenizer, prompts: list, options: SampleOptions, *, ref_model=None, seed_offset: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Samples:
    """Sample one response per prompt in seeded batches (batch i uses seed + seed_offset + i); with
    `ref_model`, also the summed log-probs of each response under both models."""
    from ppo.rollout import encode_prompts, generate, left_pad

    device = next(model.parameters()).device
    rows = encode_prompts(tokenizer, prompts, options.max_prompt_length, options.use_chat_template)
    out = Samples([], [], [], [], [], [])
    for b, start in enumerate(range(0, len(rows), options.batch_size)):
        prompt_ids, prompt_mask = (t.to(device) for t in left_pad(rows[start:start + options.batch_size], tokenizer.pad_token_id))
        torch.manual_seed(options.seed + seed_offset + b)
        response_ids, response_mask, contains_eos = generate(model, tokenizer, prompt_ids, prompt_mask,
                                                             options.max_new_tokens, options.temperature)
        out.texts += tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(response_ids, response_mask)], skip_special_tokens=True)
        out.response_ids += [ids[m.bool()].tolist() for ids, m in zip(response_ids, response_mask)]
        out.lengths += response_mask.sum(1).tolist()
        out.ended += contains_eos.tolist()
        if ref_model is not None:
            mask = response_mask.float()
            out.logprob_sums += response_logprob_sums(model, prompt_ids, prompt_mask, response_ids, mask, options.temperature).tolist()
            out.ref_logprob_sums += response_logprob_sums(ref_model, prompt_ids, prompt_mask, response_ids, mask, options.temperature).tolist()
        if progress is not None:
            progress(start + len(response_ids))
    return out


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(xs), dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


def _score(fn: RewardFn, prompts: list, texts: list[str], what: str) -> torch.Tensor:
    scores = torch.as_tensor(fn(prompts, texts), dtype=torch.float32).flatten().cpu()
    if scores.numel() != len(texts) or not torch.isfinite(scores).all():
        raise PPOError(f"{what} returned {scores.numel()} scores (finite: {bool(torch.isfinite(scores).all())}) for {len(texts)} responses")
    return scores


def evaluate_policy(
    policy, reference, reward_fn: RewardFn, prompts: list, options: SampleOptions | None = None, *,
    n_samples: int = 8, progress: Callable[[float, str], None] | None = None, judges=None,
) -> dict[str, Any]:
    """Win rate, mean rewards and KL of `policy` against `reference`, both (model, tokenizer).

    Returns a dict with n_prompts, win_rate (+ wins, ties, losses, win_rate_stderr),
    reward_policy, reward_reference (means; *_std spreads), kl (mean summed KL per response,
    nats; kl_std), response lengths and EOS rates, `samples` (the first n_samples prompts side
    by side) and `rows` (every prompt's rewards and KL). judges: more reward functions with
    names (as ppo.train.named_judges takes them); each scores the same responses and gets
    `judges[name]` = its win rate (+ counts, stderr) and both mean rewards."""
    from ppo.train import named_judges

    from ppo.models import same_tokenizer
    from ppo.rollout import prompt_text

    options = (options or SampleOptions()).validate()
    if not prompts:
        raise PPOError("no prompts to evaluate on")
    (pol_model, pol_tok), (ref_model, ref_tok) = policy, reference
    if not same_tokenizer(pol_tok, ref_tok):
        raise PPOError("the policy and the reference use different tokenizers; the KL between them is undefined")
    for m in (pol_model, ref_model):
        m.eval()
    n = len(prompts)
    report = (lambda done, total, what: progress(done / total, what)) if progress else (lambda *a: None)

    pol = sample_responses(pol_model, pol_tok, prompts, options, ref_model=ref_model,
                           progress=lambda k: report(k, 2 * n + 1, f"policy: {k}/{n} prompts"))
    ref = sample_responses(ref_model, ref_tok, prompts, options,
                           progress=lambda k: report(n + k, 2 * n + 1, f"reference: {k}/{n} prompts"))
    scores = _score(reward_fn, list(prompts) * 2, pol.texts + ref.texts, "the reward model")
    reward_pol, reward_ref = scores[:n].tolist(), scores[n:].tolist()
    judged = {}
    for name, fn in named_judges(judges):
        js = _score(fn, list(prompts) * 2, pol.texts + ref.texts, f"judge {name}")
        judged[name] = {**win_rate(js[:n].tolist(), js[n:].tolist()),
                        "reward_policy": float(js[:n].mean()), "reward_reference": float(js[n:].mean())}
    kls = [a - b for a, b in zip(pol.logprob_sums, pol.ref_logprob_sums)]
    report(1, 1, "scored")

    rows = [
        {"prompt": prompt_text(p), "policy": pol.texts[i], "reference": ref.texts[i], "reward_policy": reward_pol[i],
         "reward_reference": reward_ref[i], "kl": kls[i]}
        for i, p in enumerate(prompts)
    ]
    (rp, rp_std), (rr, rr_std), (kl, kl_std) = _mean_std(reward_pol), _mean_std(reward_ref), _mean_std(kls)
    return {
        "n_prompts": n,
        **win_rate(reward_pol, reward_ref),
        "reward_policy": rp, "reward_policy_std": rp_std,
        "reward_reference": rr, "reward_reference_std": rr_std,
        "kl": kl, "kl_std": kl_std,
        "response_length_policy": sum(pol.lengths) / n, "response_length_reference": sum(ref.lengths) / n,
        "eos_rate_policy": sum(pol.ended) / n, "eos_rate_reference": sum(ref.ended) / n,
        "sampling": dataclasses.asdict(options),
        **({"judges": judged} if judged else {}),
        "samples": rows[:n_samples],
        "rows": rows,
    }


def training_reward_model(policy: str | Path, engine=None) -> str | None:
    """The reward model a policy was trained on, or None when nothing records it: the policy's
    registry row (params.reward_model, with `engine`), else its PPO run's summary.json (written
    by ppo.train.run_ppo in the directory above policy/)."""
    target = Path(policy).resolve()
    if engine is not None:
        from annotation.registry import list_models
        from annotation.store import transaction

        with transaction(engine) as session:
            for row in list_models(session, kind="policy"):
                if Path(row.path).resolve() == target and (row.params or {}).get("reward_model"):
                    return str(row.params["reward_model"])
    summary = target.parent / "summary.json"
    if summary.is_file():
        try:
            recorded = json.loads(summary.read_text(encoding="utf-8")).get("reward_model")
        except (OSError, ValueError):
            recorded = None
        if recorded:
            return str(recorded)
    return None


def same_model(a: str | Path | None, b: str | Path | None) -> bool | None:
    """Whether two model paths are the same directory (None when either is unknown)."""
    if a is None or b is None:
        return None
    return Path(a).resolve() == Path(b).resolve()


def run_eval_policy(
    policy: str, reference: str, reward_model: str, prompts: list, options: SampleOptions | None = None, *,
    n_samples: int = 8, progress: Callable[[float, str], None] | None = None, judges: list[str] | None = None,
    trained_on: str | None = None,
) -> dict[str, Any]:
    """evaluate_policy from paths: policy and reference model directories (or hub ids), a reward
    model run directory (reward.score) and judge directories. trained_on: the reward model the
    policy was trained on (training_reward_model); a verdict by it is self_judged."""
    from ppo.models import load_policy
    from ppo.train import judge_name
    from reward.score import load_reward_model

    device = _device()
    scorer = load_reward_model(reward_model)
    judge_paths = [str(j) for j in judges or []]
    names = [judge_name(j, i, judge_paths) for i, j in enumerate(judge_paths)]
    judge_fns = [(name, load_reward_model(j).score) for name, j in zip(names, judge_paths)]
    pol_model, pol_tok = load_policy(policy)
    ref_model, ref_tok = load_policy(reference)
    result = evaluate_policy((pol_model.to(device), pol_tok), (ref_model.to(device), ref_tok), scorer.score, prompts,
                             options, n_samples=n_samples, progress=progress, judges=judge_fns)
    for name, path in zip(names, judge_paths):
        result["judges"][name].update(path=path, self_judged=same_model(path, trained_on))
    return {**result, "policy": str(policy), "reference": str(reference), "reward_model": str(reward_model),
            "trained_on": trained_on, "self_judged": same_model(reward_model, trained_on)}


def format_report(result: dict[str, Any], width: int = 60) -> str:
    """The result as text: the headline figures, then the samples side by side."""

    def cut(text: str) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = [
        f"prompts: {result['n_prompts']}",
        f"win rate of the policy: {result['win_rate']:.3f} ± {result['win_rate_stderr']:.3f} "
        f"({result['wins']} wins, {result['ties']} ties, {result['losses']} losses)",
        f"mean reward: policy {result['reward_policy']:.4f}, reference {result['reward_reference']:.4f}",
        f"KL(policy || reference): {result['kl']:.3f} nats per response (std {result['kl_std']:.3f})",
        f"response length: policy {result['response_length_policy']:.1f}, reference {result['response_length_reference']:.1f} tokens",
    ]
    flag = {True: "self_judged: true (the reward model it was trained on)", False: "self_judged: false",
            None: "self_judged: unknown"}
    if "self_judged" in result:
        lines[1] += f" ({flag[result['self_judged']]})"
    for name, j in result.get("judges", {}).items():
        lines.append(f"win rate by judge {name}: {j['win_rate']:.3f} ± {j['win_rate_stderr']:.3f} "
                     f"(reward: policy {j['reward_policy']:.4f}, reference {j['reward_reference']:.4f}; "
                     f"{flag[j.get('self_judged')]})")
    lines += [
        "",
        f"{'prompt':<{width}} | {'policy':<{width}} | {'reference':<{width}} | r_pol   r_ref   kl",
    ]
    for row in result["samples"]:
        lines.append(f"{cut(row['prompt']):<{width}} | {cut(row['policy']):<{width}} | {cut(row['reference']):<{width}} | "
                     f"{row['reward_policy']:+.3f} {row['reward_reference']:+.3f} {row['kl']:.2f}")
    return "\n".join(lines)
