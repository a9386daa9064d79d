"""annotation.io: every import format, every class of bad input (nothing written), idempotent
re-import, and export (labels, exclusions, filters, split, Parquet, atomic write), on SQLite and
PostgreSQL through the `engine` fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from annotation.errors import AnnotationError, InputError
from annotation.io import export, import_file, pair_text, project_pairs, read_pairs, scan_pairs, split_of
from annotation.io import exporter as exporter_mod
from annotation.io import importer as importer_mod
from annotation.store import Annotation, Item, Project, Prompt, User, transaction
from conftest import hh_dev_path


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def count(engine, model) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(model.__table__))


def items_of(engine, project="p"):
    with engine.connect() as conn:
        pid = conn.scalar(select(Project.id).where(Project.name == project))
        return conn.execute(select(Item.__table__).where(Item.project_id == pid).order_by(Item.id)).all()


def annotations_of(engine):
    with engine.connect() as conn:
        rows = conn.execute(select(Annotation.item_id, Annotation.choice, User.username).join(User, User.id == Annotation.annotator_id))
        return {r.item_id: (r.choice, r.username) for r in rows}


def chosen_of(item, choice):
    return item.response_a if choice == "a" else item.response_b


# --------------------------------------------------------------------------- import formats


def test_pairs_format_becomes_unlabelled_items_in_the_given_order(engine, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Say hi", "response_a": "Hi!", "response_b": "Go away.", "id": "x1", "metadata": {"batch": 7}},
        {"prompt": [{"role": "user", "content": "2+2?"}], "response_a": "4", "response_b": "5", "source_a": "m1",
         "source_b": "m2", "gold_choice": "a"},
    ])
    report = import_file(engine, f, "p")
    assert (report.format, report.lines, report.items_added, report.annotations_added) == ("items", 2, 2, 0)
    one, two = items_of(engine)
    assert (one.prompt, one.response_a, one.response_b, one.external_id, one.metadata) == ("Say hi", "Hi!", "Go away.", "x1", {"batch": 7})
    assert two.prompt == [{"role": "user", "content": "2+2?"}] and (two.source_a, two.source_b, two.gold_choice) == ("m1", "m2", "a")
    assert count(engine, Annotation) == 0


def test_trl_explicit_prompt_records_the_chosen_side_as_the_source_annotators_choice(engine, tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}", "margin": 0.5} for i in range(40)]
    report = import_file(engine, write_jsonl(tmp_path / "t.jsonl", rows), "p", source_annotator="ultra")
    assert (report.format, report.items_added, report.annotations_added, report.source_annotator) == ("trl", 40, 40, "import:ultra")
    labels = annotations_of(engine)
    choices = []
    for item in items_of(engine):
        choice, user = labels[item.id]
        assert user == "import:ultra" and chosen_of(item, choice).startswith(" good")
        assert item.metadata["margin"] == 0.5
        choices.append(choice)
    # The chosen side is placed by content hash, so exported data is not all 'a'.
    assert 10 <= choices.count("a") <= 30
    with transaction(engine) as s:
        src = s.scalar(select(User).where(User.username == "import:ultra"))
        assert (src.password_hash, src.role) == (None, "annotator")


def test_trl_implicit_prompt_is_split_exactly_like_trl_extract_prompt(engine, tmp_path):
    from trl import extract_prompt

    rows = [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Answer: yes, of course", "rejected": "Answer: no"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    ]
    pairs = read_pairs(write_jsonl(tmp_path / "t.jsonl", rows))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        tuple(extract_prompt(r)[k] for k in ("prompt", "chosen", "rejected")) for r in rows
    ]
    report = import_file(engine, tmp_path / "t.jsonl", "p")
    assert (report.format, report.items_added) == ("trl", 3)


def test_trl_conversational_explicit_and_implicit_prompts(engine, tmp_path):
    user = {"role": "user", "content": "What colour is the sky?"}
    explicit = {"prompt": [user], "chosen": [{"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "assistant", "content": "Green."}]}
    implicit = {"chosen": [user, {"role": "assistant", "content": "Blue, by day."}],
                "rejected": [user, {"role": "assistant", "content": "Plaid."}]}
    report = import_file(engine, write_jsonl(tmp_path / "c.jsonl", [explicit, implicit]), "p")
    assert (report.format, report.items_added, report.annotations_added) == ("trl-conversational", 2, 2)
    labels = annotations_of(engine)
    got = {(json.dumps(i.prompt), chosen_of(i, labels[i.id][0])) for i in items_of(engine)}
    assert got == {(json.dumps([user]), "Blue."), (json.dumps([user]), "Blue, by day.")}
    assert [p.chosen for p in read_pairs(tmp_path / "c.jsonl")] == ["Blue.", "Blue, by day."]


def test_hh_transcripts_split_at_the_last_assistant_turn_and_count_skips(engine, tmp_path):
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:"
    rows = [
        {"chosen": shared + " Why did the chicken...", "rejected": shared + " No."},
        {"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y", "rejected": "\n\nHuman: a\n\nAssistant: DIFFERENT\n\nHuman: b\n\nAssistant: z"},
        {"chosen": shared + " ", "rejected": shared + " Ok"},
    ]
    report = import_file(engine, write_jsonl(tmp_path / "h.jsonl", rows), "p")
    assert (report.format, report.items_added, report.annotations_added) == ("hh", 1, 1)
    assert report.skipped == {"sides differ before the last Assistant turn": 1, "empty response": 1}
    (item,) = items_of(engine)
    assert item.prompt == shared
    assert chosen_of(item, annotations_of(engine)[item.id][0]) == " Why did the chicken..."


def test_prompts_go_to_the_prompts_table(engine, tmp_path):
    rows = [{"prompt": "Write a haiku."}, {"prompt": [{"role": "user", "content": "Hi"}], "id": 7}, {"prompt": "Write a haiku."}]
    report = import_file(engine, write_jsonl(tmp_path / "q.jsonl", rows), "p")
    assert (report.format, report.prompts_added, report.items_added, report.duplicates) == ("prompts", 2, 0, 1)
    with engine.connect() as conn:
        got = conn.execute(select(Prompt.prompt, Prompt.external_id).order_by(Prompt.id)).all()
    assert [tuple(r) for r in got] == [("Write a haiku.", None), ([{"role": "user", "content": "Hi"}], "7")]


def test_forced_format_is_checked_on_every_line(engine, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pytest.raises(InputError, match="mixed formats: this line is trl but --format is items"):
        import_file(engine, f, "p", format="items")
    assert import_file(engine, f, "p", format="trl").items_added == 1


def test_the_old_format_name_pairs_is_still_accepted(engine, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q", "response_a": "A", "response_b": "B"}])
    report = import_file(engine, f, "p", format="pairs")
    assert (report.format, report.items_added) == ("items", 1)
    with pytest.raises(InputError, match="unknown format 'pair'"):
        import_file(engine, f, "p", format="pair")


def test_reimport_adds_nothing_and_swapped_sides_are_the_same_item(engine, tmp_path):
    path = hh_dev_path()
    first = import_file(engine, path, "hh")
    assert first.items_added == 1495 and first.annotations_added == 1495
    assert sum(first.skipped.values()) == 5
    again = import_file(engine, path, "hh")
    assert (again.items_added, again.annotations_added, again.duplicates) == (0, 0, 1495)
    assert count(engine, Item) == 1495 and count(engine, Annotation) == 1495 and count(engine, User) == 1
    # Batches see rows from earlier batches, and the same item twice in one batch is caught too.
    f = write_jsonl(tmp_path / "dup.jsonl", [
        {"prompt": "Q", "response_a": "x", "response_b": "y"}, {"prompt": "Q", "response_a": "y", "response_b": "x"},
    ])
    r = import_file(engine, f, "p")
    assert (r.items_added, r.duplicates) == (1, 1)


def test_labels_for_items_already_imported_unlabelled_follow_the_stored_order(engine, tmp_path):
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [{"prompt": f"Q{i}", "response_a": f"bad{i}", "response_b": f"good{i}"} for i in range(6)])
    labelled = write_jsonl(tmp_path / "l.jsonl", [{"prompt": f"Q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(6)])
    import_file(engine, unlabelled, "p")
    r = import_file(engine, labelled, "p", source_annotator="gold-team")
    assert (r.items_added, r.duplicates, r.annotations_added) == (0, 6, 6)
    assert {c for c, _ in annotations_of(engine).values()} == {"b"}
    assert import_file(engine, labelled, "p", source_annotator="gold-team").annotations_added == 0


def test_import_source_must_not_be_a_persons_login(engine, tmp_path):
    from annotation.auth import create_user

    with transaction(engine) as s:
        create_user(s, "import:alice", "a-long-password")
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pytest.raises(AnnotationError, match="person's login"):
        import_file(engine, f, "p", source_annotator="alice")
    assert count(engine, Item) == 0 and count(engine, Project) == 0


# --------------------------------------------------------------------------- bad input

GOOD = json.dumps({"prompt": "Q", "response_a": "A", "response_b": "B"})
GOOD2 = json.dumps({"prompt": "Q2", "response_a": "A", "response_b": "B"})

BAD_CASES = {
    "invalid utf-8": (GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9", "response_a": "A", "response_b": "B"}\n', 2, None, "invalid UTF-8"),
    "truncated json": ((GOOD + "\n" + GOOD2 + "\n" + '{"prompt": "Q3", "response_a": "A", "resp').encode(), 3, None, "invalid JSON"),
    "not an object": ((GOOD + "\n[1, 2]\n").encode(), 2, None, "not an object"),
    "wrong type": ((GOOD + "\n" + json.dumps({"prompt": "Q", "response_a": 5, "response_b": "B"}) + "\n").encode(), 2, "response_a", "wrong type: number"),
    "empty string": ((GOOD + "\n" + json.dumps({"prompt": "   ", "response_a": "A", "response_b": "B"}) + "\n").encode(), 2, "prompt", "empty string"),
    "oversize": ((GOOD + "\n" + json.dumps({"prompt": "Q", "response_a": "A" * 101, "response_b": "B"}) + "\n").encode(), 2, "response_a", "too long: 101"),
    "missing field": ((GOOD + "\n" + json.dumps({"prompt": "Q", "response_a": "A"}) + "\n").encode(), 2, "response_b", "missing"),
    "mixed formats": ((GOOD + "\n" + json.dumps({"prompt": "Q", "chosen": "A", "rejected": "B"}) + "\n").encode(), 2, None, "mixed formats"),
    "unknown shape": (b'{"question": "Q", "answer": "A"}\n', 1, None, "not a known format"),
    "bad chat role": (json.dumps({"prompt": [{"role": "robot", "content": "x"}], "response_a": "A", "response_b": "B"}).encode() + b"\n", 1, "prompt[0].role", "not a chat role"),
    "bad metadata": ((GOOD + "\n" + json.dumps({"prompt": "Q", "response_a": "A", "response_b": "C", "metadata": [1]}) + "\n").encode(), 2, "metadata", "wrong type"),
    "bad margin": (json.dumps({"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "big"}).encode() + b"\n", 1, "margin", "not a finite number"),
    "hh without assistant turn": (json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a no turn"}).encode() + b"\n", 1, "rejected", "no '\\n\\nAssistant:' turn"),
}


def test_bad_input_is_refused_with_file_line_field_and_nothing_is_written(engine, tmp_path, monkeypatch):
    # Batches of one: the good lines before the bad one have already been inserted when it is read,
    # so this checks the rollback, not just validation before writing. One database for all cases
    # (a fresh PostgreSQL database per case costs seconds); each case must leave it empty.
    monkeypatch.setattr(importer_mod, "BATCH_LINES", 1)
    for case, (data, line, field, fragment) in BAD_CASES.items():
        path = tmp_path / f"bad-{case.replace(' ', '-')}.jsonl"
        path.write_bytes(data)
        with pytest.raises(InputError) as info:
            import_file(engine, path, "p", max_field_chars=100)
        err = info.value
        assert (err.path, err.line, err.field) == (str(path), line, field), case
        assert fragment in str(err) and str(path) in str(err) and err.expected, case
        for model in (Project, Item, Prompt, Annotation, User):
            assert count(engine, model) == 0, (case, model.__name__)


def test_oversize_limit_is_configurable(engine, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q", "response_a": "A" * 500, "response_b": "B"}])
    with pytest.raises(InputError, match="at most 100"):
        import_file(engine, f, "p", max_field_chars=100)
    assert import_file(engine, f, "p", max_field_chars=1000).items_added == 1


def test_empty_and_missing_files_are_clear_errors(engine, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="no JSON lines"):
        import_file(engine, tmp_path / "empty.jsonl", "p")
    with pytest.raises(InputError, match="cannot read the file"):
        import_file(engine, tmp_path / "nope.jsonl", "p")
    assert count(engine, Project) == 0


# --------------------------------------------------------------------------- export


def make_voted_project(engine, votes_per_item: list[list[str]], project="v"):
    """Items i with responses ('resp a i', 'resp b i') and the given votes by annotators u0, u1, ..."""
    from annotation.projects import create_project

    with transaction(engine) as s:
        pid = create_project(s, project).id
        users = [User(username=f"u{j}", role="annotator") for j in range(max(len(v) for v in votes_per_item))]
        s.add_all(users)
        s.flush()
        ids = []
        for i, votes in enumerate(votes_per_item):
            item = Item(project_id=pid, prompt=f"prompt {i}", response_a=f"resp a {i}", response_b=f"resp b {i}", content_hash=f"h{i:04d}")
            s.add(item)
            s.flush()
            ids.append(item.id)
            for user, choice in zip(users, votes):
                s.add(Annotation(item_id=item.id, annotator_id=user.id, choice=choice, strength=2, duration_ms=1200))
    return ids


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_export_labels_by_majority_and_excludes_ties_both_bad_and_no_majority(engine, tmp_path):
    ids = make_voted_project(engine, [["a", "a", "b"], ["tie", "tie", "a"], ["a", "b"], ["both_bad", "both_bad"], ["b"], []])
    out = tmp_path / "out.jsonl"
    report = export(engine, "v", "trl", out)
    rows = read_jsonl(out)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("prompt 0", "resp a 0", "resp b 0"), ("prompt 4", "resp b 4", "resp a 4")]
    assert rows[0]["metadata"] == {"item_id": ids[0], "external_id": None, "n_annotations": 3, "agreement": pytest.approx(1 / 3), "confidence": pytest.approx(2 / 3)}
    assert "margin" not in rows[0]
    assert (report.exported, report.ties_excluded, report.no_majority, report.both_bad_excluded, report.unannotated, report.items) == (2, 1, 1, 1, 1, 6)


def test_min_agreement_min_confidence_and_margin(engine, tmp_path):
    make_voted_project(engine, [["a", "a", "a"], ["a", "a", "b"], ["b", "b", "b", "a"]])
    out = tmp_path / "o.jsonl"
    assert export(engine, "v", "trl", out, min_agreement=0.5).exported == 2  # agreements 1, 1/3, 1/2
    r = export(engine, "v", "trl", out, min_confidence=0.7, margin_from="confidence")
    assert (r.exported, r.below_threshold) == (2, 1)
    assert [row["margin"] for row in read_jsonl(out)] == [pytest.approx(1.0), pytest.approx(0.5)]
    with pytest.raises(AnnotationError, match="--min-agreement"):
        export(engine, "v", "trl", out, min_agreement=2)


def test_split_is_a_deterministic_partition_by_item_hash(engine, tmp_path):
    make_voted_project(engine, [["a"]] * 200)
    train = export(engine, "v", "trl", tmp_path / "train.jsonl", split="train", test_fraction=0.2)
    test = export(engine, "v", "trl", tmp_path / "test.jsonl", split="test", test_fraction=0.2)
    ids = lambda p: {r["metadata"]["item_id"] for r in read_jsonl(p)}
    assert not ids(tmp_path / "train.jsonl") & ids(tmp_path / "test.jsonl")
    assert train.exported + test.exported == 200 and 20 <= test.exported <= 60
    assert train.other_split == test.exported
    assert {p.metadata["item_id"] for p in project_pairs(engine, "v", split="test", test_fraction=0.2)} == ids(tmp_path / "test.jsonl")
    assert [split_of(f"h{i:04d}", 0.2) for i in range(5)] == [split_of(f"h{i:04d}", 0.2) for i in range(5)]


def test_parquet_export_holds_the_same_rows_as_jsonl(engine, tmp_path):
    import pyarrow.parquet as pq

    make_voted_project(engine, [["a", "b", "b"], ["a"], ["b", "b"]])
    for fmt in ("trl", "trl-conversational", "hh", "annotations"):
        export(engine, "v", fmt, tmp_path / f"{fmt}.jsonl")
        report = export(engine, "v", fmt, tmp_path / f"{fmt}.parquet", margin_from="none")
        table = pq.read_table(tmp_path / f"{fmt}.parquet").to_pylist()
        rows = read_jsonl(tmp_path / f"{fmt}.jsonl")
        if fmt == "annotations":
            for r in rows:
                r["criteria"] = json.dumps(r["criteria"], separators=(",", ":"))
        assert table == rows and report.exported == len(rows) > 0


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.parquet"])
def test_an_export_is_fsynced_before_and_after_it_is_renamed_into_place(engine, tmp_path, monkeypatch, name):
    """A crash must not leave a complete-looking export with missing bytes: the file is synced before
    the rename (Parquet too, which the JSONL writer's own fsync never covered) and the directory after."""
    import os
    import stat

    make_voted_project(engine, [["a", "a"], ["b"]])
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        synced.append(("dir" if stat.S_ISDIR(mode) else "file", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    export(engine, "v", "trl", tmp_path / name)
    dirs = [path for kind, path in synced if kind == "dir"]
    files = [path for kind, path in synced if kind == "file"]
    assert dirs and dirs[-1] == str(tmp_path.resolve())
    assert files and all(Path(f).name.startswith(f".{name}.") for f in files)  # the temporary, before the rename


def test_fast_jsonl_lines_are_exactly_the_json_of_the_rows():
    from annotation.io import Pair

    chat = [{"role": "system", "content": "Be \"brief\"."}, {"role": "user", "content": "Café?\n\u2028"}]
    meta = {"item_id": 3, "external_id": 'x"1\\', "n_annotations": 3, "agreement": 1 / 3, "confidence": 2 / 3}
    for prompt in ("\n\nHuman: hi é\n\nAssistant:", chat, "plain \t text"):
        for margin in (None, 1 / 3):
            pair = Pair(prompt, " yes \x01", "no", margin, meta)
            for fmt in ("trl", "trl-conversational", "hh"):
                for with_margin in (False, True):
                    line = exporter_mod._pair_line(fmt, pair, with_margin)
                    row = exporter_mod._pair_row(fmt, pair, with_margin)
                    assert line == json.dumps(row, ensure_ascii=False), (fmt, prompt, margin, with_margin)


def test_failed_export_leaves_the_previous_file_and_no_temporary(engine, tmp_path, monkeypatch):
    make_voted_project(engine, [["a"]] * 10)
    (tmp_path / "exports").mkdir()
    out = tmp_path / "exports" / "out.jsonl"
    out.write_text("previous export\n")
    calls = {"n": 0}
    real = exporter_mod._pair_line

    def crash_after_three(*args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(exporter_mod, "_pair_line", crash_after_three)
    with pytest.raises(RuntimeError):
        export(engine, "v", "trl", out)
    assert out.read_text() == "previous export\n" and [p.name for p in out.parent.iterdir()] == ["out.jsonl"]


def test_annotations_dump_has_one_row_per_annotation(engine, tmp_path):
    make_voted_project(engine, [["a", "b", "tie"], ["both_bad"]])
    report = export(engine, "v", "annotations", tmp_path / "a.jsonl")
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert report.exported == 4
    assert [(r["annotator"], r["choice"]) for r in rows] == [("u0", "a"), ("u1", "b"), ("u2", "tie"), ("u0", "both_bad")]
    assert {k for k in rows[0]} >= {"item_id", "annotator", "choice", "strength", "shown_swapped", "duration_ms", "created_at", "prompt"}
    assert rows[0]["strength"] == 2 and rows[0]["duration_ms"] == 1200


def test_unknown_project_format_and_missing_directory_are_clear_errors(engine, tmp_path):
    make_voted_project(engine, [["a"]])
    with pytest.raises(AnnotationError, match="no project named 'nope'"):
        export(engine, "nope", "trl", tmp_path / "o.jsonl")
    with pytest.raises(AnnotationError, match="expected one of trl"):
        export(engine, "v", "csv", tmp_path / "o.jsonl")
    with pytest.raises(AnnotationError, match="does not exist"):
        export(engine, "v", "trl", tmp_path / "no" / "o.jsonl")


def test_every_export_format_reads_back_to_the_same_pairs(engine, tmp_path):
    """Export in each pair format, read it back (and import it into a new project): the same
    pairs in prompt-as-text terms, for HH text prompts and for chat prompts alike."""
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: A pun.", "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No."},
    ])
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Lyon."}]},
    ])
    import_file(engine, hh, "src")
    import_file(engine, chat, "src")
    expected = {(pair_text(p.prompt, p.chosen), pair_text(p.prompt, p.rejected)) for p in project_pairs(engine, "src")}
    assert len(expected) == 2
    for fmt in ("trl", "trl-conversational", "hh"):
        out = tmp_path / f"{fmt}.jsonl"
        export(engine, "src", fmt, out)
        got = {(pair_text(p.prompt, p.chosen).strip(), pair_text(p.prompt, p.rejected).strip()) for p in read_pairs(out)}
        assert got == {(c.strip(), r.strip()) for c, r in expected}, fmt
        assert import_file(engine, out, f"copy-{fmt}").items_added == 2


