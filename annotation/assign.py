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
  recorded in the lease and the annotation so position bias can be measured;
- a ranking item (3 to 6 `responses`) goes through the same queue, leases and k cap; its
  responses are shown in an order that is random per (annotator, item) but fixed (a hash,
  `shown_order_for`), recorded in the lease and the annotation like shown_swapped. It is answered
  with `submit_ranking` (ranks in stored order), a pair with `submit` (a choice); each refuses
  the other kind of item.

Convention: every function takes an Engine and runs its own short transaction, so no caller ever
holds a transaction open while a person reads an item. Choices are always in A/B terms
(`a` = response_a); the app maps left/right to A/B with `Task.shown_swapped`.

Speed: the hot path (next_item, submit) runs statements built once at import time on a plain
Connection, not the ORM, so a request costs a handful of index lookups and little Python;
benchmarks/assign_bench.py measures it at 100k items.

The queue reads `items.annotation_count`, which database triggers keep equal to the item's number
of annotations (migration 0002), through the index (project_id, annotation_count, id).

Concurrency: on SQLite every transaction starts with BEGIN IMMEDIATE (annotation.store), so
writers are serialised; within one process they also queue on a mutex (see _writer_lock). On
PostgreSQL (READ COMMITTED) every check-then-write on an item happens under a row lock on that
item (SELECT ... FOR UPDATE), so the count check and the insert are atomic; `next_item` skips
items another transaction holds locked (SKIP LOCKED) rather than queueing behind it, and before
answering that nothing is left it looks once more, waiting on those locks.
Serialization failures, deadlocks and "database is locked" are retried a
bounded number of times.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import numbers
import random
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from sqlalchemy import and_, bindparam, delete, exists, func, insert, select, update
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError, IntegrityError

from annotation.errors import AnnotationError
from annotation.projects import completion
from annotation.store import (
    MAX_RANKED_RESPONSES,
    Annotation,
    Assignment,
    Item,
    ItemFlag,
    ItemScore,
    Project,
    User,
    reading,
    sqlite_busy,
    transaction,
    utcnow,
)

T = TypeVar("T")

MAX_ATTEMPTS = 6
"""Transactions tried at most this often when the database reports a retryable conflict."""
MAX_RATIONALE_CHARS = 20_000
FLAG_CHOICES = ("broken", "unsafe")
# PostgreSQL SQLSTATEs worth retrying: serialization failure, deadlock, lock not available.
_RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}

# Gold draws need no reproducibility (leases make a refresh return the same item anyway); tests
# may replace this with a seeded random.Random.
_rng = random.Random()


@dataclass(frozen=True)
class Task:
    """An item as one annotator is shown it. `is_gold` is for internal use: never show it.

    For a ranking item, `responses` holds the texts in the order shown (left_text and right_text
    are ""), and `shown_order[p]` is the stored index of the response shown at position p."""

    item_id: int
    prompt: Any
    left_text: str
    right_text: str
    shown_swapped: bool
    leased_until: dt.datetime
    is_gold: bool
    responses: tuple[str, ...] = ()
    shown_order: tuple[int, ...] | None = None
    suggestion: str | None = None
    """The reward model's suggestion, shown only in projects that turned suggestions on: "a" or "b"
    (A/B terms, like a choice) for a pair, or for a ranking the stored index (as a string) of the
    response the model ranks first. Recorded with the annotation."""
    suggestion_confidence: float | None = None
    """For a pair, the model's P(its suggestion is preferred); None for a ranking."""

    @property
    def is_ranking(self) -> bool:
        return self.shown_order is not None


# --------------------------------------------------------------------------- statements
# Built once: SQLAlchemy then reuses their compiled form, and each request pays only for execution.

_items, _annotations, _assignments, _flags = Item.__table__, Annotation.__table__, Assignment.__table__, ItemFlag.__table__
_scores = ItemScore.__table__
_projects, _users = Project.__table__, User.__table__
_ITEM = (_items.c.id, _items.c.project_id, _items.c.prompt, _items.c.response_a, _items.c.response_b, _items.c.gold_choice,
         _items.c.annotation_count, _items.c.responses)
