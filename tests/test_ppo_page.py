"""The PPO page (app/pages/6_PPO.py) under Streamlit's AppTest: role check, starting a run as a
job, live curves, warnings and samples read from a run directory, registered policies, and
queuing a generation job. No model runs here: the page only submits jobs and reads run files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select, update

from annotation.store import Job, User, session_factory, transaction
from browser_helpers import open_page_as

PAGE = Path(__file__).resolve().parent.parent / "app" / "pages" / "6_PPO.py"


def open_page(engine, username):
    return open_page_as(PAGE, engine, username)


def register(engine, **fields):
    from annotation.registry import register_model

    with transaction(engine) as s:
        return register_model(s, **fields).id


def test_annotators_are_refused(store):
    at = open_page(store, "ann1")
    assert len(at.error) == 1 and "This page is for researchers" in at.error[0].value and not at.button


def test_a_run_is_started_as_a_ppo_job_with_the_chosen_models_and_settings(store, tmp_path):
    at = open_page(store, "res")
    assert any("No reward model is registered yet" in i.value for i in at.info)
    register(store, kind="reward", name="rm-hh", path=str(tmp_path / "rm"))
    register(store, kind="policy", name="sft-1", path=str(tmp_path / "sft"))
    at = open_page(store, "res")
    at.selectbox(key="ppo_policy").set_value("sft-1 (#2)")
    at.number_input(key="ppo_steps").set_value(12)
    at.checkbox(key="ppo_lora").check()
    next(b for b in at.button if b.label == "Start PPO run").click()
    at.run()
    assert not at.exception, at.exception
    with session_factory(store)() as s:
        (job,) = s.scalars(select(Job)).all()
    assert job.kind == "ppo" and job.status == "queued"
    assert job.params["policy"] == str(tmp_path / "sft") and job.params["reward_model"] == str(tmp_path / "rm")
    assert job.params["prompts_project"] == "demo" and job.params["steps"] == 12 and job.params["lora"] is True
    assert any("queued as job" in s.value for s in at.success)
    # The policies tab lists the registered policy.
    assert "sft-1" in at.dataframe[-1].value.to_csv() or any("sft-1" in f.value.to_csv() for f in at.dataframe)


def test_a_bad_setting_is_refused_with_the_config_message(store, tmp_path):
    register(store, kind="reward", name="rm-hh", path=str(tmp_path / "rm"))
    at = open_page(store, "res")
    at.number_input(key="ppo_batch_size").set_value(10)
    at.number_input(key="ppo_mini_batch_size").set_value(4)
    next(b for b in at.button if b.label == "Start PPO run").click()
    at.run()
    assert any("must be a multiple of mini_batch_size" in e.value for e in at.error)
    with session_factory(store)() as s:
        assert s.scalars(select(Job)).all() == []


def test_a_finished_run_shows_its_curves_warnings_and_samples(store, tmp_path):
    from app.jobs import submit_job
    from app.settings import get_settings

    job_id = submit_job(store, "ppo", {"reward_model": "rm", "prompts_project": "demo", "steps": 3})
    from ppo.runs import job_run_dir

    run = job_run_dir(Path(get_settings().runs_dir) / f"job-{job_id}")  # the fixed place the ppo job writes its run
    run.mkdir(parents=True)
    base = {"reward_std": 1.0, "kl_coef": 0.05, "entropy": 2.0, "value_loss": 0.1, "response_length": 20.0,
            "truncated_fraction": 0.0}
    rows = [{**base, "step": s, "reward_mean": 0.1 * s, "kl": kl} for s, kl in ((1, 0.5), (2, 3.0), (3, 40.0))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew', encoding="utf-8")
    (run / "config.yaml").write_text("target: 6.0\nsteps: 3\n", encoding="utf-8")
    (run / "samples.jsonl").write_text(json.dumps({"step": 3, "prompt": "hi <b>there</b>", "response": "RESPONSE-XYZ",
                                                   "score": 0.3, "ended_with_eos": True}) + "\n", encoding="utf-8")
    with transaction(store) as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="succeeded", progress=1.0, message="done"))
    at = open_page(store, "res")
    assert not at.exception, at.exception
    assert [m.value for m in at.metric][:3] == ["3", "0.300", "40.00"]
    assert any("divergence" in w.value or "above the hard limit" in w.value for w in at.warning)
    assert any("RESPONSE-XYZ" in f.value.to_csv() for f in at.dataframe)
    assert len(at.get("vega_lite_chart")) == 2


def test_generation_is_queued_for_a_target_project(store, tmp_path):
    register(store, kind="policy", name="ppo-2", path=str(tmp_path / "ppo2"))
    at = open_page(store, "res")
    at.selectbox(key="gen_policy").set_value("ppo-2 (#1)")
    at.text_input(key="gen_target").input("round-2")
    next(b for b in at.button if b.label == "Generate items").click()
    at.run()
    with session_factory(store)() as s:
        (job,) = s.scalars(select(Job)).all()
    assert job.kind == "generate" and job.params == {"policy": str(tmp_path / "ppo2"), "prompts_project": "demo",
                                                      "project": "round-2", "n": 50, "temperature": 1.0}


def test_prompts_come_from_a_project_or_an_upload_never_a_server_path(store, tmp_path):
    """The page offered a text box for "a prompts file on the server", which let a researcher make the
    worker read (and show) any JSONL on the machine. Now it takes an upload, kept under a name of ours."""
    from ppo.errors import PPOError
    from ppo.prompts import read_prompts, save_uploaded_prompts

    register(store, kind="reward", name="rm-hh", path=str(tmp_path / "rm"))
    at = open_page(store, "res")
    assert not [t for t in at.text_input if "server" in (t.label or "").lower()]
    folder = tmp_path / "uploads"
    saved = save_uploaded_prompts(folder, "../../etc/passwd.jsonl", b'{"prompt": "hi"}\n{"prompt": "yo"}\n')
    assert saved.parent == folder and saved.name.startswith("prompts-") and read_prompts(saved) == ["hi", "yo"]
    with pytest.raises(PPOError, match=r"mine\.jsonl") as err:
        save_uploaded_prompts(folder, "mine.jsonl", b'{"no": "prompt"}\n')
    assert str(folder) not in str(err.value)
    assert list(folder.iterdir()) == [saved]  # the bad upload kept nothing
