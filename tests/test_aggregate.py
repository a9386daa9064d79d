"""Aggregation: majority vote by hand, Dawid-Skene against crowd-kit, gold and degenerate input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from annotation.aggregate import OUTPUT_COLUMNS, aggregate, dawid_skene, majority
from annotation.errors import AnnotationError

# crowd-kit 1.4.2 uses pandas keywords that pandas 3 deprecates; its warnings are not ours.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:crowdkit.*")

LABELS = np.array(["a", "b", "tie", "both_bad"])


def synthetic_votes(n_items=1500, accuracies=(0.95, 0.55, 0.5, 0.45, 0.9), per_item=(2, 5), seed=0):
    """Votes from annotators of known accuracy on items with a known true label (wrong answers uniform)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(4, size=n_items, p=[0.45, 0.35, 0.15, 0.05])
    rows = []
    for i in range(n_items):
        who = rng.choice(len(accuracies), size=rng.integers(per_item[0], per_item[1] + 1), replace=False)
        for a in who:
            label = truth[i] if rng.random() < accuracies[a] else rng.integers(4)
            rows.append((i, f"ann{a}", LABELS[label]))
    votes = pd.DataFrame(rows, columns=["item_id", "annotator", "choice"])
    return votes, pd.Series(LABELS[truth], index=pd.RangeIndex(n_items, name="item_id"))


def crowdkit_probas(votes, gold=None):
    from crowdkit.aggregation import DawidSkene

    data = votes.rename(columns={"item_id": "task", "annotator": "worker", "choice": "label"})[["task", "worker", "label"]]
    model = DawidSkene(n_iter=100)
    return model.fit_predict_proba(data, gold), model


def test_majority_by_hand():
    votes = pd.DataFrame(
        {"item_id": [1, 1, 1, 2, 2, 3], "annotator": ["x", "y", "z", "x", "y", "x"], "choice": ["a", "a", "b", "a", "b", "tie"]}
    )
    out = majority(votes)
    assert list(out.columns) == OUTPUT_COLUMNS
    assert out.loc[1, "label"] == "a" and out.loc[1, "confidence"] == pytest.approx(2 / 3)
    assert out.loc[1, "agreement"] == pytest.approx(1 / 3)  # one agreeing pair of three
    assert out.loc[2, "label"] is None and out.loc[2, "agreement"] == 0.0  # a 1-1 split has no winner
    assert out.loc[3, "label"] == "tie" and out.loc[3, "n_annotations"] == 1 and out.loc[3, "agreement"] == 1.0


@pytest.mark.parametrize("with_gold", [False, True])
def test_dawid_skene_matches_crowdkit(with_gold):
    votes, truth = synthetic_votes(seed=3)
    gold = truth.iloc[:150] if with_gold else None
    ours = dawid_skene(votes, gold)
    theirs, model = crowdkit_probas(votes, gold)
    theirs = theirs.reindex(index=ours.probas.index, columns=ours.probas.columns)
    np.testing.assert_allclose(ours.probas.to_numpy(), theirs.to_numpy(), atol=1e-6)
    assert ours.n_iter == len(model.loss_history_)
    np.testing.assert_allclose(ours.priors.to_numpy(), model.priors_.reindex(ours.labels).to_numpy(), atol=1e-6)
    # crowd-kit's error matrices, indexed (worker, observed label) x true label
    for wi, name in enumerate(ours.annotators):
        theirs_e = model.errors_.loc[name].reindex(index=ours.labels, columns=ours.labels).fillna(0.0).to_numpy()
        np.testing.assert_allclose(ours.errors[wi], theirs_e, atol=1e-6)