_PROJECT_COLUMNS = (
    _projects.c.name, _projects.c.overlap, _projects.c.choices, _projects.c.criteria, _projects.c.gold_rate, _projects.c.lease_seconds,
    _projects.c.suggestions,
)
_PROJECT = select(_projects.c.id, *_PROJECT_COLUMNS).where(_projects.c.id == bindparam("project"))
_USER = select(_users.c.username, _users.c.active).where(_users.c.id == bindparam("annotator"))
# The project and the annotator in one round trip. NO KEY UPDATE on the user row serialises one
# annotator's own requests (two tabs) without blocking foreign-key checks that reference the user.
_PROJECT_AND_USER_LOCKED = (
    select(_projects.c.id, *_PROJECT_COLUMNS, _users.c.username, _users.c.active)
    .select_from(_projects.join(_users, _users.c.id == bindparam("annotator")))
    .where(_projects.c.id == bindparam("project"))
    .with_for_update(key_share=True, of=_users)
)
_ITEM_LOCKED = select(*_ITEM).where(_items.c.id == bindparam("item")).with_for_update()
# Submit's first statement: the item row, locked, with its project's settings, the annotator, and
# whether they annotated it already.
_SUBMIT_LOCK = (
    select(
        *_ITEM,
        *_PROJECT_COLUMNS,
        _users.c.username,
        _users.c.active,
        exists().where(_annotations.c.item_id == _items.c.id, _annotations.c.annotator_id == _users.c.id).label("annotated"),
    )
    .select_from(_items.join(_projects, _projects.c.id == _items.c.project_id).join(_users, _users.c.id == bindparam("annotator")))
    .where(_items.c.id == bindparam("item"))
    .with_for_update(of=_items)
)
# All of the annotator's leases in the project, live ones first, newest first.
_MY_LEASES = (
    select(*_ITEM, _assignments.c.shown_swapped, _assignments.c.shown_order, _assignments.c.suggestion, _assignments.c.leased_until)
    .join(_items, _items.c.id == _assignments.c.item_id)
    .where(_assignments.c.annotator_id == bindparam("annotator"), _items.c.project_id == bindparam("project"))
    .order_by((_assignments.c.leased_until > bindparam("now")).desc(), _assignments.c.created_at.desc(), _assignments.c.item_id)
)
_PROJECT_ITEM_IDS = select(_items.c.id).where(_items.c.project_id == bindparam("project"))
_DROP_EXPIRED = delete(_assignments).where(
    _assignments.c.annotator_id == bindparam("annotator"),
    _assignments.c.leased_until <= bindparam("now"),
    _assignments.c.item_id.in_(_PROJECT_ITEM_IDS),
)
_DROP_PROJECT_LEASES = delete(_assignments).where(
    _assignments.c.annotator_id == bindparam("annotator"), _assignments.c.item_id.in_(_PROJECT_ITEM_IDS)
)
_UNSEEN = and_(
    ~exists().where(_annotations.c.item_id == _items.c.id, _annotations.c.annotator_id == bindparam("annotator")),
    ~exists().where(_flags.c.item_id == _items.c.id, _flags.c.annotator_id == bindparam("annotator")),
)
_LIVE_ON_ITEM = (
    select(func.count())
    .select_from(_assignments)
    .where(_assignments.c.item_id == _items.c.id, _assignments.c.leased_until > bindparam("now"))
    .scalar_subquery()
)
# One completion level of the queue: an ordered range scan of ix_items_queue (project_id,
# annotation_count, queue_key, id) that stops at the first item this annotator may take, locking
# it. queue_key is 0 everywhere in a project with random selection (so: lowest id first) and the
# reward model's order in one with uncertainty selection (annotation.selection writes it). On
# PostgreSQL, SKIP LOCKED passes over items that other annotators' transactions hold right now
# instead of queueing behind them (the job-queue pattern); SQLite ignores the clause.
_REGULAR_AT_LEVEL = (
    select(*_ITEM)
    .where(_items.c.project_id == bindparam("project"), _items.c.annotation_count == bindparam("level"), _items.c.gold_choice.is_(None))
    .where(_UNSEEN, _LIVE_ON_ITEM < bindparam("room"))
    .order_by(_items.c.queue_key, _items.c.id)
    .limit(1)
    .with_for_update(skip_locked=True, of=_items)
)
# The same scan waiting on row locks instead of skipping them: SKIP LOCKED finds nothing when the
# only items left for this annotator are locked by other annotators' transactions at this moment
# (they may release them untaken), so an empty answer is checked with this before it is given.
_REGULAR_AT_LEVEL_WAITING = _REGULAR_AT_LEVEL.with_for_update(of=_items)
# Least-used gold first, so that annotators do not all meet the same few gold items. Gold has no
# cap, so there is nothing to lock.
_GOLD = (
    select(*_ITEM)
    .where(_items.c.project_id == bindparam("project"), _items.c.gold_choice.is_not(None), _UNSEEN)
    .order_by(_items.c.annotation_count, _items.c.id)
    .limit(1)
)
_LIVE_OTHERS = (
    select(func.count())
    .select_from(_assignments)
    .where(
        _assignments.c.item_id == bindparam("item"),
        _assignments.c.leased_until > bindparam("now"),
        _assignments.c.annotator_id != bindparam("annotator"),
    )
)
_DROP_LEASE = delete(_assignments).where(_assignments.c.item_id == bindparam("item"), _assignments.c.annotator_id == bindparam("annotator"))
# Submit takes the lease and learns what it was in one round trip; a refusal rolls the delete back.
_TAKE_LEASE = _DROP_LEASE.returning(_assignments.c.leased_until, _assignments.c.shown_swapped, _assignments.c.shown_order,
                                     _assignments.c.suggestion)
