"""Choosing what to label next: the queue order (annotation.selection), the scoring use case
(reward.usecases.score_queue) and its job and commands, and the reward model's suggestions.

Uncertainty selection must hand out the items the model is least sure of first (SQLite and
PostgreSQL), keep the completion-level rule and the random share, stay one index range scan, and
go back to the plain order when the project turns it off. Suggestions are off by default, shown
only from stored scores, and recorded with the answer.

    .venv/bin/python -m pytest tests/test_selection.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from reward_fixtures import save_tiny_bert, synthetic_pairs  # noqa: E402

from annotation.errors import AnnotationError  # noqa: E402
from annotation.selection import queue_order  # noqa: E402
from reward.errors import RewardError  # noqa: E402


class TableScorer:
    """The scorer contract with a reward per response text (unknown texts score 0)."""

    def __init__(self, rewards: dict[str, float]):
        self.rewards = rewards

    def score(self, prompts, responses, batch_size=32):
        assert len(prompts) == len(responses)
        return torch.tensor([self.rewards.get(r, 0.0) for r in responses])


class TableEnsemble:
    def __init__(self, *tables: dict[str, float]):
        self.members = [TableScorer(t) for t in tables]

    def member_scores(self, prompts, responses, batch_size=32):
        return torch.stack([m.score(prompts, responses) for m in self.members])


# --------------------------------------------------------------------------- the order, as plain data


def test_no_random_share_orders_by_uncertainty_then_id():
    keys, drawn = queue_order([10, 11, 12, 13, 14], [0.1, 0.4, 0.4, 0.0, 0.3], 0.0)
    served = [i for _, i in sorted(zip(keys, [10, 11, 12, 13, 14]))]
    assert served == [11, 12, 14, 10, 13]  # most uncertain first, a tie by lower id
    assert not drawn.any()
    assert (keys < 0).all()  # before every unscored item (key 0)


def test_random_share_takes_every_fifth_place_with_random_items():
    n = 100
    ids = np.arange(1000, 1000 + n)
    u = np.linspace(1.0, 0.0, n)  # item 1000 is the least sure
    keys, drawn = queue_order(ids, u, 0.2, seed=3)
    assert drawn.sum() == 20
    served = ids[np.argsort(keys)]
    places = {int(i): p for p, i in enumerate(served)}
    assert sorted(places[int(i)] for i in ids[drawn]) == list(range(4, n, 5))
    # the other places keep the uncertainty order
    rest = [int(i) for i in served if not drawn[int(i) - 1000]]
    assert rest == sorted(rest)
    # the draw is seeded, and another seed draws other items
    assert (queue_order(ids, u, 0.2, seed=3)[1] == drawn).all()
    assert not (queue_order(ids, u, 0.2, seed=4)[1] == drawn).all()
    # share 1: all random
    assert queue_order(ids, u, 1.0, seed=3)[1].all()


def test_bad_order_input_is_refused():
    with pytest.raises(AnnotationError, match="2 items but 1"):
        queue_order([1, 2], [0.1], 0.0)
    with pytest.raises(AnnotationError, match="finite"):
        queue_order([1], [float("nan")], 0.0)
    with pytest.raises(AnnotationError, match="between 0 and 1"):
        queue_order([1], [0.1], 1.5)


# --------------------------------------------------------------------------- the store


def make_project(engine, n_items=8, overlap=1, selection="uncertainty", random_share=0.0, suggestions=False, gold=()):
    """Project 'al' with items i0..i{n-1}: response_a 'a{i}', response_b 'b{i}'; users u1, u2."""
    from annotation.auth import create_user
    from annotation.projects import create_project
    from annotation.store import Item, transaction

    with transaction(engine) as s:
        project = create_project(s, "al", overlap=overlap, selection=selection, random_share=random_share,
                                 suggestions=suggestions)
        users = [create_user(s, f"u{i}", None).id for i in (1, 2)]
        ids = []
        for i in range(n_items):
            item = Item(project_id=project.id, prompt=f"p{i}", response_a=f"a{i}", response_b=f"b{i}", content_hash=f"h{i}",
                        gold_choice="a" if i in gold else None)
            s.add(item)
            s.flush()
            ids.append(item.id)
        return project.id, users, ids


def margins_scorer(margins: list[float]) -> TableScorer:
    """Item i gets r_A - r_B = margins[i]."""
    table = {}
    for i, m in enumerate(margins):
        table[f"a{i}"], table[f"b{i}"] = m, 0.0
    return TableScorer(table)


def score(engine, scorer, tmp_path, measure="auto", seed=0):
    from annotation.runs import RunContext
    from reward.usecases import ScoreQueueSpec, score_queue

    return score_queue(ScoreQueueSpec(project="al", measure=measure, seed=seed),
                       RunContext(output_dir=tmp_path / f"score-{measure}-{seed}", engine=engine), scorer=scorer)


def served_order(engine, project_id, user_id, n):
    from annotation.assign import next_item, submit

    order = []
    for _ in range(n):
        task = next_item(engine, project_id, user_id)
        if task is None:
            break
        order.append(task.item_id)
        submit(engine, user_id, task.item_id, "a")
    return order


def test_uncertainty_selection_hands_out_the_least_sure_items_first(engine, tmp_path):
    pid, (u1, _), ids = make_project(engine, 8)
    margins = [3.0, 0.1, -2.0, 0.0, 5.0, -0.5, 1.0, -0.05]
    result = score(engine, margins_scorer(margins), tmp_path)
    assert result.metrics["measure"] == "margin" and result.metrics["queued"] == 8
    expected = [ids[i] for i in np.argsort(np.abs(margins), kind="stable")]
    assert served_order(engine, pid, u1, 8) == expected


def test_random_selection_ignores_nothing_and_keeps_id_order(engine, tmp_path):
    from annotation.projects import save_project_settings

    pid, (u1, u2), ids = make_project(engine, 6)
    score(engine, margins_scorer([3.0, 0.1, -2.0, 0.0, 5.0, -0.5]), tmp_path)
    assert served_order(engine, pid, u1, 1) == [ids[3]]
    save_project_settings(engine, pid, selection="random")  # back to the plain order, at once
    from annotation.store import Item, ItemScore, reading
    from sqlalchemy import func, select

    with reading(engine) as s:
        assert set(s.scalars(select(Item.queue_key).where(Item.project_id == pid))) == {0.0}
        # the scores stay (suggestions read them), without places
        assert s.scalar(select(func.count()).select_from(ItemScore)) == 6
        assert set(s.scalars(select(ItemScore.queue_key))) == {None}
    assert served_order(engine, pid, u1, 5) == [i for i in ids if i != ids[3]]


def test_completion_level_still_comes_first(engine, tmp_path):
    """With k = 2, an item one annotation short is finished before an unsure fresh one starts."""
    pid, (u1, u2), ids = make_project(engine, 4, overlap=2)
    score(engine, margins_scorer([4.0, 3.0, 0.0, 2.0]), tmp_path)  # item 2 least sure, then 3, 1, 0
    assert served_order(engine, pid, u1, 1) == [ids[2]]
    assert served_order(engine, pid, u2, 1) == [ids[2]]  # level 1 first: the same item for the second annotator
    assert served_order(engine, pid, u2, 1) == [ids[3]]


def test_ensemble_disagreement_picks_where_members_disagree(engine, tmp_path):
    pid, (u1, _), ids = make_project(engine, 4)
    # every member has margin 0 on item 0 (the mean is unsure, the members agree); on item 2 they disagree most
    m1 = {"a0": 0.0, "b0": 0.0, "a1": 1.0, "b1": 0.0, "a2": 4.0, "b2": 0.0, "a3": 2.0, "b3": 0.0}
    m2 = {"a0": 0.0, "b0": 0.0, "a1": 1.2, "b1": 0.0, "a2": -4.0, "b2": 0.0, "a3": 1.0, "b3": 0.0}
    result = score(engine, TableEnsemble(m1, m2), tmp_path)
    assert result.metrics["measure"] == "disagreement"
    assert served_order(engine, pid, u1, 4) == [ids[2], ids[3], ids[1], ids[0]]
    with pytest.raises(RewardError, match="needs an ensemble"):
        score(engine, margins_scorer([0, 0, 0, 0]), tmp_path, measure="disagreement")


def test_the_random_share_is_honoured_in_the_store(engine, tmp_path):
    from annotation.store import ItemScore, reading
    from sqlalchemy import select

    pid, (u1, _), ids = make_project(engine, 20, random_share=0.25)
    margins = list(np.linspace(0.0, 5.0, 20))
    result = score(engine, margins_scorer(margins), tmp_path, seed=1)
    assert result.metrics["calibration"] == 5
    with reading(engine) as s:
        drawn = set(s.scalars(select(ItemScore.item_id).where(ItemScore.calibration.is_(True))))
    order = served_order(engine, pid, u1, 20)
    assert {order[p] for p in (3, 7, 11, 15, 19)} == drawn
    assert [i for i in order if i not in drawn] == [i for i in ids if i not in drawn]  # the rest least sure first


def add_item(engine, project_id: int, i: int) -> int:
    """One more item, i-th in make_project's naming (a{i} / b{i}), arriving after a scoring; its id."""
    from annotation.store import Item, transaction

    with transaction(engine) as s:
        item = Item(project_id=project_id, prompt=f"p{i}", response_a=f"a{i}", response_b=f"b{i}", content_hash=f"h{i}")
        s.add(item)
        s.flush()
        return item.id