def test_dawid_skene_beats_majority_on_noisy_annotators():
    votes, truth = synthetic_votes(n_items=2000, accuracies=(0.95, 0.92, 0.35, 0.35, 0.35), per_item=(3, 5), seed=7)
    ds = aggregate(votes, "dawid-skene")
    mv = aggregate(votes, "majority")
    acc_ds = (ds["label"] == truth.reindex(ds.index)).mean()
    acc_mv = (mv["label"] == truth.reindex(mv.index)).mean()
    assert acc_ds > acc_mv + 0.05, (acc_ds, acc_mv)
    assert ds["confidence"].between(0, 1).all() and not ds["confidence"].isna().any()
    fit = dawid_skene(votes)
    accuracy = fit.annotator_accuracy()
    assert accuracy["ann0"] > 0.85 and accuracy["ann2"] < 0.6


def test_gold_weighs_into_annotator_quality():
    # ann0 and ann1 always agree with each other and are wrong on the gold items; ann2 is right there.
    rng = np.random.default_rng(0)
    rows, gold = [], {}
    for i in range(300):
        right = LABELS[rng.integers(2)]
        wrong = "b" if right == "a" else "a"
        said = wrong if i < 150 else right
        rows += [(i, "ann0", said), (i, "ann1", said), (i, "ann2", right)]
        if i < 150:
            gold[i] = right
    votes = pd.DataFrame(rows, columns=["item_id", "annotator", "choice"])
    without = dawid_skene(votes).annotator_accuracy()
    with_gold = dawid_skene(votes, gold).annotator_accuracy()
    assert with_gold["ann0"] < without["ann0"] - 0.3
    assert with_gold["ann2"] > without["ann2"] + 0.3
    out = aggregate(votes, "dawid-skene", gold)
    assert (out.loc[list(gold), "label"] == pd.Series(gold)).all()
    assert np.allclose(out.loc[list(gold), "confidence"], 1.0)
    # the same gold given as a gold_choice column
    votes_col = votes.assign(gold_choice=votes["item_id"].map(gold))
    pd.testing.assert_frame_equal(aggregate(votes_col, "dawid-skene"), out)


def test_degenerate_input_is_defined():
    one = pd.DataFrame({"item_id": [1, 2, 3], "annotator": ["x"] * 3, "choice": ["a", "b", "a"]})
    out = aggregate(one, "dawid-skene")
    assert out["label"].tolist() == ["a", "b", "a"] and not out["confidence"].isna().any()
    same = pd.DataFrame({"item_id": [1, 1, 2, 2], "annotator": ["x", "y", "x", "y"], "choice": ["a"] * 4})
    out = aggregate(same, "dawid-skene")
    assert out["label"].tolist() == ["a", "a"] and np.allclose(out["confidence"], 1.0)
    empty = aggregate(one.iloc[:0], "dawid-skene")
    assert empty.empty and list(empty.columns) == OUTPUT_COLUMNS


def test_bad_method_and_columns_are_clear_errors():
    votes = pd.DataFrame({"item_id": [1], "annotator": ["x"], "choice": ["a"]})
    with pytest.raises(AnnotationError, match="unknown aggregation 'median'"):
        aggregate(votes, "median")
    with pytest.raises(AnnotationError, match="choice"):
        aggregate(votes.drop(columns="choice"), "dawid-skene")


def test_gold_edge_cases_as_export_passes_them():
    # export passes integer annotator ids and a gold_choice column; gold may name a choice nobody made,
    # and gold items without votes must not enter the fit
    votes = pd.DataFrame({
        "item_id": [1, 1, 2, 2, 3, 3],
        "annotator": [10, 11, 10, 11, 10, 11],
        "choice": ["a", "a", "b", "a", "b", "b"],
        "gold_choice": [None, None, "tie", "tie", None, None],
    })
    out = aggregate(votes, "dawid-skene", {**{2: "tie"}, 99: "a"})
    assert list(out.index) == [1, 2, 3] and out.loc[2, "label"] == "tie" and out.loc[2, "confidence"] == pytest.approx(1.0)
    assert not out["confidence"].isna().any()
    pd.testing.assert_frame_equal(aggregate(votes, "dawid-skene"), out)
