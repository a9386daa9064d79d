"""Assignment: which item an annotator sees next, and recording what they decide about it.

The rules (issue 3):
- every item gets exactly its project's overlap k annotations, each by a different annotator;
- nobody is offered an item twice: not after annotating it, skipping it or flagging it;
- an item handed out is leased to the annotator for `project.lease_seconds`; asking again while
  the lease is live returns the same item (a page refresh changes nothing); an expired lease
  puts the item back in the pool;
- an item is leased to at most k minus its annotations annotators at a time, so a live lease
  guarantees that the annotator's submission will be accepted;
- items closest to completion go first (finish items before starting new ones), then lowest id;
- gold items (`items.gold_choice` set by a researcher) are mixed in at `project.gold_rate`; they
  look like any other item. Gold items are NOT capped at k: their answer is known already, and
  they exist to score every annotator, so each annotator may get each gold item once;
- which response is shown on the left is random per (annotator, item) but fixed (a hash), and
  recorded in the lease and the annotation so position bias can be measured.

Convention: every function takes an Engine and runs its own short transaction, so no caller ever
holds a transaction open while a person reads an item. Choices are always in A/B terms
(`a` = response_a); the app maps left/right to A/B with `Task.shown_swapped`.

Concurrency: on SQLite every transaction starts with BEGIN IMMEDIATE (annotation.store), so
writers are serialised. On PostgreSQL (READ COMMITTED) every check-then-write on an item happens
under a row lock on that item (SELECT ... FOR UPDATE), so the count check and the insert are
atomic; `next_item` skips items another transaction holds locked (SKIP LOCKED) rather than
queueing behind it. Serialization failures, deadlocks and "database is locked" are retried a
bounded number of times.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from sqlalchemy import delete, exists, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from annotation.errors import AnnotationError
from annotation.projects import completion
from annotation.store import CHOICES, Annotation, Assignment, Item, ItemFlag, Project, User, transaction, utcnow

T = TypeVar("T")

MAX_ATTEMPTS = 6
"""Transactions tried at most this often when the database reports a retryable conflict."""
CANDIDATES_PER_LEVEL = 16
"""Items fetched per completion level; under contention some are locked by other annotators."""
MAX_RATIONALE_CHARS = 20_000
FLAG_CHOICES = ("broken", "unsafe")
# PostgreSQL SQLSTATEs worth retrying: serialization failure, deadlock, lock not available.
_RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}

# Gold draws need no reproducibility (leases make a refresh return the same item anyway); tests
# may replace this with a seeded random.Random.
_rng = random.Random()


@dataclass(frozen=True)
class Task:
    """An item as one annotator is shown it. `is_gold` is for internal use: never show it."""

    item_id: int
    prompt: Any
    left_text: str
    right_text: str
    shown_swapped: bool
    leased_until: dt.datetime
    is_gold: bool


# --------------------------------------------------------------------------- helpers


def shown_swapped_for(annotator_id: int, item_id: int) -> bool:
    """Whether this annotator sees response B on the left for this item (fixed, about half the items)."""
    digest = hashlib.blake2b(f"{annotator_id}:{item_id}".encode(), digest_size=8).digest()
    return bool(digest[0] & 1)


def _naive_utc(now: dt.datetime | None) -> dt.datetime:
    # The store keeps naive UTC datetimes; accept aware ones from callers.
    if now is None:
        return utcnow()
    if now.tzinfo is not None:
        now = now.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return now


def _retryable(exc: DBAPIError) -> bool:
    if isinstance(exc, IntegrityError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    message = str(exc.orig).lower()
    return "database is locked" in message or "database is busy" in message


def _in_transaction(engine: Engine, work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction, again from scratch if the database reports a retryable conflict."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            with transaction(engine) as session:
                return work(session)
        except DBAPIError as exc:
            if attempt + 1 < MAX_ATTEMPTS and _retryable(exc):
                time.sleep(_rng.uniform(0, 0.01 * 2**attempt))
                continue
            raise
    raise AssertionError("unreachable")


def _lock_item(session: Session, item_id: int, *, skip_locked: bool = False) -> Item | None:
    """The item's current row, locked until the transaction ends (PostgreSQL; SQLite holds the write lock already).

    With skip_locked, None when another transaction holds the lock."""
    stmt = select(Item).where(Item.id == item_id).with_for_update(skip_locked=skip_locked)
    return session.scalars(stmt.execution_options(populate_existing=True)).first()


def _active_annotator(session: Session, annotator_id: int, *, lock: bool = False) -> User:
    stmt = select(User).where(User.id == annotator_id)
    if lock:
        # NO KEY UPDATE: serialises this annotator's own requests (two tabs) without blocking the
        # foreign-key checks of inserts that reference the user.
        stmt = stmt.with_for_update(key_share=True)
    user = session.scalars(stmt).first()
    if user is None:
        raise AnnotationError(f"no user with id {annotator_id}")
    if not user.active:
        raise AnnotationError(f"user '{user.username}' is deactivated and cannot annotate")
    return user


def _project(session: Session, project_id: int) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise AnnotationError(f"no project with id {project_id}")
    return project


def _live_leases(session: Session, item_id: int, now: dt.datetime, *, excluding: int | None = None) -> int:
    stmt = select(func.count()).select_from(Assignment).where(Assignment.item_id == item_id, Assignment.leased_until > now)
    if excluding is not None:
        stmt = stmt.where(Assignment.annotator_id != excluding)
    return session.scalar(stmt) or 0


def _seen(session: Session, item_id: int, annotator_id: int) -> bool:
    """Whether the annotator has annotated, skipped or flagged the item."""
    annotated = exists().where(Annotation.item_id == item_id, Annotation.annotator_id == annotator_id)
    flagged = exists().where(ItemFlag.item_id == item_id, ItemFlag.annotator_id == annotator_id)
    return bool(session.scalar(select(annotated | flagged)))


def _task(item: Item, lease: Assignment) -> Task:
    left, right = (item.response_b, item.response_a) if lease.shown_swapped else (item.response_a, item.response_b)
    return Task(
        item_id=item.id, prompt=item.prompt, left_text=left, right_text=right, shown_swapped=lease.shown_swapped,
        leased_until=lease.leased_until, is_gold=item.gold_choice is not None,
    )


# --------------------------------------------------------------------------- next item


def next_item(engine: Engine, project_id: int, annotator_id: int, *, now: dt.datetime | None = None) -> Task | None:
    """The item this annotator should judge now, leased to them; None when nothing is left for them.

    Returns the annotator's live lease in this project if there is one, so a refresh shows the same item."""
    now = _naive_utc(now)
    return _in_transaction(engine, lambda s: _next_item(s, project_id, annotator_id, now))


