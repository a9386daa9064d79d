"""Read-only queries behind the app's pages: projects, items and annotations, filtered, as tables.

The pages call these and render; they hold no SQL. Tables are pandas DataFrames with one row per
item or annotation; filters run in the database and a row limit keeps a page fast on a 100k-item
project.
"""

from __future__ import annotations

import json
import re

import pandas as pd
from sqlalchemy import Text, cast, func, or_, select
from sqlalchemy.engine import Engine

from annotation.errors import AnnotationError
from annotation.store import Annotation, Item, ItemFlag, Project, User, reading

PREVIEW_CHARS = 120


def prompt_text(prompt) -> str:
    """A prompt (text, or chat messages) as one string, for previews and search."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")


def chat_turns(prompt) -> list[dict] | None:
    """A prompt as chat turns [{"role", "content"}]: chat messages as they are, HH-style text
    ("Human: ... Assistant: ...") split at its speaker tags; None for plain text."""
    if isinstance(prompt, list):
        return [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))} for m in prompt if isinstance(m, dict)]
    text = str(prompt)
    parts = _HH_TURN.split(text)
    # split() gives [before, speaker, text, speaker, text, ...]; plain text has no speakers.
    if len(parts) < 3 or parts[0].strip():
        return None
    turns = [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]
    # An HH prompt ends with an empty "Assistant:" that the responses complete.
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns


def _preview(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def list_projects(engine: Engine) -> list[Project]:
    with reading(engine) as session:
        return list(session.scalars(select(Project).order_by(Project.name)))


def get_project_by_id(engine: Engine, project_id: int) -> Project:
    with reading(engine) as session:
        project = session.get(Project, project_id)
    if project is None:
        raise AnnotationError(f"no project with id {project_id}")
    return project


def items_frame(
    engine: Engine,
    project_id: int,
    *,
    search: str | None = None,
    min_annotations: int | None = None,
    max_annotations: int | None = None,
    flagged: bool | None = None,
    gold: bool | None = None,
    limit: int = 500,
    offset: int = 0,
) -> tuple[pd.DataFrame, int]:
    """Items of a project matching the filters (first `limit` after `offset`, by id) and the total matching."""
    n_ann = (
        select(Annotation.item_id, func.count().label("n"))
        .group_by(Annotation.item_id)
        .subquery()
    )
    n_flag = (
        select(ItemFlag.item_id, func.count().label("n"))
        .where(ItemFlag.kind != "skip")
        .group_by(ItemFlag.item_id)
        .subquery()
    )
    annotations = func.coalesce(n_ann.c.n, 0)
    flags = func.coalesce(n_flag.c.n, 0)
    query = (
        select(Item, annotations.label("annotations"), flags.label("flags"))
        .outerjoin(n_ann, n_ann.c.item_id == Item.id)
        .outerjoin(n_flag, n_flag.c.item_id == Item.id)
        .where(Item.project_id == project_id)
    )
    if search:
        # The prompt is JSON (text or messages); a LIKE on its text form finds words in either.
        text = search.lower()
        # JSON columns are stored as JSON text, where quotes, newlines and non-ASCII letters are
        # escaped ("café" is "caf\u00e9"): search for the escaped form there too. autoescape: the
        # text is matched as written (% and _ are not wildcards, a backslash is a backslash).
        escaped = json.dumps(text)[1:-1]

        def has(column, value):
            return func.lower(column).contains(value, autoescape=True)

        query = query.where(or_(
            has(cast(Item.prompt, Text), text), has(cast(Item.prompt, Text), escaped),
            has(Item.response_a, text), has(Item.response_b, text),
            has(cast(Item.responses, Text), escaped),  # a ranking item's responses
        ))
    if min_annotations is not None:
        query = query.where(annotations >= min_annotations)
    if max_annotations is not None:
        query = query.where(annotations <= max_annotations)
    if flagged is not None:
        query = query.where(flags > 0 if flagged else flags == 0)
    if gold is not None:
        query = query.where(Item.gold_choice.is_not(None) if gold else Item.gold_choice.is_(None))
    with reading(engine) as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.execute(query.order_by(Item.id).limit(limit).offset(offset)).all()
    frame = pd.DataFrame(
        [
            {
                "item_id": item.id,
                "external_id": item.external_id,
                "prompt": _preview(prompt_text(item.prompt)),
                "response_a": _preview(item.response_a),
                "response_b": _preview(item.response_b),
                "source_a": item.source_a,
                "source_b": item.source_b,
                "responses": len(item.responses) if item.responses is not None else 2,
                "annotations": int(n),
                "flags": int(f),
                "gold_choice": item.gold_choice,
            }
            for item, n, f in rows
        ],
        columns=["item_id", "external_id", "prompt", "response_a", "response_b", "source_a", "source_b",
                 "responses", "annotations", "flags", "gold_choice"],
    )
    return frame, int(total)


def annotations_frame(
    engine: Engine,
    project_id: int,
    *,
    annotator: str | None = None,
    choice: str | None = None,
    item_id: int | None = None,
    limit: int = 1000,
    offset: int = 0,
) -> tuple[pd.DataFrame, int]:
    """Annotations of a project (choices in A/B terms, with the order each annotator saw) and the total matching."""
    query = (
        select(Annotation, User.username)
        .join(Item, Item.id == Annotation.item_id)
        .join(User, User.id == Annotation.annotator_id)
        .where(Item.project_id == project_id)
    )
    if annotator:
        query = query.where(User.username == annotator)
    if choice:
        query = query.where(Annotation.choice == choice)
    if item_id is not None:
        query = query.where(Annotation.item_id == item_id)
    with reading(engine) as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.execute(query.order_by(Annotation.id).limit(limit).offset(offset)).all()
    return pd.DataFrame(
        [
            {
                "annotation_id": a.id,
                "item_id": a.item_id,
                "annotator": name,
                "choice": a.choice,
                # a ranking: each response's rank in stored order (1 = best), e.g. "1 1 3"
                "ranking": " ".join(str(r) for r in a.ranking) if a.ranking is not None else "",
                "strength": a.strength,
                "criteria": json.dumps(a.criteria) if a.criteria else "",
                "rationale": a.rationale or "",
                "shown_swapped": a.shown_swapped,
                "duration_ms": a.duration_ms,
                "created_at": a.created_at,
            }
            for a, name in rows
        ],
        columns=["annotation_id", "item_id", "annotator", "choice", "ranking", "strength", "criteria", "rationale",
                 "shown_swapped", "duration_ms", "created_at"],
    ), int(total)


def annotator_names(engine: Engine, project_id: int) -> list[str]:
    """Usernames with at least one annotation in the project."""
    with reading(engine) as session:
        return list(session.scalars(
            select(User.username).distinct()
            .join(Annotation, Annotation.annotator_id == User.id)
            .join(Item, Item.id == Annotation.item_id)
            .where(Item.project_id == project_id)
            .order_by(User.username)
        ))


def item_detail(engine: Engine, project_id: int, item_id: int) -> dict:
    """One item in full, with its flags; for researchers (shows sources, i.e. model names)."""
    with reading(engine) as session:
        item = session.get(Item, item_id)
        if item is None or item.project_id != project_id:
            raise AnnotationError(f"no item {item_id} in this project")
        flags = session.execute(
            select(ItemFlag.kind, ItemFlag.note, User.username, ItemFlag.created_at)
            .join(User, User.id == ItemFlag.annotator_id)
            .where(ItemFlag.item_id == item_id)
            .order_by(ItemFlag.id)
        ).all()
    return {
        "item_id": item.id,
        "external_id": item.external_id,
        "prompt": item.prompt,
        "response_a": item.response_a,
        "response_b": item.response_b,
        "source_a": item.source_a,
        "source_b": item.source_b,
        # a ranking item's responses [{"text", "source"}] in stored order; None for a pair
        "responses": item.responses,
        "metadata": item.meta,
        "gold_choice": item.gold_choice,
        "flags": [{"kind": k, "note": n, "annotator": u, "created_at": c} for k, n, u, c in flags],
    }
