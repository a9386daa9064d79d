"""annotation.assign: who gets which item, leases, the k cap, gold mixing, undo, skip/flag, validation.

Every test runs on SQLite and PostgreSQL (the `engine` fixture)."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from sqlalchemy import func, insert, select, text, update

from annotation import assign
from annotation.assign import flag, next_item, progress, set_gold, shown_swapped_for, skip, submit, undo_last
from annotation.errors import AnnotationError
from annotation.projects import create_project
from annotation.store import Annotation, Assignment, Item, ItemFlag, User, transaction, utcnow


def setup(engine, n_items=5, n_users=3, gold=(), **project_kw):
    """A project with n_items items (ids in insertion order), n_users annotators; returns (project_id, [user ids], [item ids])."""
    with transaction(engine) as s:
        project = create_project(s, "p", **project_kw).id
    with engine.begin() as conn:
        # No passwords: argon2 hashing would dominate these tests, and nobody logs in here.
        conn.execute(insert(User), [{"username": f"ann{i}", "role": "annotator", "active": True} for i in range(n_users)])
        conn.execute(
            insert(Item),
            [
                dict(project_id=project, prompt=f"prompt {i}", response_a=f"A{i}", response_b=f"B{i}", content_hash=f"h{i}",
                     meta={}, gold_choice="a" if i in gold else None)
                for i in range(n_items)
            ],
        )
    with transaction(engine) as s:
        items = list(s.scalars(select(Item.id).order_by(Item.id)))
        users = list(s.scalars(select(User.id).order_by(User.id)))
    return project, users, items


def later(seconds):
    return utcnow() + dt.timedelta(seconds=seconds)


def count(engine, model, *where):
    with transaction(engine) as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def test_refresh_returns_the_same_leased_item_and_leases_keep_others_off_it(engine):
    project, (a, b, _), items = setup(engine, n_items=3, overlap=1)
    first = next_item(engine, project, a)
    assert first.item_id == items[0]
    assert next_item(engine, project, a) == first  # a refresh changes nothing
    # k=1 and a holds item 0: b must get a different item.
    assert next_item(engine, project, b).item_id == items[1]
    assert count(engine, Assignment) == 2


def test_an_expired_lease_puts_the_item_back_in_the_pool(engine):
    project, (a, b, c), items = setup(engine, n_items=2, overlap=1, lease_seconds=60)
    assert next_item(engine, project, a).item_id == items[0]
    assert next_item(engine, project, b).item_id == items[1]
    assert next_item(engine, project, c) is None  # both items reserved by live leases
    task = next_item(engine, project, c, now=later(61))
    assert task is not None and task.item_id == items[0]
    assert task.leased_until == pytest.approx(later(61) + dt.timedelta(seconds=60), abs=dt.timedelta(seconds=5))


def test_nobody_sees_an_item_again_after_annotating_skipping_or_flagging_it(engine):
    project, (a, _, _), items = setup(engine, n_items=3, overlap=3)
    seen = []
    for action in ("submit", "skip", "flag"):
        task = next_item(engine, project, a)
        seen.append(task.item_id)
        if action == "submit":
            submit(engine, a, task.item_id, "a")
        elif action == "skip":
            skip(engine, a, task.item_id)
        else:
            flag(engine, a, task.item_id, "unsafe", note="  threatens someone  ")
    assert sorted(seen) == items
    assert next_item(engine, project, a) is None
    assert next_item(engine, project, a, now=later(10_000)) is None  # not even after every lease has expired
    assert count(engine, Assignment) == 0  # skip and flag released their leases
    with transaction(engine) as s:
        flags = {f.kind: f.note for f in s.scalars(select(ItemFlag))}
    assert flags == {"skip": None, "unsafe": "threatens someone"}


def test_each_item_gets_exactly_k_annotations_and_leases_count_towards_k(engine):
    project, users, items = setup(engine, n_items=1, n_users=4, overlap=2)
    a, b, c, d = users
    assert next_item(engine, project, a).item_id == items[0]
    assert next_item(engine, project, b).item_id == items[0]
    assert next_item(engine, project, c) is None  # 0 annotations + 2 live leases = k
    submit(engine, a, items[0], "a")
    submit(engine, b, items[0], "b")
    assert next_item(engine, project, c, now=later(10_000)) is None
    with pytest.raises(AnnotationError, match="not assigned to you"):
        submit(engine, d, items[0], "a")
    assert count(engine, Annotation) == 2
    with transaction(engine) as s:
        assert s.get(Item, items[0]).annotation_count == 2


def test_a_late_submission_is_accepted_only_while_the_item_has_unreserved_room(engine):
    project, (a, b, c), items = setup(engine, n_items=1, overlap=1, lease_seconds=60)
    long_ago = utcnow() - dt.timedelta(seconds=600)
    assert next_item(engine, project, a, now=long_ago).item_id == items[0]  # a's lease expired long ago
    submit(engine, a, items[0], "tie")  # nobody else wanted it: still accepted
    assert count(engine, Annotation) == 1

    project2_items = _second_project(engine, overlap=1)
    assert next_item(engine, project2_items[0], a, now=long_ago).item_id == project2_items[1]
    # b takes the item while a's lease is expired; a's late answer must not push it over k.
    assert next_item(engine, project2_items[0], b).item_id == project2_items[1]
    with pytest.raises(AnnotationError, match="expired .* no longer needs you"):
        submit(engine, a, project2_items[1], "a")
    submit(engine, b, project2_items[1], "b")  # a live lease is always honoured
    assert count(engine, Annotation, Annotation.item_id == project2_items[1]) == 1


def _second_project(engine, overlap):
    with transaction(engine) as s:
        project = create_project(s, "p2", overlap=overlap)
        item = Item(project_id=project.id, prompt="q", response_a="x", response_b="y", content_hash="z", meta={})
        s.add(item)
        s.flush()
        return project.id, item.id


def test_items_closest_to_completion_come_first_then_lowest_id(engine):
    project, users, items = setup(engine, n_items=4, n_users=4, overlap=3)
    a, b, c, d = users
    # Give item 2 two annotations and item 3 one: the queue is then 2, 3, 0, 1.
    for annotator, item in ((a, items[2]), (b, items[2]), (a, items[3])):
        with engine.begin() as conn:
            conn.execute(insert(Annotation).values(item_id=item, annotator_id=annotator, choice="a", criteria={}, shown_swapped=False))
    assert next_item(engine, project, c).item_id == items[2]
    order = []
    while (task := next_item(engine, project, d)) is not None:
        order.append(task.item_id)
        submit(engine, d, task.item_id, "a")
    assert order == [items[3], items[0], items[1]]  # item 2: two annotations + c's lease = k


def test_which_side_is_left_is_random_per_annotator_and_item_but_fixed_and_recorded(engine):
    project, (a, b, _), items = setup(engine, n_items=20, overlap=2)
    for annotator in (a, b):
        while (task := next_item(engine, project, annotator)) is not None:
            i = items.index(task.item_id)
            expect = shown_swapped_for(annotator, task.item_id)
            assert task.shown_swapped == expect
            assert (task.left_text, task.right_text) == ((f"B{i}", f"A{i}") if expect else (f"A{i}", f"B{i}"))
            submit(engine, annotator, task.item_id, "a")
    with transaction(engine) as s:
        rows = s.execute(select(Annotation.annotator_id, Annotation.item_id, Annotation.shown_swapped)).all()
    assert len(rows) == 40
    assert all(swapped == shown_swapped_for(u, i) for u, i, swapped in rows)
    share = sum(swapped for _, _, swapped in rows) / len(rows)
    assert 0.3 < share < 0.7
    # Not the same pattern for both annotators (else position bias and annotator would be confounded).
    assert [shown_swapped_for(a, i) for i in items] != [shown_swapped_for(b, i) for i in items]


def test_gold_items_are_mixed_in_at_the_gold_rate(engine, monkeypatch):
    monkeypatch.setattr(assign, "_rng", random.Random(1234))
    gold = set(range(0, 200, 5))  # 40 gold items among 200
    project, (a, b, c), items = setup(engine, n_items=200, gold=gold, overlap=1, gold_rate=0.25)
    got_gold = 0
    for _ in range(80):
        task = next_item(engine, project, a)
        assert task.is_gold == (items.index(task.item_id) in gold)
        got_gold += task.is_gold
        submit(engine, a, task.item_id, "b")
    # Binomial(80, 0.25): mean 20, sd 3.9 (the regular queue alone never offers gold: 0).
    # The seeded draw keeps this deterministic.
    assert 10 <= got_gold <= 30


class AlwaysGold(random.Random):
    def random(self):
        return 0.0


def test_gold_items_are_not_capped_at_k_so_every_annotator_meets_them(engine, monkeypatch):
    monkeypatch.setattr(assign, "_rng", AlwaysGold())
    project, users, items = setup(engine, n_items=4, gold={3}, overlap=1, gold_rate=0.5)
    for annotator in users:
        task = next_item(engine, project, annotator)
        assert task.item_id == items[3] and task.is_gold
        submit(engine, annotator, task.item_id, "a")
    assert count(engine, Annotation, Annotation.item_id == items[3]) == 3  # k=1 does not apply to gold
    # With the gold used up, the same draw falls back to regular items.
    assert next_item(engine, project, users[0]).item_id == items[0]


def test_gold_rate_zero_never_offers_gold_and_gold_is_not_offered_when_regular_items_run_out(engine):
    project, (a, _, _), items = setup(engine, n_items=6, gold={0, 1, 2}, overlap=1, gold_rate=0.0)
    got = []
    while (task := next_item(engine, project, a)) is not None:
        got.append(task.item_id)
        submit(engine, a, task.item_id, "a")
    assert got == items[3:]


def test_undo_within_the_window_deletes_the_annotation_and_shows_the_item_again(engine):
    project, (a, _, _), items = setup(engine, n_items=3, overlap=1)
    first = next_item(engine, project, a)
    submit(engine, a, first.item_id, "a", strength=3)
    second = next_item(engine, project, a)
    assert second.item_id != first.item_id
    undone = undo_last(engine, a, project)
    # What was undone comes back, so the page can restore the earlier choice.
    assert (undone.item_id, undone.choice, undone.strength) == (first.item_id, "a", 3)
    assert count(engine, Annotation) == 0
    again = next_item(engine, project, a)
    assert again.item_id == first.item_id and again.shown_swapped == first.shown_swapped
    # The item handed out after the undone one went back to the pool.
    assert count(engine, Assignment, Assignment.item_id == second.item_id) == 0
    submit(engine, a, again.item_id, "b")
    assert undo_last(engine, a, project, window_seconds=30, now=later(31)) is None  # too late
    assert count(engine, Annotation) == 1
    with pytest.raises(AnnotationError, match="no user with id 999999"):
        undo_last(engine, 999_999, project)


def test_undo_stays_in_its_project(engine):
    """Z in project B must not undo an answer given in project A."""
    project_a, (a, _, _), _ = setup(engine, n_items=2, overlap=1)
    with transaction(engine) as s:
        project_b = create_project(s, "other", overlap=1).id
    with engine.begin() as conn:
        conn.execute(insert(Item).values(project_id=project_b, prompt="q", response_a="x", response_b="y", content_hash="hb", meta={}))
    task = next_item(engine, project_a, a)
    submit(engine, a, task.item_id, "b")
    assert undo_last(engine, a, project_b) is None
    assert count(engine, Annotation) == 1
    assert undo_last(engine, a, project_a).item_id == task.item_id


def test_a_deactivated_user_cannot_undo(engine):
    project, (a, _, _), _ = setup(engine, n_items=2, overlap=1)
    task = next_item(engine, project, a)
    submit(engine, a, task.item_id, "a")
    with engine.begin() as conn:
        conn.execute(update(User).where(User.id == a).values(active=False))
    with pytest.raises(AnnotationError, match="deactivated"):
        undo_last(engine, a, project)
    assert count(engine, Annotation) == 1 and count(engine, Assignment) == 0


def test_validation_errors_say_what_was_wrong(engine):
    project, (a, b, _), items = setup(engine, n_items=2, overlap=2, choices=["a", "b"], criteria=["helpfulness", "harmlessness"])
    task = next_item(engine, project, a)
    cases = [
        (dict(choice="tie"), "choice 'tie' is not allowed .* allowed: a, b"),
        (dict(choice="left"), "choice 'left' is not allowed"),
        (dict(choice="a", strength=0), "strength must be 1"),
        (dict(choice="a", strength=4), "strength must be 1"),
        (dict(choice="a", strength=True), "strength must be 1"),
        (dict(choice="a", criteria={"honesty": "a"}), "unknown criteria honesty .* helpfulness, harmlessness"),
        (dict(choice="a", criteria={"helpfulness": "tie"}), "criterion 'helpfulness': choice 'tie' is not allowed"),
        (dict(choice="a", criteria=["helpfulness"]), "criteria must be a mapping"),
        (dict(choice="a", duration_ms=-5), "duration_ms must be a non-negative"),
        (dict(choice="a", rationale="x" * 20_001), "at most 20000"),
    ]
    for kwargs, message in cases:
        kwargs = dict(kwargs)
        with pytest.raises(AnnotationError, match=message):
            submit(engine, a, task.item_id, kwargs.pop("choice"), **kwargs)
    assert count(engine, Annotation) == 0  # nothing half-written
    submit(engine, a, task.item_id, "b", strength=2, criteria={"helpfulness": "b", "harmlessness": None}, rationale="  clearer  ", duration_ms=1200)
    with pytest.raises(AnnotationError, match="already annotated"):
        submit(engine, a, task.item_id, "a")
    with pytest.raises(AnnotationError, match="no item with id"):
        submit(engine, a, 10**9, "a")
    with pytest.raises(AnnotationError, match="flag kind must be one of broken, unsafe"):
        flag(engine, a, items[1], "boring")
    with pytest.raises(AnnotationError, match="no project with id"):
        next_item(engine, 10**9, a)
    with transaction(engine) as s:
        saved = s.scalars(select(Annotation)).one()
    assert (saved.choice, saved.strength, saved.criteria, saved.rationale, saved.duration_ms) == ("b", 2, {"helpfulness": "b"}, "clearer", 1200)
    assert saved.shown_swapped == task.shown_swapped


def test_a_deactivated_annotator_gets_nothing_and_cannot_submit(engine):
    project, (a, _, _), items = setup(engine, n_items=2, overlap=1)
    task = next_item(engine, project, a)
    with transaction(engine) as s:
        s.get(User, a).active = False
    with pytest.raises(AnnotationError, match="deactivated"):
        next_item(engine, project, a)
    with pytest.raises(AnnotationError, match="deactivated"):
        submit(engine, a, task.item_id, "a")


def test_progress_counts_today_total_and_project_completion(engine):
    project, (a, b, _), items = setup(engine, n_items=4, overlap=2)
    for annotator, n in ((a, 3), (b, 1)):
        for _ in range(n):
            task = next_item(engine, project, annotator)
            submit(engine, annotator, task.item_id, "a")
    with engine.begin() as conn:  # one of a's annotations was made yesterday
        oldest = conn.scalar(select(func.min(Annotation.id)).where(Annotation.annotator_id == a))
        conn.execute(update(Annotation).where(Annotation.id == oldest).values(created_at=utcnow() - dt.timedelta(days=1, hours=1)))
    assert progress(engine, project, a) == {"today": 2, "total": 3, "project_completion": pytest.approx(4 / 8)}
    assert progress(engine, project, b)["total"] == 1


def test_set_gold_validates_the_choice_and_can_clear_it(engine):
    project, _, items = setup(engine, n_items=1, choices=["a", "b", "tie"])
    set_gold(engine, items[0], "tie")
    with transaction(engine) as s:
        assert s.get(Item, items[0]).gold_choice == "tie"
    with pytest.raises(AnnotationError, match="gold choice 'both_bad' is not allowed .* a, b, tie"):
        set_gold(engine, items[0], "both_bad")
    set_gold(engine, items[0], None)
    with transaction(engine) as s:
        assert s.get(Item, items[0]).gold_choice is None
    with pytest.raises(AnnotationError, match="no item with id"):
        set_gold(engine, 10**9, "a")


def test_annotation_count_is_kept_by_the_database_for_every_writer(engine):
    """The queue relies on items.annotation_count; the triggers of migration 0002 must keep it equal to
    the true count whoever writes annotations (this API, a raw insert, a delete, a cascade)."""
    project, users, items = setup(engine, n_items=3, n_users=3, overlap=3)
    with engine.begin() as conn:
        for u in users:
            conn.execute(insert(Annotation).values(item_id=items[0], annotator_id=u, choice="a", criteria={}, shown_swapped=False))
        conn.execute(insert(Annotation).values(item_id=items[1], annotator_id=users[0], choice="a", criteria={}, shown_swapped=False))
        conn.execute(text("DELETE FROM annotations WHERE item_id = :i AND annotator_id = :u"), {"i": items[0], "u": users[2]})
        conn.execute(update(Annotation).where(Annotation.item_id == items[1]).values(item_id=items[2]))
    task = next_item(engine, project, users[2])
    submit(engine, users[2], task.item_id, "b")
    undo_last(engine, users[2], project)
    with transaction(engine) as s:
        kept = dict(s.execute(select(Item.id, Item.annotation_count)).all())
        true = dict(s.execute(select(Annotation.item_id, func.count()).group_by(Annotation.item_id)).all())
    assert kept == {i: true.get(i, 0) for i in items}
    assert kept[items[0]] == 2 and kept[items[2]] == 1


def test_progress_reuses_a_recent_project_completion_but_counts_the_annotators_own_work_exactly(engine, monkeypatch):
    project, (a, b, _), items = setup(engine, n_items=2, overlap=1)
    assert progress(engine, project, a)["project_completion"] == 0.0
    task = next_item(engine, project, b)
    submit(engine, b, task.item_id, "a")
    assert progress(engine, project, b) == {"today": 1, "total": 1, "project_completion": 0.0}  # completion cached
    # When the page says "no items left" it asks for the exact figure.
    assert progress(engine, project, b, fresh=True)["project_completion"] == pytest.approx(0.5)
    monkeypatch.setattr(assign, "COMPLETION_CACHE_SECONDS", 0.0)
    assert progress(engine, project, b)["project_completion"] == pytest.approx(0.5)


def test_a_lease_in_one_project_does_not_leak_into_another(engine):
    project, (a, _, _), items = setup(engine, n_items=1, overlap=1)
    other_project, other_item = _second_project(engine, overlap=1)
    assert next_item(engine, project, a).item_id == items[0]
    assert next_item(engine, other_project, a).item_id == other_item
    assert next_item(engine, project, a).item_id == items[0]  # both leases live, each in its project
    assert progress(engine, other_project, a)["total"] == 0


class FakeDriverError(Exception):
    def __init__(self, sqlstate):
        super().__init__(f"driver error {sqlstate}")
        self.sqlstate = sqlstate


def test_deadlocks_and_serialization_failures_are_retried_but_other_errors_are_not(sqlite_engine):
    from sqlalchemy.exc import IntegrityError, OperationalError

    calls = []

    def flaky(conn):
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, FakeDriverError("40P01" if len(calls) == 1 else "40001"))
        return "done"

    assert assign._in_transaction(sqlite_engine, flaky) == "done"
    assert len(calls) == 3

    def always_deadlocked(conn):
        calls.append(1)
        raise OperationalError("SELECT 1", {}, FakeDriverError("40P01"))

    calls.clear()
    with pytest.raises(OperationalError):
        assign._in_transaction(sqlite_engine, always_deadlocked)
    assert len(calls) == assign.MAX_ATTEMPTS  # bounded

    def duplicate(conn):
        calls.append(1)
        raise IntegrityError("INSERT", {}, FakeDriverError("23505"))

    calls.clear()
    with pytest.raises(IntegrityError):
        assign._in_transaction(sqlite_engine, duplicate)
    assert len(calls) == 1


def test_one_annotator_in_two_tabs_at_once_still_holds_one_lease(engine):
    import threading

    project, (a, _, _), items = setup(engine, n_items=10, overlap=1)
    errors = []
    for _ in range(6):
        got, start = [], threading.Barrier(2)

        def tab():
            start.wait()
            try:
                got.append(next_item(engine, project, a).item_id)
            except Exception as exc:  # reported below
                errors.append(exc)

        tabs = [threading.Thread(target=tab) for _ in range(2)]
        for t in tabs:
            t.start()
        for t in tabs:
            t.join()
        assert not errors
        assert got[0] == got[1]  # both tabs show the same item...
        assert count(engine, Assignment) == 1  # ...and only one is held
        skip(engine, a, got[0])
