"""The issue's must-show for annotation.assign: 20 annotators working at once until a 500-item, k=3
project is complete leave exactly 1,500 annotations: no duplicates, no item over k, none lost.

Threads sharing one engine run on SQLite (a file database, WAL) and PostgreSQL. Spawned processes
(4 processes of 5 annotator threads, an engine per process: 20 interpreters would cost the busy
2-core test machine more than the whole test) run on SQLite, where separate processes contend
through the file's locks. On PostgreSQL every connection is its own server process whether the
clients are threads or processes, so the thread test already exercises it.

Annotators also misbehave now and then: they double-submit (a double click), which must be refused
without effect, and they let a lease expire (simulated by asking for an item "an hour ago"), then
either walk away, so the item must return to the pool, or submit late, which must be accepted only
while the item has room that nobody else's live lease has reserved.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import random
import threading

import pytest
from sqlalchemy import func, insert, select

from annotation.assign import next_item, shown_swapped_for, submit
from annotation.errors import AnnotationError
from annotation.store import Annotation, Assignment, Item, Project, User, init_db, make_engine, utcnow

N_ITEMS, K, N_ANNOTATORS = 500, 3, 20


def annotate_until_done(engine, project_id: int, annotator_id: int) -> dict:
    """One annotator's session: take the next item and judge it until nothing is left for them.

    Returns the ids of the annotations the API acknowledged, and any unexpected error."""
    rng = random.Random(annotator_id)
    acknowledged, refused_doubles, expired, error = [], 0, 0, None
    try:
        for _ in range(N_ITEMS + 1):  # an annotator can take each item at most once
            if rng.random() < 0.04:
                stale = next_item(engine, project_id, annotator_id, now=utcnow() - dt.timedelta(hours=1))
                if stale is not None:
                    expired += 1
                    if rng.random() < 0.5:  # submit late; otherwise walk away
                        try:
                            acknowledged.append(submit(engine, annotator_id, stale.item_id, "b"))
                        except AnnotationError as exc:
                            if "no longer needs you" not in str(exc):
                                raise
            task = next_item(engine, project_id, annotator_id)
            if task is None:
                break
            acknowledged.append(submit(engine, annotator_id, task.item_id, rng.choice(["a", "b", "tie"]), strength=rng.randint(1, 3)))
            if rng.random() < 0.05:
                try:
                    submit(engine, annotator_id, task.item_id, "a")
                except AnnotationError:
                    refused_doubles += 1
    except Exception as exc:  # reported to the test, which fails with it
        error = f"annotator {annotator_id}: {type(exc).__name__}: {exc}"
    return {"acknowledged": acknowledged, "refused_doubles": refused_doubles, "expired": expired, "error": error}


def annotate_in_threads(url_or_engine, project_id: int, annotator_ids: list[int]) -> list[dict]:
    """All these annotators at once, one thread each, sharing one engine with a connection each."""
    engine = make_engine(url_or_engine, pool_size=len(annotator_ids), max_overflow=5) if isinstance(url_or_engine, str) else url_or_engine
    results: list[dict] = [{"acknowledged": [], "refused_doubles": 0, "expired": 0, "error": f"annotator {a}: thread did not finish"} for a in annotator_ids]

    def run(slot: int, annotator_id: int) -> None:
        results[slot] = annotate_until_done(engine, project_id, annotator_id)

    threads = [threading.Thread(target=run, args=(slot, a)) for slot, a in enumerate(annotator_ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    if isinstance(url_or_engine, str):
        engine.dispose()
    return results


def _process_entry(args) -> list[dict]:
    return annotate_in_threads(*args)


def build_project(engine) -> tuple[int, list[int]]:
    with engine.begin() as conn:
        # No passwords: argon2 for 20 users would cost more than the test; these users never log in.
        conn.execute(insert(User), [{"username": f"a{i}", "role": "annotator", "active": True} for i in range(N_ANNOTATORS)])
        project_id = conn.execute(insert(Project).values(name="concurrency", overlap=K, choices=["a", "b", "tie", "both_bad"], criteria=[])).inserted_primary_key[0]
        conn.execute(
            insert(Item),
            [
                {"project_id": project_id, "prompt": f"prompt {i}", "response_a": "A", "response_b": "B", "content_hash": f"{i:064d}", "meta": {}}
                for i in range(N_ITEMS)
            ],
        )
        annotators = list(conn.execute(select(User.id).order_by(User.id)).scalars())
    return project_id, annotators


def check_complete(engine, results: list[dict]) -> None:
    errors = [r["error"] for r in results if r["error"]]
    assert not errors, errors
    acknowledged = [i for r in results for i in r["acknowledged"]]
    with engine.connect() as conn:
        rows = conn.execute(select(Annotation.id, Annotation.item_id, Annotation.annotator_id, Annotation.shown_swapped)).all()
        per_item = dict(conn.execute(select(Item.id, func.count(Annotation.id)).outerjoin(Annotation).group_by(Item.id)).all())
        kept_counts = dict(conn.execute(select(Item.id, Item.annotation_count)).all())
        leases_left = conn.scalar(select(func.count()).select_from(Assignment))
    assert len(rows) == N_ITEMS * K == 1500
    assert len({(item, annotator) for _, item, annotator, _ in rows}) == len(rows)  # no one annotated an item twice
    assert set(per_item.values()) == {K}  # every item exactly k: none over, none short
    assert sorted(acknowledged) == sorted(row.id for row in rows)  # every acknowledged annotation exists, and only those
    assert kept_counts == per_item
    assert leases_left == 0
    assert all(swapped == shown_swapped_for(annotator, item) for _, item, annotator, swapped in rows)
    assert sum(r["refused_doubles"] for r in results) > 0  # the double clicks really happened, and were refused
    assert sum(r["expired"] for r in results) > 0  # and so did the expired leases


@pytest.fixture
def project(db_url):
    engine = init_db(db_url)
    project_id, annotators = build_project(engine)
    yield engine, project_id, annotators
    engine.dispose()


def test_twenty_annotator_threads_complete_the_project_exactly(db_url, project):
    setup_engine, project_id, annotators = project
    results = annotate_in_threads(db_url, project_id, annotators)
    check_complete(setup_engine, results)


PROCESSES = 4


def test_twenty_annotators_in_four_processes_complete_the_project_exactly(db_url, project):
    if not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL serves every connection from its own server process: the thread test covers it")
    setup_engine, project_id, annotators = project
    groups = [annotators[i::PROCESSES] for i in range(PROCESSES)]
    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
        results = [r for group in pool.map(_process_entry, [(db_url, project_id, g) for g in groups], chunksize=1) for r in group]
    assert len(results) == N_ANNOTATORS
    check_complete(setup_engine, results)