def _next_item(session: Session, project_id: int, annotator_id: int, now: dt.datetime) -> Task | None:
    project = _project(session, project_id)
    _active_annotator(session, annotator_id, lock=True)

    held = session.execute(
        select(Assignment, Item)
        .join(Item, Item.id == Assignment.item_id)
        .where(Assignment.annotator_id == annotator_id, Assignment.leased_until > now, Item.project_id == project_id)
        .order_by(Assignment.created_at.desc(), Assignment.item_id)
        .limit(1)
    ).first()
    if held is not None:
        lease, item = held
        return _task(item, lease)

    # The annotator moved on: leases they let expire here go back to the pool for good.
    session.execute(
        delete(Assignment)
        .where(Assignment.annotator_id == annotator_id, Assignment.leased_until <= now)
        .where(Assignment.item_id.in_(select(Item.id).where(Item.project_id == project_id)))
        .execution_options(synchronize_session=False)
    )

    regular = _regular_candidates(session, project, annotator_id, now)
    if project.gold_rate > 0 and _rng.random() < project.gold_rate:
        order = [_gold_candidates(session, project, annotator_id), regular]
    else:
        order = [regular]
    for candidates in order:
        for item_id in candidates:
            task = _try_lease(session, project, item_id, annotator_id, now)
            if task is not None:
                return task
    return None


