"""Training under `accelerate launch`, run here with configs/accelerate/cpu2.yaml: two CPU processes
data-parallel over gloo. The shipped configs load and pick the right launcher; the worker's
train_rm job trains in both processes and registers ONE model; a failing process fails its job;
a cancel stops every process; `rlhf train-rm` under accelerate launch writes and registers one run.

SQLite only: the database is not what is under test, and each launch costs tens of seconds here.
The job-path tests use `ranks_handler` below as a job kind (the job processes import this module).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation.store import RegisteredModel, init_db, transaction
from app import jobs

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "accelerate"
CPU2 = CONFIGS / "cpu2.yaml"
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


# --------------------------------------------------------------------------- a job kind for the tests


def ranks_handler(params, ctx):
    """Runs in every process of the job: records its pid, joins the others in an all-reduce (so the
    processes really are one group), then fails on rank params["fail_rank"], or ticks every 0.1 s
    for params["loop_seconds"] (polling cancel), then returns one model to register. Rank
    params["deaf_rank"] ignores SIGTERM while it ticks (and then no rank all-reduces in the loop,
    as that rank would not leave it)."""
    import signal

    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    # A bare Accelerator(), as in ppo/train.py: on this CPU host it forms one gloo group only
    # because the job process sets ACCELERATE_USE_CPU (app.jobs._prepare_rank).
    state = Accelerator().state
    (Path(params["pid_dir"]) / f"rank{state.process_index}.pid").write_text(str(os.getpid()))
    total = torch.tensor([float(state.process_index + 1)])
    dist.all_reduce(total)
    if state.process_index == params.get("fail_rank"):
        raise ValueError(f"rank {state.process_index} broke on purpose")
    deaf = params.get("deaf_rank")
    if state.process_index == deaf:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline, tick = time.monotonic() + float(params.get("loop_seconds", 0)), 0
    while time.monotonic() < deadline:
        ctx.raise_if_cancelled()
        if deaf is None:
            dist.all_reduce(torch.ones(1))
        tick += 1
        ctx.progress(min(0.9, tick / 1000), f"tick {tick}")
        time.sleep(0.1)
    out = ctx.run_dir / "model"
    out.mkdir()
    return {"register": [{"kind": "reward", "name": "rm-ranks", "path": str(out),
                          "metrics": {"processes": state.num_processes, "rank_sum": total.item()}}]}


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def acc(settings, monkeypatch):
    """Settings with the worker launching training kinds through cpu2.yaml, the test kind enabled."""
    from app import settings as settings_mod

    monkeypatch.setenv("RLHF_ACCELERATE_CONFIG", str(CPU2.relative_to(REPO)))
    monkeypatch.setenv(jobs.EXTRA_HANDLERS_ENV, "t_ranks=tests.test_accelerate:ranks_handler")
    monkeypatch.setattr(jobs, "ACCELERATE_KINDS", (*jobs.ACCELERATE_KINDS, "t_ranks"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RLHF_HEARTBEAT_SECONDS", "1")
    monkeypatch.chdir(REPO)  # the relative config path resolves from here
    settings_mod.get_settings.cache_clear()
    s = settings_mod.get_settings()
    eng = init_db(s.db_url)
    yield s, eng
    eng.dispose()


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A 2-layer BERT reward base and 40 synthetic preference pairs (chosen says "good")."""
    from reward_fixtures import save_tiny_bert, synthetic_pairs  # tests/ is on sys.path under pytest

    root = tmp_path_factory.mktemp("task")
    base = save_tiny_bert(root / "tiny-bert")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in synthetic_pairs(40, seed=1)))
    return base, data


def models(eng):
    with transaction(eng) as s:
        return list(s.scalars(select(RegisteredModel)))


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie still answers kill(0), yet it has stopped
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def quiet(_msg):
    pass


# --------------------------------------------------------------------------- configs