def test_new_items_wait_behind_scored_ones_until_the_next_scoring(engine, tmp_path):
    pid, (u1, _), ids = make_project(engine, 3)
    score(engine, margins_scorer([1.0, 0.0, 2.0]), tmp_path)
    late_id = add_item(engine, pid, 9)
    assert served_order(engine, pid, u1, 4) == [ids[1], ids[0], ids[2], late_id]


def test_scoring_again_places_the_new_items(engine, tmp_path):
    pid, (u1, _), ids = make_project(engine, 3)
    score(engine, margins_scorer([1.0, 0.5, 2.0]), tmp_path)
    late_id = add_item(engine, pid, 3)
    score(engine, margins_scorer([1.0, 0.5, 2.0, 0.0]), tmp_path, seed=1)
    assert served_order(engine, pid, u1, 4) == [late_id, ids[1], ids[0], ids[2]]


def test_only_open_items_are_scored_and_gold_gets_no_place(engine, tmp_path):
    from annotation.assign import next_item
    from annotation.store import Item, ItemScore, reading
    from sqlalchemy import select

    pid, (u1, u2), ids = make_project(engine, 4, gold=(3,))
    served_order(engine, pid, u1, 1)  # item 0 complete (k = 1)
    result = score(engine, margins_scorer([0.0, 1.0, 2.0, 0.1]), tmp_path)
    assert result.metrics == {**result.metrics, "scored": 3, "queued": 2, "gold_scored": 1}
    with reading(engine) as s:
        keys = dict(s.execute(select(Item.id, Item.queue_key).where(Item.project_id == pid)).all())
        scored = set(s.scalars(select(ItemScore.item_id)))
    assert keys[ids[0]] == 0 and keys[ids[3]] == 0 and keys[ids[1]] < 0 and keys[ids[2]] < 0
    assert scored == {ids[1], ids[2], ids[3]}
    assert next_item(engine, pid, u2).item_id == ids[1]