_SCORE = select(_scores.c.p_a, _scores.c.top).where(_scores.c.item_id == bindparam("item"))
_ADD_LEASE = insert(_assignments)
_ADD_ANNOTATION = insert(_annotations)
_FLAG = select(_flags.c.id).where(_flags.c.item_id == bindparam("item"), _flags.c.annotator_id == bindparam("annotator"), _flags.c.kind == bindparam("kind"))
_ADD_FLAG = insert(_flags)
_LAST_ANNOTATION = (
    select(_annotations.c.id, _annotations.c.item_id, _annotations.c.shown_swapped, _annotations.c.created_at,
           _annotations.c.choice, _annotations.c.strength, _annotations.c.ranking, _annotations.c.shown_order,
           _annotations.c.suggestion)
    .select_from(_annotations.join(_items, _items.c.id == _annotations.c.item_id))
    .where(_annotations.c.annotator_id == bindparam("annotator"), _items.c.project_id == bindparam("project"))
    .order_by(_annotations.c.created_at.desc(), _annotations.c.id.desc())
    .limit(1)
)
_DROP_ANNOTATION = delete(_annotations).where(_annotations.c.id == bindparam("annotation"))
_SET_GOLD = update(_items).where(_items.c.id == bindparam("item")).values(gold_choice=bindparam("gold"))
_MINE_IN_PROJECT = (
    select(func.count())
    .select_from(_annotations.join(_items, _items.c.id == _annotations.c.item_id))
    .where(_annotations.c.annotator_id == bindparam("annotator"), _items.c.project_id == bindparam("project"))
)
_MINE_SINCE = _MINE_IN_PROJECT.where(_annotations.c.created_at >= bindparam("since"))


# --------------------------------------------------------------------------- helpers


def shown_swapped_for(annotator_id: int, item_id: int) -> bool:
    """Whether this annotator sees response B on the left for this item (fixed, about half the items)."""
    digest = hashlib.blake2b(f"{annotator_id}:{item_id}".encode(), digest_size=8).digest()
    return bool(digest[0] & 1)


def shown_order_for(annotator_id: int, item_id: int, n: int) -> tuple[int, ...]:
    """The order in which this annotator sees a ranking item's n responses: stored indices, position
    by position; a permutation that is random per (annotator, item) but fixed (a hash seeds it)."""
    digest = hashlib.blake2b(f"order:{annotator_id}:{item_id}".encode(), digest_size=8).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest, "big")).shuffle(order)
    return tuple(order)


def check_ranking(ranks, n: int) -> list[int]:
    """`ranks` as a list when it ranks n responses: one whole number per response in stored order,
    1 = best, tied responses sharing a rank and the next rank skipping as many places as were
    tied (standard competition ranking: rank = 1 + the number of responses ranked better, e.g.
    [2, 1, 2, 4]); otherwise an AnnotationError saying what is wrong and what would be right."""
    if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__"):
        raise AnnotationError(f"ranking must be a list of {n} ranks, one per response in stored order; got {ranks!r}")
    ranks = list(ranks)
    if len(ranks) != n:
        raise AnnotationError(f"ranking has {len(ranks)} ranks but the item has {n} responses; give one rank per response, in stored order")
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= n:
            raise AnnotationError(f"ranking[{i}] is {r!r}; expected a whole number from 1 (best) to {n}")
    ranks = [int(r) for r in ranks]
    expected = [1 + sum(other < r for other in ranks) for r in ranks]
    if ranks != expected:
        raise AnnotationError(
            f"ranking {ranks} is not a ranking with ties: a response's rank is 1 + the number of responses ranked "
            f"better, so tied responses share a rank and the next rank skips (this order is {expected})"
        )
    return ranks


