"""The job queue and worker: lifecycle (queued, running, succeeded, failed, cancelled, worker
killed), atomic claims under concurrency, and the `rlhf jobs` / `rlhf worker` commands, on SQLite
and PostgreSQL. Handlers are the test ones in tests/job_handlers.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation.store import Job, RegisteredModel, init_db, transaction, utcnow
from app import jobs

REPO = Path(__file__).resolve().parent.parent
EXTRA = ("t_ok=tests.job_handlers:succeed,t_fail=tests.job_handlers:fail,"
         "t_badreg=tests.job_handlers:fail_after_register_list,t_loop=tests.job_handlers:loop,"
         "t_stubborn=tests.job_handlers:stubborn")
CLI = [sys.executable, "-c", "from app.cli import main; main()"]


@pytest.fixture
def jset(settings, monkeypatch):
    """Settings with a 1 s heartbeat and 3 s staleness, the test handlers enabled, schema migrated."""
    from app import settings as settings_mod

    monkeypatch.setenv("RLHF_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("RLHF_STALE_AFTER_SECONDS", "3")
    monkeypatch.setenv(jobs.EXTRA_HANDLERS_ENV, EXTRA)
    # The job subprocess imports tests.job_handlers, whatever directory pytest was started from.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    settings_mod.get_settings.cache_clear()
    s = settings_mod.get_settings()
    eng = init_db(s.db_url)
    yield s, eng
    eng.dispose()


def models(eng):
    with transaction(eng) as s:
        return list(s.scalars(select(RegisteredModel)))


def wait_for(pred, timeout=20.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it has stopped running all the same.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def quiet(_msg):
    pass


# --------------------------------------------------------------------------- submit / list / cancel


def test_submit_validates_kind_and_params(jset):
    _, eng = jset
    with pytest.raises(jobs.JobError, match="unknown job kind 'train'"):
        jobs.submit_job(eng, "train", {})
    with pytest.raises(jobs.JobError, match="JSON object"):
        jobs.submit_job(eng, "train_rm", ["project", "x"])
    with pytest.raises(jobs.JobError, match="needs param.*project"):
        jobs.submit_job(eng, "export", {"format": "trl"})
    with pytest.raises(jobs.JobError, match="JSON-serialisable"):
        jobs.submit_job(eng, "train_rm", {"when": object()})
    with pytest.raises(jobs.JobError, match="no user with id 99"):
        jobs.submit_job(eng, "train_rm", {"project": "p"}, created_by=99)
    # The use case's spec is checked at submission: a form or `rlhf jobs submit` hears of a bad value
    # at once, instead of a job that fails in the worker.
    with pytest.raises(jobs.JobError, match=r"train_rm: --epochs -1.0 is invalid; expected a positive number"):
        jobs.submit_job(eng, "train_rm", {"project": "p", "epochs": -1})
    with pytest.raises(jobs.JobError, match=r"ppo: unknown param\(s\) learnin_rate"):
        jobs.submit_job(eng, "ppo", {"reward_model": "rm", "prompts_project": "p", "learnin_rate": 1e-5})
    with pytest.raises(jobs.JobError, match="batch_size \\(10\\) must be a multiple of mini_batch_size"):
        jobs.submit_job(eng, "ppo", {"reward_model": "rm", "prompts_project": "p", "batch_size": 10, "mini_batch_size": 4})
    with pytest.raises(jobs.JobError, match="exactly one of --data FILE or --project NAME"):
        jobs.submit_job(eng, "sft", {})
    job_id = jobs.submit_job(eng, "train_rm", {"project": "p", "epochs": 1})
    job = jobs.get_job(eng, job_id)
    assert (job["status"], job["kind"], job["params"], job["progress"]) == ("queued", "train_rm", {"project": "p", "epochs": 1}, 0.0)
    assert [j["id"] for j in jobs.list_jobs(eng, status="queued")] == [job_id]
    assert jobs.list_jobs(eng, status="running") == []
    with pytest.raises(jobs.JobError, match="no job with id 12345"):
        jobs.get_job(eng, 12345)


@pytest.mark.parametrize("kind, params, message", [
    ("dpo", {"data": "p.jsonl", "beta": 0}, r"dpo: DPO option beta=0.0 \(--beta\) is invalid"),
    ("dpo", {"data": "p.jsonl", "betta": 0.2}, r"dpo: unknown param\(s\) betta"),
    ("grpo", {"prompts": "q.jsonl"}, r"grpo: --reward-model is required"),
    ("grpo", {"reward_model": "rm", "prompts": "q.jsonl", "batch_size": 6}, r"grpo: GRPO/RLOO option batch_size=6"),
    ("rloo", {"reward_model": "rm", "prompts": "q.jsonl", "loss_type": "grpo"}, r"rloo: RLOO option loss_type='grpo'"),
    ("generate", {"policy": "p", "project": "r2"}, r"generate: give exactly one of --prompts FILE or --prompts-project NAME"),
    ("generate", {"policy": "p", "project": "r2", "prompts": "q.jsonl", "temperature": 0}, r"generate: temperature=0.0 is invalid"),
    ("eval_policy", {"policy": "p", "reward_model": "rm", "prompts": "q.jsonl", "n": 0}, r"eval_policy: --n 0: expected"),
    ("eval_rm", {"data": "p.jsonl"}, r"eval_rm: --model is required"),
    ("export", {"project": "p", "format": "csv"}, r"export: --format 'csv': expected one of"),
])
def test_every_use_case_spec_is_checked_at_submission(jset, kind, params, message):
    """Each kind's spec (app.jobs.JOB_TABLE) checks its params when the job is submitted, naming the option."""
    _, eng = jset
    with pytest.raises(jobs.JobError, match=message):
        jobs.submit_job(eng, kind, params)
    assert jobs.list_jobs(eng) == []


