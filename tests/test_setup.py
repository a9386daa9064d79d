"""`rlhf init [--sample]`: schema, sample project, first admin; idempotent; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from annotation.auth import authenticate, create_user
from annotation.errors import AnnotationError
from annotation.store import Item, Prompt, User, init_db, transaction
from app.setup import SAMPLE_ITEMS, SAMPLE_PROMPTS, SAMPLES_DIR, initialise


@pytest.fixture
def samples(tmp_path):
    d = tmp_path / "samples"
    d.mkdir()
    items = [{"prompt": f"Question {i}?", "response_a": f"Answer A{i}", "response_b": f"Answer B{i}"} for i in range(5)]
    (d / SAMPLE_ITEMS).write_text("".join(json.dumps(x) + "\n" for x in items))
    (d / SAMPLE_PROMPTS).write_text("".join(json.dumps({"prompt": f"Tell me about {t}."}) + "\n" for t in ("cats", "dogs", "owls")))
    return d


def counts(url):
    eng = init_db(url)
    with transaction(eng) as s:
        out = {
            "items": s.scalar(select(func.count()).select_from(Item)),
            "prompts": s.scalar(select(func.count()).select_from(Prompt)),
            "admins": s.scalar(select(func.count()).select_from(User).where(User.role == "admin")),
            "users": s.scalar(select(func.count()).select_from(User).where(User.password_hash.is_not(None))),
        }
    eng.dispose()
    return out


def test_init_without_sample_only_migrates(settings, samples):
    payload = initialise(settings, sample=False, samples_dir=samples)
    assert set(payload) == {"db_url"}
    assert counts(settings.db_url) == {"items": 0, "prompts": 0, "admins": 0, "users": 0}


def test_init_sample_loads_the_project_and_creates_one_admin_whose_password_is_shown_once(settings, samples):
    first = initialise(settings, sample=True, samples_dir=samples)
    assert first["sample"] == {"project": "sample", "items": 5, "prompts": 3, "items_added": 5, "prompts_added": 3}
    assert first["admin_username"] == "admin" and len(first["admin_password"]) >= 16
    eng = init_db(settings.db_url)
    with transaction(eng) as s:
        admin = authenticate(s, "admin", first["admin_password"])
        assert admin is not None and admin.role == "admin"
        assert first["admin_password"] not in (admin.password_hash or "")

    second = initialise(settings, sample=True, samples_dir=samples)
    assert "admin_password" not in second and "admin_username" not in second
    assert second["sample"] == {"project": "sample", "items": 5, "prompts": 3, "items_added": 0, "prompts_added": 0}
    assert counts(settings.db_url) == {"items": 5, "prompts": 3, "admins": 1, "users": 1}
    with transaction(eng) as s:
        assert authenticate(s, "admin", first["admin_password"]) is not None, "the second run left the password alone"
    eng.dispose()


def test_an_existing_admin_of_any_name_means_no_new_admin(settings, samples):
    eng = init_db(settings.db_url)
    with transaction(eng) as s:
        create_user(s, "root", "password123", "admin")
    eng.dispose()
    payload = initialise(settings, sample=True, samples_dir=samples)
    assert "admin_password" not in payload
    assert counts(settings.db_url)["admins"] == 1


def test_missing_sample_file_fails_clearly_before_any_admin_exists(settings, samples):
    (samples / SAMPLE_PROMPTS).unlink()
    with pytest.raises(AnnotationError, match=f"{SAMPLE_PROMPTS} is missing"):
        initialise(settings, sample=True, samples_dir=samples)
    assert counts(settings.db_url)["admins"] == 0


def test_admin_name_taken_by_a_non_admin_is_a_clear_error(settings, samples):
    eng = init_db(settings.db_url)
    with transaction(eng) as s:
        create_user(s, "admin", "password123", "annotator")
    eng.dispose()
    with pytest.raises(AnnotationError, match="rlhf user add NAME --role admin"):
        initialise(settings, sample=True, samples_dir=samples)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_rlhf_init_sample_command_with_the_shipped_samples(settings):
    if not (SAMPLES_DIR / SAMPLE_ITEMS).is_file() or not (SAMPLES_DIR / SAMPLE_PROMPTS).is_file():
        pytest.fail(f"the shipped sample files are missing from {SAMPLES_DIR}")
    n_items = sum(1 for line in open(SAMPLES_DIR / SAMPLE_ITEMS, encoding="utf-8") if line.strip())
    cli = [sys.executable, "-c", "from app.cli import main; main()", "init", "--sample"]
    first = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "first admin created: username 'admin' password '" in first.stdout and "shown once" in first.stdout
    second = subprocess.run(cli + ["--json"], capture_output=True, text=True, timeout=300)
    payload = json.loads(second.stdout)
    assert "admin_password" not in payload and payload["sample"]["items_added"] == 0
    assert 0 < payload["sample"]["items"] <= n_items and payload["sample"]["prompts"] > 0
