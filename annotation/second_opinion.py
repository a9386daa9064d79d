"""A reward model as a second opinion on the annotators: how far it agrees with them, and where it
confidently says the people got an item wrong.

The model's judgement of each item arrives here as plain data (reward/second_opinion.py scores
items; this layer never loads a model): a frame indexed by item_id with columns p_a (the model's
P(A preferred), Bradley-Terry: sigmoid(r_A - r_B)), label ("a", "b" or "undecided" when P(A) is
within a small margin of 0.5), confidence (max(p_a, 1 - p_a)) and optionally spread (the
ensemble's spread of r_A - r_B).

- `model_vs_aggregate`: the model against the annotators' aggregated label of each item (majority
  or Dawid-Skene): agreement (accuracy), Cohen's kappa, n, with percentile bootstrap intervals.
- `model_vs_annotators`: the model as one more rater: Cohen's kappa and agreement with each
  annotator over the items both labelled, with bootstrap intervals.
- `model_as_rater`: the model's row of annotation.agreement's per-annotator table (agreement with
  the people's majority, gold accuracy, rate of "undecided").
- `label_noise`: items where the model confidently prefers the other response than a strong human
  majority did (candidates for a second look: the label, or the model, may be wrong).

For comparisons the model's "undecided" counts as a tie, the human label nearest to it; it can
never match both_bad. Cohen's kappa and the bootstrap reuse annotation.agreement's helpers
(cohen_from_confusion, percentile_interval); tests/test_second_opinion.py checks the numbers
against scikit-learn.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine

from annotation import agreement as ag
from annotation.aggregate import METHODS, aggregate
from annotation.errors import AnnotationError

OPINION_COLUMNS = ["reward_a", "reward_b", "spread", "p_a", "label", "confidence"]
UNDECIDED = "undecided"
# What "undecided" is compared as: a tie is the human label that also says neither side is better.
UNDECIDED_AS = "tie"
MODEL_RATER = "model"
DEFAULT_NOISE_THRESHOLD = 0.85
DEFAULT_MIN_SHARE = 2 / 3
DEFAULT_MIN_ANNOTATIONS = 3
DEFAULT_MIN_POSTERIOR = 0.9
# Shares like 2/3 are compared with a float threshold of 2/3: allow for rounding.
_TOL = 1e-9


# --------------------------------------------------------------------------- loading


def load_project_items(engine: Engine, project: str, annotated_only: bool = True) -> pd.DataFrame:
    """The items of `project` (by default only those someone made a choice on: the items a second
    opinion can be compared on), indexed by item_id, with columns prompt, response_a, response_b,
    gold_choice: one query, for scoring in batches."""
    from annotation.projects import get_project
    from annotation.store import Annotation, Item, reading

    with reading(engine) as session:
        proj = get_project(session, project)
        stmt = select(Item.id, Item.prompt, Item.response_a, Item.response_b, Item.gold_choice).where(Item.project_id == proj.id)
        if annotated_only:
            # a choice, not any annotation: ranking items (choice NULL) have no A/B to score
            chosen = select(Annotation.id).where(Annotation.item_id == Item.id, Annotation.choice.is_not(None)).exists()
            stmt = stmt.where(chosen)
        rows = session.execute(stmt.order_by(Item.id)).all()
    items = pd.DataFrame(rows, columns=["item_id", "prompt", "response_a", "response_b", "gold_choice"], dtype=object)
    items["item_id"] = items["item_id"].astype("int64")
    return items.set_index("item_id")


# --------------------------------------------------------------------------- checks


def check_options(
    noise_threshold: float = DEFAULT_NOISE_THRESHOLD,
    method: str = "majority",
    min_share: float = DEFAULT_MIN_SHARE,
    min_annotations: int = DEFAULT_MIN_ANNOTATIONS,
    min_posterior: float = DEFAULT_MIN_POSTERIOR,
) -> None:
    """Raise AnnotationError naming the option when one makes no sense (called before any model loads)."""
    if not (isinstance(noise_threshold, (int, float)) and 0.5 < noise_threshold <= 1):
        raise AnnotationError(f"--noise-threshold {noise_threshold}: expected a probability above 0.5 and at most 1, e.g. 0.85")
    if method not in METHODS:
        raise AnnotationError(f"unknown aggregation '{method}'; expected one of {', '.join(METHODS)}")
    if not 0.5 < min_share <= 1:
        raise AnnotationError(f"min_share {min_share}: expected a share above 0.5 and at most 1, e.g. 2/3")
    if min_annotations < 1:
        raise AnnotationError(f"min_annotations {min_annotations}: expected 1 or more")
    if not 0.5 < min_posterior <= 1:
        raise AnnotationError(f"min_posterior {min_posterior}: expected a probability above 0.5 and at most 1, e.g. 0.9")


def _check_opinion(opinion: pd.DataFrame) -> None:
    missing = [c for c in ("p_a", "label", "confidence") if c not in opinion.columns]
    if missing:
        raise AnnotationError(f"the model's opinion lacks column(s) {', '.join(missing)}; expected p_a, label, confidence by item_id")


def _compared(labels: pd.Series) -> pd.Series:
    """The model's labels on the human scale: undecided as a tie."""
    return labels.astype(object).where(labels != UNDECIDED, UNDECIDED_AS)


