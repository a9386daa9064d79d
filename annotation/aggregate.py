"""Turning several annotations of an item into one label with a confidence.

`aggregate(votes, method)` is the one entry point export, training and the app use.
"""

from __future__ import annotations

import pandas as pd

from annotation.errors import AnnotationError

METHODS = ("majority", "dawid-skene")


def majority(votes: pd.DataFrame) -> pd.DataFrame:
    """Plurality vote per item. `votes` has columns item_id, annotator, choice.

    Returns one row per item, indexed by item_id, with columns label (None where the top choices
    tie), confidence (the winning share of votes), n_annotations and agreement (the share of
    annotator pairs on the item that agree; 1.0 for an item with a single vote).
    """
    if votes.empty:
        return pd.DataFrame(columns=["label", "confidence", "n_annotations", "agreement"]).rename_axis("item_id")
    counts = votes.groupby(["item_id", "choice"]).size().unstack(fill_value=0)
    n = counts.sum(axis=1)
    top = counts.max(axis=1)
    n_top = counts.eq(top, axis=0).sum(axis=1)
    label = counts.idxmax(axis=1).where(n_top == 1, None)
    pairs = (counts * (counts - 1)).sum(axis=1)
    agreement = (pairs / (n * (n - 1))).where(n > 1, 1.0)
    return pd.DataFrame(
        {"label": label, "confidence": top / n, "n_annotations": n.astype(int), "agreement": agreement.astype(float)}
    ).rename_axis("item_id")


def aggregate(votes: pd.DataFrame, method: str = "majority", gold: dict | None = None) -> pd.DataFrame:
    if method == "majority":
        return majority(votes)
    raise AnnotationError(f"unknown aggregation '{method}'; expected one of {', '.join(METHODS)}")
