"""The Reward Models page under Streamlit's AppTest: role check, the retrain button queues a train_rm
job, versions with metrics read from run directories, and the active flag. No model runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation.store import Job, Project, RegisteredModel, User, session_factory, transaction
from browser_helpers import open_page_as

PAGE = Path(__file__).resolve().parent.parent / "app" / "pages" / "5_Reward_Models.py"


def open_page(engine, username):
    return open_page_as(PAGE, engine, username)


def fake_run(path: Path, accuracy: float) -> Path:
    """A run directory with the files the page reads, written by hand."""
    path.mkdir(parents=True)
    (path / "training_curve.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.7 - 0.1 * s}) + "\n" for s in range(1, 4)))
    ev = {"calibration": [{"lo": 0.5, "hi": 0.75, "count": 3, "confidence": 0.6, "accuracy": accuracy}],
          "length_bias": {"chosen_longer": {"n_pairs": 2, "accuracy": 1.0}, "chosen_shorter": {"n_pairs": 1, "accuracy": 0.0}}}
    (path / "metrics.json").write_text(json.dumps({"eval_accuracy": accuracy, "eval": ev}))
    return path


def test_annotators_are_refused(store):
    at = open_page(store, "ann1")
    assert "This page is for researchers" in at.error[0].value and not at.button


def test_retrain_button_queues_a_train_rm_job_for_the_project(store):
    at = open_page(store, "res")
    assert any("No reward model registered" in i.value for i in at.info)
    at.number_input[0].set_value(2.0)  # epochs
    at.button[0].click().run()  # the form's "Retrain reward model"
    with transaction(store) as s:
        job = s.scalars(select(Job)).one()
        res_id = s.scalar(select(User.id).where(User.username == "res"))
        assert (job.kind, job.status, job.created_by) == ("train_rm", "queued", res_id)
        assert job.params["project"] == "demo" and job.params["epochs"] == 2.0 and job.params["base"] == "minilm"
    assert any("queued job" in s.value for s in at.success)
    assert at.get("progress")  # the job's progress bar is on the page


def test_versions_show_metrics_and_make_active_switches_the_flag(store, tmp_path):
    from annotation.registry import register_model

    with transaction(store) as s:
        pid = s.scalar(select(Project.id).where(Project.name == "demo"))
        a = register_model(s, kind="reward", name="rm-a", path=str(fake_run(tmp_path / "a", 0.6)), project_id=pid,
                           metrics={"eval_accuracy": 0.6}, active=True).id
        b = register_model(s, kind="reward", name="rm-b", path=str(fake_run(tmp_path / "b", 0.7)), project_id=pid,
                           metrics={"eval_accuracy": 0.7}, parent_id=a).id
    at = open_page(store, "res")
    table = at.dataframe[0].value
    assert list(table["name"]) == ["rm-b", "rm-a"] and list(table["eval_accuracy"]) == [0.7, 0.6]
    assert len(at.get("vega_lite_chart")) == 3  # curve, calibration, length bias
    make_active = next(sb for sb in at.selectbox if sb.label == "Make active")
    make_active.set_value(b)
    next(btn for btn in at.button if btn.label == "Make active").click().run()
    with transaction(store) as s:
        assert s.get(RegisteredModel, b).active and not s.get(RegisteredModel, a).active