def _unseen_by(annotator_id: int):
    return ~exists().where(Annotation.item_id == Item.id, Annotation.annotator_id == annotator_id) & ~exists().where(
        ItemFlag.item_id == Item.id, ItemFlag.annotator_id == annotator_id
    )


def _regular_candidates(session: Session, project: Project, annotator_id: int, now: dt.datetime):
    """Non-gold item ids this annotator may take, closest to completion first, then lowest id.

    One short query per completion level, each an ordered range scan of ix_items_queue
    (project_id, annotation_count, id) that stops after CANDIDATES_PER_LEVEL hits; lazily, so
    the common case (an item in progress is free) runs one query."""
    k = project.overlap
    live = (
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.item_id == Item.id, Assignment.leased_until > now)
        .scalar_subquery()
    )
    for level in range(k - 1, -1, -1):
        ids = session.scalars(
            select(Item.id)
            .where(Item.project_id == project.id, Item.annotation_count == level, Item.gold_choice.is_(None))
            .where(_unseen_by(annotator_id))
            .where(live < k - level)
            .order_by(Item.id)
            .limit(CANDIDATES_PER_LEVEL)
        ).all()
        yield from ids


def _gold_candidates(session: Session, project: Project, annotator_id: int) -> list[int]:
    # Least-used gold first, so that annotators do not all meet the same few gold items.
    return session.scalars(
        select(Item.id)
        .where(Item.project_id == project.id, Item.gold_choice.is_not(None))
        .where(_unseen_by(annotator_id))
        .order_by(Item.annotation_count, Item.id)
        .limit(CANDIDATES_PER_LEVEL)
    ).all()


def _try_lease(session: Session, project: Project, item_id: int, annotator_id: int, now: dt.datetime) -> Task | None:
    item = _lock_item(session, item_id, skip_locked=True)
    if item is None:
        return None  # another annotator's transaction holds it right now: take the next candidate
    # Recheck under the lock: the candidate query ran before it, on data that may have moved.
    if item.gold_choice is None and item.annotation_count + _live_leases(session, item_id, now, excluding=annotator_id) >= project.overlap:
        return None
    if _seen(session, item_id, annotator_id):
        return None
    session.execute(delete(Assignment).where(Assignment.item_id == item_id, Assignment.annotator_id == annotator_id))
    lease = Assignment(
        item_id=item_id, annotator_id=annotator_id, leased_until=now + dt.timedelta(seconds=project.lease_seconds),
        shown_swapped=shown_swapped_for(annotator_id, item_id), created_at=now,
    )
    session.add(lease)
    session.flush()
    return _task(item, lease)


# --------------------------------------------------------------------------- submit


def _validate_answer(project: Project, choice: str, strength, criteria, rationale, duration_ms) -> tuple:
    allowed = list(project.choices)
    if choice not in allowed:
        raise AnnotationError(f"choice '{choice}' is not allowed in project '{project.name}'; allowed: {', '.join(allowed)}")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, int) or not 1 <= strength <= 3):
        raise AnnotationError(f"strength must be 1 (slight), 2 (clear), 3 (strong) or empty; got {strength!r}")
    if criteria is None:
        criteria = {}
    if not isinstance(criteria, dict):
        raise AnnotationError(f"criteria must be a mapping of criterion to choice; got {type(criteria).__name__}")
    criteria = {key: value for key, value in criteria.items() if value is not None}
    unknown = [key for key in criteria if key not in project.criteria]
    if unknown:
        known = ", ".join(project.criteria) or "none"
        raise AnnotationError(f"unknown criteria {', '.join(map(str, unknown))} for project '{project.name}'; its criteria: {known}")
    for key, value in criteria.items():
        if value not in allowed:
            raise AnnotationError(f"criterion '{key}': choice '{value}' is not allowed; allowed: {', '.join(allowed)}")
    if rationale is not None:
        if not isinstance(rationale, str):
            raise AnnotationError(f"rationale must be text; got {type(rationale).__name__}")
        rationale = rationale.strip() or None
        if rationale is not None and len(rationale) > MAX_RATIONALE_CHARS:
            raise AnnotationError(f"rationale is {len(rationale)} characters long; at most {MAX_RATIONALE_CHARS} are allowed")
    if duration_ms is not None and (isinstance(duration_ms, bool) or not isinstance(duration_ms, int) or duration_ms < 0):
        raise AnnotationError(f"duration_ms must be a non-negative whole number of milliseconds; got {duration_ms!r}")
    return criteria, rationale


