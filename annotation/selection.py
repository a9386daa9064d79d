"""Choosing what to label next: a project's selection setting and the queue order a reward model sets.

    rlhf project set demo --selection uncertainty --random-share 0.2
    rlhf project score demo          # or the score_queue job, queued when a model is activated or items arrive

A project hands items out closest to completion first (annotation.assign); within one completion
level, by `items.queue_key`, then by id. With selection `random` every key is 0, so items go out in
id order (import order: shuffle the file for a random order). With `uncertainty`, the scoring use
case (reward.usecases.score_queue) scores the open items with the project's active reward model and
`write_queue` gives them keys: the items the model is least sure of first, with a share of the
places (`random_share`) given to items drawn at random, for calibration (an estimate of how good the
model is that the selection did not bias). Items that arrive after the scoring keep key 0, behind
the scored ones, until the next scoring places them (app.jobs.queue_rescore queues it when items
arrive or a model is activated).

Nothing here loads a model: the scores arrive as plain data, and the next-item query stays one
ordered range scan of ix_items_queue (project_id, annotation_count, queue_key, id).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
from sqlalchemy import delete, func, insert, select, update

from annotation.errors import AnnotationError
from annotation.store import Item, ItemScore, Project, reading, transaction, utcnow

SELECTIONS = ("random", "uncertainty")
MEASURES = ("margin", "disagreement")
"""margin: 1 - the model's confidence in its preferred response (P(A) near 0.5 is unsure);
disagreement: the spread of an ensemble's members on r_A - r_B (members that disagree are unsure)."""
DEFAULT_RANDOM_SHARE = 0.2
SCORE_COLUMNS = ["p_a", "top", "uncertainty"]


def check_selection(selection: str, random_share: float) -> None:
    if selection not in SELECTIONS:
        raise AnnotationError(f"selection {selection!r} is invalid; expected one of {', '.join(SELECTIONS)}")
    if not 0.0 <= random_share <= 1.0:
        raise AnnotationError(f"random share must be between 0 and 1, got {random_share}")


def check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise AnnotationError(f"measure {measure!r} is invalid; expected one of {', '.join(MEASURES)}")


# --------------------------------------------------------------------------- the order


