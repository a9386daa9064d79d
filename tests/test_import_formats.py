"""Import from Parquet files and `datasets` directories, and the UltraFeedback layout: the same
items, labels, errors and guarantees as the JSONL path (row-numbered errors, all-or-nothing,
streamed, re-import adds nothing), on SQLite and PostgreSQL through the `engine` fixture.

    .venv/bin/python -m pytest -q tests/test_import_formats.py

Fixtures are written in each test (pyarrow for Parquet, Dataset.from_list(...).save_to_disk for
datasets); nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from annotation.errors import AnnotationError, InputError
from annotation.io import export, import_file, pair_text, project_pairs, read_pairs
from annotation.io import formats as formats_mod
from annotation.io import importer as importer_mod
from annotation.store import Annotation, Item, Project, Prompt, User

from app import cli as cli_mod

cli_mod._register_commands()


@pytest.fixture(autouse=True)
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


# --------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows, schema=None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_dataset(path: Path, rows=None, splits: dict | None = None) -> Path:
    import datasets

    if splits is None:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        datasets.DatasetDict({name: datasets.Dataset.from_list(r) for name, r in splits.items()}).save_to_disk(str(path))
    return path


def write_as(kind: str, path: Path, rows) -> Path:
    """`rows` in the container `kind`: jsonl, parquet, dataset (one Dataset) or datasetdict (split "train")."""
    if kind == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), rows)
    if kind == "parquet":
        return write_parquet(path.with_suffix(".parquet"), rows)
    if kind == "dataset":
        return write_dataset(path, rows)
    return write_dataset(path, splits={"train": rows})


def count(engine, model) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(model.__table__))


def nothing_written(engine) -> bool:
    return all(count(engine, m) == 0 for m in (Project, Item, Prompt, Annotation, User))


def project_state(engine, project: str):
    """Items (prompt, responses, ids, metadata, gold) and their labels, in a comparable form."""
    with engine.connect() as conn:
        pid = conn.scalar(select(Project.id).where(Project.name == project))
        items = conn.execute(select(Item.__table__).where(Item.project_id == pid)).all()
        labels = dict(conn.execute(
            select(Annotation.item_id, Annotation.choice).join(Item, Item.id == Annotation.item_id).where(Item.project_id == pid)
        ).all())
        prompts = conn.execute(select(Prompt.__table__.c.prompt, Prompt.__table__.c.external_id, Prompt.__table__.c.metadata).where(Prompt.project_id == pid)).all()
    got = {
        i.content_hash: (json.dumps(i.prompt), i.response_a, i.response_b, i.external_id, json.dumps(i.metadata, sort_keys=True),
                         i.source_a, i.source_b, i.gold_choice, labels.get(i.id))
        for i in items
    }
    return got, sorted((json.dumps(p.prompt), p.external_id, json.dumps(p.metadata, sort_keys=True)) for p in prompts)


def chosen_of(item, choice):
    return item.response_a if choice == "a" else item.response_b


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


HH_SHARED = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:"

# One small file per layout, as people have them. Rows within a layout share their keys, as a
# table's columns do.
LAYOUTS = {
    "items": ("items", [
        {"prompt": "Say hi", "response_a": "Hi!", "response_b": "Go away.", "id": "x1", "metadata": {"batch": 7},
         "source_a": "m1", "source_b": "m2", "gold_choice": "a"},
        {"prompt": "Say bye", "response_a": "Bye!", "response_b": "Whatever.", "id": "x2", "metadata": {"batch": 8},
         "source_a": "m1", "source_b": "m3", "gold_choice": None},
    ]),
    "trl": ("trl", [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}", "margin": 0.5, "id": i} for i in range(6)]),
    "trl-implicit": ("trl", [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Answer: yes, of course", "rejected": "Answer: no"},
    ]),
    "trl-conversational": ("trl-conversational", [
        {"prompt": [{"role": "system", "content": "Be brief."}, user(f"Capital of country {i}?")],
         "chosen": [assistant(f"City {i}.")], "rejected": [assistant(f"Nowhere {i}.")]} for i in range(4)
    ]),
    "trl-conversational-implicit": ("trl-conversational", [
        {"chosen": [user("Sky?"), assistant("Blue, by day.")], "rejected": [user("Sky?"), assistant("Plaid.")]},
    ]),
    "hh": ("hh", [
        {"chosen": HH_SHARED + " Why did the chicken...", "rejected": HH_SHARED + " No."},
        {"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y",
         "rejected": "\n\nHuman: a\n\nAssistant: DIFFERENT\n\nHuman: b\n\nAssistant: z"},
        {"chosen": HH_SHARED + " ", "rejected": HH_SHARED + " Ok"},
    ]),
    "ultrafeedback": ("ultrafeedback", [
        {"prompt": f"Write line {i}.", "prompt_id": f"{i:064x}",
         "chosen": [user(f"Write line {i}."), assistant(f"A fine line {i}.")],
         "rejected": [user(f"Write line {i}."), assistant(f"meh {i}")],
         "messages": [user(f"Write line {i}."), assistant(f"A fine line {i}.")],
         "score_chosen": 8.5, "score_rejected": 4.0 + i} for i in range(3)
    ]),
    "prompts": ("prompts", [{"prompt": "Write a haiku.", "id": 1}, {"prompt": "Write a limerick.", "id": 2},
                            {"prompt": "Write a haiku.", "id": 1}]),
}
CONTAINERS = ("parquet", "dataset", "datasetdict")


# --------------------------------------------------------------------------- each layout, each container


def test_every_layout_imports_from_parquet_and_datasets_exactly_as_from_jsonl(engine, tmp_path):
    """The same rows as JSONL, Parquet, a saved Dataset and a DatasetDict give the same items,
    labels, prompts and counts; importing one after another adds nothing (content hashes)."""
    for layout, (fmt, rows) in LAYOUTS.items():
        reference = import_file(engine, write_as("jsonl", tmp_path / f"{layout}-ref", rows), f"ref-{layout}")
        assert reference.format == fmt and reference.container == "jsonl", layout
        expected = project_state(engine, f"ref-{layout}")
        assert expected[0] or expected[1], layout
        for kind in CONTAINERS:
            path = write_as(kind, tmp_path / f"{layout}-{kind}", rows)
            project = f"{kind}-{layout}"
            report = import_file(engine, path, project)
            assert (report.format, report.lines) == (fmt, len(rows)), (layout, kind)
            assert report.container == ("parquet" if kind == "parquet" else "datasets")
            assert report.splits == (["train"] if kind == "datasetdict" else [])
            same = ("items_added", "prompts_added", "annotations_added", "duplicates", "skipped")
            assert {k: getattr(report, k) for k in same} == {k: getattr(reference, k) for k in same}, (layout, kind)
            assert project_state(engine, project) == expected, (layout, kind)
            # Re-import, and the JSONL into the same project: nothing new.
            for again in (path, tmp_path / f"{layout}-ref.jsonl"):
                r = import_file(engine, again, project)
                assert (r.items_added, r.prompts_added, r.annotations_added) == (0, 0, 0), (layout, kind, again)


def test_ultrafeedback_rows_become_items_with_scores_margin_and_the_chosen_label(engine, tmp_path):
    fmt, rows = LAYOUTS["ultrafeedback"]
    path = write_parquet(tmp_path / "uf.parquet", rows)
    report = import_file(engine, path, "uf", source_annotator="ultrafeedback")
    assert (report.format, report.items_added, report.annotations_added, report.source_annotator) == (
        "ultrafeedback", 3, 3, "import:ultrafeedback")
    with engine.connect() as conn:
        got = conn.execute(select(Item.__table__, Annotation.choice).join(Annotation, Annotation.item_id == Item.id)).all()
    by_prompt = {r.prompt[0]["content"]: r for r in got}
    for i in range(3):
        item = by_prompt[f"Write line {i}."]
        assert item.prompt == [user(f"Write line {i}.")]
        assert chosen_of(item, item.choice) == f"A fine line {i}."
        assert item.metadata == {"score_chosen": 8.5, "score_rejected": 4.0 + i, "margin": 4.5 - i}
        assert "messages" not in json.dumps(item.metadata) and "prompt_id" not in json.dumps(item.metadata)
    # The pairs read back carry the derived margin and the scores.
    pairs = read_pairs(path)
    assert [(p.chosen, p.margin, p.metadata["score_rejected"]) for p in pairs] == [(f"A fine line {i}.", 4.5 - i, 4.0 + i) for i in range(3)]


def test_ultrafeedback_details_forced_format_explicit_margin_missing_scores_and_skips(tmp_path):
    from annotation.io.formats import LineParser

    base = {"prompt": "Hi?", "chosen": [user("Hi?"), assistant("Hello.")], "rejected": [user("Hi?"), assistant("Go.")]}
    parser = LineParser("f", "ultrafeedback")
    rec = parser.parse(1, base)
    assert (rec.prompt, rec.first, rec.second, rec.margin, rec.meta) == ([user("Hi?")], "Hello.", "Go.", None, {})
    rec = parser.parse(2, {**base, "score_chosen": 9, "score_rejected": 9, "margin": 0.25})
    assert (rec.margin, rec.meta) == (0.25, {"score_chosen": 9, "score_rejected": 9})  # an explicit margin wins
    rec = parser.parse(3, {**base, "score_chosen": 7})
    assert (rec.margin, rec.meta) == (None, {"score_chosen": 7})  # one score: no margin to derive
    # Only the assistant turns: the text prompt is the user turn.
    rec = parser.parse(4, {**base, "chosen": [assistant("Hello.")], "rejected": [assistant("Go.")]})
    assert rec.prompt == [user("Hi?")]
    system = {"role": "system", "content": "Be kind."}
    rec = parser.parse(5, {**base, "chosen": [system, user("Hi?"), assistant("Hello.")], "rejected": [system, user("Hi?"), assistant("Go.")]})
    assert rec.prompt == [system, user("Hi?")]
    skip = parser.parse(6, {**base, "rejected": [user("Other?"), assistant("Go.")]})
    assert isinstance(skip, formats_mod.Skip) and skip.reason == "sides differ before the last assistant turn"
    with pytest.raises(InputError, match="field 'chosen': ends in role 'user'"):
        parser.parse(7, {**base, "chosen": [user("Hi?")]})
    with pytest.raises(InputError, match="field 'score_chosen': 'high' is not a finite number"):
        parser.parse(8, {**base, "score_chosen": "high"})
    with pytest.raises(InputError, match="field 'prompt': missing"):
        LineParser("f", "ultrafeedback").parse(1, {k: v for k, v in base.items() if k != "prompt"})
    # Auto detection: a text prompt beside message lists is UltraFeedback, message prompts stay TRL.
    assert formats_mod.detect_format(base) == "ultrafeedback"
    assert formats_mod.detect_format({**base, "prompt": [user("Hi?")]}) == "trl-conversational"
    with pytest.raises(InputError, match="mixed formats: this line is trl-conversational but --format is ultrafeedback"):
        LineParser("f", "ultrafeedback").parse(1, {**base, "prompt": [user("Hi?")]})


def test_format_list_is_one_tuple_shared_by_cli_help_and_the_app():
    import typer

    from annotation.io import FORMATS
    from annotation.io.formats import LABELLED_FORMATS

    assert "ultrafeedback" in FORMATS and "ultrafeedback" in LABELLED_FORMATS
    params = {p.name: p for p in typer.main.get_command(cli_mod.cli).commands["import"].params}
    assert ", ".join(FORMATS) in params["format"].help and params["split"].opts == ["--split"]
    page = (Path(__file__).resolve().parent.parent / "app" / "pages" / "2_Projects.py").read_text()
    assert 'IMPORT_FORMATS = ["auto", *FORMATS]' in page and '"parquet"' in page


# --------------------------------------------------------------------------- round trip from export


def test_parquet_export_imports_back_to_the_same_pairs_and_reimport_adds_nothing(engine, tmp_path):
    hh = write_jsonl(tmp_path / "hh.jsonl", LAYOUTS["hh"][1])
    chat = write_jsonl(tmp_path / "chat.jsonl", LAYOUTS["trl-conversational"][1])
    import_file(engine, hh, "src")
    import_file(engine, chat, "src")
    expected = {(pair_text(p.prompt, p.chosen).strip(), pair_text(p.prompt, p.rejected).strip()) for p in project_pairs(engine, "src")}
    assert len(expected) == 5
    for fmt in ("trl", "trl-conversational", "hh"):
        for margin_from in ("none", "confidence"):
            out = tmp_path / f"{fmt}-{margin_from}.parquet"
            assert export(engine, "src", fmt, out, margin_from=margin_from).exported == 5
            got = {(pair_text(p.prompt, p.chosen).strip(), pair_text(p.prompt, p.rejected).strip()) for p in read_pairs(out)}
            assert got == expected, (fmt, margin_from)
            project = f"copy-{fmt}-{margin_from}"
            report = import_file(engine, out, project)
            assert (report.format, report.container, report.items_added, report.annotations_added) == (fmt, "parquet", 5, 5)
            # The Parquet export imports to exactly what its JSONL twin imports to.
            twin = tmp_path / f"{fmt}-{margin_from}.jsonl"
            export(engine, "src", fmt, twin, margin_from=margin_from)
            import_file(engine, twin, f"twin-{fmt}-{margin_from}")
            assert project_state(engine, project) == project_state(engine, f"twin-{fmt}-{margin_from}")
            again = import_file(engine, out, project)
            assert (again.items_added, again.annotations_added, again.duplicates) == (0, 0, 5)


# --------------------------------------------------------------------------- bad rows: row numbers, nothing written


def test_a_bad_row_in_each_container_names_its_row_and_writes_nothing(engine, tmp_path, monkeypatch):
    # Batches of one row written and Arrow batches of two rows read: the good rows before the bad
    # one are already inserted (and from an earlier Arrow batch), so this checks the rollback.
    monkeypatch.setattr(importer_mod, "BATCH_LINES", 1)
    monkeypatch.setattr(formats_mod, "ARROW_BATCH_ROWS", 2)
    good = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    bad = good[:3] + [{"prompt": "Q3", "chosen": "   ", "rejected": "bad"}] + good[4:]
    cases = {
        "parquet": (write_parquet(tmp_path / "bad.parquet", bad), "row 3"),
        "dataset": (write_dataset(tmp_path / "bad-ds", bad), "row 3"),
        "datasetdict": (write_dataset(tmp_path / "bad-dd", splits={"train": good, "test": bad}), "test/row 3"),
    }
    for kind, (path, where) in cases.items():
        with pytest.raises(InputError) as info:
            import_file(engine, path, "p")
        err = info.value
        assert (err.path, err.line, err.field) == (str(path), where, "chosen"), kind
        assert str(err).startswith(f"{path}:{where}: field 'chosen': empty string; expected"), kind
        assert nothing_written(engine), kind
    # The DatasetDict's good split alone imports.
    report = import_file(engine, cases["datasetdict"][0], "p", split="train")
    assert (report.splits, report.items_added) == (["train"], 5)


def _parquet_bad_cases(tmp_path: Path) -> dict:
    """case: (path, row, field, fragment of the message) for Parquet, one per class of bad input
    that the JSONL importer refuses."""
    pairs = pa.schema([("prompt", pa.string()), ("response_a", pa.string()), ("response_b", pa.string())])
    good = [{"prompt": f"Q{i}", "response_a": "A", "response_b": "B"} for i in range(3)]
    union = pa.schema([("prompt", pa.string()), ("response_a", pa.string()), ("response_b", pa.string()),
                       ("chosen", pa.string()), ("rejected", pa.string())])
    chat = pa.schema([("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                      ("response_a", pa.string()), ("response_b", pa.string())])
    w = lambda name, rows, schema=None: write_parquet(tmp_path / f"{name}.parquet", rows, schema)  # noqa: E731
    return {
        # A column has one type, so a wrong type is the first row with a value.
        "wrong type": (w("wrong-type", [{"prompt": "Q", "response_a": 5, "response_b": "B"}]), "row 0", "response_a", "wrong type: number"),
        "wrong type (list)": (w("wrong-list", [{"prompt": "Q", "response_a": ["A"], "response_b": "B"}]), "row 0", "response_a", "wrong type: array"),
        "empty string": (w("empty", good + [{"prompt": "  ", "response_a": "A", "response_b": "B"}], pairs), "row 3", "prompt", "empty string"),
        "oversize": (w("oversize", good + [{"prompt": "Q", "response_a": "A" * 101, "response_b": "B"}], pairs), "row 3", "response_a", "too long: 101"),
        "missing (null)": (w("null", good + [{"prompt": "Q", "response_a": "A", "response_b": None}], pairs), "row 3", "response_b", "missing"),
        "mixed formats": (w("mixed", good + [{"prompt": "Q", "chosen": "A", "rejected": "B"}], union), "row 3", None,
                          "mixed formats: this row is trl but row 0 is items"),
        "unknown shape": (w("unknown", [{"question": "Q", "answer": "A"}]), "row 0", None, "not a known format"),
        "bad chat role": (w("role", [{"prompt": [{"role": "user", "content": "x"}], "response_a": "A", "response_b": "B"},
                                     {"prompt": [{"role": "robot", "content": "x"}], "response_a": "A", "response_b": "B"}], chat),
                          "row 1", "prompt[0].role", "not a chat role"),
        "bad margin": (w("margin", [{"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "big"}]), "row 0", "margin", "not a finite number"),
        "bad metadata": (w("meta", [{"prompt": "Q", "response_a": "A", "response_b": "B", "metadata": [1]}]), "row 0", "metadata", "wrong type"),
        "hh without assistant turn": (w("hh", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a no turn"}]),
                                      "row 0", "rejected", "no '\\n\\nAssistant:' turn"),
        "binary column": (w("binary", [{"prompt": "Q", "response_a": "A", "response_b": "B", "blob": b"\x00"}]), None, "blob",
                          "Arrow type binary"),
    }


def test_bad_input_classes_are_refused_for_parquet_and_datasets_too(engine, tmp_path, monkeypatch):
    """Every class of bad input the JSONL importer refuses, in a Parquet file and in a saved
    Dataset with the same columns: the same field and message, the row named, nothing written."""
    import datasets

    monkeypatch.setattr(importer_mod, "BATCH_LINES", 1)
    for case, (path, row, field, fragment) in _parquet_bad_cases(tmp_path).items():
        ds_path = tmp_path / f"ds-{path.stem}"
        datasets.Dataset(pq.read_table(path)).save_to_disk(str(ds_path))
        for where in (path, ds_path):
            with pytest.raises(InputError) as info:
                import_file(engine, where, "p", max_field_chars=100)
            err = info.value
            assert (err.path, err.line, err.field) == (str(where), row, field), (case, where)
            assert fragment in str(err) and err.expected, (case, str(err))
            assert nothing_written(engine), case


def test_unreadable_empty_and_misnamed_inputs_are_clear_errors(engine, tmp_path):
    with pytest.raises(InputError, match="cannot read the file: no such file"):
        import_file(engine, tmp_path / "missing.parquet", "p")
    (tmp_path / "fake.parquet").write_text('{"prompt": "Q"}\n')
    with pytest.raises(InputError, match="not a readable Parquet file"):
        import_file(engine, tmp_path / "fake.parquet", "p")
    empty = write_parquet(tmp_path / "empty.parquet", [], pa.schema([("prompt", pa.string())]))
    with pytest.raises(InputError, match="no rows in the parquet data"):
        import_file(engine, empty, "p")
    (tmp_path / "plain-dir").mkdir()
    with pytest.raises(InputError, match="a directory without dataset_dict.json"):
        import_file(engine, tmp_path / "plain-dir", "p")
    broken = tmp_path / "broken-ds"
    broken.mkdir()
    (broken / "state.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot load the datasets directory"):
        import_file(engine, broken, "p")
    # A Parquet file under another name is still read as Parquet (by its magic bytes).
    renamed = tmp_path / "pairs.data"
    renamed.write_bytes(write_parquet(tmp_path / "p.parquet", [{"prompt": "Q", "response_a": "A", "response_b": "B"}]).read_bytes())
    assert import_file(engine, renamed, "q").container == "parquet"
    assert count(engine, Item) == 1 and count(engine, Project) == 1


def test_dates_and_decimals_in_extra_columns_are_kept_as_text(engine, tmp_path):
    import datetime
    import decimal

    schema = pa.schema([("prompt", pa.string()), ("response_a", pa.string()), ("response_b", pa.string()),
                        ("created", pa.timestamp("s")), ("price", pa.decimal128(5, 2)), ("score", pa.float64())])
    path = write_parquet(tmp_path / "extra.parquet", [
        {"prompt": "Q", "response_a": "A", "response_b": "B", "created": datetime.datetime(2024, 5, 1, 12), "price": decimal.Decimal("1.50"), "score": float("nan")},
    ], schema)
    assert import_file(engine, path, "p").items_added == 1
    with engine.connect() as conn:
        meta = conn.scalar(select(Item.__table__.c.metadata))
    # Parquet stores the timestamp in ms; NaN is a missing value, as pandas means it.
    assert meta == {"extra": {"created": "2024-05-01 12:00:00.000", "price": "1.50"}}


# --------------------------------------------------------------------------- DatasetDict splits


def test_datasetdict_imports_every_split_or_the_one_asked_for(engine, tmp_path):
    _, rows = LAYOUTS["ultrafeedback"]
    extra = [{**r, "prompt": r["prompt"] + " Again.", "chosen": [user(r["prompt"] + " Again."), r["chosen"][1]],
              "rejected": [user(r["prompt"] + " Again."), r["rejected"][1]]} for r in rows]
    path = write_dataset(tmp_path / "uf", splits={"train_prefs": rows, "test_prefs": extra[:2]})
    only = import_file(engine, path, "test-only", split="test_prefs")
    assert (only.format, only.splits, only.lines, only.items_added, only.annotations_added) == ("ultrafeedback", ["test_prefs"], 2, 2, 2)
    both = import_file(engine, path, "all")
    assert (both.splits, both.lines, both.items_added) == (["train_prefs", "test_prefs"], 5, 5)
    with pytest.raises(AnnotationError, match=r"--split dev: .* has no split 'dev'; expected one of train_prefs, test_prefs"):
        import_file(engine, path, "x", split="dev")
    single = write_dataset(tmp_path / "single", rows)
    with pytest.raises(AnnotationError, match="holds one Dataset, not a DatasetDict"):
        import_file(engine, single, "x", split="train")
    with pytest.raises(AnnotationError, match="is a file; --split picks one split"):
        import_file(engine, write_parquet(tmp_path / "f.parquet", rows), "x", split="train")
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Project.__table__).where(Project.name == "x")) == 0
    # Mixed formats across splits are mixed formats too.
    mixed = write_dataset(tmp_path / "mixed", splits={"a": rows, "b": LAYOUTS["trl"][1]})
    with pytest.raises(InputError, match=r":b/row 0: mixed formats: this row is trl but a/row 0 is ultrafeedback"):
        import_file(engine, mixed, "y")


# --------------------------------------------------------------------------- the CLI


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["rlhf", *args])
    with pytest.raises(SystemExit) as info:
        cli_mod.main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli_imports_parquet_and_a_datasets_dir_and_a_bad_one_is_one_line_exit_2(settings, tmp_path, monkeypatch, capsys):
    _, rows = LAYOUTS["trl"]
    pq_path = write_parquet(tmp_path / "pairs.parquet", rows)
    code, out, _ = run_main(monkeypatch, capsys, "import", str(pq_path), "--project", "p", "--json")
    report = json.loads(out)
    assert code == 0 and (report["format"], report["container"], report["items_added"], report["annotations_added"]) == ("trl", "parquet", 6, 6)
    dd = write_dataset(tmp_path / "dd", splits={"train": LAYOUTS["ultrafeedback"][1], "test": LAYOUTS["ultrafeedback"][1][:1]})
    code, out, _ = run_main(monkeypatch, capsys, "import", str(dd), "--project", "uf", "--split", "train", "--json")
    report = json.loads(out)
    assert code == 0 and (report["format"], report["container"], report["splits"], report["items_added"]) == ("ultrafeedback", "datasets", ["train"], 3)
    code, out, _ = run_main(monkeypatch, capsys, "import", str(dd), "--project", "uf2", "--format", "ultrafeedback")
    assert code == 0 and "(ultrafeedback, datasets, splits train, test) into project 'uf2': 4 rows" in out
    assert "items added: 3" in out and "already present: 1" in out
    # Bad ones: one line, exit code 2, the row named.
    bad_pq = write_parquet(tmp_path / "bad.parquet", rows[:2] + [{**rows[2], "rejected": ""}] + rows[3:])
    bad_dd = write_dataset(tmp_path / "bad-dd", splits={"train": rows[:2] + [{**rows[2], "rejected": ""}] + rows[3:]})
    for path, where in ((bad_pq, "row 2"), (bad_dd, "train/row 2")):
        code, _, err = run_main(monkeypatch, capsys, "import", str(path), "--project", "bad")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"error: {path}:{where}: field 'rejected': empty string"), lines[0]
    for args, fragment in (((str(pq_path), "--split", "train"), "--split train"), ((str(dd), "--split", "nope"), "no split 'nope'")):
        code, _, err = run_main(monkeypatch, capsys, "import", *args, "--project", "bad")
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    from annotation.store import init_db

    eng = init_db(settings.db_url)
    try:
        with eng.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Project.__table__).where(Project.name == "bad")) == 0
    finally:
        eng.dispose()


def test_projects_page_imports_an_uploaded_parquet_file(store, tmp_path):
    from test_app_pages import open_page

    path = write_parquet(tmp_path / "up.parquet", LAYOUTS["trl"][1])
    before = count(store, Item)
    at = open_page("projects", store, "res")
    at.file_uploader(key="proj_upload").set_value(("new_pairs.parquet", path.read_bytes(), "application/octet-stream"))
    at.run()
    at.button(key="proj_import").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Imported new_pairs.parquet: 6 items" in s.value for s in at.success)
    assert count(store, Item) == before + 6
    bad = write_parquet(tmp_path / "bad.parquet", [{"prompt": "Q", "chosen": 1, "rejected": "B"}])
    at.file_uploader(key="proj_upload").set_value(("broken.parquet", bad.read_bytes(), "application/octet-stream"))
    at.run()
    at.button(key="proj_import").click().run()
    assert len(at.error) == 1 and at.error[0].value.startswith("Import failed, nothing was added: broken.parquet:row 0: field 'chosen'")
    assert count(store, Item) == before + 6


# --------------------------------------------------------------------------- streaming


def test_arrow_data_is_read_one_batch_at_a_time(tmp_path, monkeypatch):
    """No code path turns a whole table into Python objects: every batch handed to the row
    conversion has at most ARROW_BATCH_ROWS rows, and the rows are consumed as they come."""
    from annotation.store import init_db

    monkeypatch.setattr(formats_mod, "ARROW_BATCH_ROWS", 100)
    sizes: list[int] = []
    real = formats_mod._arrow_rows

    def recording(batch, target):
        sizes.append(batch.num_rows)
        return real(batch, target)

    monkeypatch.setattr(formats_mod, "_arrow_rows", recording)
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(1_050)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=1_050)  # one row group
    write_dataset(tmp_path / "big-dd", splits={"train": rows, "test": rows[:30]})
    engine = init_db(f"sqlite:///{tmp_path / 's.db'}")
    try:
        for path, total in ((tmp_path / "big.parquet", 1_050), (tmp_path / "big-dd", 1_080)):
            sizes.clear()
            assert import_file(engine, path, path.name).lines == total
            assert max(sizes) == 100 and sum(sizes) == total, sizes
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_import_streams_memory_does_not_grow_with_the_input(tmp_path, monkeypatch, kind):
    import tracemalloc

    from annotation.store import init_db

    monkeypatch.setattr(importer_mod, "BATCH_LINES", 250)
    monkeypatch.setattr(formats_mod, "ARROW_BATCH_ROWS", 250)
    rows = [{"prompt": f"question {i} " + "x" * 400, "chosen": " yes " + "y" * 400, "rejected": " no " + "z" * 400} for i in range(5_000)]

    def make(name, n):
        if kind == "parquet":
            return write_parquet(tmp_path / f"{name}.parquet", rows[:n])
        return write_dataset(tmp_path / name, splits={"train": rows[:n]})

    big, small = make("big", 5_000), make("small", 1_000)
    del rows

    def peak(path, name):
        engine = init_db(f"sqlite:///{tmp_path / name}.db")
        tracemalloc.start()
        try:
            import_file(engine, path, "p")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            engine.dispose()

    peak(small, "warm")  # imports, statement caches and the datasets machinery are allocated once
    small_peak, big_peak = peak(small, "small"), peak(big, "big")
    # Holding the rows as Python objects would cost ~5x more for 5x the rows (~6.5 MB of text).
    assert big_peak < 1.5 * small_peak, (small_peak, big_peak)