# --------------------------------------------------------------------------- agreement from a confusion matrix


def _codes(*columns: Iterable) -> tuple[list[np.ndarray], list]:
    values = sorted(set().union(*(set(c) for c in columns)))
    index = pd.Index(values)
    return [index.get_indexer(list(c)) for c in columns], values


def _confusion_stats(conf: np.ndarray, bootstrap: int, rng: np.random.Generator, confidence: float) -> dict:
    """Agreement and Cohen's kappa of one K x K confusion matrix, with percentile bootstrap intervals.

    Items are resampled with replacement; an item's whole contribution is one cell of the matrix, so
    a replicate is one multinomial draw over the cells.
    """
    n = int(conf.sum())
    point_kappa = ag._num(ag.cohen_from_confusion(conf))
    out = {"n_items": n, "agreement": float(np.trace(conf) / n) if n else None, "kappa": point_kappa,
           "agreement_interval": None, "interval": None}
    if n and bootstrap > 0:
        draws = rng.multinomial(n, conf.ravel() / n, size=bootstrap).reshape(bootstrap, *conf.shape).astype(float)
        for key, samples, point in (("agreement_interval", np.trace(draws, axis1=1, axis2=2) / n, out["agreement"]),
                                    ("interval", ag.cohen_from_confusion(draws), point_kappa)):
            if point is None:
                continue
            lo, hi = ag.percentile_interval(samples, confidence)
            out[key] = [float(lo), float(hi)] if math.isfinite(lo) and math.isfinite(hi) else None
    return out


def _check_bootstrap(bootstrap: int, confidence: float) -> None:
    if bootstrap < 0:
        raise AnnotationError(f"--bootstrap must be 0 or more, got {bootstrap}")
    if not 0 < confidence < 1:
        raise AnnotationError(f"confidence must be between 0 and 1, got {confidence}")


# --------------------------------------------------------------------------- (a) the model vs the aggregated label


def model_vs_aggregate(
    annotations: pd.DataFrame,
    opinion: pd.DataFrame,
    *,
    method: str = "majority",
    bootstrap: int = ag.DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    aggregated: pd.DataFrame | None = None,
) -> dict:
    """The model's label against the annotators' aggregated label (annotation.aggregate), per item.

    Over the items that have both (a majority tie has no aggregated label and is left out, and
    counted): agreement (the model's accuracy), Cohen's kappa, each with a bootstrap interval over
    items; `decisive`: the model's accuracy over items the people decided a or b (undecided counts
    as wrong), the reward-model accuracy of `rlhf eval-rm`; the confusion counts (people x model).
    """
    _check_opinion(opinion)
    _check_bootstrap(bootstrap, confidence)
    agg = aggregated if aggregated is not None else aggregate(annotations, method)
    human = agg["label"].dropna()
    model = _compared(opinion["label"])
    both = human.index.intersection(model.index)
    h, m = human.loc[both].to_numpy(object), model.loc[both].to_numpy(object)
    (hc, mc), values = _codes(h, m)
    k = len(values)
    conf = np.bincount(hc * k + mc, minlength=k * k).reshape(k, k).astype(float) if k else np.zeros((0, 0))
    stats = _confusion_stats(conf, bootstrap, np.random.default_rng(seed), confidence)
    decisive = np.isin(h, ["a", "b"])
    return {
        "aggregation": method,
        **stats,
        "decisive": {"n_items": int(decisive.sum()),
                     "accuracy": float((h[decisive] == m[decisive]).mean()) if decisive.any() else None},
        "confusion": {values[i]: {values[j]: int(conf[i, j]) for j in range(k) if conf[i, j]} for i in range(k) if conf[i].any()},
        "left_out": {"no_aggregated_label": int(agg["label"].isna().sum()),
                     "not_scored": int(len(human.index.difference(model.index)))},
    }


# --------------------------------------------------------------------------- (b) the model as one more rater