# --------------------------------------------------------------------------- read_pairs and pair_text


def test_read_pairs_reports_skips_and_refuses_unlabelled_files(tmp_path):
    pairs, skipped = scan_pairs(hh_dev_path())
    assert len(pairs) == 1495 and skipped == {"sides differ before the last Assistant turn": 2, "empty response": 3}
    assert all(p.prompt.endswith("\n\nAssistant:") and p.line > 0 for p in pairs)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "response_a": "A", "response_b": "B"}])
    with pytest.raises(InputError, match="carry no preference label"):
        read_pairs(f)


def test_pair_text_flattens_chat_messages_to_an_hh_transcript():
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert pair_text(msgs) == "\n\nSystem: Be kind.\n\nHuman: Hi\n\nAssistant:"
    assert pair_text(msgs, "Hello") == "\n\nSystem: Be kind.\n\nHuman: Hi\n\nAssistant: Hello"
    assert pair_text("\n\nHuman: Hi\n\nAssistant:", " Hello") == "\n\nHuman: Hi\n\nAssistant: Hello"
    assert pair_text("plain prompt") == "plain prompt"


# --------------------------------------------------------------------------- streaming and the sample project


def test_import_streams_memory_does_not_grow_with_the_file(tmp_path, monkeypatch):
    import tracemalloc

    from annotation.store import init_db

    monkeypatch.setattr(importer_mod, "BATCH_LINES", 250)
    rows = ({"prompt": f"question {i} " + "x" * 400, "chosen": " yes " + "y" * 400, "rejected": " no " + "z" * 400} for i in range(5_000))
    big = write_jsonl(tmp_path / "big.jsonl", rows)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(open(big, encoding="utf-8").readlines()[:1_000]), encoding="utf-8")

    def peak(path, name):
        engine = init_db(f"sqlite:///{tmp_path / name}.db")
        tracemalloc.start()
        try:
            import_file(engine, path, "p")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            engine.dispose()

    peak(small, "warm")  # statement caches and imports are allocated once, not per line
    small_peak, big_peak = peak(small, "small"), peak(big, "big")
    # Holding the file would cost ~5x more for 5x the lines (the big file is ~6.5 MB).
    assert big_peak < 1.5 * small_peak, (small_peak, big_peak)