def ranks_from_groups(groups, shown_order) -> list[int]:
    """Ranks in stored order from what an annotator did: `groups` lists, best first, the groups of
    tied shown positions (0-based), and shown_order maps a position to its stored index. Every
    position must be in exactly one group."""
    n = len(shown_order)
    placed = [p for group in groups for p in group]
    if sorted(placed) != list(range(n)):
        raise AnnotationError(f"every one of the {n} responses must be placed exactly once; placed: {[p + 1 for p in placed]}")
    ranks = [0] * n
    better = 0
    for group in groups:
        for p in group:
            ranks[shown_order[p]] = better + 1
        better += len(group)
    return ranks


def groups_from_ranks(ranks, shown_order) -> list[list[int]]:
    """The inverse of ranks_from_groups: tied groups of shown positions, best first (positions in shown order)."""
    by_rank: dict[int, list[int]] = {}
    for position, stored in enumerate(shown_order):
        by_rank.setdefault(ranks[stored], []).append(position)
    return [by_rank[r] for r in sorted(by_rank)]


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
    return sqlite_busy(str(exc.orig))


_sqlite_writers: "weakref.WeakKeyDictionary[Engine, threading.Lock]" = weakref.WeakKeyDictionary()
_sqlite_writers_guard = threading.Lock()


def _writer_lock(engine: Engine):
    """For SQLite, a lock that queues this process's transactions on the engine.

    SQLite lets one writer in at a time and makes the others poll with growing sleeps (up to 100 ms
    each) until the busy timeout; with twenty annotator sessions in one server that polling, not the
    work, would set the latency. Queueing on a mutex hands the database over as soon as it is free.
    Other processes still meet the busy timeout, which keeps them correct."""
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    with _sqlite_writers_guard:
        lock = _sqlite_writers.get(engine)
        if lock is None:
            lock = _sqlite_writers[engine] = threading.Lock()
    return lock


def _in_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run `work` in one transaction, again from scratch if the database reports a retryable conflict."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            with _writer_lock(engine), engine.begin() as conn:
                return work(conn)
        except DBAPIError as exc:
            if attempt + 1 < MAX_ATTEMPTS and _retryable(exc):
                time.sleep(_rng.uniform(0, 0.01 * 2**attempt))
                continue
            raise
    raise AssertionError("unreachable")


def _project(conn: Connection, project_id: int) -> Row:
    project = conn.execute(_PROJECT, {"project": project_id}).first()
    if project is None:
        raise AnnotationError(f"no project with id {project_id}")
    return project


def _check_annotator(conn: Connection, annotator_id: int, row: Row | None = None) -> None:
    """Refuse unknown and deactivated users; `row` (username, active) saves the lookup when already read."""
    user = row if row is not None else conn.execute(_USER, {"annotator": annotator_id}).first()
    if user is None:
        raise AnnotationError(f"no user with id {annotator_id}")
    if not user.active:
        raise AnnotationError(f"user '{user.username}' is deactivated and cannot annotate")


def _locked_item(conn: Connection, item_id: int) -> Row:
    """The item's current row, locked until the transaction ends (PostgreSQL; SQLite holds the write lock already)."""
    item = conn.execute(_ITEM_LOCKED, {"item": item_id}).first()
    if item is None:
        raise AnnotationError(f"no item with id {item_id}")
    return item


def _order_shown(recorded, annotator_id: int, item_id: int, n: int) -> tuple[int, ...]:
    """The order a lease recorded for a ranking item, or (missing or not an order of n, as a lease
    written by hand might be) the one shown_order_for gives, which is what a lease records anyway."""
    if recorded is not None and sorted(recorded) == list(range(n)):
        return tuple(recorded)
    return shown_order_for(annotator_id, item_id, n)


def _task(item: Row, annotator_id: int, shown_swapped: bool, leased_until: dt.datetime, shown_order=None,
          suggestion: tuple[str | None, float | None] = (None, None)) -> Task:
    hint, confidence = suggestion
    if item.responses is not None:
        order = _order_shown(shown_order, annotator_id, item.id, len(item.responses))
        return Task(
            item_id=item.id, prompt=item.prompt, left_text="", right_text="", shown_swapped=False, leased_until=leased_until,
            is_gold=item.gold_choice is not None, responses=tuple(item.responses[i]["text"] for i in order), shown_order=order,
            suggestion=hint,
        )
    left, right = (item.response_b, item.response_a) if shown_swapped else (item.response_a, item.response_b)
    return Task(
        item_id=item.id, prompt=item.prompt, left_text=left, right_text=right, shown_swapped=bool(shown_swapped),
        leased_until=leased_until, is_gold=item.gold_choice is not None, suggestion=hint, suggestion_confidence=confidence,
    )


