"""Ranking items (3 to 6 responses): migration 0004, the `responses` import layout, assignment and
submit_ranking, pairs and margins on export, Kendall's W and ordinal alpha, the CLI, and the
Annotate page (AppTest; the real-browser test is tests/test_browser_rankings.py).

    .venv/bin/python -m pytest tests/test_rankings.py

Store tests run on SQLite and PostgreSQL (the `engine` / `db_url` fixtures).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import krippendorff
import numpy as np
import pandas as pd
import pytest
from scipy.stats import friedmanchisquare, spearmanr
from sqlalchemy import func, insert, select, text, update

from annotation import agreement as ag
from annotation.aggregate import ranking_votes
from annotation.assign import (
    check_ranking,
    groups_from_ranks,
    next_item,
    ranks_from_groups,
    set_gold,
    shown_order_for,
    submit,
    submit_ranking,
    undo_last,
)
from annotation.errors import AnnotationError, InputError
from annotation.io import FORMATS, export, import_file, project_pairs
from annotation.projects import create_project
from annotation.store import Annotation, Assignment, Item, User, init_db, make_engine, migrations_dir, transaction

REPO = Path(__file__).resolve().parent.parent
ANNOTATE = REPO / "app" / "pages" / "1_Annotate.py"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def setup_rankings(engine, responses_per_item=(4, 4, 3), n_users=3, pairs=0, **project_kw):
    """A project 'r' with ranking items of the given sizes (then `pairs` two-response items) and n_users
    annotators without passwords; returns (project_id, [user ids], [item ids])."""
    with transaction(engine) as s:
        project = create_project(s, "r", **project_kw).id
    with engine.begin() as conn:
        conn.execute(insert(User), [{"username": f"ann{i}", "role": "annotator", "active": True} for i in range(n_users)])
        rows = [
            dict(project_id=project, prompt=f"rank {i}", response_a="", response_b="", content_hash=f"r{i}", meta={},
                 responses=[{"text": f"item {i} response {j}", "source": f"m{j}"} for j in range(n)])
            for i, n in enumerate(responses_per_item)
        ]
        rows += [dict(project_id=project, prompt=f"pair {i}", response_a=f"A{i}", response_b=f"B{i}", content_hash=f"p{i}",
                      meta={}, responses=None) for i in range(pairs)]
        conn.execute(insert(Item), rows)
    with transaction(engine) as s:
        items = list(s.scalars(select(Item.id).order_by(Item.id)))
        users = list(s.scalars(select(User.id).order_by(User.id)))
    return project, users, items


def annotation_rows(engine):
    with engine.connect() as conn:
        return conn.execute(select(Annotation.__table__).order_by(Annotation.id)).all()


# --------------------------------------------------------------------------- migration 0004


def _alembic(engine, url, command_name, revision):
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, command_name)(cfg, revision)


def test_migration_0004_on_a_database_with_data_keeps_rows_constraints_and_the_count_triggers(db_url):
    """0004 recreates `annotations` on SQLite (choice becomes nullable), which drops its triggers
    (0002's note): after the upgrade every writer still keeps items.annotation_count, the unique
    (item, annotator) constraint and the cascade from items still hold, and the data is all there.
    The downgrade deletes ranking rows, keeps the counts right and leaves 0003's schema."""
    engine = make_engine(db_url)
    _alembic(engine, db_url, "upgrade", "0003")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (username, role, active, created_at) VALUES ('u1', 'annotator', true, '2026-01-01'),"
                          " ('u2', 'annotator', true, '2026-01-01'), ('u3', 'annotator', true, '2026-01-01')"))
        conn.execute(text("INSERT INTO projects (name, guidelines, overlap, choices, criteria, gold_rate, lease_seconds, created_at)"
                          " VALUES ('p', '', 3, '[\"a\",\"b\"]', '[]', 0, 600, '2026-01-01')"))
        for i in (1, 2):
            conn.execute(text("INSERT INTO items (project_id, prompt, response_a, response_b, metadata, content_hash, created_at)"
                              " VALUES (1, '\"q\"', 'a', 'b', '{}', :h, '2026-01-01')"), {"h": f"h{i}"})
        conn.execute(text("INSERT INTO annotations (item_id, annotator_id, choice, strength, criteria, shown_swapped, created_at)"
                          " VALUES (1, 1, 'a', 2, '{}', true, '2026-01-01'), (1, 2, 'b', NULL, '{}', false, '2026-01-01')"))
    _alembic(engine, db_url, "upgrade", "head")

    with engine.begin() as conn:
        kept = [tuple(r) for r in conn.execute(text("SELECT item_id, annotator_id, choice, strength FROM annotations ORDER BY id"))]
        assert kept == [(1, 1, "a", 2), (1, 2, "b", None)]
        assert conn.scalar(text("SELECT annotation_count FROM items WHERE id = 1")) == 2
        conn.execute(text("INSERT INTO annotations (item_id, annotator_id, choice, criteria, shown_swapped, ranking, shown_order, created_at)"
                          " VALUES (2, 1, NULL, '{}', false, '[1, 2]', '[1, 0]', '2026-01-01')"))
        conn.execute(text("UPDATE annotations SET item_id = 2 WHERE annotator_id = 2"))
        counts = dict(conn.execute(text("SELECT id, annotation_count FROM items")).all())
        assert counts == {1: 1, 2: 2}
    with pytest.raises(Exception):  # the unique constraint survived the table's recreation
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO annotations (item_id, annotator_id, choice, criteria, shown_swapped, created_at)"
                              " VALUES (2, 1, 'a', '{}', false, '2026-01-01')"))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM items WHERE id = 1"))  # cascades to its annotation
        assert conn.scalar(text("SELECT count(*) FROM annotations")) == 2
        assert conn.scalar(text("SELECT annotation_count FROM items WHERE id = 2")) == 2

    _alembic(engine, db_url, "downgrade", "0003")
    with engine.begin() as conn:
        # the ranking (choice NULL) is gone and the count says so; the triggers are back and work
        assert conn.scalar(text("SELECT annotation_count FROM items WHERE id = 2")) == 1
        conn.execute(text("INSERT INTO annotations (item_id, annotator_id, choice, criteria, shown_swapped, created_at)"
                          " VALUES (2, 3, 'a', '{}', false, '2026-01-01')"))
        assert conn.scalar(text("SELECT annotation_count FROM items WHERE id = 2")) == 2
    from sqlalchemy import inspect

    columns = {c["name"]: c for c in inspect(engine).get_columns("annotations")}
    assert "ranking" not in columns and not columns["choice"]["nullable"]
    assert "responses" not in {c["name"] for c in inspect(engine).get_columns("items")}
    _alembic(engine, db_url, "upgrade", "head")
    engine.dispose()


