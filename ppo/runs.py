"""A PPO run directory: writing its logs as the run goes, and reading them while it runs or after.

`ppo.train`'s loop writes metrics.jsonl (one line per step, MetricsLog, also to TensorBoard or
MLflow when asked), samples.jsonl (write_samples), config.yaml and summary.json (summary_metrics).
The PPO page reads them with the functions below (pages hold no logic). A live run may be halfway
through writing its last line, so readers skip a line that does not parse instead of failing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("ppo.train")

# --------------------------------------------------------------------------- writing (the training loop)


class MetricsLog:
    """metrics.jsonl plus, when installed and asked for, TensorBoard and MLflow."""

    def __init__(self, out: Path, config, keep_until: int):
        self.path = out / "metrics.jsonl"
        kept = []
        if keep_until and self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_until]
        self.history = [json.loads(line) for line in kept]
        self.fh = open(self.path, "w", encoding="utf-8")
        for line in kept:
            self.fh.write(line + "\n")
        self.fh.flush()
        self.tb = self.mlflow = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                pass
        if config.mlflow:
            try:
                import mlflow

                self.mlflow = mlflow
                mlflow.log_params({k: v for k, v in config.to_dict().items()})
            except ImportError:
                logger.warning("mlflow=true but the mlflow package is not installed; logging to metrics.jsonl only")

    def write(self, row: dict) -> None:
        self.history.append(row)
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=row["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def trim_samples(out: Path, until_step: int) -> None:
    """Drop sample lines a resumed run will write again (all of them on a fresh start)."""
    path = out / "samples.jsonl"
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if until_step and line.strip() and json.loads(line)["step"] <= until_step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def write_samples(out: Path, step: int, ro, n: int = 4) -> None:
    with open(out / "samples.jsonl", "a", encoding="utf-8") as fh:
        for i in range(min(n, len(ro.responses_text))):
            prompt = ro.prompts[i]
            fh.write(json.dumps({"step": step, "prompt": prompt, "response": ro.responses_text[i],
                                 "score": ro.scores[i].item(), "ended_with_eos": bool(ro.contains_eos[i])}) + "\n")


SUMMARY_KEYS = ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "response_length", "value_loss")


def summary_metrics(history: list[dict], last: int = 5) -> dict:
    """Final metrics averaged over the last few steps (one step is noisy), plus the first step's
    reward for comparison."""
    if not history:
        return {}
    tail = history[-last:]
    summary = {k: sum(r[k] for r in tail) / len(tail) for k in SUMMARY_KEYS}
    summary["reward_mean_first"] = history[0]["reward_mean"]
    summary["steps"] = history[-1]["step"]
    judged = [r for r in history if "proxy_reward_heldout" in r]
    if judged:
        summary["proxy_reward_heldout"] = judged[-1]["proxy_reward_heldout"]
        summary["kl_heldout"] = judged[-1]["kl_heldout"]
    judged = [r for r in judged if "judge_reward" in r]
    if judged:
        peak = max(judged, key=lambda r: r["judge_reward"])
        summary.update(judge_reward=judged[-1]["judge_reward"], judge_reward_peak=peak["judge_reward"],
                       judge_peak_step=peak["step"])
    return summary



# --------------------------------------------------------------------------- reading (the page, eval-policy)

CURVES = ("reward_mean", "kl", "kl_coef", "entropy", "response_length", "value_loss")


JOB_RUN_DIR = "ppo"
"""Where a ppo job's run lives in its job directory (runs/job-N/ppo/, the policy at ppo/policy/):
the use case writes into a fresh directory, and the job directory already holds the job's log."""


def job_run_dir(job_dir: str | Path) -> Path:
    """The PPO run directory of the ppo job whose directory is `job_dir`."""
    return Path(job_dir) / JOB_RUN_DIR


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(run_dir: str | Path | None) -> list[dict]:
    """One dict per PPO step, in step order."""
    if run_dir is None:
        return []
    return sorted((r for r in _jsonl(Path(run_dir) / "metrics.jsonl") if "step" in r), key=lambda r: r["step"])


def read_samples(run_dir: str | Path | None, last_steps: int = 2) -> list[dict]:
    """Sample responses written at the last `last_steps` sampling steps, newest first."""
    if run_dir is None:
        return []
    rows = _jsonl(Path(run_dir) / "samples.jsonl")
    steps = sorted({r.get("step", 0) for r in rows}, reverse=True)[:last_steps]
    return sorted((r for r in rows if r.get("step", 0) in steps), key=lambda r: -r.get("step", 0))


def read_config(run_dir: str | Path | None):
    """The run's PPOConfig from config.yaml, or None when there is none yet (or it is unreadable)."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return None
    import yaml

    from ppo.errors import PPOError
    from ppo.config import PPOConfig

    try:
        return PPOConfig.from_dict(yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8")) or {})
    except (PPOError, yaml.YAMLError, TypeError):
        return None


def run_warnings(run_dir: str | Path | None, history: list[dict] | None = None) -> list[dict]:
    """ppo.diagnostics warnings for the run so far (the default config's thresholds if config.yaml is missing)."""
    from ppo import diagnostics
    from ppo.config import PPOConfig

    history = read_metrics(run_dir) if history is None else history
    if not history:
        return []
    try:
        return diagnostics.check(history, read_config(run_dir) or PPOConfig())
    except KeyError:
        return []  # a metrics file from an older run without every column the checks read


def judge_curve_rows(history: list[dict]) -> list[dict[str, Any]]:
    """Long-form rows (step, kl, metric, value) of the judged steps, for the over-optimisation
    curve: the proxy's held-out reward and the judges' mean against the KL to the reference (the
    held-out prompts' KL where logged, else the training batch's)."""
    out = []
    for r in history:
        kl = r.get("kl_heldout", r.get("kl"))
        if not isinstance(kl, (int, float)):
            continue
        for m in ("proxy_reward_heldout", "judge_reward"):
            if isinstance(r.get(m), (int, float)):
                out.append({"step": r["step"], "kl": float(kl), "metric": m, "value": float(r[m])})
    return out


def curve_rows(history: list[dict], metrics: tuple[str, ...] = CURVES) -> list[dict[str, Any]]:
    """Long-form rows (step, metric, value) for charting."""
    return [{"step": r["step"], "metric": m, "value": float(r[m])}
            for r in history for m in metrics if isinstance(r.get(m), (int, float))]