def _suggestion(conn: Connection, item: Row, recorded: str | None = None, new: bool = True) -> tuple[str | None, float | None]:
    """The model's suggestion for `item` and, for a pair, its confidence: from item_scores (written
    by the scoring job; no model runs here). A resumed lease (`new` False) shows what it recorded
    and nothing when it recorded none, so the annotation says exactly what was shown."""
    if not new and recorded is None:
        return None, None
    row = conn.execute(_SCORE, {"item": item.id}).first()
    if item.responses is not None:
        top = row.top if row is not None else None
        hint = str(top) if top is not None and 0 <= top < len(item.responses) else None
        return (recorded if recorded is not None else hint), None
    if row is None or row.p_a is None:
        return recorded, None
    side = "a" if row.p_a >= 0.5 else "b"
    if recorded not in (None, side):
        return recorded, None  # scored again since the lease was taken, the other way: no confidence to show
    return side, float(row.p_a if side == "a" else 1.0 - row.p_a)


def _shown_for(annotator_id: int, item: Row) -> tuple[bool, list[int] | None]:
    """(shown_swapped, shown_order) of a new lease: a side for a pair, an order for a ranking item."""
    if item.responses is not None:
        return False, list(shown_order_for(annotator_id, item.id, len(item.responses)))
    return shown_swapped_for(annotator_id, item.id), None


# --------------------------------------------------------------------------- next item


def next_item(engine: Engine, project_id: int, annotator_id: int, *, now: dt.datetime | None = None) -> Task | None:
    """The item this annotator should judge now, leased to them; None when nothing is left for them.

    Returns the annotator's live lease in this project if there is one, so a refresh shows the same item."""
    now = _naive_utc(now)
    return _in_transaction(engine, lambda conn: _next_item(conn, project_id, annotator_id, now))


def _next_item(conn: Connection, project_id: int, annotator_id: int, now: dt.datetime) -> Task | None:
    me = {"annotator": annotator_id, "project": project_id, "now": now}
    project = conn.execute(_PROJECT_AND_USER_LOCKED, me).first()
    if project is None:
        _project(conn, project_id)  # raises the right message for whichever is missing
        _check_annotator(conn, annotator_id)
    _check_annotator(conn, annotator_id, project)

    leases = conn.execute(_MY_LEASES, me).all()
    if leases and leases[0].leased_until > now:
        lease = leases[0]
        return _task(lease, annotator_id, lease.shown_swapped, lease.leased_until, lease.shown_order,
                     _suggestion(conn, lease, lease.suggestion, new=False))
    if leases:
        # The annotator moved on: leases they let expire here go back to the pool for good.
        conn.execute(_DROP_EXPIRED, me)

    item = None
    if project.gold_rate > 0 and _rng.random() < project.gold_rate:
        item = conn.execute(_GOLD, me).first()
    if item is None:
        item = _next_regular(conn, project, me)
    if item is None and conn.dialect.name != "sqlite":
        item = _next_regular(conn, project, me, query=_REGULAR_AT_LEVEL_WAITING)
    if item is None:
        return None
    swapped, order = _shown_for(annotator_id, item)
    until = now + dt.timedelta(seconds=project.lease_seconds)
    suggestion = _suggestion(conn, item) if project.suggestions else (None, None)
    conn.execute(_ADD_LEASE, {"item_id": item.id, "annotator_id": annotator_id, "leased_until": until, "shown_swapped": swapped,
                              "shown_order": order, "suggestion": suggestion[0], "created_at": now})
    return _task(item, annotator_id, swapped, until, order, suggestion)


RECHECKS_PER_LEVEL = 4
"""On PostgreSQL, candidates at one level that may turn out taken after locking before moving on."""