def test_the_migrated_schema_matches_the_models(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from annotation.store import Base

    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    # login_sessions / login_failures are created by 0003 and modelled in annotation.sessions (not in Base)
    ours = [d for d in diff if "login_" not in repr(d)]
    assert ours == []


def test_ranking_annotations_count_towards_annotation_count(engine):
    project, users, items = setup_rankings(engine, (3,), overlap=3)
    for u in users[:2]:
        task = next_item(engine, project, u)
        submit_ranking(engine, u, task.item_id, [1, 2, 3])
    with engine.begin() as conn:
        conn.execute(insert(Annotation).values(item_id=items[0], annotator_id=users[2], ranking=[3, 2, 1], criteria={}, shown_swapped=False))
    undo_last(engine, users[1], project)
    with transaction(engine) as s:
        assert s.get(Item, items[0]).annotation_count == 2
        assert s.scalar(select(func.count()).select_from(Annotation)) == 2


# --------------------------------------------------------------------------- import


def test_responses_layout_imports_ranking_items_and_pairs(engine, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q1", "responses": ["one", {"text": "two", "source": "model-x"}, "three", "four"], "id": "q1", "note": "kept"},
        {"prompt": [{"role": "user", "content": "hi"}], "responses": ["hello", "hey"], "gold_choice": "b"},
        {"prompt": "q3", "responses": [f"r{i}" for i in range(6)]},
    ])
    assert "responses" in FORMATS
    report = import_file(engine, path, "p")
    assert (report.format, report.items_added, report.ranking_items_added) == ("responses", 3, 2)
    with engine.connect() as conn:
        rows = conn.execute(select(Item.__table__).order_by(Item.id)).all()
    first, pair, six = rows
    assert first.responses == [{"text": "one", "source": None}, {"text": "two", "source": "model-x"},
                               {"text": "three", "source": None}, {"text": "four", "source": None}]
    assert (first.response_a, first.response_b, first.source_a, first.external_id) == ("", "", None, "q1")
    assert first.metadata == {"extra": {"note": "kept"}}
    # two responses are an ordinary pair, responses[0] as A
    assert (pair.responses, pair.response_a, pair.response_b, pair.gold_choice) == (None, "hello", "hey", "b")
    assert len(six.responses) == 6
    # the same responses in another order are the same item: re-importing adds nothing
    again = write_jsonl(tmp_path / "again.jsonl", [{"prompt": "q1", "responses": ["four", "three", "two", "one"]}])
    assert import_file(engine, again, "p").duplicates == 1
    # a pair given as responses is the same item as the pairs layout
    assert import_file(engine, write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": [{"role": "user", "content": "hi"}], "response_a": "hey", "response_b": "hello"}]), "p").duplicates == 1


BAD_RESPONSES = [
    ({"prompt": "q", "responses": "one"}, "responses", "wrong type: string"),
    ({"prompt": "q", "responses": ["only one"]}, "responses", "1 response(s)"),
    ({"prompt": "q", "responses": [f"r{i}" for i in range(7)]}, "responses", "2 to 6 responses"),
    ({"prompt": "q", "responses": ["a", 3, "c"]}, "responses[1]", "wrong type: number"),
    ({"prompt": "q", "responses": ["a", {"text": "b", "score": 2}, "c"]}, "responses[1]", "unknown key(s) score"),
    ({"prompt": "q", "responses": ["a", {"source": "m"}, "c"]}, "responses[1].text", "missing"),
    ({"prompt": "q", "responses": ["a", "  ", "c"]}, "responses[1]", "empty string"),
    ({"prompt": "q", "responses": ["a", "b", "a"]}, "responses[2]", "the same text as responses[0]"),
    ({"prompt": "q", "responses": ["a", {"text": "b", "source": "x" * 201}, "c"]}, "responses[1].source", "201 characters"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "gold_choice": "a"}, "gold_choice", "given for 3 responses"),
    ({"responses": ["a", "b", "c"]}, "prompt", "missing"),
]


@pytest.mark.parametrize("row,field,problem", BAD_RESPONSES)
def test_bad_responses_rows_name_file_line_and_field_and_write_nothing(engine, tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "responses": ["x", "y", "z"]}, row])
    with pytest.raises(InputError) as info:
        import_file(engine, path, "p")
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and field in message and problem in message, message
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Item.__table__)) == 0
        assert conn.scalar(text("SELECT count(*) FROM projects")) == 0  # all or nothing: not even the project


def test_responses_and_pairs_layouts_do_not_mix_in_one_file(engine, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "q", "responses": ["x", "y", "z"]},
                                                 {"prompt": "q", "response_a": "x", "response_b": "y"}])
    with pytest.raises(InputError, match="mixed formats: this line is items but line 1 made the file responses"):
        import_file(engine, path, "p")
    with pytest.raises(InputError, match="mixed formats: this line is responses but --format is items"):
        import_file(engine, path, "p", format="pairs")


# --------------------------------------------------------------------------- assignment