def test_cancel_while_queued_is_immediate_and_the_worker_never_runs_it(jset):
    s, eng = jset
    job_id = jobs.submit_job(eng, "t_ok", {})
    assert jobs.cancel_job(eng, job_id) == "cancelled"
    assert jobs.get_job(eng, job_id)["status"] == "cancelled"
    assert jobs.run_worker(s, once=True, poll=0.1, log=quiet) == 0
    assert models(eng) == [] and not jobs.job_run_dir(s, job_id).exists()
    with pytest.raises(jobs.JobError, match="already cancelled"):
        jobs.cancel_job(eng, job_id)


def test_cancel_from_the_app_checks_the_user_inside_the_action(jset):
    """The pages' Cancel buttons pass the acting user: an annotator, or a researcher deactivated since
    the page was drawn, cannot cancel a job."""
    from annotation.auth import create_user
    from annotation.errors import AnnotationError
    from annotation.store import User

    _, eng = jset
    with transaction(eng) as s:
        ann = create_user(s, "ann-cancel", None, "annotator").id
        res = create_user(s, "res-cancel", None, "researcher").id
    job_id = jobs.submit_job(eng, "t_ok", {})
    with pytest.raises(AnnotationError, match="permission denied"):
        jobs.cancel_job(eng, job_id, by_user_id=ann)
    with transaction(eng) as s:
        s.get(User, res).active = False
    with pytest.raises(AnnotationError, match="not logged in"):
        jobs.cancel_job(eng, job_id, by_user_id=res)
    assert jobs.get_job(eng, job_id)["status"] == "queued"
    with transaction(eng) as s:
        s.get(User, res).active = True
    assert jobs.cancel_job(eng, job_id, by_user_id=res) == "cancelled"


def test_claims_are_atomic_under_concurrent_workers(jset):
    _, eng = jset
    ids = {jobs.submit_job(eng, "t_ok", {"i": i}) for i in range(24)}
    claimed: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def claimer(n):
        try:
            start.wait()
            while (job := jobs.claim_next(eng, f"test-host:{n}")) is not None:
                claimed.append(job["id"])
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(claimed) == sorted(ids), "every job claimed exactly once"
    with transaction(eng) as session:
        rows = session.execute(select(Job.status, Job.worker)).all()
    assert {r.status for r in rows} == {"running"} and all(r.worker.startswith("test-host:") for r in rows)


def test_claim_takes_the_oldest_queued_job_first(jset):
    _, eng = jset
    first, second = jobs.submit_job(eng, "t_ok", {}), jobs.submit_job(eng, "t_ok", {})
    job = jobs.claim_next(eng, "w:1")
    assert job["id"] == first and job["status"] == "running" and job["worker"] == "w:1"
    assert jobs.claim_next(eng, "w:2")["id"] == second
    assert jobs.claim_next(eng, "w:3") is None


# --------------------------------------------------------------------------- the worker


def test_job_runs_to_success_with_progress_log_and_registered_model(jset):
    s, eng = jset
    job_id = jobs.submit_job(eng, "t_ok", {"name": "rm-1", "steps": 4})
    assert jobs.run_worker(s, once=True, poll=0.2, log=quiet) == 1
    job = jobs.get_job(eng, job_id)
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert job["started_at"] and job["finished_at"] and job["heartbeat_at"]
    (model,) = models(eng)
    assert (model.name, model.kind, model.job_id, model.metrics) == ("rm-1", "reward", job_id, {"accuracy": 0.75})
    assert job["result"] == {"accuracy": 0.75, "registered_model_ids": [model.id]}
    log = Path(job["log_path"]).read_text()
    assert Path(job["log_path"]).parent == jobs.job_run_dir(s, job_id)
    assert "progress 25%: step 1/4" in log and "did step 4" in log and "succeeded" in log
    assert "did step 4" in jobs.log_tail(job, 5)


