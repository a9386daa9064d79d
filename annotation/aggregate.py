"""Turning several annotations of an item into one label with a confidence.

`aggregate(votes, method, gold)` is the one entry point export, training and the app use. A vote
is one annotator's judgement of one pair of responses: an annotation of a two-response item (the
frame annotation.agreement.load_annotations reads), or one pair expanded from a ranking
(`ranking_votes`); elsewhere the stored rows are called annotations. Both
methods return one row per item, indexed by item_id, with columns label, confidence,
n_annotations and agreement:

- "majority": plurality vote; confidence is the winning share of votes; gold is not used.
- "dawid-skene": Dawid & Skene (1979) EM with one confusion matrix per annotator; the label is
  the most probable class and the confidence its posterior probability. Gold items have their
  posterior fixed to the gold choice in every EM step, so they weigh into each annotator's
  confusion matrix (and get their gold label, confidence 1). The EM follows crowd-kit's
  `DawidSkene` step for step (initialisation, clipping, stopping rule) so results agree with it
  to 1e-6, but works on integer codes with sparse products (benchmarks/agreement_bench.py times it
  against crowd-kit).

Rankings (items with 3 to 6 responses) are aggregated through the same functions: each
annotator's ranking of an item becomes votes on pairs of its responses (`ranking_votes`), one
vote per annotator and pair, in the pair's own A/B terms ("a": the first response in stored order
is better, "b": the second, "tie": ranked equal). A pair of responses of a ranking item is then
aggregated exactly like a two-response item, by majority over the annotators who voted on it (or
Dawid-Skene, over these votes and the two-response items' votes together: an annotator's
confusion is the same whichever way they gave their judgement). Which pairs an annotator votes on:
- "all": every pair of the item's responses (so a tie in a ranking is a tie vote);
- "adjacent": the pairs whose responses are in the same or in neighbouring tie groups of that
  annotator's ranking (1st vs 2nd place, 2nd vs 3rd, and tied responses), as OpenAssistant's
  ranked replies are often turned into pairs.
Each vote also carries its signed rank gap (`signed_gap`): (rank of the second - rank of the
first) / (n - 1), in [-1, 1], positive when the first response is ranked better; a two-response
item counts as a ranking of two, so its votes have +1 (a), -1 (b) or 0 (tie, both_bad).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from annotation.errors import AnnotationError

METHODS = ("majority", "dawid-skene")
OUTPUT_COLUMNS = ["label", "confidence", "n_annotations", "agreement"]
RANKING_PAIRS = ("all", "adjacent")
"""Which pairs of a ranking's responses become votes (see the module docstring)."""
RANKING_VOTE_COLUMNS = ["item_id", "first", "second", "annotator", "choice", "signed_gap"]
_KEY_SLOTS = 8
"""Response indices are below this (at most 6 responses), so pair_key never collides."""

# crowd-kit clips probabilities at 1e-10 before taking logs; the same floor keeps our EM identical.
_EPS = 1e-10


def _empty() -> pd.DataFrame:
    return pd.DataFrame(columns=OUTPUT_COLUMNS).rename_axis("item_id")


def _check_columns(votes: pd.DataFrame, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in votes.columns]
    if missing:
        raise AnnotationError(f"votes lack column(s) {', '.join(missing)}; expected {', '.join(needed)}")


def majority(votes: pd.DataFrame) -> pd.DataFrame:
    """Plurality vote per item. `votes` has columns item_id, annotator, choice.

    Returns one row per item, indexed by item_id, with columns label (None where the top choices
    tie), confidence (the winning share of votes), n_annotations and agreement (the share of
    annotator pairs on the item that agree; 1.0 for an item with a single vote).
    """
    if votes.empty:
        return _empty()
    counts = votes.groupby(["item_id", "choice"]).size().unstack(fill_value=0)
    n = counts.sum(axis=1)
    top = counts.max(axis=1)
    n_top = counts.eq(top, axis=0).sum(axis=1)
    # object dtype: pandas 3 would turn None into NaN in a string column
    label = counts.idxmax(axis=1).astype(object).where(n_top == 1, None)
    pairs = (counts * (counts - 1)).sum(axis=1)
    agreement = (pairs / (n * (n - 1))).where(n > 1, 1.0)
    return pd.DataFrame(
        {"label": label, "confidence": top / n, "n_annotations": n.astype(int), "agreement": agreement.astype(float)}
    ).rename_axis("item_id")