def test_ranking_items_are_shown_in_a_recorded_order_random_per_annotator_and_item(engine):
    project, users, items = setup_rankings(engine, (4, 4, 4, 4, 4, 4), n_users=3, overlap=3)
    orders = set()
    for u in users:
        for _ in range(len(items)):
            task = next_item(engine, project, u)
            assert task.is_ranking and task.left_text == task.right_text == ""
            assert next_item(engine, project, u) == task  # a refresh shows the same order
            assert task.shown_order == shown_order_for(u, task.item_id, 4)
            stored = [f"item {items.index(task.item_id)} response {j}" for j in range(4)]
            assert list(task.responses) == [stored[i] for i in task.shown_order]
            orders.add(task.shown_order)
            submit_ranking(engine, u, task.item_id, [1, 2, 3, 4])
    assert len(orders) > 3  # not one fixed order for everyone
    rows = annotation_rows(engine)
    assert all(r.shown_order == list(shown_order_for(r.annotator_id, r.item_id, 4)) and r.choice is None for r in rows)
    assert all(r.ranking == [1, 2, 3, 4] and r.shown_swapped is False for r in rows)


def test_k_cap_leases_and_nobody_twice_hold_for_ranking_items(engine):
    project, (a, b, c), items = setup_rankings(engine, (3,), n_users=3, overlap=2)
    first, second = next_item(engine, project, a), next_item(engine, project, b)
    assert first.item_id == second.item_id == items[0]
    assert next_item(engine, project, c) is None  # two live leases fill k = 2
    submit_ranking(engine, a, items[0], [2, 1, 3])
    with pytest.raises(AnnotationError, match="already annotated"):
        submit_ranking(engine, a, items[0], [1, 2, 3])
    assert next_item(engine, project, a) is None
    with pytest.raises(AnnotationError, match="not assigned to you"):
        submit_ranking(engine, c, items[0], [1, 2, 3])
    submit_ranking(engine, b, items[0], [1, 1, 3])
    with transaction(engine) as s:
        assert s.get(Item, items[0]).annotation_count == 2
        assert s.scalar(select(func.count()).select_from(Assignment)) == 0


@pytest.mark.parametrize("ranks,message", [
    ([1, 2], "has 2 ranks but the item has 3 responses"),
    ([1, 2, 3, 4], "has 4 ranks"),
    ([0, 1, 2], r"ranking\[0\] is 0; expected a whole number from 1 \(best\) to 3"),
    ([1, 2, 4], r"ranking\[2\] is 4"),
    ([1, True, 3], r"ranking\[1\] is True"),
    ([1, 2.5, 3], r"ranking\[1\] is 2.5"),
    ([1, 1, 2], r"not a ranking with ties.*\[1, 1, 3\]"),
    ([2, 2, 2], r"not a ranking with ties.*\[1, 1, 1\]"),
    ("123", "must be a list of 3 ranks"),
    (None, "must be a list of 3 ranks"),
])
def test_submit_ranking_refuses_ranks_that_are_not_a_ranking(engine, ranks, message):
    project, (a, *_), items = setup_rankings(engine, (3,))
    next_item(engine, project, a)
    with pytest.raises(AnnotationError, match=message):
        submit_ranking(engine, a, items[0], ranks)
    assert annotation_rows(engine) == []


def test_check_ranking_accepts_every_ranking_with_ties():
    assert check_ranking([1, 2, 3], 3) == [1, 2, 3]
    assert check_ranking((2, 1, 2, 4), 4) == [2, 1, 2, 4]
    assert check_ranking(np.array([1, 1, 1]), 3) == [1, 1, 1]
    assert check_ranking([3, 1, 1], 3) == [3, 1, 1]


def test_a_choice_for_a_ranking_item_and_a_ranking_for_a_pair_are_refused(engine):
    project, (a, b, _), items = setup_rankings(engine, (3,), pairs=1, overlap=1)
    ranking_task, pair_task = next_item(engine, project, a), next_item(engine, project, b)
    assert ranking_task.is_ranking and not pair_task.is_ranking
    with pytest.raises(AnnotationError, match="is a ranking of 3 responses: rank them"):
        submit(engine, a, ranking_task.item_id, "a")
    with pytest.raises(AnnotationError, match="has two responses: choose between them"):
        submit_ranking(engine, b, pair_task.item_id, [1, 2])
    with pytest.raises(AnnotationError, match="a gold choice applies to items with two responses only"):
        set_gold(engine, ranking_task.item_id, "a")
    # both leases survived the refusals: the right call still goes through
    submit_ranking(engine, a, ranking_task.item_id, [1, 3, 2])
    submit(engine, b, pair_task.item_id, "b")
    assert [r.choice for r in annotation_rows(engine)] == [None, "b"]


def test_undo_of_a_ranking_gives_it_back_in_the_same_order(engine):
    project, (a, *_), items = setup_rankings(engine, (5,))
    task = next_item(engine, project, a)
    submit_ranking(engine, a, task.item_id, [5, 1, 2, 2, 4], rationale="  second is clearest ", duration_ms=900)
    row = annotation_rows(engine)[0]
    assert (row.rationale, row.duration_ms) == ("second is clearest", 900)
    undone = undo_last(engine, a, project)
    assert undone.item_id == task.item_id and undone.choice is None and undone.ranking == (5, 1, 2, 2, 4)
    again = next_item(engine, project, a)
    assert again.shown_order == task.shown_order and again.responses == task.responses


def test_places_and_ranks_convert_both_ways():
    order = (2, 0, 3, 1)  # position p shows stored response order[p]
    groups = [[1], [0, 3], [2]]  # shown 2 best, shown 1 and 4 tied second, shown 3 last
    ranks = ranks_from_groups(groups, order)
    assert ranks == [1, 2, 2, 4]  # stored 0 (shown 2nd) best; stored 2 and 1 (shown 1st, 4th) tied; stored 3 (shown 3rd) last
    assert groups_from_ranks(ranks, order) == [[1], [0, 3], [2]]
    with pytest.raises(AnnotationError, match="placed exactly once"):
        ranks_from_groups([[0], [1]], order)


# --------------------------------------------------------------------------- concurrency


N_RANK_ITEMS, N_PAIRS, K, N_THREADS = 60, 6, 3, 12


