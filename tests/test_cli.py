"""The `rlhf` command line's own commands: init, user add, project create/list, error handling."""

import json
import subprocess
import sys

import pytest

from annotation.auth import authenticate
from annotation.store import init_db, transaction

RLHF = [sys.executable, "-m", "app.cli"]


def run(args, input_text=None, env_extra=None):
    return subprocess.run(RLHF + args, input=input_text, capture_output=True, text=True, timeout=120)


def test_user_add_reads_the_password_from_stdin_and_stores_only_a_hash(settings):
    proc = run(["user", "add", "alice", "--role", "researcher", "--json"], input_text="s3cret-pass\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["role"] == "researcher"
    engine = init_db(settings.db_url)
    with transaction(engine) as s:
        assert authenticate(s, "alice", "s3cret-pass").role == "researcher"


def test_user_add_has_no_password_option_so_it_never_lands_in_argv(settings):
    proc = run(["user", "add", "bob", "--password", "x"], input_text="")
    assert proc.returncode != 0
    assert "No such option" in proc.stderr or "no such option" in proc.stderr.lower()


def test_bad_role_and_empty_stdin_are_clear_errors_with_exit_code_2(settings):
    proc = run(["user", "add", "carol", "--role", "boss"], input_text="s3cret-pass\n")
    assert proc.returncode == 2 and "unknown role 'boss'" in proc.stderr
    proc = run(["user", "add", "carol"], input_text="")
    assert proc.returncode == 2 and "no password on standard input" in proc.stderr


def test_user_add_refuses_a_taken_or_bad_name_before_asking_for_the_password(settings):
    # stdin is empty: had the password been read first, the error would be about the password.
    assert run(["user", "add", "dora"], input_text="s3cret-pass\n").returncode == 0
    proc = run(["user", "add", "dora"], input_text="")
    assert proc.returncode == 2 and "user 'dora' already exists" in proc.stderr, proc.stderr
    proc = run(["user", "add", "   "], input_text="")
    assert proc.returncode == 2 and "username must not be empty" in proc.stderr, proc.stderr


def test_project_create_and_list(settings, tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text("# Be kind\nPrefer harmless answers.", encoding="utf-8")
    proc = run(["project", "create", "demo", "-k", "2", "--guidelines", str(guide), "--criteria", "helpfulness,harmlessness"])
    assert proc.returncode == 0, proc.stderr
    proc = run(["project", "create", "demo"])
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = run(["project", "list", "--json"])
    rows = json.loads(proc.stdout)["projects"]
    assert rows == [{"name": "demo", "overlap": 2, "selection": "random", "items": 0, "prompts": 0, "annotations": 0, "items_complete": 0, "completion": 0.0}]


def test_missing_guidelines_file_names_the_option(settings, tmp_path):
    proc = run(["project", "create", "demo", "--guidelines", str(tmp_path / "nope.md")])
    assert proc.returncode == 2 and "--guidelines" in proc.stderr and "nope.md" in proc.stderr


def test_unknown_setting_in_environment_is_reported(settings, monkeypatch):
    monkeypatch.setenv("RLHF_MAX_FIELD_CHARS", "lots")
    proc = run(["project", "list"])
    assert proc.returncode == 2 and "RLHF_MAX_FIELD_CHARS" in proc.stderr