def queue_order(item_ids, uncertainty, random_share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The queue keys for `item_ids` (aligned with them) and which were drawn for calibration.

    Places 0, 1, ... are filled by the most uncertain item first (ties by id), except every place
    j where floor((j + 1) * random_share) steps up: those go to items drawn at random (seeded), in
    random order. So a share of about `random_share` of every stretch of the queue is random, from
    the first items on. Keys are place - n: all negative, so scored items come before unscored
    ones (key 0)."""
    ids = np.asarray(item_ids, dtype=np.int64)
    u = np.asarray(uncertainty, dtype=np.float64)
    if ids.shape != u.shape:
        raise AnnotationError(f"{ids.size} items but {u.size} uncertainties")
    if not np.isfinite(u).all():
        raise AnnotationError("uncertainties must be finite numbers")
    check_selection("uncertainty", random_share)
    n = len(ids)
    places = np.arange(n)
    random_place = np.floor((places + 1) * random_share) > np.floor(places * random_share)
    rng = np.random.default_rng(seed)
    drawn = rng.permutation(n)[: int(random_place.sum())]  # in random order
    calibration = np.zeros(n, dtype=bool)
    calibration[drawn] = True
    rest = np.flatnonzero(~calibration)
    rest = rest[np.lexsort((ids[rest], -u[rest]))]  # most uncertain first, then lowest id
    order = np.empty(n, dtype=np.int64)
    order[random_place] = drawn
    order[~random_place] = rest
    keys = np.empty(n, dtype=np.float64)
    keys[order] = places - n
    return keys, calibration


# --------------------------------------------------------------------------- the store


def open_items(engine, project: str) -> tuple[Project, pd.DataFrame]:
    """The project and its items that still want annotations (gold items too: a suggestion shows on
    them as on any item, so that it does not give them away), indexed by item_id, with columns
    prompt, response_a, response_b, responses (None for a pair) and gold."""
    from annotation.projects import get_project

    with reading(engine) as session:
        proj = get_project(session, project)
        rows = session.execute(
            select(Item.id, Item.prompt, Item.response_a, Item.response_b, Item.responses, Item.gold_choice.is_not(None))
            .where(Item.project_id == proj.id, (Item.annotation_count < proj.overlap) | Item.gold_choice.is_not(None))
            .order_by(Item.id)
        ).all()
    frame = pd.DataFrame(rows, columns=["item_id", "prompt", "response_a", "response_b", "responses", "gold"], dtype=object)
    frame["item_id"] = frame["item_id"].astype("int64")
    return proj, frame.set_index("item_id")


KEY_CHUNK = 2000
"""Items whose queue keys one short transaction rewrites (sync_keys): on PostgreSQL a row being
rewritten is skipped by the next-item query (SKIP LOCKED), so only a chunk at a time is out of
reach; on SQLite each chunk holds the write lock briefly instead of the whole rewrite at once."""


def write_queue(engine, project_id: int, scores: pd.DataFrame, *, measure: str, model_id: int | None, random_share: float,
                seed: int = 0, gold: pd.Series | None = None, order: bool = True, now: dt.datetime | None = None) -> dict:
    """Store `scores` (indexed by item_id, columns SCORE_COLUMNS: p_a for pairs, top for rankings,
    uncertainty larger = less sure) in item_scores and, with `order` (a project with uncertainty
    selection), give the items their places in the queue. Gold items (`gold` True) get a score, for
    suggestions, but no place: they are handed out by their own rule. Items scored before but not
    now (completed since) keep their score, for the suggestion effect, and lose their place."""
    check_measure(measure)
    now = now or utcnow()
    gold = pd.Series(False, index=scores.index) if gold is None else gold.reindex(scores.index).fillna(False).astype(bool)
    regular = scores[~gold.to_numpy()]
    keys, calibration = queue_order(regular.index, regular["uncertainty"], random_share, seed)
    items, table = Item.__table__, ItemScore.__table__
    project_items = select(items.c.id).where(items.c.project_id == project_id)

    # The rows are built before the transaction opens: on SQLite it holds the write lock.
    key_of = dict(zip(regular.index.tolist(), keys.tolist()))
    drawn_of = dict(zip(regular.index.tolist(), calibration.tolist()))
    p_a = [None if v is None or pd.isna(v) else float(v) for v in scores["p_a"].tolist()]
    top = [None if v is None or pd.isna(v) else int(v) for v in scores["top"].tolist()]
    ids = scores.index.tolist()
    rows = [{"item_id": i, "model_id": model_id, "p_a": pa, "top": t, "uncertainty": u, "measure": measure,
             "calibration": drawn_of.get(i, False), "queue_key": key_of.get(i), "scored_at": now}
            for i, pa, t, u in zip(ids, p_a, top, scores["uncertainty"].astype(float).tolist())]
    with transaction(engine) as session:
        conn = session.connection()
        conn.execute(update(table).where(table.c.item_id.in_(project_items), table.c.queue_key.is_not(None))
                     .values(queue_key=None))
        for start in range(0, len(ids), 5000):  # bounded IN lists (SQLite's and the drivers' parameter limits)
            conn.execute(delete(table).where(table.c.item_id.in_(ids[start:start + 5000])))
        if rows:
            conn.execute(insert(table), rows)
    if order:
        sync_keys(engine, project_id)
    return {"scored": int(len(scores)), "queued": int(len(regular)) if order else 0,
            "calibration": int(calibration.sum()) if order else 0, "gold_scored": int(gold.sum()), "measure": measure,
            "model_id": model_id, "random_share": random_share}


def sync_keys(engine, project_id: int) -> None:
    """items.queue_key = the item's key in item_scores (0 without one), for every item of the
    project whose key differs, in short transactions of KEY_CHUNK ids each."""
    items, table = Item.__table__, ItemScore.__table__
    new_key = func.coalesce(select(table.c.queue_key).where(table.c.item_id == items.c.id).scalar_subquery(), 0.0)
    with reading(engine) as session:
        low, high = session.execute(select(func.min(Item.id), func.max(Item.id)).where(Item.project_id == project_id)).one()
    if low is None:
        return
    for lo in range(low, high + 1, KEY_CHUNK):
        with transaction(engine) as session:
            session.connection().execute(
                update(items)
                .where(items.c.project_id == project_id, items.c.id >= lo, items.c.id < lo + KEY_CHUNK, items.c.queue_key != new_key)
                .values(queue_key=new_key)
            )


def reset_queue(session, project_id: int) -> None:
    """Back to the plain order (key 0 everywhere), for a project that turns selection to random;
    the scores stay (suggestions read them)."""
    items, table = Item.__table__, ItemScore.__table__
    conn = session.connection()
    conn.execute(update(table).where(table.c.item_id.in_(select(items.c.id).where(items.c.project_id == project_id)),
                                     table.c.queue_key.is_not(None)).values(queue_key=None))
    conn.execute(update(items).where(items.c.project_id == project_id, items.c.queue_key != 0).values(queue_key=0.0))


def queue_preview(engine, project: str, limit: int = 20) -> pd.DataFrame:
    """The next `limit` open, non-gold items in queue order (lowest completion level first is not
    applied: this is the order within a level) with their scores, for the Projects page."""
    from annotation.projects import get_project

    with reading(engine) as session:
        proj = get_project(session, project)
        rows = session.execute(
            select(Item.id, Item.annotation_count, Item.queue_key, ItemScore.uncertainty, ItemScore.p_a, ItemScore.calibration)
            .outerjoin(ItemScore, ItemScore.item_id == Item.id)
            .where(Item.project_id == proj.id, Item.gold_choice.is_(None), Item.annotation_count < proj.overlap)
            .order_by(Item.annotation_count.desc(), Item.queue_key, Item.id)
            .limit(limit)
        ).all()
    return pd.DataFrame(rows, columns=["item_id", "annotations", "queue_key", "uncertainty", "p_a", "calibration"])


def wants_scores(engine, project: str) -> bool:
    """Whether `project` uses its reward model's scores (uncertainty selection, or suggestions) and
    has an active reward model to score with."""
    from annotation.projects import get_project
    from annotation.registry import active_model

    with reading(engine) as session:
        proj = get_project(session, project)
        return (proj.selection == "uncertainty" or bool(proj.suggestions)) and active_model(session, proj.id) is not None


# --------------------------------------------------------------------------- did the suggestions sway people?


def suggestion_effect(engine, project: str, confidence: float = 0.95) -> dict | None:
    """How often annotators chose the response the model prefers, with the suggestion shown and
    without it (two-response items only); None when no answer of the project was given with one.

    With a suggestion: the share of those answers that chose it. Without: the share that chose what
    the model prefers now (item_scores' P(A); items never scored are left out). A large gap means the
    suggestions sway people (anchoring) rather than that people agree with the model. The interval
    of the gap is Newcombe's hybrid score interval (statsmodels). Ties and both_bad count as not
    choosing the model's side."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    from annotation.projects import get_project
    from annotation.store import Annotation

    with reading(engine) as session:
        proj = get_project(session, project)
        rows = session.execute(
            select(Annotation.choice, Annotation.suggestion, ItemScore.p_a)
            .join(Item, Item.id == Annotation.item_id)
            .outerjoin(ItemScore, ItemScore.item_id == Item.id)
            .where(Item.project_id == proj.id, Item.responses.is_(None), Annotation.choice.is_not(None))
        ).all()
    shown = [r.choice == r.suggestion for r in rows if r.suggestion is not None]
    if not shown:
        return None
    unshown = [r.choice == ("a" if r.p_a >= 0.5 else "b") for r in rows if r.suggestion is None and r.p_a is not None]
    out = {"shown": {"n": len(shown), "chose_model_side": sum(shown) / len(shown)},
           "not_shown": {"n": len(unshown), "chose_model_side": sum(unshown) / len(unshown) if unshown else None},
           "difference": None, "interval": None, "confidence": confidence,
           "note": "answers without a suggestion are compared with the model's current scores (the last scoring)"}
    if unshown:
        out["difference"] = out["shown"]["chose_model_side"] - out["not_shown"]["chose_model_side"]
        lo, hi = confint_proportions_2indep(sum(shown), len(shown), sum(unshown), len(unshown), method="newcomb",
                                            compare="diff", alpha=1 - confidence)
        out["interval"] = [float(lo), float(hi)]
    return out