def _annotate_until_done(engine, project_id, annotator_id, results, slot):
    rng = np.random.default_rng(annotator_id)
    done, doubles, error = [], 0, None
    try:
        for _ in range(N_RANK_ITEMS + N_PAIRS + 1):  # an annotator can take each item at most once
            task = next_item(engine, project_id, annotator_id)
            if task is None:
                break
            if task.is_ranking:
                scores = rng.integers(0, 3, len(task.responses))
                ranks = [1 + int((scores < s).sum()) for s in scores]
                done.append(submit_ranking(engine, annotator_id, task.item_id, ranks))
                if rng.random() < 0.1:
                    try:
                        submit_ranking(engine, annotator_id, task.item_id, ranks)
                    except AnnotationError:
                        doubles += 1
            else:
                done.append(submit(engine, annotator_id, task.item_id, "a"))
    except Exception as exc:  # reported to the test, which fails with it
        error = f"annotator {annotator_id}: {type(exc).__name__}: {exc}"
    results[slot] = {"acknowledged": done, "doubles": doubles, "error": error}


def test_annotator_threads_give_every_ranking_item_exactly_k_rankings_nobody_twice(db_url):
    """Like tests/test_assign_concurrency.py, on ranking items (3 to 6 responses, with a few pairs
    mixed in): threads sharing one engine, on SQLite and PostgreSQL."""
    setup = init_db(db_url)
    sizes = [3 + i % 4 for i in range(N_RANK_ITEMS)]
    project, users, items = setup_rankings(setup, sizes, n_users=N_THREADS, pairs=N_PAIRS, overlap=K)
    engine = make_engine(db_url, pool_size=N_THREADS, max_overflow=5)
    results: list = [None] * N_THREADS
    threads = [threading.Thread(target=_annotate_until_done, args=(engine, project, u, results, i)) for i, u in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    engine.dispose()
    assert all(r is not None for r in results), "a thread did not finish"
    assert not [r["error"] for r in results if r["error"]]
    rows = annotation_rows(setup)
    with setup.connect() as conn:
        kept = dict(conn.execute(select(Item.id, Item.annotation_count)).all())
        sizes_of = {i: (len(r) if r is not None else 2) for i, r in conn.execute(select(Item.id, Item.responses)).all()}
        leases = conn.scalar(select(func.count()).select_from(Assignment))
    per_item = {i: sum(r.item_id == i for r in rows) for i in items}
    assert len(rows) == (N_RANK_ITEMS + N_PAIRS) * K
    assert set(per_item.values()) == {K} and kept == per_item
    assert len({(r.item_id, r.annotator_id) for r in rows}) == len(rows)  # nobody twice
    assert sorted(i for r in results for i in r["acknowledged"]) == [r.id for r in rows]
    assert leases == 0
    for r in rows:
        if sizes_of[r.item_id] > 2:
            assert len(r.ranking) == sizes_of[r.item_id] and check_ranking(r.ranking, len(r.ranking))
            assert r.shown_order == list(shown_order_for(r.annotator_id, r.item_id, sizes_of[r.item_id]))
        else:
            assert r.choice == "a" and r.ranking is None
    assert sum(r["doubles"] for r in results) > 0
    setup.dispose()


# --------------------------------------------------------------------------- aggregation and export


def test_ranking_votes_all_and_adjacent_by_hand():
    rankings = pd.DataFrame({"item_id": [7, 7], "annotator": ["x", "y"], "ranking": [[1, 2, 3, 4], [2, 1, 3, 3]]})
    annotations = ranking_votes(rankings, "all")
    x = annotations[annotations.annotator == "x"]
    assert list(zip(x["first"], x["second"], x["choice"])) == [(0, 1, "a"), (0, 2, "a"), (0, 3, "a"), (1, 2, "a"), (1, 3, "a"), (2, 3, "a")]
    assert x["signed_gap"].tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1 / 3, 2 / 3, 1 / 3])
    y = annotations[annotations.annotator == "y"]
    assert y["choice"].tolist() == ["b", "a", "a", "a", "a", "tie"]
    adjacent = ranking_votes(rankings, "adjacent")
    # x: 1st-2nd, 2nd-3rd, 3rd-4th; y: groups {1}, {0}, {2, 3}: 0-1, 0-2, 0-3 and the tie 2-3
    assert sorted(zip(adjacent["annotator"], adjacent["first"], adjacent["second"])) == [
        ("x", 0, 1), ("x", 1, 2), ("x", 2, 3), ("y", 0, 1), ("y", 0, 2), ("y", 0, 3), ("y", 2, 3)]
    with pytest.raises(AnnotationError, match="--ranking-pairs 'best'"):
        ranking_votes(rankings, "best")


