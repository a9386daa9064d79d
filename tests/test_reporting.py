"""--report-to: the TRL-based trainers (reward model, SFT, DPO) also log their curves to
TensorBoard in the run's tb/ folder, or to MLflow/trackio when installed; an unknown or missing
tracker is a clear error before training."""

from __future__ import annotations

import pytest

from reward.errors import RewardError
from reward.reporting import check_report_to
from reward_fixtures import save_tiny_bert, synthetic_pairs
from tiny_lm import one_thread, save_tiny_policy


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def event_scalars(tb_dir) -> set[str]:
    """The scalar tags written to the TensorBoard event files under tb_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(tb_dir.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {tb_dir}"
    tags = set()
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_trackers_are_checked_before_anything_runs():
    assert check_report_to("none") == [] and check_report_to(None) == []
    assert check_report_to("tensorboard") == ["tensorboard"]
    with pytest.raises(RewardError, match="unknown tracker wandb"):
        check_report_to("tensorboard,wandb")
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(RewardError, match="mlflow is not installed"):
            check_report_to("mlflow")


def test_reward_training_logs_its_curve_to_tensorboard_in_the_run(tmp_path):
    from reward.train import TrainParams, train_reward_model

    base = save_tiny_bert(tmp_path / "bert")
    run = tmp_path / "rm"
    train_reward_model(synthetic_pairs(32, seed=1), run, TrainParams(base=str(base), epochs=1, lr=3e-3, batch_size=8,
                                                                      max_length=32, precision="fp32", report_to="tensorboard",
                                                                      logging_steps=1))
    assert "train/loss" in event_scalars(run / "tb")


def test_sft_and_dpo_log_to_tensorboard_in_the_run(tmp_path):
    from ppo.dpo import DPOOptions, train_dpo
    from ppo.sft import SFTOptions, train_sft

    base = save_tiny_policy(tmp_path / "policy")
    rows = [{"prompt": "ping", "completion": "pong pong"}, {"prompt": "hello", "completion": "world"}]
    train_sft(rows, tmp_path / "sft", base=base, options=SFTOptions(max_steps=2, batch_size=2, precision="fp32",
                                                                     report_to="tensorboard"))
    assert "train/loss" in event_scalars(tmp_path / "sft" / "tb")
    pairs = [{"prompt": "ping", "chosen": "pong", "rejected": "world"}, {"prompt": "hello", "chosen": "world", "rejected": "pong"}]
    train_dpo(pairs, tmp_path / "dpo", base=base, options=DPOOptions(max_steps=2, batch_size=2, precision="fp32",
                                                                      report_to="tensorboard"))
    assert "train/loss" in event_scalars(tmp_path / "dpo" / "tb")


def test_cli_refuses_an_unknown_tracker_with_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from app import cli as cli_mod

    cli_mod._register_commands()
    monkeypatch.setattr(sys, "argv", ["rlhf", "sft", "--data", "x.jsonl", "-o", str(tmp_path / "o"), "--report-to", "wandb"])
    with pytest.raises(SystemExit) as info:
        cli_mod.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "report_to" in err and "Traceback" not in err