@dataclass
class DawidSkeneResult:
    """A fitted Dawid-Skene model.

    probas: items x labels posterior probabilities (index item_id, columns the labels).
    errors: annotators x observed label x true label; errors[w, k, c] = P(w says k | truth c).
    priors: the class prior per label. n_iter: EM iterations run. annotators, labels: the axes.
    """

    probas: pd.DataFrame
    errors: np.ndarray
    priors: pd.Series
    annotators: list
    labels: list
    n_iter: int

    def annotator_accuracy(self) -> pd.Series:
        """Each annotator's estimated accuracy: their confusion diagonal weighted by the class prior."""
        diag = np.einsum("wkk->wk", self.errors)
        return pd.Series(diag @ self.priors.to_numpy(), index=pd.Index(self.annotators, name="annotator"), name="accuracy")


def _gold_series(votes: pd.DataFrame, gold) -> pd.Series:
    """Gold choices as a Series indexed by item_id (only non-null entries)."""
    if gold is None:
        if "gold_choice" not in votes.columns:
            return pd.Series(dtype=object)
        gold = votes.drop_duplicates("item_id").set_index("item_id")["gold_choice"]
    elif isinstance(gold, Mapping):
        gold = pd.Series(dict(gold), dtype=object)
    gold = pd.Series(gold)
    return gold[gold.notna()]


def dawid_skene(
    votes: pd.DataFrame, gold: Mapping | pd.Series | None = None, *, n_iter: int = 100, tol: float = 1e-5
) -> DawidSkeneResult:
    """Fit Dawid-Skene by EM on `votes` (columns item_id, annotator, choice).

    `gold` maps item_id to the known choice; when None, a gold_choice column of `votes` is used if
    there is one. Gold items for which nobody voted do not enter the fit.
    """
    _check_columns(votes, ("item_id", "annotator", "choice"))
    if votes.empty:
        raise AnnotationError("no annotations to aggregate")
    gold_s = _gold_series(votes, gold)

    t, items = pd.factorize(votes["item_id"], sort=True)
    w, annotators = pd.factorize(votes["annotator"], sort=True)
    labels = sorted(set(votes["choice"].unique()) | set(gold_s[gold_s.index.isin(items)].unique()))
    k = pd.Index(labels).get_indexer(votes["choice"])
    n_items, n_ann, n_lab, n_obs = len(items), len(annotators), len(labels), len(votes)

    gold_rows = items.get_indexer(gold_s.index)
    keep = gold_rows >= 0
    gold_rows, gold_cols = gold_rows[keep], pd.Index(labels).get_indexer(gold_s.to_numpy()[keep])

    def fix_gold(p: np.ndarray) -> np.ndarray:
        if len(gold_rows):
            p[gold_rows] = 0.0
            p[gold_rows, gold_cols] = 1.0
        return p

    # One row per item, one column per (annotator, label said): the EM steps become two sparse
    # products, X.T @ posteriors (M-step) and X @ log errors (E-step).
    from scipy import sparse

    wk = w * n_lab + k
    x = sparse.csr_matrix((np.ones(n_obs), (t, wk)), shape=(n_items, n_ann * n_lab))
    x_t = x.T.tocsr()
    n_per_item = np.asarray(x.sum(axis=1)).ravel()
    # An annotator's confusion matrix has rows only for the labels they used (as in crowd-kit):
    # rows never observed stay 0 and are never looked up.
    used = (np.asarray(x.sum(axis=0)).ravel() > 0).reshape(n_ann, n_lab)

    def m_step(p: np.ndarray) -> np.ndarray:
        e = (x_t @ p).reshape(n_ann, n_lab, n_lab)
        e = np.where(used[:, :, None], np.maximum(e, _EPS), 0.0)
        return e / e.sum(axis=1, keepdims=True)

    def log_likelihood(e: np.ndarray) -> np.ndarray:
        """Items x true label: sum over the item's annotations of log P(said | truth)."""
        with np.errstate(divide="ignore"):
            log_e = np.where(used[:, :, None], np.log(np.where(used[:, :, None], e, 1.0)), 0.0)
        return x @ log_e.reshape(n_ann * n_lab, n_lab)

    def e_step(pri: np.ndarray, lik: np.ndarray) -> np.ndarray:
        ll = lik + np.log(np.maximum(pri, _EPS))
        ll -= ll.max(axis=1, keepdims=True)
        p = np.exp(ll)
        return p / p.sum(axis=1, keepdims=True)

    def elbo(p: np.ndarray, pri: np.ndarray, lik: np.ndarray) -> float:
        # crowd-kit's bound adds the log prior once per annotation (not once per item); we keep its
        # definition because the stopping rule, and so the result, depends on it.
        joint = float((p * (lik + n_per_item[:, None] * np.log(np.maximum(pri, _EPS)))).sum())
        pc = np.maximum(p, _EPS)
        return (joint - float((pc * np.log(pc)).sum())) / n_obs

    counts = np.bincount(t * n_lab + k, minlength=n_items * n_lab).reshape(n_items, n_lab).astype(float)
    probas = fix_gold(counts / counts.sum(axis=1, keepdims=True))
    priors = probas.mean(axis=0)
    errors = m_step(probas)
    lik = log_likelihood(errors)
    loss, it = -np.inf, 0
    for it in range(1, n_iter + 1):
        probas = fix_gold(e_step(priors, lik))
        priors = probas.mean(axis=0)
        errors = m_step(probas)
        lik = log_likelihood(errors)
        new_loss = elbo(probas, priors, lik)
        if new_loss - loss < tol:
            break
        loss = new_loss
    return DawidSkeneResult(
        probas=pd.DataFrame(probas, index=pd.Index(items, name="item_id"), columns=pd.Index(labels, name="label")),
        errors=errors,
        priors=pd.Series(priors, index=pd.Index(labels, name="label"), name="prior"),
        annotators=list(annotators),
        labels=labels,
        n_iter=it,
    )


