"""`rlhf ppo` and the ppo job handler, on the tiny policy of test_ppo_train and a rule-based
reward model standing in for reward.score (its contract: .score(prompts, responses) -> tensor)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from ppo.errors import PPOError
from test_ppo_train import share_of_yes, tiny_policy, tiny_prompts

FAST = ["--set", "batch_size=8", "--set", "mini_batch_size=8", "--set", "max_new_tokens=4", "--set", "ppo_epochs=1",
        "--set", "tensorboard=false"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ShareOfYes:
    def __init__(self, path, device=None):
        self.path = path

    def score(self, prompts, responses, batch_size=32):
        return share_of_yes(prompts, responses)


@pytest.fixture
def files(tmp_path, monkeypatch):
    import reward.score

    monkeypatch.setattr(reward.score, "load_reward_model", ShareOfYes)
    model, tok = tiny_policy()
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny_prompts(12)), encoding="utf-8")
    (tmp_path / "rm").mkdir()
    return SimpleNamespace(policy=tmp_path / "policy", prompts=prompts, rm=tmp_path / "rm", root=tmp_path)


def invoke(args):
    import app.cli_ppo  # noqa: F401  (adds the ppo commands to the app)
    from app.cli import cli

    return CliRunner().invoke(cli, args)


def test_rlhf_ppo_trains_registers_and_prints_diagnostics(files, settings, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "ppo.yaml"
    config.write_text("learning_rate: 0.001\nmissing_eos_penalty: 1.0\n")
    args = ["ppo", "--reward-model", str(files.rm), "--prompts", str(files.prompts), "--output", str(out),
            "--policy", str(files.policy), "--steps", "2", "--config", str(config), *FAST, "--name", "ppo-tiny"]
    result = invoke(args + ["--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["steps"] == 2 and isinstance(payload["diagnostics"], list) and payload["model_id"]
    assert (out / "policy" / "config.json").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    saved = (out / "config.yaml").read_text()
    assert "learning_rate: 0.001" in saved and "missing_eos_penalty: 1.0" in saved and "batch_size: 8" in saved

    from annotation.registry import get_model
    from annotation.store import transaction

    with transaction(settings_engine(settings)) as session:
        row = get_model(session, "ppo-tiny")
        assert row.kind == "policy" and row.data_rows == 12 and row.params["learning_rate"] == 0.001

    # The same output again is refused; --resume continues it to more steps.
    again = invoke(args)
    assert isinstance(again.exception, PPOError) and "--resume" in str(again.exception)
    resumed = invoke([a if a != "2" else "3" for a in args[:-2]] + ["--resume", "--no-register"])
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "diagnostics:" in resumed.stdout


def settings_engine(settings):
    from annotation.store import init_db

    return init_db(settings.db_url)


def test_rlhf_ppo_refuses_unknown_options_before_loading_anything(files, tmp_path):
    result = invoke(["ppo", "--reward-model", str(files.rm), "--prompts", str(files.prompts), "--output",
                     str(tmp_path / "x"), "--policy", str(files.policy), "--set", "learnin_rate=1"])
    assert isinstance(result.exception, PPOError)
    assert "--set learnin_rate: unknown key 'learnin_rate'" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_ppo_options_lists_every_field_with_its_help():
    result = invoke(["ppo-options", "--json"])
    rows = {r["name"]: r for r in json.loads(result.stdout)["options"]}
    assert rows["target"]["default"] == 6.0 and "KL target" in rows["target"]["help"]
    assert all(r["help"] for r in rows.values())


def test_eval_policy_samples_like_ppo_by_default():
    """eval-policy's sampling options repeat PPOConfig's defaults (the CLI module must not import
    torch); a win rate measured with other settings than training's would mislead."""
    import typer

    from app.cli import _register_commands, cli
    from ppo.train import PPOConfig

    _register_commands()
    params = {p.name: p.default for p in typer.main.get_command(cli).commands["eval-policy"].params}
    config = PPOConfig()
    for name in ("max_new_tokens", "max_prompt_length", "temperature"):
        assert params[name] == getattr(config, name), name


def _ctx(settings, run_dir, cancel_after=None):
    from annotation.store import init_db

    calls = []

    def cancelled():
        calls.append(1)
        return cancel_after is not None and len(calls) > cancel_after

    return SimpleNamespace(job_id=7, run_dir=run_dir, engine=init_db(settings.db_url), settings=settings,
                           log=logging.getLogger("test.ppo.job"), progress=lambda f, m="": None, cancelled=cancelled)