def submit(
    engine: Engine,
    annotator_id: int,
    item_id: int,
    choice: str,
    *,
    strength: int | None = None,
    criteria: dict | None = None,
    rationale: str | None = None,
    duration_ms: int | None = None,
    now: dt.datetime | None = None,
) -> int:
    """Record the annotator's judgement of a leased item (choice in A/B terms) and return the annotation id.

    Accepted with a live lease; with an expired one only while the item still has room that no
    other annotator's live lease has reserved. Refused (AnnotationError) for a second annotation
    of the same item by the same annotator, a full item, or an item never leased to them."""
    now = _naive_utc(now)

    def work(session: Session) -> int:
        item = _lock_item(session, item_id)
        if item is None:
            raise AnnotationError(f"no item with id {item_id}")
        project = _project(session, item.project_id)
        _active_annotator(session, annotator_id)
        clean_criteria, clean_rationale = _validate_answer(project, choice, strength, criteria, rationale, duration_ms)
        if session.scalar(select(exists().where(Annotation.item_id == item_id, Annotation.annotator_id == annotator_id))):
            raise AnnotationError(f"you have already annotated item {item_id}; use undo to change a recent answer")
        lease = session.get(Assignment, (item_id, annotator_id), populate_existing=True)
        if lease is None:
            raise AnnotationError(f"item {item_id} is not assigned to you (never handed out, skipped, or handed over after your lease expired); ask for the next item")
        if item.gold_choice is None:
            if lease.leased_until > now:
                if item.annotation_count >= project.overlap:
                    raise AnnotationError(f"item {item_id} already has its {project.overlap} annotations; your answer was not saved")
            else:
                others = _live_leases(session, item_id, now, excluding=annotator_id)
                if item.annotation_count + others >= project.overlap:
                    raise AnnotationError(
                        f"your lease on item {item_id} expired at {lease.leased_until:%H:%M:%S} UTC and the item no longer "
                        f"needs you ({item.annotation_count} of {project.overlap} annotations, {others} more reserved by "
                        "other annotators); your answer was not saved"
                    )
        annotation = Annotation(
            item_id=item_id, annotator_id=annotator_id, choice=choice, strength=strength, criteria=clean_criteria,
            rationale=clean_rationale, shown_swapped=lease.shown_swapped, duration_ms=duration_ms, created_at=now,
        )
        session.add(annotation)
        session.delete(lease)
        session.flush()
        return annotation.id

    try:
        return _in_transaction(engine, work)
    except IntegrityError as exc:
        # Only reachable if the same annotator submits the same item twice at the same moment.
        raise AnnotationError(f"you have already annotated item {item_id}") from exc


# --------------------------------------------------------------------------- skip, flag, undo


def _write_flag(engine: Engine, annotator_id: int, item_id: int, kind: str, note: str | None) -> int:
    def work(session: Session) -> int:
        item = _lock_item(session, item_id)
        if item is None:
            raise AnnotationError(f"no item with id {item_id}")
        _active_annotator(session, annotator_id)
        session.execute(delete(Assignment).where(Assignment.item_id == item_id, Assignment.annotator_id == annotator_id))
        existing = session.scalars(
            select(ItemFlag).where(ItemFlag.item_id == item_id, ItemFlag.annotator_id == annotator_id, ItemFlag.kind == kind)
        ).first()
        if existing is not None:  # a double click: one flag is enough
            return existing.id
        flag = ItemFlag(item_id=item_id, annotator_id=annotator_id, kind=kind, note=note)
        session.add(flag)
        session.flush()
        return flag.id

    return _in_transaction(engine, work)