def test_failed_job_keeps_its_traceback_and_registers_nothing(jset):
    s, eng = jset
    fail_id = jobs.submit_job(eng, "t_fail", {"why": "disk on fire"})
    badreg_id = jobs.submit_job(eng, "t_badreg", {})
    assert jobs.run_worker(s, once=True, poll=0.2, log=quiet) == 1
    assert jobs.run_worker(s, once=True, poll=0.2, log=quiet) == 1
    failed = jobs.get_job(eng, fail_id)
    assert failed["status"] == "failed" and failed["message"] == "ValueError: disk on fire"
    assert failed["progress"] == 0.5 and failed["result"] is None
    log = Path(failed["log_path"]).read_text()
    assert "Traceback (most recent call last)" in log and "raise ValueError" in log
    badreg = jobs.get_job(eng, badreg_id)
    assert badreg["status"] == "failed" and "not-a-kind" in badreg["message"]
    assert models(eng) == [], "the valid first entry of a failing register list is rolled back too"


def _cancel_when_running(eng, job_id, box):
    wait_for(lambda: (j := jobs.get_job(eng, job_id))["status"] == "running" and j["progress"] > 0)
    box["answer"] = jobs.cancel_job(eng, job_id)


@pytest.mark.parametrize("kind", ["t_loop", "t_stubborn"])
def test_cancel_while_running_stops_the_job_process_and_registers_nothing(jset, kind):
    """t_loop polls ctx.cancelled(); t_stubborn ignores SIGTERM and is killed after the grace period."""
    s, eng = jset
    job_id = jobs.submit_job(eng, kind, {"seconds": 30})
    box: dict = {}
    canceller = threading.Thread(target=_cancel_when_running, args=(eng, job_id, box))
    canceller.start()
    t0 = time.monotonic()
    jobs.run_worker(s, once=True, poll=0.2, grace=1.0, log=quiet)
    canceller.join(30)
    assert box["answer"] == "cancel_requested"
    assert time.monotonic() - t0 < 20, "the cancel was acted on, not waited out"
    job = jobs.get_job(eng, job_id)
    assert job["status"] == "cancelled" and job["message"].startswith("cancelled")
    assert models(eng) == []
    assert pid_gone(int((jobs.job_run_dir(s, job_id) / "pid").read_text()))