def _next_regular(conn: Connection, project: Row, me: dict, query=_REGULAR_AT_LEVEL) -> Row | None:
    """The non-gold item this annotator should take, locked: closest to completion first, then by
    queue_key (the reward model's order under uncertainty selection, 0 otherwise), then lowest id.

    One short query per completion level, highest first, so the common case (an item in progress is
    free) runs one."""
    k = project.overlap
    for level in range(k - 1, -1, -1):
        params = {**me, "level": level, "room": k - level}
        for _ in range(RECHECKS_PER_LEVEL):
            item = conn.execute(query, params).first()
            if item is None:
                break
            # SQLite needs no recheck: BEGIN IMMEDIATE gave this transaction the database's write lock
            # before its first read. On PostgreSQL the statement's snapshot predates the lock, so a
            # transaction that leased or completed the item and committed just before we got the lock
            # is invisible to it: count again now, under the lock. ("Unseen by me" needs no recheck:
            # this annotator's requests are serialised by the lock on their user row.) If it is
            # taken, the next query at this level, with a fresh snapshot, no longer returns it.
            if conn.dialect.name == "sqlite":
                return item
            others = conn.execute(_LIVE_OTHERS, {"item": item.id, "annotator": me["annotator"], "now": me["now"]}).scalar_one()
            if item.annotation_count + others < k:
                return item
    return None


# --------------------------------------------------------------------------- submit


def _validate_answer(project: Row, choice: str, strength, criteria, rationale, duration_ms) -> tuple[dict, str | None]:
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
    unknown = [str(key) for key in criteria if key not in project.criteria]
    if unknown:
        known = ", ".join(project.criteria) or "none"
        raise AnnotationError(f"unknown criteria {', '.join(unknown)} for project '{project.name}'; its criteria: {known}")
    for key, value in criteria.items():
        if value not in allowed:
            raise AnnotationError(f"criterion '{key}': choice '{value}' is not allowed; allowed: {', '.join(allowed)}")
    return criteria, _validate_note(rationale, duration_ms)