def model_vs_annotators(
    annotations: pd.DataFrame,
    opinion: pd.DataFrame,
    *,
    bootstrap: int = ag.DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    min_shared: int = ag.DEFAULT_MIN_SHARED,
) -> list[dict]:
    """One row per annotator: Cohen's kappa and agreement between them and the model over the items
    both labelled, each with a bootstrap interval (items resampled). As for pairs of annotators in
    `agreement_report`, kappa needs `min_shared` shared items (None below, agreement still given)."""
    _check_opinion(opinion)
    _check_bootstrap(bootstrap, confidence)
    annotations = annotations[annotations["choice"].notna()]
    model = _compared(opinion["label"])
    shared = annotations[annotations["item_id"].isin(model.index)]
    said_by_model = model.reindex(shared["item_id"]).to_numpy(object)
    annotators = pd.factorize(annotations["annotator"], sort=True)[1]
    w_shared = pd.Index(annotators).get_indexer(shared["annotator"])
    (hc, mc), values = _codes(shared["choice"].to_numpy(object), said_by_model)
    k = max(len(values), 1)
    conf = np.bincount((w_shared * k + hc) * k + mc, minlength=len(annotators) * k * k).reshape(len(annotators), k, k).astype(float)
    rows = []
    for i, name in enumerate(annotators):
        # one generator per annotator: their interval does not depend on who else is in the project
        rng = np.random.default_rng(seed)
        stats = _confusion_stats(conf[i], bootstrap if conf[i].sum() >= min_shared else 0, rng, confidence)
        if stats["n_items"] < min_shared:
            stats["kappa"] = None
        rows.append({"annotator": name, **stats})
    return rows


def model_as_rater(annotations: pd.DataFrame, opinion: pd.DataFrame) -> dict:
    """The model's row of annotation.agreement's per-annotator table, the model joined as one more
    annotator: agreement with the people's plurality on each item, gold accuracy, undecided rate."""
    _check_opinion(opinion)
    annotations = annotations[annotations["choice"].notna()]
    model = _compared(opinion["label"])
    model = model[model.index.isin(annotations["item_id"])]
    gold = annotations.drop_duplicates("item_id").set_index("item_id")["gold_choice"] if "gold_choice" in annotations.columns else None
    model_votes = pd.DataFrame({
        "item_id": model.index.to_numpy(), "annotator": MODEL_RATER, "choice": model.to_numpy(object),
        "gold_choice": gold.reindex(model.index).to_numpy(object) if gold is not None else None,
    })
    humans = annotations[["item_id", "annotator", "choice"] + (["gold_choice"] if gold is not None else [])]
    # a real annotator could be called "model": prefix the people so the model's row is its own
    humans = humans.assign(annotator="~" + humans["annotator"].astype(str))
    table = ag.annotator_table(pd.concat([humans, model_votes], ignore_index=True), "choice")
    row = table.loc[MODEL_RATER]
    return {
        "annotator": MODEL_RATER,
        "count": int(row["count"]),
        "n_compared": int(row["n_compared"]),
        "loo_agreement": ag._num(row["loo_agreement"]),
        "gold_accuracy": ag._num(row["gold_accuracy"]),
        "n_gold": int(row["n_gold"]),
        "undecided_rate": ag._num(row["tie_rate"]),
    }


# --------------------------------------------------------------------------- (c) label-noise candidates