def rank_project(engine, rankings_per_item, pairs_votes=()):
    """Project 'r' with one ranking item per entry of rankings_per_item (its size from the first
    ranking) ranked by annotators ann0, ann1, ... in order; then two-response items voted as given."""
    sizes = [len(rs[0]) for rs in rankings_per_item]
    n_users = max([len(rs) for rs in rankings_per_item] + [len(v) for v in pairs_votes] + [1])
    project, users, items = setup_rankings(engine, sizes, n_users=n_users, pairs=len(pairs_votes), overlap=n_users)
    with engine.begin() as conn:
        for item, rankings in zip(items, rankings_per_item):
            conn.execute(insert(Annotation), [dict(item_id=item, annotator_id=users[k], ranking=r, shown_order=list(range(len(r))),
                                                   criteria={}, shown_swapped=False) for k, r in enumerate(rankings)])
        for item, annotations in zip(items[len(sizes):], pairs_votes):
            conn.execute(insert(Annotation), [dict(item_id=item, annotator_id=users[k], choice=c, criteria={}, shown_swapped=False)
                                              for k, c in enumerate(annotations)])
    return items


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_export_expands_rankings_into_majority_pairs_with_rank_gap_margins(engine, tmp_path):
    items = rank_project(engine, [[[1, 2, 3, 4], [1, 3, 2, 4], [2, 1, 3, 3]], [[1, 1, 3]]], pairs_votes=[["a", "a", "b"]])
    out = tmp_path / "all.jsonl"
    report = export(engine, "r", "trl", out, margin_from="rank-gap")
    rows = read_jsonl(out)
    text_of = lambda i, j: f"item {i} response {j}"
    got = [(r["chosen"], r["rejected"], round(r["margin"], 6), r["metadata"]["n_annotations"], r["metadata"]["confidence"]) for r in rows]
    # (w, x): votes a, a, b -> chosen w, 2 of 3; gaps +1/3, +2/3, -1/3 -> mean 2/9
    assert got[0] == (text_of(0, 0), text_of(0, 1), round(2 / 9, 6), 3, pytest.approx(2 / 3))
    assert [(r["metadata"]["chosen_response"], r["metadata"]["rejected_response"]) for r in rows[:6]] == [
        (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert rows[5]["margin"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)  # (y, z): a, a, tie
    assert rows[0]["metadata"]["n_responses"] == 4 and rows[0]["prompt"] == "rank 0"
    # the second ranking item: 0 and 1 tied (a tie, left out), both above 2
    assert [(r["metadata"]["chosen_response"], r["metadata"]["rejected_response"]) for r in rows[6:8]] == [(0, 2), (1, 2)]
    assert rows[6]["margin"] == pytest.approx(1.0)
    # the two-response item: a ranking of two, margin (2 - 1) / 3
    assert rows[8]["chosen"] == "A0" and rows[8]["margin"] == pytest.approx(1 / 3) and "chosen_response" not in rows[8]["metadata"]
    assert (report.exported, report.ranking_items, report.ranking_pairs_exported, report.ranking_pairs_tied) == (9, 2, 8, 1)
    assert report.items == 3 and report.unannotated == 0

    adjacent = export(engine, "r", "trl", tmp_path / "adj.jsonl", ranking_pairs="adjacent", margin_from="confidence")
    rows = read_jsonl(tmp_path / "adj.jsonl")
    pairs = [(r["metadata"]["item_id"], r["metadata"].get("chosen_response"), r["metadata"].get("rejected_response"),
              r["metadata"]["n_annotations"]) for r in rows]
    # by hand (see test_ranking_votes_all_and_adjacent_by_hand): (0,2) by two voters, (0,3) and (1,3) by one;
    # (0,1), (1,2), (2,3) have no majority
    assert pairs == [(items[0], 0, 2, 2), (items[0], 0, 3, 1), (items[0], 1, 3, 1), (items[1], 0, 2, 1), (items[1], 1, 2, 1),
                     (items[2], None, None, 3)]
    assert (adjacent.ranking_pairs, adjacent.ranking_pairs_no_majority, adjacent.ranking_pairs_tied) == ("adjacent", 3, 1)
    assert [r["margin"] for r in rows] == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 1 / 3])

    assert [(p.chosen, p.rejected) for p in project_pairs(engine, "r", ranking_pairs="adjacent")] == [
        (r["chosen"], r["rejected"]) for r in rows]
    filtered = export(engine, "r", "trl", tmp_path / "f.jsonl", min_confidence=0.9)
    # (w,x), (x,y) and (y,z) have 2 of 3 votes, and so has the two-response item
    assert filtered.ranking_pairs_below_threshold == 3 and filtered.below_threshold == 1


def test_every_pair_of_a_ranking_item_lands_in_its_split_and_parquet_holds_the_same_rows(engine, tmp_path):
    import pyarrow.parquet as pq

    rank_project(engine, [[[1, 2, 3]]] * 30 + [[[1, 2, 3, 4]]] * 30)
    export(engine, "r", "trl", tmp_path / "train.jsonl", split="train", test_fraction=0.3)
    export(engine, "r", "trl", tmp_path / "test.jsonl", split="test", test_fraction=0.3)
    train, test = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "test.jsonl")
    train_items, test_items = {r["metadata"]["item_id"] for r in train}, {r["metadata"]["item_id"] for r in test}
    assert train_items and test_items and not train_items & test_items
    assert len(train) + len(test) == 30 * 3 + 30 * 6
    report = export(engine, "r", "trl-conversational", tmp_path / "all.parquet", margin_from="rank-gap")
    table = pq.read_table(tmp_path / "all.parquet").to_pylist()
    export(engine, "r", "trl-conversational", tmp_path / "all.jsonl", margin_from="rank-gap")
    assert table == read_jsonl(tmp_path / "all.jsonl") and report.exported == len(table) == 270


def test_dawid_skene_aggregates_ranking_pairs_and_pairs_together(engine, tmp_path):
    rank_project(engine, [[[1, 2, 3], [1, 2, 3], [3, 2, 1]]] * 5, pairs_votes=[["a", "a", "b"]] * 5)
    report = export(engine, "r", "trl", tmp_path / "ds.jsonl", aggregation="dawid-skene")
    assert report.exported == 5 * 3 + 5 and report.aggregation == "dawid-skene"


def test_the_annotations_dump_keeps_the_ranking_and_the_order_shown(engine, tmp_path):
    import pyarrow.parquet as pq

    rank_project(engine, [[[2, 1, 3]]], pairs_votes=[["tie"]])
    export(engine, "r", "annotations", tmp_path / "a.jsonl")
    ranking_row, pair_row = read_jsonl(tmp_path / "a.jsonl")
    assert (ranking_row["choice"], ranking_row["ranking"], ranking_row["shown_order"]) == (None, [2, 1, 3], [0, 1, 2])
    assert [r["text"] for r in ranking_row["responses"]] == [f"item 0 response {j}" for j in range(3)]
    assert (pair_row["choice"], pair_row["ranking"], pair_row["shown_order"], pair_row["responses"]) == ("tie", None, None, None)
    export(engine, "r", "annotations", tmp_path / "a.parquet")
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert rows[0]["ranking"] == [2, 1, 3] and rows[0]["shown_order"] == [0, 1, 2] and rows[1]["ranking"] is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_export_ranking_pairs_option(settings, tmp_path, monkeypatch, capsys):
    from app import cli as cli_mod

    rank_project(init_db(settings.db_url), [[[1, 2, 3, 4], [1, 2, 3, 4]]])

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["rlhf", *args])
        with pytest.raises(SystemExit) as info:
            cli_mod.main()
        out = capsys.readouterr()
        return info.value.code, out.out, out.err

    rc, out, err = run("export", "--project", "r", "--format", "trl", "-o", str(tmp_path / "o.jsonl"), "--ranking-pairs", "adjacent")
    assert rc == 0, err
    assert "ranking items: 1, pairs from them (adjacent): 3" in out
    rc, out, err = run("export", "--project", "r", "--format", "trl", "-o", str(tmp_path / "o.jsonl"), "--json", "--margin-from", "rank-gap")
    assert rc == 0 and json.loads(out)["ranking_pairs_exported"] == 6
    assert [r["margin"] for r in read_jsonl(tmp_path / "o.jsonl")] == pytest.approx([1 / 3, 2 / 3, 1, 1 / 3, 2 / 3, 1 / 3])
    rc, out, err = run("export", "--project", "r", "--format", "trl", "-o", str(tmp_path / "o.jsonl"), "--ranking-pairs", "best")
    assert rc == 2 and "--ranking-pairs 'best': expected one of all, adjacent" in err
    rc, out, err = run("export", "--project", "r", "--format", "trl", "-o", str(tmp_path / "o.jsonl"), "--margin-from", "gap")
    assert rc == 2 and "rank-gap" in err


