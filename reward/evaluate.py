"""How good and how trustworthy a reward model is on labelled pairs.

    rlhf eval-rm --model runs/rm-1 --data pairs.jsonl --json

From the two scores of each pair (chosen r_c, rejected r_r) and d = r_c - r_r:
- accuracy: share of pairs with d > 0, a tie (d == 0) counting one half;
- mean_margin: mean of d;
- log_loss: Bradley-Terry negative log-likelihood of the human label, mean of -log sigmoid(d);
- ece: expected calibration error of the model's own pick. Its confidence is max(p, 1 - p) with
  p = sigmoid(d), it is right when d > 0 (half right on a tie); pairs are binned by confidence in
  [0.5, 1] and ECE = sum over bins of (bin share) * |bin accuracy - bin mean confidence|;
- by_agreement: accuracy per bucket of the item's annotator agreement (pair metadata "agreement");
- length_bias: accuracy where the chosen response is the longer one and where it is the shorter
  one (characters), and how often the model prefers the longer response.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from reward.errors import RewardError

AGREEMENT_EDGES = (0.0, 0.5, 0.75, 1.0)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _correct(d: np.ndarray) -> np.ndarray:
    return np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))


def calibration_bins(d: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Reliability-diagram bins over confidence [0.5, 1]: lo, hi, count, confidence (mean), accuracy."""
    p = 1.0 / (1.0 + np.exp(-d))
    conf = np.maximum(p, 1.0 - p)
    correct = _correct(d)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = which == b
        count = int(sel.sum())
        bins.append({
            "lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
            "confidence": float(conf[sel].mean()) if count else None,
            "accuracy": float(correct[sel].mean()) if count else None,
        })
    return bins


def expected_calibration_error(bins: list[dict]) -> float:
    total = sum(b["count"] for b in bins)
    if not total:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def _bucket(value: float) -> str:
    edges = AGREEMENT_EDGES
    for lo, hi in zip(edges[:-1], edges[1:]):
        if value < hi or hi == edges[-1]:
            return f"{lo:.2f}-{hi:.2f}"
    return f"{edges[-2]:.2f}-{edges[-1]:.2f}"


def evaluate_scores(chosen: Sequence[float], rejected: Sequence[float], pairs: Sequence | None = None,
                    n_bins: int = 10) -> dict:
    """Every metric from the module docstring, from scores alone (and the pairs, for the agreement and
    length breakdowns)."""
    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 1:
        raise RewardError(f"{c.size} chosen scores but {r.size} rejected scores; expected one of each per pair")
    if c.size == 0:
        raise RewardError("no pairs to evaluate")
    d = c - r
    correct = _correct(d)
    bins = calibration_bins(d, n_bins)
    out = {
        "n_pairs": int(d.size),
        "accuracy": float(correct.mean()),
        "ties": int((d == 0).sum()),
        "mean_margin": float(d.mean()),
        "log_loss": float(-_log_sigmoid(d).mean()),
        "ece": expected_calibration_error(bins),
        "calibration": bins,
        "mean_chosen": float(c.mean()),
        "mean_rejected": float(r.mean()),
    }
    if pairs is not None:
        if len(pairs) != d.size:
            raise RewardError(f"{len(pairs)} pairs but {d.size} scores")
        out["by_agreement"] = _by_agreement(pairs, correct)
        out["length_bias"] = _length_bias(pairs, d, correct)
    return out


def _by_agreement(pairs: Sequence, correct: np.ndarray) -> list[dict]:
    groups: dict[str, list[float]] = {}
    for pair, ok in zip(pairs, correct):
        agreement = (getattr(pair, "metadata", None) or {}).get("agreement")
        if agreement is None or (isinstance(agreement, float) and math.isnan(agreement)):
            continue
        groups.setdefault(_bucket(float(agreement)), []).append(float(ok))
    return [{"bucket": k, "n_pairs": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(groups.items())]


def _length_bias(pairs: Sequence, d: np.ndarray, correct: np.ndarray) -> dict:
    lc = np.array([len(p.chosen) for p in pairs])
    lr = np.array([len(p.rejected) for p in pairs])
    longer, shorter, equal = lc > lr, lc < lr, lc == lr
    # The model prefers the longer response when its score difference points at it.
    prefers_longer = np.where(longer, d > 0, np.where(shorter, d < 0, False))

    def acc(mask):
        return float(correct[mask].mean()) if mask.any() else None

    unequal = ~equal
    return {
        "chosen_longer": {"n_pairs": int(longer.sum()), "accuracy": acc(longer)},
        "chosen_shorter": {"n_pairs": int(shorter.sum()), "accuracy": acc(shorter)},
        "equal_length": int(equal.sum()),
        "prefers_longer_rate": float(prefers_longer[unequal].mean()) if unequal.any() else None,
        "human_longer_rate": float(longer[unequal].mean()) if unequal.any() else None,
    }


def score_pairs(scorer, pairs: Sequence, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(chosen scores, rejected scores, per-pair ensemble spread of the difference or None)."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    n = len(pairs)
    if hasattr(scorer, "member_scores"):
        members = scorer.member_scores(prompts, responses, batch_size).numpy()
        mean = members.mean(0)
        diff_spread = (members[:, :n] - members[:, n:]).std(0)
        return mean[:n], mean[n:], diff_spread
    scores = scorer.score(prompts, responses, batch_size).numpy()
    return scores[:n], scores[n:], None


def evaluate_model(model, pairs: Sequence, batch_size: int = 32, scorer=None) -> dict:
    """Score `pairs` with the reward model (dir, ensemble dir or registered row) and compute every metric."""
    from reward.score import load_reward_model

    scorer = scorer or load_reward_model(model)
    chosen, rejected, spread = score_pairs(scorer, pairs, batch_size)
    out = evaluate_scores(chosen, rejected, pairs)
    if spread is not None:
        out["mean_ensemble_spread"] = float(np.mean(spread))
    out["model"] = str(getattr(model, "path", model))
    return out


def reliability_chart(bins: list[dict]):
    """An Altair reliability diagram: bin accuracy against bin confidence, with the diagonal."""
    import altair as alt
    import pandas as pd

    df = pd.DataFrame([b for b in bins if b["count"]])
    diag = alt.Chart(pd.DataFrame({"x": [0.5, 1.0], "y": [0.5, 1.0]})).mark_line(strokeDash=[4, 4], color="gray").encode(
        x="x:Q", y="y:Q")
    if df.empty:
        return diag
    points = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("confidence:Q", title="confidence", scale=alt.Scale(domain=[0.5, 1.0])),
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0.0, 1.0])),
        tooltip=["lo", "hi", "count", "confidence", "accuracy"],
    )
    return (diag + points).properties(title="Reliability", width=320, height=280)


def save_reliability_plot(bins: list[dict], path: str | Path) -> Path:
    """The reliability diagram as .html or .json (Vega-Lite); PNG would need vl-convert, which is not installed."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".json"):
        raise RewardError(f"--plot {path}: expected a .html or .json file (PNG export needs vl-convert, not installed)")
    path.parent.mkdir(parents=True, exist_ok=True)
    reliability_chart(bins).save(str(path))
    return path