def label_noise(
    annotations: pd.DataFrame,
    opinion: pd.DataFrame,
    items: pd.DataFrame | None = None,
    *,
    threshold: float = DEFAULT_NOISE_THRESHOLD,
    method: str = "majority",
    min_share: float = DEFAULT_MIN_SHARE,
    min_annotations: int = DEFAULT_MIN_ANNOTATIONS,
    min_posterior: float = DEFAULT_MIN_POSTERIOR,
    top: int | None = None,
    aggregated: pd.DataFrame | None = None,
) -> dict:
    """Items where the model gives the other response P >= `threshold` against a strong human label.

    Strong: with "majority", at least `min_share` of at least `min_annotations` annotations chose
    the side; with "dawid-skene", the side's posterior is at least `min_posterior`. Only a or b
    labels count (the model has no opinion on ties and both_bad). Most confident model first;
    `top` keeps the first rows (n_candidates counts them all). Each row has the votes as text and,
    when `items` (indexed by item_id: prompt, response_a, response_b) is given, the item's text.
    """
    _check_opinion(opinion)
    check_options(threshold, method, min_share, min_annotations, min_posterior)
    if top is not None and top < 0:
        raise AnnotationError(f"--top must be 0 or more, got {top}")
    agg = aggregated if aggregated is not None else aggregate(annotations, method)
    frame = agg.join(opinion[[c for c in OPINION_COLUMNS if c in opinion.columns]].add_prefix("model_"), how="inner")
    if method == "majority":
        strong = (frame["confidence"] >= min_share - _TOL) & (frame["n_annotations"] >= min_annotations)
        rule = f"at least {min_share:.0%} of at least {min_annotations} annotations"
    else:
        strong = frame["confidence"] >= min_posterior - _TOL
        rule = f"Dawid-Skene posterior at least {min_posterior:.2f}"
    other = frame["label"].map({"a": "b", "b": "a"})
    hits = frame[strong & other.notna() & (frame["model_label"] == other) & (frame["model_confidence"] >= threshold - _TOL)]
    hits = hits.sort_values("model_confidence", ascending=False, kind="stable")
    n_candidates = len(hits)
    if top is not None:
        hits = hits.iloc[:top]
    vote_text = ag.item_table(annotations[annotations["item_id"].isin(hits.index)])["votes"] if len(hits) else pd.Series(dtype=object)
    rows = []
    for item_id, r in hits.iterrows():
        row = {
            "item_id": int(item_id), "human_label": r["label"], "human_confidence": ag._num(r["confidence"]),
            "n_annotations": int(r["n_annotations"]), "votes": vote_text.get(item_id),
            "model_label": r["model_label"], "p_a": ag._num(r["model_p_a"]), "model_confidence": ag._num(r["model_confidence"]),
        }
        for col in ("spread", "reward_a", "reward_b"):
            if f"model_{col}" in r.index:
                row[col] = ag._num(r[f"model_{col}"])
        if items is not None and item_id in items.index:
            text = items.loc[item_id]
            row.update(prompt=text["prompt"], response_a=text["response_a"], response_b=text["response_b"])
        rows.append(row)
    return {"threshold": threshold, "aggregation": method, "strong_majority": rule, "n_candidates": n_candidates, "items": rows}


# --------------------------------------------------------------------------- everything at once


def model_report(
    annotations: pd.DataFrame,
    opinion: pd.DataFrame,
    items: pd.DataFrame | None = None,
    *,
    method: str = "majority",
    bootstrap: int = ag.DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    min_shared: int = ag.DEFAULT_MIN_SHARED,
    noise_threshold: float = DEFAULT_NOISE_THRESHOLD,
    min_share: float = DEFAULT_MIN_SHARE,
    min_annotations: int = DEFAULT_MIN_ANNOTATIONS,
    min_posterior: float = DEFAULT_MIN_POSTERIOR,
    top: int | None = None,
) -> dict:
    """(a), (b), the model's rater row and (c) as one JSON-ready dict (the `model` section of `rlhf agreement`)."""
    check_options(noise_threshold, method, min_share, min_annotations, min_posterior)
    _check_opinion(opinion)
    annotations = annotations[annotations["choice"].notna()]
    notes: dict[str, str] = {}
    if annotations.empty:
        notes["model"] = "no annotations to compare the model with"
        aggregated = aggregate(annotations, "majority")
    else:
        aggregated = aggregate(annotations, method)
    scored = opinion[opinion.index.isin(annotations["item_id"])]
    n_undecided = int((scored["label"] == UNDECIDED).sum())
    out = {
        "n_scored": int(len(opinion)),
        "n_compared_items": int(len(scored)),
        "n_undecided": n_undecided,
        "project": model_vs_aggregate(annotations, opinion, method=method, bootstrap=bootstrap, seed=seed,
                                      confidence=confidence, aggregated=aggregated),
        "as_rater": model_as_rater(annotations, opinion) if len(scored) else None,
        "annotators": model_vs_annotators(annotations, opinion, bootstrap=bootstrap, seed=seed, confidence=confidence,
                                          min_shared=min_shared) if not annotations.empty else [],
        "label_noise": label_noise(annotations, opinion, items, threshold=noise_threshold, method=method, min_share=min_share,
                                   min_annotations=min_annotations, min_posterior=min_posterior, top=top,
                                   aggregated=aggregated),
        "min_shared": min_shared,
        "bootstrap": {"resamples": int(bootstrap), "confidence": confidence, "seed": seed, "unit": "item"},
        "undecided_as": UNDECIDED_AS,
        "notes": notes,
    }
    not_scored = int((~annotations["item_id"].drop_duplicates().isin(opinion.index)).sum())
    if not_scored:
        notes["not_scored"] = f"{not_scored} annotated items have no model score (annotated after scoring); score again to include them"
    if any(r["kappa"] is None and r["n_items"] for r in out["annotators"]):
        notes["annotators"] = f"kappa is given for annotators sharing {min_shared} or more items with the model"
    return out