# --------------------------------------------------------------------------- Kendall's W and ordinal alpha

# Published worked examples of Kendall's W (rows: raters, columns: objects ranked).
# 1. "Kendall's Coefficient of Concordance/Examples/Arbitrary Example 1", ProofWiki: 4 judges rank
#    3 competitors; W = 1/16.
PROOFWIKI = [[1, 3, 2], [1, 2, 3], [2, 3, 1], [3, 1, 2]]
# 2. InfluentialPoints, "Kendall's coefficient of concordance", worked example I: 4 raters rank the
#    strawberries of 8 farms; rank sums 31 12 12 15 22 5 22 25, SS = 500, W = 500 / (504 * 16 / 12) = 0.744.
STRAWBERRIES = [[8, 4, 2, 3, 5, 1, 6, 7], [7, 3, 1, 4, 5, 2, 6, 8], [8, 2, 5, 6, 7, 1, 4, 3], [8, 3, 4, 2, 5, 1, 6, 7]]
# 3. With ties: Sheskin's tie-corrected formula worked in stats.stackexchange.com question 261206
#    ("Kendall's tau ... tied ranks"): two raters' scores x = [12, 2, 1, 12, 2], y = [1, 4, 7, 1, 0]
#    as mid-ranks, tie terms 12 + 6 = 18; W = (12 * 188.5 - 3 * 4 * 5 * 36) / (4 * 5 * 24 - 2 * 18) = 0.22973.
SHESKIN_TIES = [[12, 2, 1, 12, 2], [1, 4, 7, 1, 0]]


def kendall_w_by_hand(ranks) -> float:
    """W written out as Sheskin writes it, from mid-ranks: (12 sum R_i^2 - 3 m^2 n (n+1)^2) / (m^2 n (n^2-1) - m sum T)."""
    from scipy.stats import rankdata

    r = np.array([rankdata(row) for row in ranks], dtype=float)
    m, n = r.shape
    ties = sum(float(((c := np.unique(row, return_counts=True)[1]) ** 3 - c).sum()) for row in r)
    return (12 * float((r.sum(0) ** 2).sum()) - 3 * m * m * n * (n + 1) ** 2) / (m * m * n * (n * n - 1) - m * ties)


def test_kendall_w_matches_published_worked_examples():
    assert ag.kendall_w(PROOFWIKI) == pytest.approx(1 / 16)
    assert round(ag.kendall_w(STRAWBERRIES), 3) == 0.744
    assert ag.kendall_w(STRAWBERRIES) == pytest.approx(500 / 672)
    assert round(ag.kendall_w(SHESKIN_TIES), 5) == 0.22973
    assert ag.kendall_w(SHESKIN_TIES) == pytest.approx(102 / 444)


@pytest.mark.parametrize("seed", range(5))
def test_kendall_w_agrees_with_friedman_in_scipy_and_with_the_formula_by_hand(seed):
    """W = chi2_F / (m (n - 1)), with scipy's tie-corrected Friedman statistic; and the hand formula."""
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(2, 7)), int(rng.integers(3, 7))
    ranks = rng.integers(1, 4, size=(m, n))  # many ties
    chi2 = friedmanchisquare(*ranks.T).statistic
    assert ag.kendall_w(ranks) == pytest.approx(chi2 / (m * (n - 1)), abs=1e-12)
    assert ag.kendall_w(ranks) == pytest.approx(kendall_w_by_hand(ranks), abs=1e-12)
    # without ties, W = ((m - 1) * mean Spearman rho + 1) / m
    perms = np.array([rng.permutation(n) + 1 for _ in range(m)])
    rhos = [spearmanr(perms[i], perms[j]).statistic for i in range(m) for j in range(i + 1, m)]
    assert ag.kendall_w(perms) == pytest.approx(((m - 1) * np.mean(rhos) + 1) / m, abs=1e-12)


def test_kendall_w_edge_cases():
    assert ag.kendall_w([[1, 2, 3], [1, 2, 3]]) == pytest.approx(1.0)
    assert ag.kendall_w([[1, 2, 3], [3, 2, 1]]) == pytest.approx(0.0)
    assert np.isnan(ag.kendall_w([[1, 2, 3]]))  # one ranking
    assert np.isnan(ag.kendall_w([[1, 1, 1], [1, 1, 1]]))  # everyone ties everything