def test_sample_project_files_import_cleanly_and_keep_the_original_label(engine):
    samples = Path(__file__).resolve().parent.parent / "data" / "samples"
    items = import_file(engine, samples / "hh_items.jsonl", "demo")
    prompts = import_file(engine, samples / "prompts.jsonl", "demo")
    assert (items.format, items.items_added, items.annotations_added) == ("items", 300, 0)
    assert (prompts.format, prompts.prompts_added) == ("prompts", 100)
    original = {p.line: p for p in scan_pairs(hh_dev_path())[0]}
    sides = []
    for item in items_of(engine, "demo"):
        src = original[item.metadata["source_line"]]
        preferred = item.metadata["hh_preferred"]
        assert chosen_of(item, preferred) == src.chosen.strip() and pair_text(item.prompt) == src.prompt
        sides.append(preferred)
    assert 120 <= sides.count("a") <= 180
    assert "LICENSE" in {p.name for p in samples.iterdir()} and "MIT" in (samples / "README.md").read_text()


def test_concurrent_imports_of_the_same_rows_fail_cleanly_on_postgres(engine, tmp_path):
    import threading

    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite queues writers (BEGIN IMMEDIATE), so imports never overlap there")
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"Q{i}", "chosen": "A", "rejected": "B"} for i in range(50)])
    import_file(engine, write_jsonl(tmp_path / "seed.jsonl", [{"prompt": "seed", "response_a": "x", "response_b": "y"}]), "p")
    errors = []
    # Another import's transaction holds the same rows, uncommitted, while ours runs into them.
    with engine.connect() as other:
        other.begin()
        from annotation.io.importer import _Importer  # the same writer, on a connection we control
        from annotation.io.formats import LineParser, iter_json_lines

        parser = LineParser(f, "auto", 1000)
        _Importer(other, parser, importer_mod.ImportReport(str(f), None), "p", "import", None).write(
            [parser.parse(n, o) for n, o in iter_json_lines(f)]
        )
        worker = threading.Thread(target=lambda: errors.append(_capture(lambda: import_file(engine, f, "p"))))
        worker.start()
        worker.join(timeout=2)
        assert worker.is_alive()  # waiting on the other transaction's rows
        other.commit()
    worker.join(timeout=60)
    assert isinstance(errors[0], AnnotationError) and "collided with another import" in str(errors[0])
    assert count(engine, Item) == 51 and count(engine, Annotation) == 50


