"""Bad input that used to reach users as a traceback, or was silently accepted, or was a path.

Each case checks what the user sees (exit code 2, one line naming the file and line, the option or
the setting, and what was expected) and that nothing was written. Store-touching cases run on
SQLite and, when RLHF_TEST_PG_URL is set, PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import types
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from annotation.errors import AnnotationError, InputError
from annotation.io import export, import_file
from annotation.store import Annotation, Item, Project, Prompt, User, transaction

from app import cli as cli_mod

cli_mod._register_commands()


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """app.cli.main in-process: the one place that turns errors into a message and an exit code."""
    monkeypatch.setattr(sys, "argv", ["rlhf", *args])
    with pytest.raises(SystemExit) as info:
        cli_mod.main()
    return info.value.code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def count(engine, model) -> int:
    with transaction(engine) as s:
        return s.scalar(select(func.count()).select_from(model))


def nothing_written(engine) -> bool:
    return all(count(engine, m) == 0 for m in (Project, Item, Prompt, Annotation, User))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "Q", "chosen": "good", "rejected": "bad"})


# --------------------------------------------------------------------------- 1. deeply nested JSON


def test_json_nested_5000_deep_is_an_input_error_naming_file_and_line(engine, tmp_path):
    path = write_lines(tmp_path / "deep.jsonl", [GOOD, '{"prompt": "Q", "metadata": ' + "[" * 5000 + "]" * 5000 + "}"])
    with pytest.raises(InputError) as info:
        import_file(engine, path, "p")
    assert (info.value.path, info.value.line) == (str(path), 2)
    assert str(info.value).startswith(f"{path}:2: ") and "nested" in str(info.value)
    assert nothing_written(engine)


def test_metadata_nested_below_the_json_limit_is_refused_by_field(engine, tmp_path):
    # Parses, but deep enough that writing it (json.dumps) or reading it back could overflow the stack.
    deep = "[" * 900 + "]" * 900
    path = write_lines(tmp_path / "deep.jsonl", [GOOD, '{"prompt": "Q", "chosen": "a", "rejected": "b", "tags": ' + deep + "}"])
    with pytest.raises(InputError) as info:
        import_file(engine, path, "p")
    assert (info.value.line, info.value.field) == (2, "metadata") and "nested" in str(info.value)
    assert nothing_written(engine)


def test_deep_json_through_the_cli_is_one_line_with_exit_code_2(settings, tmp_path, monkeypatch, capsys):
    path = write_lines(tmp_path / "deep.jsonl", ['{"prompt": ' + "[" * 5000 + "]" * 5000 + "}"])
    code, err = run_main(monkeypatch, capsys, "import", str(path), "--project", "p")
    assert code == 2 and one_error_line(err).startswith(f"error: {path}:1: ")


def test_deep_json_upload_on_the_projects_page_is_an_error_message(store):
    from test_app_pages import open_page

    at = open_page("projects", store, "res")
    before = count(store, Item)
    body = (GOOD + "\n" + '{"prompt": "Q", "metadata": ' + "{\"a\": " * 5000 + "1" + "}" * 5000 + "}\n").encode()
    at.file_uploader(key="proj_upload").set_value(("deep.jsonl", body, "application/jsonl"))
    at.run()
    at.button(key="proj_import").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "deep.jsonl:2:" in at.error[0].value and "nested" in at.error[0].value
    assert count(store, Item) == before


# --------------------------------------------------------------------------- 2. export -o


@pytest.fixture
def labelled_project(settings, tmp_path):
    from annotation.store import init_db

    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    engine = init_db(settings.db_url)
    import_file(engine, path, "p")
    yield engine
    engine.dispose()


def test_export_to_an_existing_directory_names_the_option(labelled_project, tmp_path, monkeypatch, capsys):
    target = tmp_path / "outdir"
    target.mkdir()
    code, err = run_main(monkeypatch, capsys, "export", "--project", "p", "--format", "trl", "-o", f"{target}/")
    line = one_error_line(err)
    assert code == 2 and "-o" in line and str(target) in line and "directory" in line
    assert list(target.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_to_a_missing_directory_or_a_trailing_slash_is_a_clear_error(labelled_project, tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, "export", "--project", "p", "--format", "trl", "-o", str(tmp_path / "no" / "o.jsonl"))
    line = one_error_line(err)
    assert code == 2 and "-o" in line and "does not exist" in line
    # "newdir/" names a directory; writing a file called "newdir" instead would surprise.
    code, err = run_main(monkeypatch, capsys, "export", "--project", "p", "--format", "trl", "-o", f"{tmp_path / 'newdir'}/")
    line = one_error_line(err)
    assert code == 2 and "-o" in line and "directory" in line
    assert not (tmp_path / "newdir").exists() and not (tmp_path / "no").exists()
    # A file where the directory should be.
    (tmp_path / "afile").write_text("x")
    code, err = run_main(monkeypatch, capsys, "export", "--project", "p", "--format", "trl", "-o", str(tmp_path / "afile" / "o.jsonl"))
    assert code == 2 and "-o" in one_error_line(err) and "not a directory" in err


# --------------------------------------------------------------------------- 3. RLHF_DB_URL


@pytest.fixture
def db_env(tmp_path, monkeypatch):
    from app import settings as settings_mod

    def set_url(url: str) -> None:
        monkeypatch.setenv("RLHF_DB_URL", url)
        settings_mod.get_settings.cache_clear()

    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("RLHF_CONFIG", raising=False)
    yield set_url
    settings_mod.get_settings.cache_clear()


BAD_URLS = {
    "unreachable": "postgresql+psycopg://rlhf:s3cretpw@127.0.0.1:1/rlhf",
    "bad port": "postgresql+psycopg://rlhf:s3cretpw@127.0.0.1:notaport/rlhf",
    "unknown dialect": "nosuchdb://rlhf:s3cretpw@localhost/rlhf",
    "not a url": "just some s3cretpw text",
    "driver not installed": "mysql://rlhf:s3cretpw@localhost/rlhf",
}


@pytest.mark.parametrize("case", list(BAD_URLS))
def test_bad_db_url_is_one_line_naming_rlhf_db_url_with_the_password_masked(db_env, monkeypatch, capsys, case):
    db_env(BAD_URLS[case])
    code, err = run_main(monkeypatch, capsys, "project", "list")
    line = one_error_line(err)
    assert code == 2 and "RLHF_DB_URL" in line and "s3cretpw" not in err, err
    if "@" in BAD_URLS[case]:
        assert "rlhf:***@" in line


def test_bad_db_url_from_a_real_process_prints_no_traceback(db_env):
    import os

    env = {**os.environ, "RLHF_DB_URL": BAD_URLS["unreachable"]}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "init"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "RLHF_DB_URL" in line and "s3cretpw" not in proc.stderr and "refused" in line.lower()


# --------------------------------------------------------------------------- 4. options refused up front


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_field_chars_below_one_is_refused_before_anything_is_written(settings, tmp_path, monkeypatch, capsys, value):
    from annotation.store import init_db

    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    code, err = run_main(monkeypatch, capsys, "import", str(path), "--project", "p", "--max-field-chars", value)
    line = one_error_line(err)
    assert code == 2 and "--max-field-chars" in line and ">= 1" in line and value in line
    assert nothing_written(init_db(settings.db_url))


def test_max_field_chars_setting_below_one_names_the_variable(settings, tmp_path, monkeypatch, capsys):
    from app import settings as settings_mod

    monkeypatch.setenv("RLHF_MAX_FIELD_CHARS", "0")
    settings_mod.get_settings.cache_clear()
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    code, err = run_main(monkeypatch, capsys, "import", str(path), "--project", "p")
    assert code == 2 and "RLHF_MAX_FIELD_CHARS" in one_error_line(err) and ">= 1" in err


def test_library_max_field_chars_below_one_is_refused(engine, tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    for value in (0, -1):
        with pytest.raises(AnnotationError, match="max_field_chars.*>= 1"):
            import_file(engine, path, "p", max_field_chars=value)
    assert nothing_written(engine)


EXPORT_CHOICES = {
    "--aggregation": ("bogus", "majority, dawid-skene"),
    "--format": ("csv", "trl, trl-conversational, hh, annotations"),
    "--split": ("dev", "train, test"),
    "--margin-from": ("strength", "none, confidence"),
}


@pytest.mark.parametrize("option", list(EXPORT_CHOICES))
def test_export_enumerated_options_refuse_unknown_values(labelled_project, tmp_path, monkeypatch, capsys, option):
    value, choices = EXPORT_CHOICES[option]
    args = {"--project": "p", "--format": "trl", "-o": str(tmp_path / "o.jsonl"), option: value}
    code, err = run_main(monkeypatch, capsys, "export", *[x for kv in args.items() for x in kv])
    line = one_error_line(err)
    assert code == 2 and option in line and repr(value) in line and choices in line
    assert not (tmp_path / "o.jsonl").exists()


def test_export_aggregation_is_refused_even_without_annotations(engine, tmp_path):
    write_lines(tmp_path / "in.jsonl", [json.dumps({"prompt": "Q", "response_a": "a", "response_b": "b"})])
    import_file(engine, tmp_path / "in.jsonl", "p")
    with pytest.raises(AnnotationError, match="--aggregation 'bogus'.*majority, dawid-skene"):
        export(engine, "p", "trl", tmp_path / "o.jsonl", aggregation="bogus")
    assert not (tmp_path / "o.jsonl").exists()


def test_train_rm_aggregation_is_refused_before_training(labelled_project, tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, "train-rm", "--project", "p", "--output", str(tmp_path / "rm"),
                         "--aggregation", "bogus")
    line = one_error_line(err)
    assert code == 2 and "--aggregation" in line and "majority, dawid-skene" in line
    assert not (tmp_path / "rm").exists()


# --------------------------------------------------------------------------- 5. names


BAD_PROJECT_NAMES = {
    "slash": "a/b",
    "dot dot": "../etc",
    "backslash": "a\\b",
    "leading dot": ".hidden",
    "leading dash": "-rf",
    "nul": "a\x00b",
    "newline": "a\nb",
    "tab": "a\tb",
    "colon": "c:x",
    "too long": "x" * 101,
}


def test_project_names_are_validated_the_same_on_both_databases(engine):
    from annotation.projects import create_project

    for case, name in BAD_PROJECT_NAMES.items():
        with transaction(engine) as s:
            with pytest.raises(AnnotationError, match="project name") as info:
                create_project(s, name)
        message = str(info.value)
        assert "\n" not in message and "\x00" not in message, case
    assert count(engine, Project) == 0
    good = ["sample", "hh", "demo", "p1", "My project 2.0", "hh_rlhf-v1.2", "x" * 100, "Prüfung"]
    with transaction(engine) as s:
        for name in good:
            create_project(s, name)
    assert count(engine, Project) == len(good)


def test_a_lookup_of_an_impossible_project_name_is_not_a_database_error(engine):
    from annotation.projects import get_project

    for name in ("x" * 300, "a\x00b"):
        with transaction(engine) as s:
            with pytest.raises(AnnotationError, match="no project named"):
                get_project(s, name)


def test_import_into_a_path_like_project_writes_nothing(engine, tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    for name in ("../etc", "x" * 300):
        with pytest.raises(AnnotationError, match="project name"):
            import_file(engine, path, name)
    assert nothing_written(engine)


def test_cli_project_names_exit_2_with_one_line(settings, tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, "project", "create", "a/b")
    assert code == 2 and "project name" in one_error_line(err) and "'/'" in err
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    code, err = run_main(monkeypatch, capsys, "import", str(path), "--project", "y" * 300)
    assert code == 2 and "project name" in one_error_line(err) and "at most 100" in err


def test_usernames_are_validated_the_same_on_both_databases(engine):
    from annotation.auth import create_user

    for name in ("u" * 129, "a\x00b", "a\nb", "bell\x07"):
        with transaction(engine) as s:
            with pytest.raises(AnnotationError, match="username"):
                create_user(s, name, "password-123")
    assert count(engine, User) == 0
    with transaction(engine) as s:
        for name in ("alice", "ann1", "a.b@example.org", "u" * 128):
            create_user(s, name, "password-123")
    assert count(engine, User) == 4


def test_import_source_name_is_validated_as_a_username(engine, tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [GOOD])
    with pytest.raises(AnnotationError, match="--source"):
        import_file(engine, path, "p", source_annotator="s" * 200)
    assert nothing_written(engine)


def test_model_names_are_checked_in_the_annotation_layer():
    from annotation.names import check_model_name

    assert check_model_name("rm-hh-job3") == "rm-hh-job3"
    for name in ("", "  ", "m" * 201, "a\x00b", "a\nb"):
        with pytest.raises(AnnotationError, match="--name"):
            check_model_name(name)


LONG_NAME = "n" * 300


def test_train_rm_name_is_checked_before_any_work(settings, tmp_path, monkeypatch, capsys):
    data = write_lines(tmp_path / "pairs.jsonl", [GOOD])
    code, err = run_main(monkeypatch, capsys, "train-rm", "--data", str(data), "--output", str(tmp_path / "rm"),
                         "--base", str(tmp_path / "no-such-model"), "--name", LONG_NAME)
    assert code == 2 and "--name" in one_error_line(err) and "at most 200" in err
    # The default name is the output directory's name.
    code, err = run_main(monkeypatch, capsys, "train-rm", "--data", str(data), "--output", str(tmp_path / ("d" * 201)),
                         "--base", str(tmp_path / "no-such-model"))
    assert code == 2 and "--name" in one_error_line(err) and "at most 200" in err
    assert not (tmp_path / "rm").exists()


def test_sft_and_ppo_names_are_checked_before_any_work(settings, tmp_path, monkeypatch, capsys):
    data = write_lines(tmp_path / "rows.jsonl", [json.dumps({"prompt": "Q", "completion": "A"})])
    code, err = run_main(monkeypatch, capsys, "sft", "--data", str(data), "--output", str(tmp_path / "sft"),
                         "--base", str(tmp_path / "no-such-model"), "--name", LONG_NAME)
    assert code == 2 and "--name" in one_error_line(err) and "at most 200" in err
    code, err = run_main(monkeypatch, capsys, "ppo", "--reward-model", str(tmp_path / "no-rm"), "--prompts", str(data),
                         "--output", str(tmp_path / "ppo"), "--name", LONG_NAME)
    assert code == 2 and "--name" in one_error_line(err) and "at most 200" in err
    assert not (tmp_path / "sft").exists() and not (tmp_path / "ppo").exists()


def _ctx(engine, tmp_path):
    def progress(*_a):
        raise AssertionError("work started before the name was checked")

    return types.SimpleNamespace(job_id=7, engine=engine, progress=progress, log=logging.getLogger("test"),
                                 run_dir=str(tmp_path / "run"), settings=None, cancelled=lambda: False)


@pytest.mark.parametrize("kind", ["train_rm", "sft", "ppo", "dpo", "grpo", "rloo"])
def test_job_names_and_derived_names_are_checked_before_any_work(sqlite_engine, tmp_path, kind):
    from ppo import jobs as ppo_jobs
    from reward import jobs as reward_jobs

    handler = {"train_rm": reward_jobs.train_rm, "sft": ppo_jobs.sft, "ppo": ppo_jobs.ppo, "dpo": ppo_jobs.dpo,
               "grpo": ppo_jobs.grpo, "rloo": ppo_jobs.rloo}[kind]
    source = "prompts" if kind in ("ppo", "grpo", "rloo") else "data"
    extra = {"reward_model": str(tmp_path / "no-rm")} if kind in ("ppo", "grpo", "rloo") else {}
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(Exception) as info:
        handler({source: missing, "name": LONG_NAME, **extra}, _ctx(sqlite_engine, tmp_path))
    assert "name" in str(info.value) and "at most 200" in str(info.value)
    long_stem = str(tmp_path / ("s" * 240 + ".jsonl"))
    with pytest.raises(Exception) as info:
        handler({source: long_stem, **extra}, _ctx(sqlite_engine, tmp_path))
    assert "name" in str(info.value) and "at most 200" in str(info.value)


# --------------------------------------------------------------------------- 6. Data page file name


def test_data_page_export_file_is_not_named_from_the_project_name(store):
    from annotation import assign
    from test_app_pages import open_page

    evil = f"../rlhf-escape-{uuid.uuid4().hex[:8]}"  # a legacy name from before names were checked
    with transaction(store) as s:
        s.execute(update(Project).values(name=evil))
        ann_id = s.scalar(select(User.id).where(User.username == "ann1"))
        pid = s.scalar(select(Project.id))
    while (task := assign.next_item(store, pid, ann_id)) is not None:
        assign.submit(store, ann_id, task.item_id, "a", strength=2, duration_ms=1000)
    tmp_root = Path(tempfile.gettempdir())
    try:
        at = open_page("data", store, "res")
        at.button(key="data_export_prepare").click().run()
        assert not at.exception and not at.error
        prepared = at.session_state["data_export"]
        server_file = Path(prepared["report"]["path"])
        assert evil.split("/")[-1] not in str(server_file) and ".." not in server_file.parts
        assert "/" not in prepared["file_name"] and not prepared["file_name"].startswith(".")
        assert prepared["file_name"].endswith("-trl.jsonl") and len(prepared["data"]) > 0
    finally:
        escaped = list(tmp_root.glob(evil.split("/")[-1] + "*"))
        for p in escaped:
            p.unlink()
    assert escaped == []
    with transaction(store) as s:
        assert s.scalar(select(Project.name)) == evil


@pytest.mark.parametrize("args", [["export", "--nope"], ["import", "x.jsonl", "--project", "p", "--max-field-chars", "many"],
                                  ["train-rm", "--data", "x", "-o", "y", "--epochs", "two"]])
def test_usage_errors_of_typers_own_parser_exit_2_without_a_traceback(monkeypatch, capsys, args):
    """Typer 0.2x raises its usage errors from the copy of click it bundles, which main() did not
    recognise: an unknown option or a value of the wrong type printed a traceback and exited 1."""
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err and "Error:" in err