def aggregate(votes: pd.DataFrame, method: str = "majority", gold: Mapping | pd.Series | None = None) -> pd.DataFrame:
    """One label and confidence per item by `method` ("majority" or "dawid-skene").

    `votes` has columns item_id, annotator, choice (and optionally gold_choice); `gold` maps
    item_id to its gold choice and is used by Dawid-Skene only (None: the gold_choice column).
    """
    if method not in METHODS:
        raise AnnotationError(f"unknown aggregation '{method}'; expected one of {', '.join(METHODS)}")
    _check_columns(votes, ("item_id", "annotator", "choice"))
    if votes.empty:
        return _empty()
    base = majority(votes)
    if method == "majority":
        return base
    fit = dawid_skene(votes, gold)
    probas = fit.probas.reindex(base.index)
    out = base.copy()
    out["label"] = probas.idxmax(axis=1).astype(object)
    out["confidence"] = probas.max(axis=1).astype(float)
    return out[OUTPUT_COLUMNS]


# --------------------------------------------------------------------------- rankings


def pair_key(item_id: int, first: int = 0, second: int = 0) -> int:
    """One integer per aggregation unit: a two-response item (first = second = 0), or the pair of
    responses (first < second, stored indices) of a ranking item. Inverse: `split_pair_key`."""
    return (int(item_id) * _KEY_SLOTS + first) * _KEY_SLOTS + second


def split_pair_key(key: int) -> tuple[int, int, int]:
    rest, second = divmod(int(key), _KEY_SLOTS)
    item_id, first = divmod(rest, _KEY_SLOTS)
    return item_id, first, second


def check_ranking_pairs(mode: str) -> None:
    if mode not in RANKING_PAIRS:
        raise AnnotationError(f"--ranking-pairs {mode!r}: expected one of {', '.join(RANKING_PAIRS)}")


def ranking_votes(rankings: pd.DataFrame, mode: str = "all") -> pd.DataFrame:
    """The pair votes of rankings (columns item_id, annotator, ranking: ranks in stored order, 1 =
    best, ties equal), one row per annotator and pair they vote on under `mode` ("all" or
    "adjacent", see the module docstring), with columns RANKING_VOTE_COLUMNS: first < second are
    stored indices, choice "a" (first better), "b" or "tie", and the signed rank gap."""
    check_ranking_pairs(mode)
    _check_columns(rankings, ("item_id", "annotator", "ranking"))
    rows = []
    for item_id, annotator, ranks in zip(rankings["item_id"], rankings["annotator"], rankings["ranking"]):
        ranks = [int(r) for r in ranks]
        n = len(ranks)
        # tie groups numbered 0, 1, ... from the best: "adjacent" compares these, not the ranks
        # (with ties the ranks skip, e.g. [1, 1, 3]: groups 0, 0, 1)
        level = {r: g for g, r in enumerate(sorted(set(ranks)))}
        for first in range(n):
            for second in range(first + 1, n):
                r1, r2 = ranks[first], ranks[second]
                if mode == "adjacent" and abs(level[r1] - level[r2]) > 1:
                    continue
                choice = "a" if r1 < r2 else "b" if r2 < r1 else "tie"
                rows.append((item_id, first, second, annotator, choice, (r2 - r1) / (n - 1)))
    return pd.DataFrame(rows, columns=RANKING_VOTE_COLUMNS)


def choice_signed_gap(choice: pd.Series) -> pd.Series:
    """The signed rank gap of two-response votes: a +1, b -1, tie and both_bad 0."""
    return choice.map({"a": 1.0, "b": -1.0}).fillna(0.0).astype(float)