def test_ranking_items_are_scored_by_their_closest_pair(engine, tmp_path):
    from annotation.assign import next_item
    from annotation.auth import create_user
    from annotation.projects import create_project
    from annotation.store import Item, ItemScore, reading, transaction
    from sqlalchemy import select

    with transaction(engine) as s:
        project = create_project(s, "al", overlap=1, selection="uncertainty", random_share=0.0)
        user = create_user(s, "u1", None)
        ids = []
        for i in range(2):
            responses = [{"text": f"r{i}{j}", "source": None} for j in range(4)]
            item = Item(project_id=project.id, prompt=f"p{i}", response_a="", response_b="", responses=responses,
                        content_hash=f"h{i}")
            s.add(item)
            s.flush()
            ids.append(item.id)
        pid, uid = project.id, user.id
    # item 0: rewards 0, 1, 2, 3 (gaps 1); item 1: 5, 0.1, 0, -3 (closest pair 0.1 vs 0): less sure
    table = {"r00": 0.0, "r01": 1.0, "r02": 2.0, "r03": 3.0, "r10": 5.0, "r11": 0.1, "r12": 0.0, "r13": -3.0}
    score(engine, TableScorer(table), tmp_path)
    with reading(engine) as s:
        rows = {r.item_id: r for r in s.scalars(select(ItemScore))}
    assert rows[ids[0]].top == 3 and rows[ids[1]].top == 0 and rows[ids[0]].p_a is None
    assert rows[ids[1]].uncertainty == pytest.approx(1 - 1 / (1 + np.exp(-0.1)), rel=1e-5)
    assert rows[ids[0]].uncertainty == pytest.approx(1 - 1 / (1 + np.exp(-1.0)), rel=1e-5)
    assert next_item(engine, pid, uid).item_id == ids[1]


