"""Reading a PPO run directory while it runs or after: metrics, samples, config and warnings.

The PPO page calls these (pages hold no logic); `ppo.train` writes the files: metrics.jsonl (one
line per step), samples.jsonl, config.yaml, summary.json. A live run may be halfway through
writing its last line, so readers skip a line that does not parse instead of failing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CURVES = ("reward_mean", "kl", "kl_coef", "entropy", "response_length", "value_loss")


def find_run_dir(root: str | Path | None) -> Path | None:
    """The directory holding metrics.jsonl: `root` itself or a folder up to two levels below it
    (a job writes its run under its own run dir); the most recently written one wins."""
    if root is None:
        return None
    root = Path(root)
    if (root / "metrics.jsonl").is_file():
        return root
    found = [p.parent for p in list(root.glob("*/metrics.jsonl")) + list(root.glob("*/*/metrics.jsonl"))]
    return max(found, key=lambda p: (p / "metrics.jsonl").stat().st_mtime) if found else None


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
    from ppo.train import PPOConfig

    try:
        return PPOConfig.from_dict(yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8")) or {})
    except (PPOError, yaml.YAMLError, TypeError):
        return None


def run_warnings(run_dir: str | Path | None, history: list[dict] | None = None) -> list[dict]:
    """ppo.diagnostics warnings for the run so far (the default config's thresholds if config.yaml is missing)."""
    from ppo import diagnostics
    from ppo.train import PPOConfig

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
