"""One settings object for the whole platform.

Values come, lowest priority first, from the defaults below, an optional `rlhf.toml` (in the
working directory, or the file named by RLHF_CONFIG), and environment variables prefixed `RLHF_`
(RLHF_DB_URL, RLHF_DATA_DIR, RLHF_MODEL_DIR, RLHF_RUNS_DIR, RLHF_MAX_FIELD_CHARS,
RLHF_ACCELERATE_CONFIG, ...).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(Exception):
    """A setting in rlhf.toml or the environment is unknown or malformed."""


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path = REPO_ROOT / "data"
    """Where the embedded database, models and runs live."""
    db_url: str = ""
    """SQLAlchemy URL of the store; empty means SQLite at <data_dir>/rlhf.db."""
    model_dir: Path | None = None
    """Fetched default models and trained models; None means <data_dir>/models."""
    runs_dir: Path | None = None
    """Training run directories and job logs; None means <data_dir>/runs."""
    max_field_chars: int = 100_000
    """Longest prompt or response an import accepts, in characters."""
    session_minutes: int = 480
    """How long an app login lasts."""
    heartbeat_seconds: int = 10
    """How often a worker running a job writes its heartbeat."""
    stale_after_seconds: int = 120
    """A running job whose heartbeat is older than this is taken to have lost its worker."""
    accelerate_config: str = ""
    """An accelerate config file (e.g. configs/accelerate/ddp.yaml) the worker starts training jobs
    (train_rm, sft, ppo) with, through `accelerate launch`; empty runs every job as one plain process."""

    def __post_init__(self) -> None:
        data_dir = Path(self.data_dir)
        object.__setattr__(self, "data_dir", data_dir)
        if not self.db_url:
            object.__setattr__(self, "db_url", f"sqlite:///{data_dir / 'rlhf.db'}")
        object.__setattr__(self, "model_dir", Path(self.model_dir) if self.model_dir else data_dir / "models")
        object.__setattr__(self, "runs_dir", Path(self.runs_dir) if self.runs_dir else data_dir / "runs")


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
# Counts and durations where 0 or less means nothing sensible (max_field_chars 0 once meant "the default").
_AT_LEAST_ONE = ("max_field_chars", "session_minutes", "heartbeat_seconds", "stale_after_seconds")


def _coerce(name: str, value):
    default = _FIELDS[name].default
    if isinstance(default, bool):
        return str(value).lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    return value


def _toml_path(environ) -> Path:
    return Path(environ.get("RLHF_CONFIG", "rlhf.toml"))


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict = {}
    toml_path = _toml_path(environ)
    if toml_path.is_file():
        with open(toml_path, "rb") as fh:
            for key, value in tomllib.load(fh).items():
                if key not in _FIELDS:
                    raise SettingsError(f"{toml_path}: unknown setting '{key}'; known: {', '.join(sorted(_FIELDS))}")
                values[key] = value
    for name in _FIELDS:
        env_value = environ.get(f"RLHF_{name.upper()}")
        if env_value not in (None, ""):
            try:
                values[name] = _coerce(name, env_value)
            except ValueError:
                raise SettingsError(f"environment variable RLHF_{name.upper()}={env_value!r} is not a valid {name}") from None
    for name in _AT_LEAST_ONE:
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SettingsError(f"{setting_source(name, environ)}={value!r}: expected an integer >= 1")
    return Settings(**values)


def setting_source(name: str, environ: dict[str, str] | None = None) -> str:
    """Where the value of setting `name` comes from, for messages: its RLHF_ variable, the rlhf.toml
    key, or (when neither sets it) the variable that would."""
    environ = os.environ if environ is None else environ
    var = f"RLHF_{name.upper()}"
    if environ.get(var) not in (None, ""):
        return var
    toml_path = _toml_path(environ)
    if toml_path.is_file():
        try:
            with open(toml_path, "rb") as fh:
                if name in tomllib.load(fh):
                    return f"{name} in {toml_path} ({var} not set)"
        except (OSError, tomllib.TOMLDecodeError):
            pass
    return f"{var} (not set: the default)"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