def random_rankings(n_items=40, n_annotators=4, p=0.8, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for item in range(n_items):
        n = int(rng.integers(3, 7))
        truth = rng.normal(size=n)
        for a in range(n_annotators):
            if rng.random() < p:
                scores = np.round(truth + rng.normal(scale=1.0, size=n))  # rounding makes ties
                rows.append((item, f"a{a}", [1 + int((scores > s).sum()) for s in scores]))
    return pd.DataFrame(rows, columns=["item_id", "annotator", "ranking"])


def reliability_matrix(rankings: pd.DataFrame) -> np.ndarray:
    """Annotators x (item, response) mid-ranks, NaN where missing: the krippendorff package's input."""
    units = sorted({(i, j) for i, r in zip(rankings.item_id, rankings.ranking) for j in range(len(r))})
    column = {u: c for c, u in enumerate(units)}
    annotators = sorted(rankings.annotator.unique())
    matrix = np.full((len(annotators), len(units)), np.nan)
    for i, a, r in zip(rankings.item_id, rankings.annotator, rankings.ranking):
        for j, value in enumerate(ag.mid_ranks([r])[0]):
            matrix[annotators.index(a), column[(i, j)]] = value
    return matrix


@pytest.mark.parametrize("seed", range(3))
def test_ranking_report_matches_krippendorff_and_the_per_item_kendall_w(seed):
    rankings = random_rankings(seed=seed)
    report = ag.ranking_report(rankings, bootstrap=0)
    expected_alpha = krippendorff.alpha(reliability_data=reliability_matrix(rankings), level_of_measurement="ordinal")
    assert report["krippendorff_alpha"]["ordinal"] == pytest.approx(expected_alpha, abs=1e-9)
    per_item = [kendall_w_by_hand(list(g)) for _, g in rankings.groupby("item_id")["ranking"] if len(g) >= 2]
    assert report["kendall_w"] == pytest.approx(np.mean(per_item), abs=1e-12)
    assert report["n_items_multi"] == report["kendall_w_items"] == len(per_item)
    assert report["n_rankings"] == len(rankings) and report["n_annotators"] == rankings.annotator.nunique()


def test_ranking_bootstrap_resamples_items_and_matches_a_naive_bootstrap():
    rankings = random_rankings(n_items=30, seed=4)
    report = ag.ranking_report(rankings, bootstrap=300, seed=1)
    for key, value in (("kendall_w", report["kendall_w"]), ("krippendorff_alpha", report["krippendorff_alpha"]["ordinal"])):
        interval = report["intervals"][key] if key == "kendall_w" else report["intervals"][key]["ordinal"]
        assert interval[0] < value < interval[1]
    # the same draws by hand: resample item ids, recompute from scratch on the resampled rankings
    stats = ag.RankingStats(rankings)
    rng = np.random.default_rng(1)
    counts = rng.multinomial(len(stats.items), np.full(len(stats.items), 1 / len(stats.items)), size=5)
    fast = stats.evaluate(counts)
    for b, row in enumerate(counts):
        drawn = pd.concat([rankings[rankings.item_id == item].assign(item_id=f"{item}-{k}")
                           for item, c in zip(stats.items, row) for k in range(c)])
        naive = ag.ranking_report(drawn, bootstrap=0)
        assert fast["kendall_w"][b] == pytest.approx(naive["kendall_w"], abs=1e-12)
        assert fast["alpha:ordinal"][b] == pytest.approx(naive["krippendorff_alpha"]["ordinal"], abs=1e-9)


def test_ranking_report_undefined_cases_say_why():
    one_each = pd.DataFrame({"item_id": [1, 2], "annotator": ["a", "b"], "ranking": [[1, 2, 3], [1, 2, 3]]})
    report = ag.ranking_report(one_each, bootstrap=10)
    assert report["kendall_w"] is None and report["krippendorff_alpha"]["ordinal"] is None
    assert "no ranking item has two or more rankings" in report["notes"]["kendall_w"]
    all_tied = pd.DataFrame({"item_id": [1, 1, 2, 2], "annotator": ["a", "b"] * 2,
                             "ranking": [[1, 1, 1], [1, 1, 1], [1, 2, 3], [1, 3, 2]]})
    report = ag.ranking_report(all_tied, bootstrap=0)
    assert report["kendall_w_items"] == 1 and "1 where every ranking ties all responses left out" in report["notes"]["kendall_w"]
    with pytest.raises(AnnotationError, match="--bootstrap"):
        ag.ranking_report(one_each, bootstrap=-1)


def test_load_rankings_and_the_pairwise_loader_keep_to_their_own_annotations(engine):
    rank_project(engine, [[[1, 2, 3], [2, 1, 3]]], pairs_votes=[["a", "b"]])
    rankings, n_items = ag.load_rankings(engine, "r")
    assert n_items == 1 and rankings["ranking"].tolist() == [[1, 2, 3], [2, 1, 3]]
    assert rankings["annotator"].tolist() == ["ann0", "ann1"]
    annotations = ag.load_annotations(engine, "r")
    assert annotations["choice"].tolist() == ["a", "b"]  # the rankings are not pairwise votes
    report = ag.project_ranking_report(engine, "r", bootstrap=0)
    assert report["n_items"] == 1 and report["kendall_w"] == pytest.approx(ag.kendall_w([[1, 2, 3], [2, 1, 3]]))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_agreement_shows_rankings_only_for_projects_with_ranking_items(settings, monkeypatch, capsys):
    from app import cli as cli_mod

    engine = init_db(settings.db_url)
    rank_project(engine, [[[1, 2, 3, 4], [1, 3, 2, 4], [2, 1, 3, 4]], [[1, 2, 3], [1, 2, 3]]], pairs_votes=[["a", "a"]])
    with transaction(engine) as s:
        create_project(s, "pairs-only")

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["rlhf", *args])
        with pytest.raises(SystemExit) as info:
            cli_mod.main()
        out = capsys.readouterr()
        return info.value.code, out.out, out.err

    rc, out, err = run("agreement", "--project", "r", "--json", "--bootstrap", "50")
    assert rc == 0, err
    rankings = json.loads(out)["rankings"]
    expected = np.mean([ag.kendall_w([[1, 2, 3, 4], [1, 3, 2, 4], [2, 1, 3, 4]]), 1.0])
    assert rankings["kendall_w"] == pytest.approx(expected) and rankings["n_items"] == 2 and rankings["n_items_multi"] == 2
    assert len(rankings["intervals"]["kendall_w"]) == 2 and rankings["krippendorff_alpha"]["ordinal"] is not None
    rc, out, err = run("agreement", "--project", "r", "--bootstrap", "0")
    assert rc == 0 and "Kendall's W (mean)" in out and "(ordinal, on the ranks)" in out
    rc, out, err = run("agreement", "--project", "pairs-only", "--json", "--bootstrap", "0")
    assert rc == 0 and "rankings" not in json.loads(out)


# --------------------------------------------------------------------------- the Annotate page (AppTest)


