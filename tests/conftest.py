"""Shared fixtures: a fresh database per test, on SQLite and, when RLHF_TEST_PG_URL is set, PostgreSQL.

`make test` starts a throwaway PostgreSQL server and sets RLHF_TEST_PG_URL, so every test that
takes `db_url` or `engine` runs on both databases there. Without it the PostgreSQL half is skipped
with a message saying how to get it.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
HH_DEV = SHARED_DATA / "hh-rlhf-harmless" / "dev.jsonl"
PG_URL = os.environ.get("RLHF_TEST_PG_URL", "")


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Streamlit's AppTest installs each page script as sys.modules["__main__"] and leaves it there;
    a later test that starts processes with the spawn method would then re-run that page in every
    child, which dies, and multiprocessing.Pool waits forever for the lost task. Put it back."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


def _fresh_postgres_db() -> tuple[str, str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_URL.rsplit("/", 1)[0] + f"/{name}", name


def _drop_postgres_db(name: str) -> None:
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A URL of an empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rlhf.db'}"
        return
    if not PG_URL:
        pytest.skip("PostgreSQL half skipped: set RLHF_TEST_PG_URL (make test starts a server and sets it)")
    url, name = _fresh_postgres_db()
    try:
        yield url
    finally:
        _drop_postgres_db(name)


@pytest.fixture
def engine(db_url):
    """An engine on a migrated, empty database (both backends)."""
    from annotation.store import init_db

    eng = init_db(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(tmp_path):
    """An engine on a migrated SQLite database, for tests that need only one backend."""
    from annotation.store import init_db

    eng = init_db(f"sqlite:///{tmp_path / 'rlhf.db'}")
    yield eng
    eng.dispose()


@pytest.fixture
def settings(tmp_path, monkeypatch, db_url):
    """Settings pointing at a fresh data dir and the test's database; also exported as RLHF_* env vars
    so that CLI invocations in the test see the same place."""
    from app import settings as settings_mod

    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RLHF_DB_URL", db_url)
    monkeypatch.delenv("RLHF_CONFIG", raising=False)
    settings_mod.get_settings.cache_clear()
    yield settings_mod.get_settings()
    settings_mod.get_settings.cache_clear()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An engine on a SQLite store prepared for the app pages (browser_helpers.prepare_store: users
    ann1, ann2, res, admin and project demo), with RLHF_* pointing the pages at it."""
    from annotation.store import make_engine
    from app import settings as settings_mod
    from browser_helpers import prepare_store

    db_url = f"sqlite:///{tmp_path / 'rlhf.db'}"
    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RLHF_DB_URL", db_url)
    monkeypatch.delenv("RLHF_CONFIG", raising=False)
    settings_mod.get_settings.cache_clear()
    prepare_store(tmp_path / "data", db_url).dispose()
    engine = make_engine(db_url)
    yield engine
    settings_mod.get_settings.cache_clear()
    engine.dispose()


def hh_dev_path() -> Path:
    if not HH_DEV.exists():
        pytest.skip(f"shared HH-RLHF data not found at {HH_DEV}")
    return HH_DEV