def skip(engine: Engine, annotator_id: int, item_id: int) -> int:
    """Pass on an item: its lease is released and it is not offered to this annotator again. Returns the flag id."""
    return _write_flag(engine, annotator_id, item_id, "skip", None)


def flag(engine: Engine, annotator_id: int, item_id: int, kind: str, note: str | None = None) -> int:
    """Report an item as broken or unsafe: released, never offered to this annotator again. Returns the flag id."""
    if kind not in FLAG_CHOICES:
        raise AnnotationError(f"flag kind must be one of {', '.join(FLAG_CHOICES)}; got '{kind}'")
    if note is not None:
        note = str(note).strip()[:MAX_RATIONALE_CHARS] or None
    return _write_flag(engine, annotator_id, item_id, kind, note)


def undo_last(engine: Engine, annotator_id: int, *, window_seconds: float = 30, now: dt.datetime | None = None) -> int | None:
    """Delete the annotator's most recent annotation if it is at most `window_seconds` old, lease its item
    back to them (so `next_item` shows it again) and return the item id; None when there is nothing to undo."""
    now = _naive_utc(now)

    def work(session: Session) -> int | None:
        last = session.scalars(
            select(Annotation).where(Annotation.annotator_id == annotator_id).order_by(Annotation.created_at.desc(), Annotation.id.desc()).limit(1)
        ).first()
        if last is None or last.created_at < now - dt.timedelta(seconds=window_seconds):
            return None
        item = _lock_item(session, last.item_id)
        project = _project(session, item.project_id)
        swapped, item_id = last.shown_swapped, last.item_id
        session.delete(last)
        # The item handed out after the undone one goes back to the pool: the undone one comes first.
        session.execute(
            delete(Assignment)
            .where(Assignment.annotator_id == annotator_id)
            .where(Assignment.item_id.in_(select(Item.id).where(Item.project_id == project.id)))
            .execution_options(synchronize_session=False)
        )
        session.add(
            Assignment(
                item_id=item_id, annotator_id=annotator_id, leased_until=now + dt.timedelta(seconds=project.lease_seconds),
                shown_swapped=swapped, created_at=now,
            )
        )
        session.flush()
        return item_id

    return _in_transaction(engine, work)


# --------------------------------------------------------------------------- progress, gold


def progress(engine: Engine, project_id: int, annotator_id: int, *, now: dt.datetime | None = None) -> dict:
    """The annotator's annotations in this project today (UTC) and in total, and the project's completion (0..1)."""
    now = _naive_utc(now)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)

    def work(session: Session) -> dict:
        project = _project(session, project_id)
        mine = (
            select(func.count())
            .select_from(Annotation)
            .join(Item, Item.id == Annotation.item_id)
            .where(Annotation.annotator_id == annotator_id, Item.project_id == project_id)
        )
        return {
            "today": session.scalar(mine.where(Annotation.created_at >= midnight)) or 0,
            "total": session.scalar(mine) or 0,
            "project_completion": completion(session, project)["completion"],
        }

    return _in_transaction(engine, work)


def set_gold(engine: Engine, item_id: int, choice: str | None) -> None:
    """Give an item a known answer (A/B terms), making it a gold item; None makes it a normal item again."""

    def work(session: Session) -> None:
        item = _lock_item(session, item_id)
        if item is None:
            raise AnnotationError(f"no item with id {item_id}")
        if choice is not None:
            allowed = [c for c in _project(session, item.project_id).choices if c in CHOICES]
            if choice not in allowed:
                raise AnnotationError(f"gold choice '{choice}' is not allowed for item {item_id}; allowed: {', '.join(allowed)}")
        item.gold_choice = choice

    _in_transaction(engine, work)
