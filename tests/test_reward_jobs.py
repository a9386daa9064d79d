"""train_rm / eval_rm job handlers and the train-rm / eval-rm / models commands, on a tiny BERT base.

A run that succeeds registers exactly one model with its lineage; a run that is cancelled or fails
registers nothing and leaves no model directory at --output.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).parent))
from reward_fixtures import save_tiny_bert, save_untrained_rm, synthetic_pairs  # noqa: E402

from annotation.store import Job, RegisteredModel, init_db, transaction  # noqa: E402
from reward.data import pairs_hash, split_pairs  # noqa: E402

pytestmark = pytest.mark.slow
TINY = {"epochs": 1, "lr": 3e-3, "batch_size": 8, "max_length": 32, "precision": "fp32"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "base")


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as fh:
        for p in synthetic_pairs(64, seed=11):
            fh.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


@pytest.fixture
def sqlite_settings(tmp_path, monkeypatch):
    from app import settings as settings_mod

    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RLHF_DB_URL", f"sqlite:///{tmp_path / 'rlhf.db'}")
    monkeypatch.delenv("RLHF_CONFIG", raising=False)
    settings_mod.get_settings.cache_clear()
    yield settings_mod.get_settings()
    settings_mod.get_settings.cache_clear()


class FakeCtx:
    """A JobContext stand-in whose cancelled() turns True on its `cancel_at`-th call."""

    def __init__(self, run_dir, engine, settings, cancel_at=None):
        self.job_id, self.run_dir, self.engine, self.settings = 99, Path(run_dir), engine, settings
        self.log = logging.getLogger("test.job")
        self.calls, self.cancel_at, self.reports = 0, cancel_at, []

    def progress(self, fraction, message=""):
        self.reports.append((fraction, message))

    def cancelled(self):
        self.calls += 1
        return self.cancel_at is not None and self.calls >= self.cancel_at


def test_train_rm_job_runs_through_the_worker_and_registers_one_model(sqlite_settings, tiny_base, pairs_file):
    from app.jobs import claim_next, run_job, submit_job
    from annotation.io import read_pairs
    from reward.jobs import eval_rm

    engine = init_db(sqlite_settings.db_url)
    job_id = submit_job(engine, "train_rm", {"data": str(pairs_file), "base": str(tiny_base), "eval_fraction": 0.25,
                                             "name": "rm-test", **TINY})
    assert claim_next(engine, "test-worker")["id"] == job_id
    assert run_job(job_id, sqlite_settings) == 0
    train, held = split_pairs(read_pairs(pairs_file), 0.25)
    with transaction(engine) as s:
        job = s.get(Job, job_id)
        assert job.status == "succeeded" and job.progress == 1.0
        row = s.scalars(select(RegisteredModel)).one()
        assert (row.kind, row.name, row.job_id, row.data_rows) == ("reward", "rm-test", job_id, len(train))
        assert row.data_hash == pairs_hash(train)
        assert row.params["seed"] == 42 and row.metrics["eval_n_pairs"] == len(held)
        assert job.result["registered_model_ids"] == [row.id]
        model_id, model_path = row.id, row.path
    assert (Path(model_path) / "model.safetensors").is_file()
    # eval_rm on the registered model by id: the same held-out metrics as training reported.
    out = eval_rm({"model": str(model_id), "data": str(pairs_file)}, FakeCtx(Path(model_path).parent, engine, sqlite_settings))
    assert out["metrics"]["n_pairs"] == 64 and 0.0 <= out["metrics"]["accuracy"] <= 1.0
    assert set(out["metrics"]) >= {"accuracy", "n_pairs", "mean_margin", "log_loss", "ece"}


def test_train_rm_cancelled_mid_training_raises_job_cancelled_and_returns_nothing(sqlite_settings, tiny_base, pairs_file, tmp_path):
    from app.jobs import JobCancelled
    from reward.jobs import train_rm

    engine = init_db(sqlite_settings.db_url)
    ctx = FakeCtx(tmp_path / "run", engine, sqlite_settings, cancel_at=4)  # a few training steps in
    with pytest.raises(JobCancelled):
        train_rm({"data": str(pairs_file), "base": str(tiny_base), **TINY}, ctx)
    assert any(msg.startswith("step") for _, msg in ctx.reports)  # it was cancelled during training
    assert not (tmp_path / "run" / "model" / "metrics.json").exists()
    with transaction(engine) as s:
        assert s.scalar(select(func.count()).select_from(RegisteredModel)) == 0


def test_train_rm_rejects_unknown_params(sqlite_settings, tmp_path):
    from reward.errors import RewardError
    from reward.jobs import train_rm

    with pytest.raises(RewardError, match="unknown param.*epoch"):
        train_rm({"data": "x.jsonl", "epoch": 3}, FakeCtx(tmp_path, None, sqlite_settings))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_train_eval_list_activate(sqlite_settings, tiny_base, pairs_file, tmp_path):
    out = tmp_path / "runs" / "rm1"
    proc = _cli("train-rm", "--data", str(pairs_file), "--output", str(out), "--base", str(tiny_base), "--epochs", "1",
                "--lr", "3e-3", "--batch-size", "8", "--max-length", "32", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["path"] == str(out) and (out / "reward_config.json").is_file()
    assert not list(out.parent.glob(".rm1.partial-*"))  # the temporary run dir was moved into place

    proc = _cli("eval-rm", "--model", str(out), "--data", str(pairs_file), "--json", "--plot", str(tmp_path / "rel.html"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["n_pairs"] == 64 and {"accuracy", "mean_margin", "log_loss", "ece", "length_bias"} <= set(metrics)
    assert (tmp_path / "rel.html").is_file()

    proc = _cli("models", "activate", str(payload["model_id"]), "--json")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(_cli("models", "list", "--kind", "reward", "--json").stdout)["models"]
    assert [(m["id"], m["active"]) for m in listed] == [(payload["model_id"], True)]

    # Training into an existing run directory is refused before anything is trained or registered.
    proc = _cli("train-rm", "--data", str(pairs_file), "--output", str(out), "--base", str(tiny_base))
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_cli_failed_training_leaves_no_model_and_no_row(sqlite_settings, tiny_base, pairs_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import reward.train
    from app.cli import _register_commands, cli

    def boom(*args, **kwargs):
        Path(args[1]).mkdir(parents=True, exist_ok=True)
        (Path(args[1]) / "config.json").write_text("{}")  # half-written output, then a crash
        raise RuntimeError("simulated crash mid-training")

    monkeypatch.setattr(reward.train, "_train_one", boom)
    _register_commands()
    out = tmp_path / "runs" / "rm2"
    result = CliRunner().invoke(cli, ["train-rm", "--data", str(pairs_file), "--output", str(out), "--base", str(tiny_base)])
    assert isinstance(result.exception, RuntimeError)
    assert not out.exists() and not list((tmp_path / "runs").glob(".rm2.partial-*"))
    with transaction(init_db(sqlite_settings.db_url)) as s:
        assert s.scalar(select(func.count()).select_from(RegisteredModel)) == 0


# The fields of a registry row that say what was trained, on what, how: the same whichever caller ran it.
SAME_FIELDS = ("kind", "base_model", "project_id", "data_hash", "data_rows", "parent_id")


def comparable(row) -> dict:
    timing = ("train_seconds", "pairs_per_s", "tokens_per_s", "peak_rss_mb", "runtime_s")
    metrics = {k: v for k, v in row.metrics.items() if k not in timing and not isinstance(v, (list, dict))}
    return {**{k: getattr(row, k) for k in SAME_FIELDS}, "params": row.params, "metrics": metrics}


def test_the_cli_and_the_job_run_one_use_case_and_register_the_same_model(sqlite_settings, tiny_base, pairs_file, tmp_path):
    """train-rm is written once (reward.usecases.train_rm): `rlhf train-rm` in process and the
    train_rm job in the worker register the same row but for its path and name."""
    from app.jobs import claim_next, run_job, submit_job

    engine = init_db(sqlite_settings.db_url)
    params = {"data": str(pairs_file), "base": str(tiny_base), "eval_fraction": 0.25, **TINY}
    job_id = submit_job(engine, "train_rm", params)
    claim_next(engine, "test-worker")
    assert run_job(job_id, sqlite_settings) == 0
    proc = _cli("train-rm", "--data", str(pairs_file), "--output", str(tmp_path / "rm-cli"), "--base", str(tiny_base),
                "--eval-fraction", "0.25", "--epochs", "1", "--lr", "3e-3", "--batch-size", "8", "--max-length", "32",
                "--precision", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with transaction(engine) as s:
        from_job, from_cli = s.scalars(select(RegisteredModel).order_by(RegisteredModel.id)).all()
        assert comparable(from_job) == comparable(from_cli)
        assert from_cli.path == str((tmp_path / "rm-cli").resolve()) and from_cli.name == "rm-cli"
        assert from_job.name == f"rm-pairs-job{job_id}" and Path(from_job.path).name == "model"


def test_rlhf_eval_rm_and_the_eval_rm_job_run_one_use_case_and_report_the_same_metrics(sqlite_settings, tiny_base, pairs_file,
                                                                                       tmp_path):
    """eval-rm is written once (reward.usecases.eval_rm): `rlhf eval-rm` prints the metrics that the
    eval_rm job, run by the worker on the same registered model and pairs, writes to its eval.json."""
    from annotation.registry import register_model
    from app.jobs import claim_next, get_job, run_job, submit_job

    engine = init_db(sqlite_settings.db_url)
    rm = save_untrained_rm(tmp_path / "rm", tiny_base, seed=3)
    with transaction(engine) as s:
        model_id = register_model(s, kind="reward", name="rm-eval", path=str(rm)).id
    job_id = submit_job(engine, "eval_rm", {"model": "rm-eval", "data": str(pairs_file)})
    claim_next(engine, "test-worker")
    assert run_job(job_id, sqlite_settings) == 0
    job = get_job(engine, job_id)
    proc = _cli("eval-rm", "--model", str(model_id), "--data", str(pairs_file), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(Path(job["result"]["path"]).read_text()) == job["result"]["metrics"]
    assert printed["model"] == str(rm) and printed["n_pairs"] == 64
    # The spec is checked when the job is submitted: a bad value never reaches the worker.
    from app.jobs import JobError

    with pytest.raises(JobError, match=r"eval_rm: --split 'dev' is invalid"):
        submit_job(engine, "eval_rm", {"model": "rm-eval", "project": "p", "split": "dev"})