@pytest.fixture
def ranking_store(store, tmp_path):
    """The app store of tests/browser_helpers.py plus project `ranked` (two 4-response items, k=2)."""
    from browser_helpers import add_ranking_project

    add_ranking_project(store, tmp_path / "data")
    return store


def open_annotate(engine, username):
    from streamlit.testing.v1 import AppTest

    from browser_helpers import RANKING_PROJECT, set_login

    at = AppTest.from_file(str(ANNOTATE), default_timeout=60)
    with transaction(engine) as s:
        uid = s.scalar(select(User.id).where(User.username == username))
        from annotation.store import Project

        at.session_state["ann_project_id"] = s.scalar(select(Project.id).where(Project.name == RANKING_PROJECT))
    set_login(at, engine, uid)
    return at.run()


def press(at, *keys):
    """Click the buttons the keys are shortcuts for, one rerun each."""
    by_shortcut = {b.proto.shortcut: b.key for b in at.button}
    for key in keys:
        at.button(key=by_shortcut[key.lower()]).click().run()
    return at


def saved(engine):
    with transaction(engine) as s:
        return s.execute(select(Annotation, Item).join(Item)).all()


def test_rank_a_four_response_item_by_its_keys_with_a_tie_and_a_take_back(ranking_store):
    from browser_helpers import ranking_order

    at = open_annotate(ranking_store, "ann1")
    task = at.session_state["ann_task"]
    assert task.is_ranking and len(task.responses) == 4
    shown = [t.value for t in at.text]
    assert all(r in shown for r in task.responses)  # verbatim, as text
    assert not any("<script>" in m.value for m in at.markdown)
    shortcuts = {b.key: b.proto.shortcut for b in at.button}
    assert [shortcuts[f"ann_rank_{p}"] for p in range(1, 5)] == ["1", "2", "3", "4"]
    assert shortcuts["ann_rank_tie"] == "t" and shortcuts["ann_rank_back"] == "backspace" and shortcuts["ann_submit"] == "enter"
    assert "ann_choice_left" not in shortcuts and "ann_strength_1" not in shortcuts
    groups = ranking_order(task.responses)
    keys = []
    for group in groups:
        keys += [str(group[0] + 1)] + [k for p in group[1:] for k in ("T", str(p + 1))]
    wrong = next(str(p + 1) for p in range(4) if p != groups[0][0])
    press(at, wrong, "Backspace", keys[0])
    press(at, keys[0])  # placed already: a warning, nothing changes
    assert any("is placed already" in w.value for w in at.warning)
    press(at, *keys[1:-1])
    assert any("still to place" in m.value for m in at.markdown)
    press(at, "Enter")  # not complete yet: nothing saved
    assert any("Place every response first" in w.value for w in at.warning) and saved(ranking_store) == []
    press(at, keys[-1])
    assert any(m.value.startswith("Your ranking: **") and "complete" in m.value for m in at.markdown)
    press(at, "Enter")
    ((annotation, item),) = saved(ranking_store)
    from browser_helpers import RANK_WORDS

    place = [RANK_WORDS.index(r["text"].split(":")[0]) for r in item.responses]
    expected = [1 + sum(other < p for other in place) for p in place]
    assert annotation.ranking == expected and annotation.choice is None
    assert annotation.shown_order == list(task.shown_order) == list(shown_order_for(annotation.annotator_id, item.id, 4))
    assert annotation.duration_ms >= 0
    assert at.session_state["ann_task"].item_id != item.id  # the next item is up


def test_undo_brings_the_ranking_back_as_keys(ranking_store):
    at = open_annotate(ranking_store, "ann1")
    first = at.session_state["ann_task"]
    press(at, "2", "T", "4", "1", "3", "Enter")
    assert len(saved(ranking_store)) == 1
    press(at, "Z")
    assert at.session_state["ann_task"].item_id == first.item_id
    assert at.session_state["ann_rank_keys"] == ["2", "T", "4", "1", "3"]
    assert any("2 = 4 > 1 > 3" in m.value for m in at.markdown)
    press(at, "Enter")
    ((annotation, _),) = saved(ranking_store)
    stored = list(first.shown_order)
    ranks = [0] * 4
    for position, rank in ((1, 1), (3, 1), (0, 3), (2, 4)):
        ranks[stored[position]] = rank
    assert annotation.ranking == ranks


def test_ranking_callbacks_check_the_user_inside_the_action(ranking_store):
    at = open_annotate(ranking_store, "ann1")
    press(at, "1", "2", "3", "4")
    with transaction(ranking_store) as s:
        s.execute(update(User).where(User.username == "ann1").values(active=False))
    at.button(key="ann_submit").click().run()
    assert saved(ranking_store) == []
    assert len(at.error) == 1 and not at.button  # refused, nothing else drawn


def test_a_lone_tie_key_and_tie_after_the_last_response_only_warn(ranking_store):
    at = open_annotate(ranking_store, "ann2")
    press(at, "T")
    assert any("Place a response first" in w.value for w in at.warning)
    press(at, "1", "T", "T", "2", "3", "4", "T")
    assert at.session_state["ann_rank_keys"] == ["1", "T", "2", "3", "4"]
    assert any("nothing is left to tie" in w.value for w in at.warning)


def test_ranking_keys_merged_into_one_rerun_are_refused_not_reordered(ranking_store):
    """Streamlit merges keys that reach the server within one rerun and runs their callbacks in the
    page's button order: 3 then 1 typed fast would otherwise become 1 then 3."""
    at = open_annotate(ranking_store, "ann1")
    at.button(key="ann_rank_3").click()
    at.button(key="ann_rank_1").click().run()
    assert at.session_state["ann_rank_keys"] == []
    assert any("Keys arrived together" in w.value for w in at.warning)
    press(at, "3", "1", "2")
    # the last key and Enter in one rerun: the key counts, the submission waits for the next Enter
    at.button(key="ann_rank_4").click()
    at.button(key="ann_submit").click().run()
    assert at.session_state["ann_rank_keys"] == ["3", "1", "2", "4"] and saved(ranking_store) == []
    assert any("press Enter again" in i.value for i in at.info)
    press(at, "Enter")
    assert len(saved(ranking_store)) == 1
