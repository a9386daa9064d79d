"""Evaluation figures checked by hand on four pairs whose scores the test sets.

Score differences d = chosen - rejected: [ln 4, 0, -ln 4, ln 1.5], so sigmoid(d) = [0.8, 0.5, 0.2, 0.6].
- accuracy: right, tie (half), wrong, right -> (1 + 0.5 + 0 + 1) / 4 = 0.625
- mean margin: (ln 4 + 0 - ln 4 + ln 1.5) / 4 = ln(1.5) / 4
- log-loss: -(ln .8 + ln .5 + ln .2 + ln .6) / 4
- confidence max(p, 1-p) = [.8, .5, .8, .6]; with 2 bins [.5, .75) and [.75, 1]:
  bin 1 holds .5 (half right) and .6 (right): confidence .55, accuracy .75, gap .2;
  bin 2 holds .8 (right) and .8 (wrong): confidence .8, accuracy .5, gap .3;
  ECE = 2/4 * .2 + 2/4 * .3 = 0.25
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from reward_fixtures import FakePair  # noqa: E402

from reward.errors import RewardError  # noqa: E402
from reward.evaluate import evaluate_model, evaluate_scores, save_reliability_plot  # noqa: E402

CHOSEN = [math.log(4), 0.0, 0.0, math.log(1.5)]
REJECTED = [0.0, 0.0, math.log(4), 0.0]
# Chosen is the longer response in the first two pairs and the shorter one in the last two.
PAIRS = [
    FakePair("p0", "a long answer", "short", metadata={"agreement": 1.0}),
    FakePair("p1", "a long answer", "short", metadata={"agreement": 0.6}),
    FakePair("p2", "short", "a long answer", metadata={"agreement": 0.3}),
    FakePair("p3", "short", "a long answer", metadata={}),
]


def test_accuracy_margin_log_loss_and_ece_match_hand_computed_values():
    m = evaluate_scores(CHOSEN, REJECTED, PAIRS, n_bins=2)
    assert m["n_pairs"] == 4 and m["ties"] == 1
    assert m["accuracy"] == pytest.approx(0.625)
    assert m["mean_margin"] == pytest.approx(math.log(1.5) / 4)
    assert m["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.5) + math.log(0.2) + math.log(0.6)) / 4)
    assert m["ece"] == pytest.approx(0.25)
    b1, b2 = m["calibration"]
    assert (b1["count"], b1["confidence"], b1["accuracy"]) == (2, pytest.approx(0.55), pytest.approx(0.75))
    assert (b2["count"], b2["confidence"], b2["accuracy"]) == (2, pytest.approx(0.8), pytest.approx(0.5))


def test_log_loss_agrees_with_scikit_learn():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(0)
    c, r = rng.normal(size=50), rng.normal(size=50)
    p = 1 / (1 + np.exp(-(c - r)))
    # The human label is always "chosen wins": y = 1 with predicted probability sigmoid(d).
    assert evaluate_scores(c, r)["log_loss"] == pytest.approx(log_loss(np.ones(50), p, labels=[0, 1]))


def test_agreement_buckets_and_length_bias_by_hand():
    m = evaluate_scores(CHOSEN, REJECTED, PAIRS, n_bins=2)
    # Pair 3 has no agreement and is left out of the buckets.
    assert m["by_agreement"] == [
        {"bucket": "0.00-0.50", "n_pairs": 1, "accuracy": 0.0},
        {"bucket": "0.50-0.75", "n_pairs": 1, "accuracy": 0.5},
        {"bucket": "0.75-1.00", "n_pairs": 1, "accuracy": 1.0},
    ]
    lb = m["length_bias"]
    assert lb["chosen_longer"] == {"n_pairs": 2, "accuracy": 0.75}   # right + tie
    assert lb["chosen_shorter"] == {"n_pairs": 2, "accuracy": 0.5}   # wrong + right
    # The model prefers the longer response in pair 0 (d > 0, chosen longer) and pair 2 (d < 0, rejected longer).
    assert lb["prefers_longer_rate"] == 0.5 and lb["human_longer_rate"] == 0.5 and lb["equal_length"] == 0


def test_perfect_confident_scorer_is_calibrated_and_a_length_only_scorer_shows_its_bias():
    m = evaluate_scores([50.0] * 4, [0.0] * 4)
    assert m["accuracy"] == 1.0 and m["ece"] == pytest.approx(0.0, abs=1e-12) and m["log_loss"] < 1e-20
    longer = [len(p.chosen) for p in PAIRS], [len(p.rejected) for p in PAIRS]
    lb = evaluate_scores(*longer, PAIRS)["length_bias"]
    assert lb["prefers_longer_rate"] == 1.0
    assert lb["chosen_longer"]["accuracy"] == 1.0 and lb["chosen_shorter"]["accuracy"] == 0.0


class FakeScorer:
    """Scores by a lookup on the response text, so the test controls every score."""

    def __init__(self, table):
        self.table = table

    def score(self, prompts, responses, batch_size=32):
        return torch.tensor([self.table[(p, r)] for p, r in zip(prompts, responses)], dtype=torch.float32)


class FakeEnsemble:
    def __init__(self, *tables):
        self.members = [FakeScorer(t) for t in tables]

    def member_scores(self, prompts, responses, batch_size=32):
        return torch.stack([m.score(prompts, responses) for m in self.members])


def _table(chosen, rejected):
    out = {}
    for pair, c, r in zip(PAIRS, chosen, rejected):
        out[(pair.prompt, pair.chosen)] = c
        out[(pair.prompt, pair.rejected)] = r
    return out


def test_evaluate_model_scores_both_sides_of_every_pair_through_the_scorer():
    m = evaluate_model("fake", PAIRS, scorer=FakeScorer(_table(CHOSEN, REJECTED)))
    assert m["accuracy"] == pytest.approx(0.625)
    assert m["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.5) + math.log(0.2) + math.log(0.6)) / 4, rel=1e-6)


def test_ensemble_evaluation_uses_the_member_mean_and_reports_the_spread():
    a = _table([1.0, 1.0, 1.0, 1.0], [0.0] * 4)
    b = _table([3.0, 3.0, 3.0, 3.0], [0.0] * 4)
    m = evaluate_model("fake", PAIRS, scorer=FakeEnsemble(a, b))
    assert m["mean_margin"] == pytest.approx(2.0)  # mean of members 1 and 3
    assert m["mean_ensemble_spread"] == pytest.approx(1.0)  # population std of {1, 3}


def test_reliability_plot_is_written_as_vega_lite_and_png_is_refused(tmp_path):
    bins = evaluate_scores(CHOSEN, REJECTED, n_bins=2)["calibration"]
    path = save_reliability_plot(bins, tmp_path / "rel.html")
    assert "vega" in path.read_text().lower()
    with pytest.raises(RewardError, match=r"\.html or \.json"):
        save_reliability_plot(bins, tmp_path / "rel.png")


def test_mismatched_or_empty_scores_are_errors():
    with pytest.raises(RewardError, match="one of each per pair"):
        evaluate_scores([1.0, 2.0], [1.0])
    with pytest.raises(RewardError, match="no pairs"):
        evaluate_scores([], [])
