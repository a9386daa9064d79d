"""`rlhf import` / `rlhf export` end to end: the HH round trip from the issue's "Must show", exit
codes and messages, and the exported file fed unchanged to TRL's RewardTrainer."""

from __future__ import annotations

import json
import math
import sys

import pytest
from typer.testing import CliRunner

from annotation.io import export, import_file, scan_pairs
from conftest import hh_dev_path

from app import cli as cli_mod

cli_mod._register_commands()
runner = CliRunner()


def rlhf(*args):
    result = runner.invoke(cli_mod.cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_hh_import_then_trl_export_round_trips_every_accepted_pair(settings, tmp_path):
    path = hh_dev_path()
    text = rlhf("import", str(path), "--project", "hh")
    assert "items added: 1495" in text and "skipped: 5" in text and "sides differ before the last Assistant turn: 2" in text
    out = tmp_path / "out.jsonl"
    report = json.loads(rlhf("export", "--project", "hh", "--format", "trl", "-o", str(out), "--json"))
    assert (report["exported"], report["no_majority"], report["ties_excluded"]) == (1495, 0, 0)
    converted, _ = scan_pairs(path)
    exported = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert {(p.prompt, p.chosen, p.rejected) for p in converted} == {(r["prompt"], r["chosen"], r["rejected"]) for r in exported}
    assert len(exported) == len(converted) == 1495
    # --parquet whatever the name, the test split, and a margin column.
    pq_out = tmp_path / "test-split.data"
    report = json.loads(rlhf("export", "--project", "hh", "--format", "trl", "-o", str(pq_out), "--parquet",
                             "--split", "test", "--margin-from", "confidence", "--json"))
    import pyarrow.parquet as pq

    table = pq.read_table(pq_out)
    assert table.num_rows == report["exported"] == 1495 - report["other_split"] and 100 < table.num_rows < 200
    assert set(table.column("margin").to_pylist()) == {1.0}  # one imported label per item: unanimous
    # Re-import adds nothing, and says so.
    again = json.loads(rlhf("import", str(path), "--project", "hh", "--json"))
    assert (again["items_added"], again["annotations_added"], again["duplicates"]) == (0, 0, 1495)


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """app.cli.main in-process (the place that turns errors into messages and exit codes)."""
    monkeypatch.setattr(sys, "argv", ["rlhf", *args])
    with pytest.raises(SystemExit) as info:
        cli_mod.main()
    return info.value.code, capsys.readouterr().err


def test_cli_errors_name_file_line_and_field_with_exit_code_2(settings, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "response_a": "A", "response_b": ""}) + "\n", encoding="utf-8")
    code, err = run_main(monkeypatch, capsys, "import", str(bad), "--project", "p")
    assert code == 2 and f"error: {bad}:1: field 'response_b': empty string; expected a non-empty string" in err
    code, err = run_main(monkeypatch, capsys, "export", "--project", "p", "--format", "trl", "-o", str(tmp_path / "o.jsonl"))
    assert code == 2 and "no project named 'p'" in err
    code, err = run_main(monkeypatch, capsys, "import", str(bad), "--project", "p", "--format", "csv")
    assert code == 2 and "unknown format 'csv'" in err


def _tiny_tokenizer(texts, chat: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "[EOS]"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    if chat:
        fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return fast


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["trl", "trl-conversational"])
def test_exported_file_feeds_trl_reward_trainer_unchanged(sqlite_engine, tmp_path, fmt):
    from datasets import load_dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    import_file(sqlite_engine, hh_dev_path(), "hh")
    out = tmp_path / f"{fmt}.jsonl"
    export(sqlite_engine, "hh", fmt, out, split="test", margin_from="confidence")
    dataset = load_dataset("json", data_files=str(out), split="train")
    assert {"prompt", "chosen", "rejected", "margin", "metadata"} <= set(dataset.column_names) and len(dataset) > 100
    texts = [json.dumps([r["prompt"], r["chosen"], r["rejected"]]) for r in dataset]
    tokenizer = _tiny_tokenizer(texts, chat=fmt == "trl-conversational")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, num_labels=1)
    model = LlamaForSequenceClassification(config)
    args = RewardConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        max_length=256, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        # CPU without native bf16: fp32 and no checkpointing (TRL's defaults are ~9x slower here).
        bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("fmt, filename", [("trl", "p.jsonl"), ("annotations", "p.parquet")])
def test_rlhf_export_and_the_export_job_run_one_use_case_and_write_the_same_file(settings, tmp_path, fmt, filename):
    """export is written once (annotation.usecases.export): with the same options the CLI's -o file
    and the export job's file in its run dir are the same bytes, with the same report but for the path."""
    import logging
    from pathlib import Path
    from types import SimpleNamespace

    from annotation.store import init_db
    from app.jobs import JobError, export_job, submit_job

    engine = init_db(settings.db_url)
    rows = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(30)]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_file(engine, data, "p", format="trl")
    options = {"split": "train", "test_fraction": 0.3, "margin_from": "confidence"}
    (tmp_path / "job").mkdir()
    ctx = SimpleNamespace(job_id=2, run_dir=tmp_path / "job", engine=engine, settings=settings, log=logging.getLogger("t"),
                          progress=lambda f, m="": None, cancelled=lambda: False)
    job = export_job({"project": "p", "format": fmt, "filename": filename, **options}, ctx)
    out = tmp_path / "cli" / filename
    out.parent.mkdir()
    printed = json.loads(rlhf("export", "--project", "p", "--format", fmt, "-o", str(out), "--split", "train",
                              "--test-fraction", "0.3", "--margin-from", "confidence", "--json"))
    assert out.read_bytes() == Path(job["path"]).read_bytes() and job["path"] == str(tmp_path / "job" / filename)
    assert {**printed, "path": None} == {**job["report"], "path": None} == {**job["metrics"], "path": None}
    assert 0 < printed["exported"] < 30 and printed["other_split"] > 0 and job["register"] == []
    # The spec is checked when the job is submitted, naming the option.
    with pytest.raises(JobError, match=r"export: --margin-from 'votes'"):
        submit_job(engine, "export", {"project": "p", "format": fmt, "margin_from": "votes"})
    engine.dispose()