def test_shipped_configs_load_and_choose_their_launcher():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    def parsed(name):
        args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "app.jobs", "run", "1"])
        return _validate_launch_command(args)[0]

    cpu2, ddp, fsdp, zero2 = (parsed(n) for n in ("cpu2.yaml", "ddp.yaml", "fsdp.yaml", "zero2.yaml"))
    # cpu2 must go through the launcher that starts N local processes, as CPU ranks.
    assert (cpu2.multi_gpu, cpu2.use_cpu, cpu2.num_processes) == (True, True, 2)
    assert (ddp.multi_gpu, ddp.use_cpu, ddp.use_fsdp, ddp.use_deepspeed) == (True, False, False, False)
    assert fsdp.use_fsdp and not fsdp.multi_gpu
    assert (fsdp.fsdp_version, fsdp.fsdp_reshard_after_forward, fsdp.fsdp_auto_wrap_policy) == (2, True, "TRANSFORMER_BASED_WRAP")
    assert zero2.use_deepspeed and zero2.zero_stage == 2
    assert all(a.module and a.training_script == "app.jobs" for a in (cpu2, ddp, fsdp, zero2))


@sqlite_only
def test_worker_command_uses_accelerate_only_for_training_kinds_when_configured(settings, monkeypatch):
    from app import settings as settings_mod

    monkeypatch.delenv("RLHF_ACCELERATE_CONFIG", raising=False)
    settings_mod.get_settings.cache_clear()
    settings = settings_mod.get_settings()
    assert jobs.job_command(settings, 7, "train_rm") == [sys.executable, "-m", "app.jobs", "run", "7"]
    monkeypatch.setenv("RLHF_ACCELERATE_CONFIG", "configs/accelerate/ddp.yaml")
    monkeypatch.chdir("/")  # a relative path not found from here resolves against the repository
    settings_mod.get_settings.cache_clear()
    s = settings_mod.get_settings()
    for kind in ("train_rm", "sft", "ppo"):
        assert jobs.job_command(s, 7, kind) == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                                str(CONFIGS / "ddp.yaml"), "-m", "app.jobs", "run", "7"]
    assert jobs.job_command(s, 7, "export") == [sys.executable, "-m", "app.jobs", "run", "7"]
    monkeypatch.setenv("RLHF_ACCELERATE_CONFIG", "configs/accelerate/nope.yaml")
    settings_mod.get_settings.cache_clear()
    with pytest.raises(jobs.JobError, match="nope.yaml: no such file"):
        jobs.run_worker(settings_mod.get_settings(), once=True, log=quiet)


# --------------------------------------------------------------------------- the job path


@pytest.mark.slow
@sqlite_only
def test_train_rm_job_trains_in_two_processes_and_registers_one_model(acc, tiny_task):
    s, eng = acc
    base, data = tiny_task
    params = {"data": str(data), "base": str(base), "epochs": 2, "batch_size": 4, "max_length": 32, "threads": 1}
    job_id = jobs.submit_job(eng, "train_rm", params)
    assert jobs.run_worker(s, once=True, poll=0.2, log=quiet) == 1
    job = jobs.get_job(eng, job_id)
    assert job["status"] == "succeeded", jobs.log_tail(job, 60)
    (model,) = models(eng)
    run_dir = jobs.job_run_dir(s, job_id)
    assert model.path == str(run_dir / "model") and (run_dir / "model" / "model.safetensors").is_file()
    # Each optimizer step takes batch_size pairs in each of the 2 processes: half the steps of one process.
    assert model.metrics["steps"] == math.ceil(model.data_rows / (4 * 2)) * 2
    log = Path(job["log_path"]).read_text()
    assert "started in 2 processes (accelerate launch), this is rank 0" in log
    assert sorted(p.name for p in run_dir.iterdir()) == ["job.log", "model"], "rank 1's scratch dir is gone"