def test_the_next_item_query_is_still_one_index_range_scan(engine):
    """EXPLAIN of the queue statement: ix_items_queue, and no sort step for the ORDER BY."""
    from sqlalchemy import text

    from annotation import assign

    pid, (u1, _), _ = make_project(engine, 3)
    params = {"project": pid, "level": 0, "annotator": u1, "now": assign._naive_utc(None), "room": 1}
    with engine.connect() as conn:
        compiled = assign._REGULAR_AT_LEVEL.compile(conn)
        values = compiled.construct_params(params)
        if conn.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled),
                                        tuple(values[k] for k in compiled.positiontup)).all()
            plan = " | ".join(str(r[-1]) for r in rows)
            assert "ix_items_queue" in plan, plan
            assert "TEMP B-TREE" not in plan.upper(), plan
        else:
            conn.execute(text("SET enable_seqscan = off"))
            plan = " | ".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled), values).all())
            assert "ix_items_queue" in plan, plan
            assert "Sort" not in plan, plan


# --------------------------------------------------------------------------- suggestions


def test_suggestions_are_off_by_default_and_record_what_was_shown(engine, tmp_path):
    from annotation.assign import next_item, submit
    from annotation.projects import save_project_settings
    from annotation.store import Annotation, reading
    from sqlalchemy import select

    pid, (u1, u2), ids = make_project(engine, 4)
    score(engine, margins_scorer([-2.0, 3.0, 0.5, 1.5]), tmp_path)  # order: items 2, 3, 0, 1
    task = next_item(engine, pid, u1)
    assert task.item_id == ids[2] and task.suggestion is None  # off: nothing shown
    submit(engine, u1, task.item_id, "b")

    save_project_settings(engine, pid, suggestions=True)
    task = next_item(engine, pid, u1)
    assert task.item_id == ids[3] and task.suggestion == "a"
    assert task.suggestion_confidence == pytest.approx(1 / (1 + np.exp(-1.5)), rel=1e-5)
    again = next_item(engine, pid, u1)  # a refresh shows the same lease and the same suggestion
    assert (again.item_id, again.suggestion) == (task.item_id, "a")
    submit(engine, u1, task.item_id, "b")
    task = next_item(engine, pid, u1)
    assert task.item_id == ids[0] and task.suggestion == "b"
    assert task.suggestion_confidence == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-5)
    submit(engine, u1, task.item_id, "b")
    with reading(engine) as s:
        recorded = dict(s.execute(select(Annotation.item_id, Annotation.suggestion)).all())
    assert recorded == {ids[2]: None, ids[3]: "a", ids[0]: "b"}


def test_a_lease_taken_before_suggestions_were_on_shows_none(engine, tmp_path):
    from annotation.assign import next_item, submit
    from annotation.projects import save_project_settings
    from annotation.store import Annotation, reading
    from sqlalchemy import select

    pid, (u1, _), ids = make_project(engine, 2)
    score(engine, margins_scorer([0.5, 2.0]), tmp_path)
    task = next_item(engine, pid, u1)
    save_project_settings(engine, pid, suggestions=True)
    assert next_item(engine, pid, u1).suggestion is None  # the same lease: what it showed, nothing
    submit(engine, u1, task.item_id, "a")
    with reading(engine) as s:
        assert s.scalar(select(Annotation.suggestion)) is None


def test_undo_restores_the_suggestion_with_the_item(engine, tmp_path):
    from annotation.assign import next_item, submit, undo_last

    pid, (u1, _), ids = make_project(engine, 2, suggestions=True)
    score(engine, margins_scorer([-0.3, 2.0]), tmp_path)
    task = next_item(engine, pid, u1)
    assert task.suggestion == "b"
    submit(engine, u1, task.item_id, "a")
    assert undo_last(engine, u1, pid).item_id == task.item_id
    back = next_item(engine, pid, u1)
    assert (back.item_id, back.suggestion) == (task.item_id, "b")


def test_annotations_export_carries_the_suggestion(engine, tmp_path):
    from annotation.assign import next_item, submit
    from annotation.io import export

    pid, (u1, _), ids = make_project(engine, 1, suggestions=True)
    score(engine, margins_scorer([1.0]), tmp_path)
    task = next_item(engine, pid, u1)
    submit(engine, u1, task.item_id, "a")
    out = tmp_path / "ann.jsonl"
    export(engine, "al", "annotations", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["suggestion"] for r in rows] == ["a"]