def _capture(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - handed back to the test thread
        return exc
    return None


def test_dawid_skene_aggregation_is_passed_through_with_gold_items(engine, tmp_path):
    from sqlalchemy import update

    ids = make_voted_project(engine, [["a", "a", "b"], ["b", "b", "a"], ["a", "b", "b"], ["a", "a", "a"]])
    with engine.begin() as conn:  # gold says item 2 is 'a', against its majority
        conn.execute(update(Item.__table__).where(Item.id == ids[2]).values(gold_choice="a"))
    majority_rows = {p.metadata["item_id"]: p for p in project_pairs(engine, "v")}
    report = export(engine, "v", "trl", tmp_path / "ds.jsonl", aggregation="dawid-skene")
    rows = {r["metadata"]["item_id"]: r for r in read_jsonl(tmp_path / "ds.jsonl")}
    assert report.aggregation == "dawid-skene" and report.exported == 4
    assert majority_rows[ids[2]].chosen == "resp b 2" and rows[ids[2]]["chosen"] == "resp a 2"
    assert rows[ids[2]]["metadata"]["confidence"] == pytest.approx(1.0)
    assert rows[ids[2]]["metadata"]["agreement"] == pytest.approx(1 / 3)  # agreement is about the votes, not the method
    with pytest.raises(AnnotationError, match="unknown aggregation"):
        export(engine, "v", "trl", tmp_path / "x.jsonl", aggregation="mean")


def test_an_import_reads_and_checks_its_rows_without_holding_the_write_lock(sqlite_engine, tmp_path, monkeypatch):
    """A large import must not stall every annotator: the rows are parsed and checked before the
    transaction opens, so another writer (an annotator's submit) gets SQLite's write lock meanwhile."""
    import sqlite3

    from annotation.io import formats

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response_a": "a", "response_b": "b"}) + "\n" for i in range(5)))
    db = str(sqlite_engine.url.database)
    probes = []
    real_parse = formats.LineParser.parse

    def parse(self, line, obj):
        other = sqlite3.connect(db, isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")  # what an annotator's submit does first
            other.execute("ROLLBACK")
            probes.append("free")
        except sqlite3.OperationalError:
            probes.append("locked")
        finally:
            other.close()
        return real_parse(self, line, obj)

    monkeypatch.setattr(formats.LineParser, "parse", parse)
    report = import_file(sqlite_engine, path, "p", format="pairs")
    assert report.items_added == 5 and probes == ["free"] * 5