@pytest.mark.slow
@sqlite_only
def test_a_failing_process_fails_the_job_and_registers_nothing(acc, tmp_path):
    s, eng = acc
    job_id = jobs.submit_job(eng, "t_ranks", {"pid_dir": str(tmp_path), "fail_rank": 1})
    jobs.run_worker(s, once=True, poll=0.2, log=quiet)
    job = jobs.get_job(eng, job_id)
    # Rank 0's handler returned a model to register; it must not be, since rank 1 failed.
    assert job["status"] == "failed" and "another process of this job failed" in job["message"], job["message"]
    assert models(eng) == []
    log = Path(job["log_path"]).read_text()
    assert "rank1 ERROR" in log and "ValueError: rank 1 broke on purpose" in log


@pytest.mark.slow
@sqlite_only
def test_cancel_stops_every_process_of_the_job_even_one_deaf_to_sigterm(acc, tmp_path):
    """The worker's SIGTERM reaches the launcher, which passes it on to every rank; rank 1 here
    ignores it, and dies with the launcher once the worker SIGKILLs that after the grace period."""
    s, eng = acc
    job_id = jobs.submit_job(eng, "t_ranks", {"pid_dir": str(tmp_path), "loop_seconds": 60, "deaf_rank": 1})
    pid_files = [tmp_path / "rank0.pid", tmp_path / "rank1.pid"]
    box: dict = {}

    def cancel_when_both_run():
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if all(p.exists() for p in pid_files) and jobs.get_job(eng, job_id)["progress"] > 0:
                box["answer"] = jobs.cancel_job(eng, job_id)
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel_when_both_run)
    canceller.start()
    jobs.run_worker(s, once=True, poll=0.2, grace=2.0, log=quiet)
    canceller.join(10)
    assert box.get("answer") == "cancel_requested"
    job = jobs.get_job(eng, job_id)
    assert job["status"] == "cancelled" and models(eng) == []
    deadline = time.monotonic() + 10
    while not all(pid_gone(int(p.read_text())) for p in pid_files) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(pid_gone(int(p.read_text())) for p in pid_files), "every rank stopped"


# --------------------------------------------------------------------------- the CLI under accelerate launch


@pytest.mark.slow
@sqlite_only
def test_cli_train_rm_under_accelerate_launch_writes_and_registers_one_run(settings, tiny_task, tmp_path):
    base, data = tiny_task
    eng = init_db(settings.db_url)
    out = tmp_path / "runs" / "rm"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU2), "-m", "app.cli", "train-rm",
         "--data", str(data), "--base", str(base), "--output", str(out), "--epochs", "2", "--batch-size", "4",
         "--max-length", "32", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (model,) = models(eng)
    assert model.path == str(out.resolve()) and (out / "model.safetensors").is_file()
    assert model.metrics["steps"] == math.ceil(model.data_rows / (4 * 2)) * 2  # 2 processes
    assert [p.name for p in out.parent.iterdir()] == ["rm"], "no partial dir of another process is left"
    eng.dispose()


def test_cli_leaves_the_process_group_it_ran_in(tmp_path, monkeypatch):
    """A launched process that exits with its gloo group alive can abort in interpreter teardown
    (SIGABRT after a finished run: what failed CI once), so `main` destroys the group on the way out,
    on success and on error alike."""
    import torch.distributed as dist

    from app import cli

    for argv, code in ((["rlhf", "--help"], 0), (["rlhf", "export", "--project", "no-such", "--format", "trl", "-o", str(tmp_path / "x.jsonl")], 2)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setenv("RLHF_DB_URL", f"sqlite:///{tmp_path / 'x.db'}")
        try:
            with pytest.raises(SystemExit) as exit_:
                cli.main()
            assert exit_.value.code == code
            assert not dist.is_initialized()
        finally:  # a failure here must not leave a group behind for the rest of the session
            jobs.leave_process_group()
            (tmp_path / "rendezvous").unlink(missing_ok=True)