# --------------------------------------------------------------------------- settings


def test_selection_settings_are_validated(engine):
    from annotation.projects import new_project, save_project_settings

    with pytest.raises(AnnotationError, match="selection 'smart' is invalid"):
        new_project(engine, "x1", selection="smart")
    pid, _, _ = make_project(engine, 1)
    with pytest.raises(AnnotationError, match="random share must be between 0 and 1"):
        save_project_settings(engine, pid, random_share=-0.1)


# --------------------------------------------------------------------------- the job and the commands, with a real model


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A tiny BERT reward model trained on the good/bad task (reward_fixtures): seconds."""
    from reward.train import TrainParams, train_reward_model

    root = tmp_path_factory.mktemp("rm")
    base = save_tiny_bert(root / "base")
    run = root / "run"
    train_reward_model(synthetic_pairs(160, seed=1), run, TrainParams(
        base=str(base), epochs=2, lr=3e-3, batch_size=8, max_length=32, precision="fp32", seed=1))
    return run


def rlhf(capsys, monkeypatch, *args):
    from app.cli import main

    monkeypatch.setattr(sys, "argv", ["rlhf", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def write_items(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response_a": a, "response_b": b}) + "\n" for p, a, b in rows))
    return path


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_activation_and_imports_queue_one_scoring_job_that_orders_the_queue(settings, tiny_rm, tmp_path, capsys, monkeypatch):
    from annotation.assign import next_item, submit
    from annotation.auth import create_user
    from annotation.registry import register_model
    from annotation.store import Item, init_db, reading, transaction
    from app.jobs import claim_next, get_job, run_job
    from sqlalchemy import select

    code, out, err = rlhf(capsys, monkeypatch, "project", "create", "al", "--selection", "uncertainty", "--random-share", "0", "--json")
    assert code == 0, err
    # clear items (a "good" and a "bad" response) and unclear ones (neither word): the model is unsure of the latter
    clear = [(f"w1 w2 {i}", f"w3 good w{i}", f"w4 bad w{i}") for i in range(5, 9)]
    unclear = [(f"w1 w2 {i}", f"w3 w5 w{i}", f"w4 w6 w{i}") for i in range(10, 14)]
    code, out, err = rlhf(capsys, monkeypatch, "import", str(write_items(tmp_path / "one.jsonl", clear + unclear)),
                          "--project", "al", "--json")
    assert code == 0, err
    assert json.loads(out)["score_job"] is None  # no active model yet: nothing to score with

    engine = init_db(settings.db_url)
    with transaction(engine) as s:
        from annotation.projects import get_project

        pid = get_project(s, "al").id
        model_id = register_model(s, kind="reward", name="rm-tiny", path=str(tiny_rm), project_id=pid).id
        uid = create_user(s, "ann", None).id
    code, out, err = rlhf(capsys, monkeypatch, "models", "activate", str(model_id), "--json")
    assert code == 0, err
    job_id = json.loads(out)["score_job"]
    assert get_job(engine, job_id)["kind"] == "score_queue"
    code, out, err = rlhf(capsys, monkeypatch, "import", str(write_items(tmp_path / "two.jsonl", [("w9 w9", "w7 w8", "w8 w7")])),
                          "--project", "al")
    assert code == 0 and f"queued job {job_id}" in out  # the job already queued will see the new item too

    assert claim_next(engine, "test-worker")["id"] == job_id
    assert run_job(job_id, settings) == 0
    job = get_job(engine, job_id)
    assert job["status"] == "succeeded" and job["result"]["metrics"]["measure"] == "margin"
    assert job["result"]["metrics"]["scored"] == 9

    with reading(engine) as s:
        text = dict(s.execute(select(Item.id, Item.response_a).where(Item.project_id == pid)).all())
    served = []
    for _ in range(5):
        task = next_item(engine, pid, uid)
        served.append(text[task.item_id])
        submit(engine, uid, task.item_id, "a")
    assert all("good" not in t for t in served)  # the five unclear items before any clear one

    code, out, err = rlhf(capsys, monkeypatch, "project", "set", "al", "--selection", "random", "--json")
    assert code == 0 and json.loads(out)["selection"] == "random" and json.loads(out)["score_job"] is None
    with reading(engine) as s:
        assert set(s.scalars(select(Item.queue_key).where(Item.project_id == pid))) == {0.0}
    code, out, err = rlhf(capsys, monkeypatch, "project", "score", "al")
    assert code == 0 and "uses random selection" in out
    engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_selection_commands_refuse_bad_options(settings, capsys, monkeypatch):
    assert rlhf(capsys, monkeypatch, "project", "create", "al")[0] == 0
    code, out, err = rlhf(capsys, monkeypatch, "project", "set", "al", "--selection", "smart")
    assert code == 2 and "selection 'smart' is invalid" in err and "Traceback" not in err
    code, out, err = rlhf(capsys, monkeypatch, "project", "score", "al", "--measure", "loud")
    assert code == 2 and "--measure 'loud' is invalid" in err
    code, out, err = rlhf(capsys, monkeypatch, "project", "score", "al")
    assert code == 2 and "no active reward model" in err
    code, out, err = rlhf(capsys, monkeypatch, "project", "set", "nope", "--suggestions")
    assert code == 2 and "no project named 'nope'" in err


# --------------------------------------------------------------------------- did the suggestions sway people?


def test_newcombe_interval_matches_the_published_example():
    """Newcombe (1998), Statistics in Medicine 17:873, Table II example (a): 56/70 vs 48/80, the
    hybrid score interval (method 10) for the difference is 0.0524 to 0.3339."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    lo, hi = confint_proportions_2indep(56, 70, 48, 80, method="newcomb", compare="diff")
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)