def _validate_note(rationale, duration_ms) -> str | None:
    """The rationale cleaned (None when blank), after checking it and duration_ms."""
    if rationale is not None:
        if not isinstance(rationale, str):
            raise AnnotationError(f"rationale must be text; got {type(rationale).__name__}")
        rationale = rationale.strip() or None
        if rationale is not None and len(rationale) > MAX_RATIONALE_CHARS:
            raise AnnotationError(f"rationale is {len(rationale)} characters long; at most {MAX_RATIONALE_CHARS} are allowed")
    if duration_ms is not None and (isinstance(duration_ms, bool) or not isinstance(duration_ms, int) or duration_ms < 0):
        raise AnnotationError(f"duration_ms must be a non-negative whole number of milliseconds; got {duration_ms!r}")
    return rationale


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

    Accepted with a live lease; with an expired one only while the item has room that no other
    annotator's live lease has reserved. Refused (AnnotationError) for a second annotation of the
    same item by the same annotator, a full item, or an item not leased to them."""
    now = _naive_utc(now)

    def work(conn: Connection) -> int:
        _item, lease, (clean_criteria, clean_rationale) = _lock_for_answer(
            conn, item_id, annotator_id, now, ranking=False,
            validate=lambda project: _validate_answer(project, choice, strength, criteria, rationale, duration_ms),
        )
        result = conn.execute(
            _ADD_ANNOTATION,
            {
                "item_id": item_id, "annotator_id": annotator_id, "choice": choice, "strength": strength,
                "criteria": clean_criteria, "rationale": clean_rationale, "shown_swapped": bool(lease.shown_swapped),
                "duration_ms": duration_ms, "suggestion": lease.suggestion, "created_at": now,
            },
        )
        return result.inserted_primary_key[0]

    return _submit_once(engine, work, item_id)


def submit_ranking(
    engine: Engine,
    annotator_id: int,
    item_id: int,
    ranks,
    *,
    rationale: str | None = None,
    duration_ms: int | None = None,
    now: dt.datetime | None = None,
) -> int:
    """Record the annotator's ranking of a leased ranking item and return the annotation id.

    `ranks` holds each response's rank in stored order (item.responses), 1 = best, ties as equal
    ranks with the next rank skipping (see check_ranking); the order shown comes from the lease.
    The same rules as `submit` (lease, k cap, once per annotator); refused for a two-response item."""
    now = _naive_utc(now)

    def validate(item: Row) -> tuple[list[int], str | None]:
        return check_ranking(ranks, len(item.responses)), _validate_note(rationale, duration_ms)

    def work(conn: Connection) -> int:
        _item, lease, (clean_ranks, clean_rationale) = _lock_for_answer(conn, item_id, annotator_id, now, ranking=True, validate=validate)
        order = _order_shown(lease.shown_order, annotator_id, item_id, len(clean_ranks))
        result = conn.execute(
            _ADD_ANNOTATION,
            {
                "item_id": item_id, "annotator_id": annotator_id, "choice": None, "strength": None, "criteria": {},
                "rationale": clean_rationale, "shown_swapped": False, "ranking": clean_ranks, "shown_order": list(order),
                "duration_ms": duration_ms, "suggestion": lease.suggestion, "created_at": now,
            },
        )
        return result.inserted_primary_key[0]

    return _submit_once(engine, work, item_id)


def _lock_for_answer(conn: Connection, item_id: int, annotator_id: int, now: dt.datetime, *, ranking: bool,
                     validate: Callable[[Row], T]) -> tuple[Row, Row, T]:
    """The checks every answer passes, under the item's row lock: the item and annotator exist and
    may answer, the answer suits the kind of item and is valid (`validate`, given the item row,
    which carries the project's settings too), the annotator has not answered it yet, holds its
    lease (taken here), and the item has room. Returns the item row, the lease taken and what
    `validate` returned."""
    key = {"item": item_id, "annotator": annotator_id, "now": now}
    item = conn.execute(_SUBMIT_LOCK, key).first()
    if item is None:
        _locked_item(conn, item_id)  # raises the right message for whichever is missing
        _check_annotator(conn, annotator_id)
    _check_annotator(conn, annotator_id, item)
    project = item  # the row carries the project's settings too
    if item.responses is not None and not ranking:
        raise AnnotationError(f"item {item_id} is a ranking of {len(item.responses)} responses: rank them (submit_ranking); "
                              "a choice between two responses does not apply")
    if item.responses is None and ranking:
        raise AnnotationError(f"item {item_id} has two responses: choose between them (submit); a ranking applies to items "
                              f"with 3 to {MAX_RANKED_RESPONSES} responses")
    validated = validate(project)
    if item.annotated:
        raise AnnotationError(f"you have already annotated item {item_id}; use undo to change a recent answer")
    lease = conn.execute(_TAKE_LEASE, key).first()
    if lease is None:
        raise AnnotationError(
            f"item {item_id} is not assigned to you (never handed out, skipped, or released after your lease "
            "expired); ask for the next item"
        )
    if item.gold_choice is None:
        if lease.leased_until > now:
            if item.annotation_count >= project.overlap:
                raise AnnotationError(f"item {item_id} already has its {project.overlap} annotations; your answer was not saved")
        else:
            others = conn.execute(_LIVE_OTHERS, key).scalar_one()
            if item.annotation_count + others >= project.overlap:
                raise AnnotationError(
                    f"your lease on item {item_id} expired at {lease.leased_until:%H:%M:%S} UTC and the item no longer "
                    f"needs you ({item.annotation_count} of {project.overlap} annotations, {others} more reserved by "
                    "other annotators); your answer was not saved"
                )
    return item, lease, validated


def _submit_once(engine: Engine, work: Callable[[Connection], int], item_id: int) -> int:
    try:
        return _in_transaction(engine, work)
    except IntegrityError as exc:
        # Only reachable if the same annotator submits the same item twice at the same moment.
        raise AnnotationError(f"you have already annotated item {item_id}") from exc


# --------------------------------------------------------------------------- skip, flag, undo


def _write_flag(engine: Engine, annotator_id: int, item_id: int, kind: str, note: str | None, now: dt.datetime) -> int:
    def work(conn: Connection) -> int:
        _locked_item(conn, item_id)
        _check_annotator(conn, annotator_id)
        key = {"item": item_id, "annotator": annotator_id, "kind": kind}
        conn.execute(_DROP_LEASE, key)
        existing = conn.execute(_FLAG, key).scalar()
        if existing is not None:  # a double click: one flag is enough
            return existing
        result = conn.execute(_ADD_FLAG, {"item_id": item_id, "annotator_id": annotator_id, "kind": kind, "note": note, "created_at": now})
        return result.inserted_primary_key[0]

    return _in_transaction(engine, work)


def skip(engine: Engine, annotator_id: int, item_id: int, *, now: dt.datetime | None = None) -> int:
    """Pass on an item: its lease is released and it is not offered to this annotator again. Returns the flag id."""
    return _write_flag(engine, annotator_id, item_id, "skip", None, _naive_utc(now))


def flag(engine: Engine, annotator_id: int, item_id: int, kind: str, note: str | None = None, *, now: dt.datetime | None = None) -> int:
    """Report an item as broken or unsafe: released, never offered to this annotator again. Returns the flag id."""
    if kind not in FLAG_CHOICES:
        raise AnnotationError(f"flag kind must be one of {', '.join(FLAG_CHOICES)}; got '{kind}'")
    if note is not None:
        note = str(note).strip()[:MAX_RATIONALE_CHARS] or None
    return _write_flag(engine, annotator_id, item_id, kind, note, _naive_utc(now))


@dataclass(frozen=True)
class Undone:
    """What undo_last removed: the item, shown again, and the answer given, so a page can restore it.
    For a ranking, `choice` is None and `ranking` holds the ranks given (stored order)."""

    item_id: int
    choice: str | None
    strength: int | None
    ranking: tuple[int, ...] | None = None


def undo_last(engine: Engine, annotator_id: int, project_id: int, *, window_seconds: float = 30,
              now: dt.datetime | None = None) -> Undone | None:
    """Delete the annotator's most recent annotation in this project if it is at most `window_seconds`
    old, lease its item back to them (so `next_item` shows it again) and return what was undone;
    None when there is nothing to undo. Refused for unknown and deactivated users."""
    now = _naive_utc(now)

    def work(conn: Connection) -> Undone | None:
        _check_annotator(conn, annotator_id)
        last = conn.execute(_LAST_ANNOTATION, {"annotator": annotator_id, "project": project_id}).first()
        if last is None or last.created_at < now - dt.timedelta(seconds=window_seconds):
            return None
        item = _locked_item(conn, last.item_id)
        project = _project(conn, item.project_id)
        conn.execute(_DROP_ANNOTATION, {"annotation": last.id})
        # The item handed out after the undone one goes back to the pool: the undone one comes first.
        conn.execute(_DROP_PROJECT_LEASES, {"annotator": annotator_id, "project": project.id})
        conn.execute(
            _ADD_LEASE,
            {
                "item_id": last.item_id, "annotator_id": annotator_id, "shown_swapped": bool(last.shown_swapped),
                "shown_order": last.shown_order, "suggestion": last.suggestion,
                "leased_until": now + dt.timedelta(seconds=project.lease_seconds), "created_at": now,
            },
        )
        ranking = tuple(last.ranking) if last.ranking is not None else None
        return Undone(item_id=last.item_id, choice=last.choice, strength=last.strength, ranking=ranking)

    return _in_transaction(engine, work)


# --------------------------------------------------------------------------- progress, gold


COMPLETION_CACHE_SECONDS = 10.0
"""How stale the project completion shown by `progress` may be. completion() reads every annotation
of the project's items (about 0.2 s at 100k items); the annotate page asks for progress after every
item, so twenty annotators would otherwise run it several times a second."""
_completion_cache: "weakref.WeakKeyDictionary[Engine, dict[int, tuple[float, float]]]" = weakref.WeakKeyDictionary()


def progress(engine: Engine, project_id: int, annotator_id: int, *, now: dt.datetime | None = None,
             fresh: bool = False) -> dict:
    """The annotator's annotations in this project today (UTC) and in total (exact), and the project's
    completion (0..1, from annotation.projects.completion, at most COMPLETION_CACHE_SECONDS old, or
    exact with `fresh`: the page asks for that when it says the annotator is done, so that "No items
    left" never stands beside a stale "50%"). Reads only: no write lock on SQLite."""
    now = _naive_utc(now)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    key = {"annotator": annotator_id, "project": project_id, "since": midnight}
    with reading(engine) as session:
        project = session.get(Project, project_id)
        if project is None:
            raise AnnotationError(f"no project with id {project_id}")
        cache = _completion_cache.setdefault(engine, {})
        cached = cache.get(project_id)
        if fresh or cached is None or time.monotonic() - cached[0] > COMPLETION_CACHE_SECONDS:
            cached = cache[project_id] = (time.monotonic(), completion(session, project)["completion"])
        return {
            "today": session.execute(_MINE_SINCE, key).scalar_one(),
            "total": session.execute(_MINE_IN_PROJECT, key).scalar_one(),
            "project_completion": cached[1],
        }


def set_gold(engine: Engine, item_id: int, choice: str | None) -> None:
    """Give an item a known answer (A/B terms), making it a gold item; None makes it a normal item again."""

    def work(conn: Connection) -> None:
        item = _locked_item(conn, item_id)
        if choice is not None and item.responses is not None:
            raise AnnotationError(f"item {item_id} is a ranking of {len(item.responses)} responses; a gold choice applies "
                                  "to items with two responses only")
        if choice is not None:
            allowed = list(_project(conn, item.project_id).choices)
            if choice not in allowed:
                raise AnnotationError(f"gold choice '{choice}' is not allowed for item {item_id}; allowed: {', '.join(allowed)}")
        conn.execute(_SET_GOLD, {"item": item_id, "gold": choice})

    _in_transaction(engine, work)
