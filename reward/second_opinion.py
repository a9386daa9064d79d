"""The reward model as a second opinion on a project's annotators: its judgement of every item.

    rlhf agreement --project demo --with-model rm-3 [--noise-threshold 0.85] [--json]

Each annotated item of the project is scored by a reward model (the project's active one unless a
registered id or name, or a model directory, is given): r_A and r_B for its two responses, all
items in one batched call; P(A preferred) = sigmoid(r_A - r_B) (Bradley-Terry, the model of the
loss reward models are trained with); the model's label, a or b, or "undecided" when P(A) is
within `margin` of 0.5; and its confidence max(P, 1 - P). For an ensemble the rewards are the
members' means and `spread` is the members' standard deviation of r_A - r_B (0 for one model).

The comparison with people (agreement, per-annotator kappa, label-noise candidates) is
annotation.second_opinion's, on these scores as plain data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from annotation import second_opinion as so
from reward.errors import RewardError

DEFAULT_MARGIN = 0.05


@dataclass
class ModelRef:
    """Which reward model gave the opinion: registry id (None for a bare directory), name and path."""

    id: int | None
    name: str
    path: str
    ensemble: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class NoActiveModel(RewardError):
    """The project has no active reward model and none was named."""


def active_reward_model(engine, project: str) -> ModelRef | None:
    """The project's active reward model, or None when none is marked."""
    try:
        return resolve_model(engine, project)
    except NoActiveModel:
        return None


def resolve_model(engine, project: str, model: str | int | None = None) -> ModelRef:
    """The reward model to score `project` with: `model` as a directory, a registered id or name,
    or (None) the project's active reward model."""
    from annotation.projects import get_project
    from annotation.registry import active_model, get_model
    from annotation.store import reading
    from reward.score import is_ensemble

    with reading(engine) as session:
        proj = get_project(session, project)
        if model is None:
            row = active_model(session, proj.id)
            if row is None:
                raise NoActiveModel(
                    f"project '{project}' has no active reward model; mark one with `rlhf models activate ID` "
                    "or name one with --with-model ID|NAME|DIR"
                )
        elif Path(str(model)).is_dir():
            path = Path(str(model))
            return ModelRef(None, path.resolve().name, str(path), is_ensemble(path))
        else:
            row = get_model(session, str(model))
            if row.kind != "reward":
                raise RewardError(f"--with-model {model}: registered model {row.id} is a {row.kind} model, not a reward model")
        return ModelRef(row.id, row.name, row.path, is_ensemble(row.path))


def check_margin(margin: float) -> None:
    if not 0 <= margin < 0.5:
        raise RewardError(f"margin {margin}: expected 0 <= margin < 0.5 (P(A) within it of 0.5 is undecided)")


def opinion_from_rewards(item_ids, reward_a, reward_b, spread=None, margin: float = DEFAULT_MARGIN) -> pd.DataFrame:
    """The model's opinion of each item from its rewards: indexed by item_id, the columns of
    annotation.second_opinion.OPINION_COLUMNS."""
    from scipy.special import expit

    check_margin(margin)
    ra, rb = np.asarray(reward_a, dtype=np.float64), np.asarray(reward_b, dtype=np.float64)
    if ra.shape != rb.shape or ra.shape != (len(item_ids),):
        raise RewardError(f"{len(item_ids)} items but {ra.size} and {rb.size} rewards; expected one of each per item")
    p_a = expit(ra - rb)
    confidence = np.maximum(p_a, 1.0 - p_a)
    label = np.where(confidence < 0.5 + margin, so.UNDECIDED, np.where(p_a > 0.5, "a", "b")).astype(object)
    spread = np.zeros_like(ra) if spread is None else np.asarray(spread, dtype=np.float64)
    return pd.DataFrame(
        {"reward_a": ra, "reward_b": rb, "spread": spread, "p_a": p_a, "label": label, "confidence": confidence},
        index=pd.Index(np.asarray(item_ids, dtype=np.int64), name="item_id"),
    )


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


def member_rewards(scorer, prompts: list, responses: list[str], batch_size: int | None = None) -> np.ndarray:
    """Rewards `[members, n]` of n (prompt, response) pairs in one call: an ensemble's
    `member_scores` (one row per member), or a single scorer's `score` as one row."""
    extra: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
    if hasattr(scorer, "member_scores"):
        members = _numpy(scorer.member_scores(prompts, responses, **extra)).astype(np.float64)
    else:
        members = _numpy(scorer.score(prompts, responses, **extra)).astype(np.float64)[None, :]
    if members.ndim != 2 or members.shape[1] != len(responses):
        raise RewardError(f"the scorer returned {members.shape[-1] if members.ndim else members.size} rewards for "
                          f"{len(responses)} responses; expected one per response")
    return members


def score_items(scorer, items: pd.DataFrame, *, margin: float = DEFAULT_MARGIN, batch_size: int | None = None) -> pd.DataFrame:
    """Score `items` (indexed by item_id: prompt, response_a, response_b) with `scorer`, anything
    with `.score(prompts, responses) -> tensor` (reward.score's scorers; an ensemble's
    `member_scores` gives the spread). One call for all items: the scorer batches them by length."""
    check_margin(margin)
    n = len(items)
    if not n:
        return opinion_from_rewards([], [], [], margin=margin)
    prompts = list(items["prompt"]) * 2
    responses = [str(r) for r in items["response_a"]] + [str(r) for r in items["response_b"]]
    members = member_rewards(scorer, prompts, responses, batch_size)
    spread = (members[:, :n] - members[:, n:]).std(0) if hasattr(scorer, "member_scores") else None
    rewards = members.mean(0)
    return opinion_from_rewards(items.index, rewards[:n], rewards[n:], spread, margin)


def score_project(engine, project: str, model: str | int | None = None, *, scorer=None, margin: float = DEFAULT_MARGIN,
                  batch_size: int | None = None, device: str | None = None) -> dict:
    """The model's opinion of every annotated item of `project`: {"model": ModelRef as a dict,
    "opinion": frame by item_id, "items": the items' text by item_id}.

    `scorer` (already loaded) skips loading `model`; without either, the project's active model."""
    from reward.score import load_reward_model

    check_margin(margin)
    if scorer is None:
        ref = resolve_model(engine, project, model)
        scorer = load_reward_model(ref.path, device)
    else:
        ref = resolve_model(engine, project, model) if model is not None else ModelRef(None, type(scorer).__name__, "")
    items = so.load_project_items(engine, project)
    return {"model": ref.as_dict(), "opinion": score_items(scorer, items, margin=margin, batch_size=batch_size),
            "items": items}


def second_opinion(engine, project: str, model: str | int | None = None, *, annotations: pd.DataFrame | None = None, scorer=None,
                   margin: float = DEFAULT_MARGIN, batch_size: int | None = None, **report_options) -> dict:
    """Score the project and compare: annotation.second_opinion.model_report plus which model and
    the margin. `votes` (annotation.agreement.load_votes) saves loading them again."""
    from annotation.agreement import load_annotations

    # options are checked before the model loads: a typo costs no minutes of scoring
    checked = ("noise_threshold", "method", "min_share", "min_annotations", "min_posterior")
    so.check_options(**{k: report_options[k] for k in checked if k in report_options})
    check_margin(margin)
    scored = score_project(engine, project, model, scorer=scorer, margin=margin, batch_size=batch_size)
    annotations = load_annotations(engine, project) if annotations is None else annotations
    report = so.model_report(annotations, scored["opinion"], scored["items"], **report_options)
    return {"model": scored["model"], "undecided_margin": margin, **report}
