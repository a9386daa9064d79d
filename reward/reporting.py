"""Where TRL-based training runs also log their curves: `--report-to tensorboard,mlflow,trackio`
(or none, the default). Every run always writes its own metrics.jsonl / training_curve.jsonl; these
are the experiment trackers users already have. A tracker that is asked for but not installed is a
clear error before training, not a silent skip.

    report_to, callbacks = trainer_reporting("tensorboard", run_dir / "tb")
    RewardConfig(..., report_to=report_to); RewardTrainer(..., callbacks=[*ours, *callbacks])

TensorBoard goes to the run directory's `tb/` (TRL's default would put it under the trainer's
scratch directory, which our runs delete); MLflow and trackio log to their own stores, configured
as usual (MLFLOW_TRACKING_URI, ...).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from reward.errors import RewardError

REPORTERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio"}  # name -> module to import
HELP = "Also log the training curve to: none, or a comma-separated list of tensorboard, mlflow, trackio (when installed)."


def check_report_to(value: str | None, option: str = "--report-to") -> list[str]:
    """The trackers named in `value` (empty for none); unknown or not installed ones raise RewardError."""
    names = [v.strip() for v in (value or "none").split(",") if v.strip()]
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise RewardError(f"{option} {value!r}: unknown tracker {', '.join(unknown)}; expected none or some of "
                          f"{', '.join(REPORTERS)}")
    missing = [n for n in names if importlib.util.find_spec(REPORTERS[n]) is None]
    if missing:
        raise RewardError(f"{option} {value!r}: {', '.join(missing)} is not installed (pip install {' '.join(missing)})")
    return names


def report_to_arg(value: str | None, option: str = "--report-to") -> list[str] | str:
    """TrainingArguments.report_to for `value`: the trackers the Trainer's own integrations log to
    (TensorBoard goes through tracker_callbacks instead, to write where the run keeps it)."""
    names = [n for n in check_report_to(value, option) if n != "tensorboard"]
    return names or "none"


def tracker_callbacks(value: str | None, log_dir: Path, option: str = "--report-to") -> list:
    """The TensorBoard callback writing to `log_dir`, when `value` asks for TensorBoard."""
    if "tensorboard" not in check_report_to(value, option):
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))]


def trainer_reporting(value: str | None, log_dir: Path, option: str = "--report-to") -> tuple[list[str] | str, list]:
    """(report_to_arg, tracker_callbacks) for one Trainer."""
    return report_to_arg(value, option), tracker_callbacks(value, log_dir, option)