def test_ppo_job_handler_returns_a_policy_to_register(files, settings, tmp_path):
    from ppo.jobs import ppo

    params = {"policy": str(files.policy), "reward_model": str(files.rm), "prompts": str(files.prompts), "steps": 2,
              "batch_size": 8, "mini_batch_size": 8, "max_new_tokens": 4, "ppo_epochs": 1, "tensorboard": False}
    result = ppo(params, _ctx(settings, tmp_path / "job"))
    (row,) = result["register"]
    assert row["kind"] == "policy" and row["name"] == "ppo-prompts-job7" and row["data_rows"] == 12
    assert (tmp_path / "job" / "ppo" / "metrics.jsonl").exists() and row["path"].endswith("policy")
    assert row["metrics"]["steps"] == 2
    with pytest.raises(PPOError, match="unknown param"):
        ppo({**params, "learning_rat": 1}, _ctx(settings, tmp_path / "job2"))


def test_ppo_job_cancelled_between_steps_registers_nothing(files, settings, tmp_path):
    from app.jobs import JobCancelled
    from ppo.jobs import ppo

    params = {"policy": str(files.policy), "reward_model": str(files.rm), "prompts": str(files.prompts), "steps": 5,
              "batch_size": 8, "mini_batch_size": 8, "max_new_tokens": 4, "ppo_epochs": 1, "tensorboard": False}
    with pytest.raises(JobCancelled):
        ppo(params, _ctx(settings, tmp_path / "job", cancel_after=2))
    assert len((tmp_path / "job" / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "job" / "ppo" / "policy").exists()


def test_rlhf_ppo_and_the_ppo_job_run_one_use_case_and_register_the_same_policy(files, settings, tmp_path):
    """PPO is written once (ppo.usecases.ppo): the CLI and the job give the same registry row but for
    its path and name (same seed, same settings, same data)."""
    from annotation.registry import get_model
    from annotation.store import transaction
    from ppo.jobs import ppo

    params = {"policy": str(files.policy), "reward_model": str(files.rm), "prompts": str(files.prompts), "steps": 2,
              "batch_size": 8, "mini_batch_size": 8, "max_new_tokens": 4, "ppo_epochs": 1, "tensorboard": False,
              "precision": "fp32"}
    (job_row,) = ppo(params, _ctx(settings, tmp_path / "job"))["register"]
    result = invoke(["ppo", "--reward-model", str(files.rm), "--prompts", str(files.prompts), "--output", str(tmp_path / "cli"),
                     "--policy", str(files.policy), "--steps", "2", *FAST, "--set", "precision=fp32", "--name", "ppo-cli"])
    assert result.exit_code == 0, result.output
    with transaction(settings_engine(settings)) as session:
        cli = get_model(session, "ppo-cli")
        cli_row = {k: getattr(cli, k) for k in ("kind", "base_model", "project_id", "data_hash", "data_rows", "params", "parent_id")}
        untimed = lambda m: {k: v for k, v in m.items() if not k.startswith("time")}  # noqa: E731
        assert cli_row == {k: job_row[k] for k in cli_row} and untimed(cli.metrics) == untimed(job_row["metrics"])
    assert cli.path == str((tmp_path / "cli" / "policy").resolve()) and job_row["path"] == str((tmp_path / "job" / "ppo" / "policy").resolve())


def test_the_cpu_profile_runs_as_the_readme_gives_it(files, tmp_path):
    """configs/ppo/cpu.yaml (the first tour's profile) is a valid config that `rlhf ppo --config`
    runs: LoRA adapters and a shared value head, saved with the run's config."""
    from pathlib import Path

    profile = Path(__file__).resolve().parent.parent / "configs" / "ppo" / "cpu.yaml"
    out = tmp_path / "run"
    result = invoke(["ppo", "--reward-model", str(files.rm), "--prompts", str(files.prompts), "--output", str(out),
                     "--policy", str(files.policy), "--config", str(profile), "--steps", "1", *FAST,
                     "--set", "lora_target_modules=q_proj,v_proj", "--no-register", "--json"])
    assert result.exit_code == 0, result.output
    saved = (out / "config.yaml").read_text()
    assert "lora: true" in saved and "value_model: shared" in saved and "adap_kl_ctrl: false" in saved
    assert (out / "policy" / "config.json").exists() and (out / "value_head.safetensors").exists()