def test_suggestion_effect_counts_who_chose_the_model_side(engine, tmp_path):
    from annotation.assign import next_item, submit
    from annotation.auth import create_user
    from annotation.projects import save_project_settings
    from annotation.selection import suggestion_effect
    from annotation.store import transaction

    pid, (u1, u2), ids = make_project(engine, 10, overlap=2)
    # the model prefers A on every item (r_A - r_B = 1 .. 10)
    score(engine, margins_scorer([float(i + 1) for i in range(10)]), tmp_path)
    assert suggestion_effect(engine, "al") is None  # nothing shown yet
    for _ in range(10):  # u1 answers without suggestions: A on 4 of 10
        task = next_item(engine, pid, u1)
        submit(engine, u1, task.item_id, "a" if task.item_id in ids[:4] else "b")
    save_project_settings(engine, pid, suggestions=True)
    for n in range(10):  # u2 sees "A" suggested: follows it on 9 of 10 (one tie)
        task = next_item(engine, pid, u2)
        assert task.suggestion == "a"
        submit(engine, u2, task.item_id, "a" if n < 9 else "tie")
    effect = suggestion_effect(engine, "al")
    assert effect["shown"] == {"n": 10, "chose_model_side": 0.9}
    assert effect["not_shown"] == {"n": 10, "chose_model_side": 0.4}
    assert effect["difference"] == pytest.approx(0.5)
    lo, hi = effect["interval"]
    assert lo < 0.5 < hi and lo > 0  # 9/10 vs 4/10 is a clear difference even at n = 10
    from app.cli_agreement import render_suggestions

    assert render_suggestions(effect) == [
        f"suggestions: chose the model's side in 90.0% of 10 answers given with its suggestion shown, 40.0% of 10 "
        f"without; difference +0.500  [{lo:.3f}, {hi:.3f}] (a large one means the suggestions sway people)"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_rlhf_agreement_reports_the_suggestion_effect(settings, tmp_path, capsys, monkeypatch):
    from annotation.assign import next_item, submit
    from annotation.projects import save_project_settings
    from annotation.store import init_db

    engine = init_db(settings.db_url)
    pid, (u1, u2), ids = make_project(engine, 3, overlap=2, suggestions=True)
    score(engine, margins_scorer([1.0, 2.0, 3.0]), tmp_path)
    for user in (u1, u2):
        for _ in range(3):
            submit(engine, user, next_item(engine, pid, user).item_id, "a")
    code, out, err = rlhf(capsys, monkeypatch, "agreement", "--project", "al", "--bootstrap", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["suggestions"]["shown"] == {"n": 6, "chose_model_side": 1.0}
    engine.dispose()


def test_scoring_a_random_project_stores_scores_and_leaves_the_order(engine, tmp_path):
    from annotation.assign import next_item
    from annotation.selection import wants_scores
    from annotation.store import Item, ItemScore, reading
    from sqlalchemy import func, select

    pid, (u1, _), ids = make_project(engine, 4, selection="random", suggestions=True)
    result = score(engine, margins_scorer([3.0, 0.1, -2.0, 0.0]), tmp_path)
    assert result.metrics["queued"] == 0 and result.metrics["scored"] == 4
    with reading(engine) as s:
        assert set(s.scalars(select(Item.queue_key).where(Item.project_id == pid))) == {0.0}
        assert s.scalar(select(func.count()).select_from(ItemScore)) == 4
    task = next_item(engine, pid, u1)
    assert task.item_id == ids[0] and task.suggestion == "a"  # import order, with the model's suggestion
    assert not wants_scores(engine, "al")  # suggestions on, but no active model to score with


def test_keys_are_rewritten_in_short_chunks_with_the_same_result(engine, tmp_path, monkeypatch):
    from annotation import selection

    monkeypatch.setattr(selection, "KEY_CHUNK", 3)
    pid, (u1, _), ids = make_project(engine, 8)
    margins = [3.0, 0.1, -2.0, 0.0, 5.0, -0.5, 1.0, -0.05]
    score(engine, margins_scorer(margins), tmp_path)
    assert served_order(engine, pid, u1, 8) == [ids[i] for i in np.argsort(np.abs(margins), kind="stable")]


def test_completed_items_keep_their_score_for_the_suggestion_effect(engine, tmp_path):
    from annotation.assign import next_item, submit
    from annotation.projects import save_project_settings
    from annotation.selection import suggestion_effect
    from annotation.store import ItemScore, reading
    from sqlalchemy import select

    pid, (u1, u2), ids = make_project(engine, 4, overlap=1)
    score(engine, margins_scorer([1.0, 2.0, 3.0, 4.0]), tmp_path)
    for _ in range(2):  # two items completed without a suggestion, the model's side chosen
        submit(engine, u1, next_item(engine, pid, u1).item_id, "a")
    score(engine, margins_scorer([1.0, 2.0, 3.0, 4.0]), tmp_path, seed=1)  # rescored: only the two open items
    with reading(engine) as s:
        kept = {r.item_id: r.queue_key for r in s.scalars(select(ItemScore))}
    assert len(kept) == 4 and sum(k is None for k in kept.values()) == 2  # the completed ones keep a score, no place
    save_project_settings(engine, pid, suggestions=True)
    for _ in range(2):
        submit(engine, u2, next_item(engine, pid, u2).item_id, "b")  # against the suggestion
    effect = suggestion_effect(engine, "al")
    assert effect["shown"] == {"n": 2, "chose_model_side": 0.0}
    assert effect["not_shown"] == {"n": 2, "chose_model_side": 1.0}


def test_a_resumed_lease_shows_no_confidence_once_the_model_changed_its_mind(engine, tmp_path):
    from annotation.assign import next_item

    pid, (u1, _), ids = make_project(engine, 1, suggestions=True)
    score(engine, margins_scorer([2.0]), tmp_path)
    assert next_item(engine, pid, u1).suggestion == "a"
    score(engine, margins_scorer([-2.0]), tmp_path, seed=1)  # rescored the other way while the lease runs
    again = next_item(engine, pid, u1)
    assert (again.suggestion, again.suggestion_confidence) == ("a", None)  # what was shown, no stale figure


def test_search_finds_accented_text_in_prompts_and_ranking_responses(engine):
    from annotation.browse import items_frame
    from annotation.projects import create_project
    from annotation.store import Item, transaction

    with transaction(engine) as s:
        project = create_project(s, "al", overlap=1)
        s.add_all([
            Item(project_id=project.id, prompt="Où est le café?", response_a="x", response_b="y", content_hash="h1"),
            Item(project_id=project.id, prompt="q", response_a="", response_b="", content_hash="h2",
                 responses=[{"text": f"crème brûlée {i}", "source": None} for i in range(3)]),
            Item(project_id=project.id, prompt="100% sure_thing", response_a="x", response_b="y", content_hash="h3"),
        ])
        pid = project.id
    assert list(items_frame(engine, pid, search="café")[0]["prompt"]) == ["Où est le café?"]
    assert len(items_frame(engine, pid, search="Brûlée 2")[0]) == 1
    assert list(items_frame(engine, pid, search="0% s")[0]["prompt"]) == ["100% sure_thing"]
    assert len(items_frame(engine, pid, search="%")[0]) == 1  # a percent sign is text, not a wildcard