def test_worker_killed_mid_job_leaves_the_job_failed_on_next_start_and_nothing_registered(jset):
    s, eng = jset
    job_id = jobs.submit_job(eng, "t_loop", {"seconds": 30})
    worker = subprocess.Popen(CLI + ["worker", "--poll", "0.2"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (j := jobs.get_job(eng, job_id))["status"] == "running" and j["progress"] > 0, timeout=60)
        child_pid = int((jobs.job_run_dir(s, job_id) / "pid").read_text())
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    # The job process dies with its worker, so it cannot finish and register behind our back.
    wait_for(lambda: pid_gone(child_pid), timeout=10)
    assert jobs.get_job(eng, job_id)["status"] == "running", "nobody is left to record the outcome yet"

    assert jobs.run_worker(s, once=True, poll=0.2, log=quiet) == 0
    job = jobs.get_job(eng, job_id)
    assert job["status"] == "failed" and job["message"].startswith("worker lost") and "is gone" in job["message"]
    assert models(eng) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_worker_stopped_with_sigterm_stops_its_job_and_marks_it_failed(jset):
    s, eng = jset
    job_id = jobs.submit_job(eng, "t_loop", {"seconds": 30})
    worker = subprocess.Popen(CLI + ["worker", "--poll", "0.2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (j := jobs.get_job(eng, job_id))["status"] == "running" and j["progress"] > 0, timeout=60)
        child_pid = int((jobs.job_run_dir(s, job_id) / "pid").read_text())
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    job = jobs.get_job(eng, job_id)
    assert job["status"] == "failed" and job["message"].startswith("the worker was stopped") and models(eng) == []
    assert pid_gone(child_pid)


def test_stale_heartbeat_from_another_host_is_reaped_and_a_fresh_one_is_not(jset):
    import datetime as dt

    _, eng = jset
    old_id, fresh_id = jobs.submit_job(eng, "t_ok", {}), jobs.submit_job(eng, "t_ok", {})
    jobs.claim_next(eng, "elsewhere:1")
    jobs.claim_next(eng, "elsewhere:2")
    with transaction(eng) as session:
        session.get(Job, old_id).heartbeat_at = utcnow() - dt.timedelta(seconds=60)
    assert jobs.reap_stale_jobs(eng, 3, log=quiet) == [old_id]
    assert jobs.get_job(eng, old_id)["status"] == "failed" and "no heartbeat since" in jobs.get_job(eng, old_id)["message"]
    assert jobs.get_job(eng, fresh_id)["status"] == "running"


def test_a_reaped_job_cannot_succeed_afterwards(jset):
    """If a lost job's process were still alive, its final commit must not register anything."""
    s, eng = jset
    job_id = jobs.submit_job(eng, "t_ok", {})
    jobs.claim_next(eng, "elsewhere:1")
    with transaction(eng) as session:
        session.get(Job, job_id).status = "failed"
    with pytest.raises(jobs.JobCancelled):
        jobs._complete(eng, job_id, {"register": [{"kind": "reward", "name": "late", "path": "/x"}]})
    assert models(eng) == [] and jobs.get_job(eng, job_id)["status"] == "failed"


# --------------------------------------------------------------------------- the commands


def run_cli(args, timeout=60):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # a thin shell over the functions above; one DB suffices
def test_jobs_commands_submit_list_show_cancel_and_worker_once(jset):
    _, eng = jset
    with transaction(eng) as session:
        from annotation.auth import create_user

        create_user(session, "alice", "password123", "researcher")
    proc = run_cli(["jobs", "submit", "t_ok", "--param", "name=rm-cli", "--param", "steps=2", "--user", "alice", "--json"])
    assert proc.returncode == 0, proc.stderr
    submitted = json.loads(proc.stdout)
    assert submitted["status"] == "queued" and submitted["params"] == {"name": "rm-cli", "steps": 2}
    assert submitted["created_by_name"] == "alice"

    queued = run_cli(["jobs", "submit", "t_ok", "--params-json", '{"name": "second"}', "--json"])
    second = json.loads(queued.stdout)["id"]
    assert run_cli(["jobs", "cancel", str(second)]).stdout.strip() == f"job {second} cancelled"

    proc = run_cli(["worker", "--once", "--poll", "0.2"])
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(run_cli(["jobs", "list", "--json"]).stdout)["jobs"]
    assert [(j["id"], j["status"]) for j in listed] == [(second, "cancelled"), (submitted["id"], "succeeded")]
    shown = run_cli(["jobs", "show", str(submitted["id"])])
    assert "succeeded" in shown.stdout and "did step 2" in shown.stdout and "registered_model_ids" in shown.stdout

    bad = run_cli(["jobs", "submit", "nonsense"])
    assert bad.returncode == 2 and "unknown job kind 'nonsense'" in bad.stderr


def test_param_options_parse_json_values_and_refuse_malformed_pairs():
    from app.cli_jobs import _params

    assert _params(["a=1", "b=x", "c=[1, 2]", "d=true"], '{"a": 0, "e": "kept"}') == {
        "a": 1, "b": "x", "c": [1, 2], "d": True, "e": "kept"}
    with pytest.raises(jobs.JobError, match="expected key=value"):
        _params(["novalue"], None)
    with pytest.raises(jobs.JobError, match="must be a JSON object"):
        _params([], "[1]")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # export itself is tested on both DBs in test_io
def test_export_job_writes_the_projects_pairs_into_its_run_dir(jset, tmp_path):
    from annotation.io import import_file

    s, eng = jset
    data = tmp_path / "labelled.jsonl"
    rows = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_file(eng, data, "p", format="trl")
    ok = jobs.submit_job(eng, "export", {"project": "p", "format": "trl", "filename": "p.jsonl"})
    with pytest.raises(jobs.JobError, match="plain file name"):
        jobs.submit_job(eng, "export", {"project": "p", "format": "trl", "filename": "../../elsewhere.jsonl"})
    missing = jobs.submit_job(eng, "export", {"project": "nope", "format": "trl"})
    jobs.run_worker(s, once=True, poll=0.2, log=quiet)
    jobs.run_worker(s, once=True, poll=0.2, log=quiet)
    job = jobs.get_job(eng, ok)
    assert job["status"] == "succeeded", job["message"]
    out = Path(job["result"]["path"])
    assert out == jobs.job_run_dir(s, ok) / "p.jsonl"
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(p["chosen"] for p in pairs) == sorted(r["chosen"] for r in rows)
    assert job["result"]["report"]["exported"] == 6 and models(eng) == []
    failed = jobs.get_job(eng, missing)
    assert failed["status"] == "failed" and failed["message"].startswith("no project named 'nope'")


def test_one_table_of_job_kinds():
    """app.jobs.JOB_TABLE is the table of kinds; the store's list (annotation cannot import app) must match it."""
    from annotation.store import JOB_KINDS

    assert set(JOB_KINDS) == set(jobs.JOB_TABLE) == set(jobs.HANDLERS)
    for kind, job in jobs.JOB_TABLE.items():
        module, _, name = job.handler.partition(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name)), kind
        if job.spec:
            module, _, name = job.spec.partition(":")
            assert hasattr(__import__(module, fromlist=[name]), name), kind
