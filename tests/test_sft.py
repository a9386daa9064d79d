"""Stage 1 SFT (ppo.sft): a tiny Llama-style chat model built in the test learns its targets
through TRL's SFTTrainer with the chat template applied, with and without LoRA; bad files and
stopped runs leave clear errors and nothing half-written."""

from __future__ import annotations

import json

import pytest

from annotation.errors import InputError
from ppo.errors import PPOError
from ppo.sft import SFTOptions, as_messages, read_sft_file, rows_from_pairs, train_sft
from tiny_lm import one_thread, save_tiny_policy

ROWS = [{"prompt": "ping", "completion": "pong pong"}, {"prompt": "hello", "completion": "world"}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "base")


def greedy_reply(model_dir, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def completion_logprob(model_dir, prompt: str, completion: str) -> float:
    """Summed log-probability of the completion tokens after the chat-formatted prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    prompt_ids = prompt_ids["input_ids"] if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys") else prompt_ids
    target = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([list(prompt_ids) + target])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0, len(prompt_ids) - 1: -1]
    return float(logp.gather(-1, torch.tensor(target)[:, None]).sum())


def test_sft_teaches_the_chat_formatted_reply_and_saves_a_loadable_policy(base, tmp_path):
    before = completion_logprob(base, "ping", "pong pong")
    out = tmp_path / "sft"
    steps = []
    result = train_sft(ROWS, out, base=base, options=SFTOptions(max_steps=60, learning_rate=5e-3, batch_size=2, precision="fp32"),
                       progress=lambda f, m: steps.append(f))
    # The reply comes back through the chat template at generation time, so the template was applied in training.
    assert greedy_reply(out, "ping") == "pong pong"
    assert greedy_reply(out, "hello") == "world"
    assert completion_logprob(out, "ping", "pong pong") > before + 5
    assert result.metrics["final_loss"] < result.metrics["first_loss"] / 3
    assert steps[-1] == pytest.approx(1.0) and len(steps) == 60
    saved = json.loads((out / "sft.json").read_text())
    assert saved["rows"] == 2 and saved["params"]["compute_precision"] == "fp32" and saved["params"]["gradient_checkpointing"] is False
    row = result.registration(name="sft-1", project_id=None)
    assert row["kind"] == "policy" and row["path"] == str(out) and row["base_model"] == str(base) and row["data_rows"] == 2
    assert len(row["data_hash"]) == 64 and not list(tmp_path.glob(".*partial"))


def test_sft_with_lora_merges_the_adapters_into_a_plain_model(base, tmp_path):
    out = tmp_path / "lora"
    before = completion_logprob(base, "ping", "pong pong")
    result = train_sft(ROWS, out, base=base, options=SFTOptions(max_steps=40, learning_rate=2e-2, batch_size=2, lora=True, lora_r=4))
    assert not (out / "adapter_config.json").exists()  # merged: every later stage loads a plain model directory
    assert completion_logprob(out, "ping", "pong pong") > before + 1
    assert greedy_reply(out, "ping") == "pong pong"
    assert result.params["lora"] is True


def test_messages_rows_are_trained_on_whole_conversations(base, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "yes yes"}]})
                              for _ in range(2)) + "\n", encoding="utf-8")
    rows = read_sft_file(data)
    train_sft(rows, tmp_path / "chat", base=base, options=SFTOptions(max_steps=40, learning_rate=5e-3, batch_size=2))
    assert greedy_reply(tmp_path / "chat", "ping") == "yes yes"


def test_stopping_raises_and_leaves_no_model_directory(base, tmp_path):
    out = tmp_path / "stopped"
    with pytest.raises(PPOError, match="stopped"):
        train_sft(ROWS, out, base=base, options=SFTOptions(max_steps=50, batch_size=2), should_stop=lambda: True)
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_an_existing_non_empty_output_is_refused(base, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(PPOError, match="not empty"):
        train_sft(ROWS, out, base=base, options=SFTOptions(max_steps=1))
    assert (out / "x").read_text() == "keep me"


@pytest.mark.parametrize("lines, line_no, needle", [
    (['{"prompt": "a", "completion": "b"}', "{not json"], 2, "not valid JSON"),
    (['{"prompt": "a", "completion": "b"}', '{"text": "c"}'], 2, "every row of one kind"),
    (['{"question": "a"}'], 1, "no SFT fields"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], 1, "field 'messages[0]'"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], 1, "no assistant message"),
    (['{"prompt": "a", "completion": ""}'], 1, "field 'completion'"),
])
def test_bad_sft_files_name_the_line_and_field(tmp_path, lines, line_no, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_sft_file(path)
    assert err.value.line == line_no and f"{path}:{line_no}" in str(err.value) and needle in str(err.value)


def test_hh_transcripts_become_chat_turns():
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant:"
    assert as_messages(prompt) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I bake bread?"},
    ]
    assert as_messages("Tell me about Human: nature") == [{"role": "user", "content": "Tell me about Human: nature"}]


def test_pairs_give_their_chosen_response_as_the_completion():
    from types import SimpleNamespace

    pairs = [SimpleNamespace(prompt="q1", chosen="good", rejected="bad"), SimpleNamespace(prompt="q2", chosen="  ", rejected="x")]
    assert rows_from_pairs(pairs) == [{"prompt": "q1", "completion": "good"}]


class FakeContext:
    """What a job handler gets from the worker, minus the worker (app.jobs.JobContext's fields)."""

    def __init__(self, engine, settings, run_dir, cancel_after=None):
        import logging

        self.job_id, self.engine, self.settings, self.run_dir = 7, engine, settings, run_dir
        self.log = logging.getLogger("test.sft.job")
        self.calls, self.cancel_after = [], cancel_after

    def progress(self, fraction, message=""):
        self.calls.append(fraction)

    def cancelled(self):
        return self.cancel_after is not None and len(self.calls) >= self.cancel_after


def test_sft_cli_registers_the_policy_only_when_training_has_finished(settings, base, tmp_path):
    from typer.testing import CliRunner

    import app.cli_policy  # noqa: F401  (adds the policy commands to the app)
    from annotation.registry import list_models
    from annotation.store import init_db, transaction
    from app.cli import cli

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    out = tmp_path / "cli-sft"
    result = CliRunner().invoke(cli, ["sft", "--data", str(data), "--output", str(out), "--base", str(base),
                                      "--max-steps", "3", "--lr", "5e-3", "--batch-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    with transaction(init_db(settings.db_url)) as s:
        rows = list_models(s, kind="policy")
        assert [(r.id, r.name, r.path, r.data_rows, r.base_model) for r in rows] == [
            (payload["model_id"], "cli-sft", str(out.resolve()), 2, str(base))]
        assert rows[0].params["source"] == {"data": str(data)} and rows[0].metrics["steps"] == 3
    # A second run into the same directory is refused and registers nothing more.
    again = CliRunner().invoke(cli, ["sft", "--data", str(data), "--output", str(out), "--base", str(base), "--json"])
    assert isinstance(again.exception, PPOError) and "not empty" in str(again.exception)


def test_sft_job_returns_its_policy_for_registration_and_stops_when_cancelled(sqlite_engine, base, tmp_path):
    from app.jobs import JobCancelled
    from app.settings import Settings
    from ppo.jobs import sft

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    settings = Settings(data_dir=tmp_path / "data")
    ctx = FakeContext(sqlite_engine, settings, tmp_path / "job-7")
    result = sft({"data": str(data), "base": str(base), "max_steps": 2, "batch_size": 2}, ctx)
    (row,) = result["register"]
    assert row["kind"] == "policy" and row["path"] == str(tmp_path / "job-7" / "policy") and row["name"] == "sft-sft-job7"
    assert (tmp_path / "job-7" / "policy" / "config.json").exists() and ctx.calls[-1] == pytest.approx(0.99)

    stopped = FakeContext(sqlite_engine, settings, tmp_path / "job-8", cancel_after=2)
    with pytest.raises(JobCancelled):
        sft({"data": str(data), "base": str(base), "max_steps": 20, "batch_size": 2}, stopped)
    assert not (tmp_path / "job-8" / "policy").exists()
    with pytest.raises(PPOError, match="unknown param"):
        sft({"data": str(data), "epoch": 2}, ctx)


def test_a_bad_sft_file_is_reported_by_the_cli_with_line_and_field_and_exit_code_2(settings, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 3}\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "sft", "--data", str(bad), "--output", str(tmp_path / "o"),
                           "--base", str(tmp_path), "--no-register"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"error: {bad}:2: field 'completion'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_rlhf_sft_and_the_sft_job_run_one_use_case_and_register_the_same_policy(base, tmp_path, settings):
    """SFT is written once (ppo.usecases.sft): the CLI and the job register the same row but for its
    path and name; both apply "1e-4 with LoRA" (before, only the CLI did)."""
    import logging
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from annotation.registry import get_model
    from annotation.store import init_db, transaction
    from app.cli import _register_commands, cli
    from ppo.jobs import sft

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    engine = init_db(settings.db_url)
    ctx = SimpleNamespace(job_id=5, run_dir=tmp_path / "job", engine=engine, settings=settings, log=logging.getLogger("t"),
                          progress=lambda f, m="": None, cancelled=lambda: False)
    options = {"max_steps": 3, "batch_size": 2, "lora": True, "lora_r": 4, "precision": "fp32"}
    (job_row,) = sft({"data": str(data), "base": str(base), **options}, ctx)["register"]
    _register_commands()
    result = CliRunner().invoke(cli, ["sft", "--data", str(data), "--base", str(base), "--max-steps", "3", "--batch-size", "2",
                                      "--lora", "--lora-r", "4", "--precision", "fp32", "-o", str(tmp_path / "cli"), "--name", "sft-cli"])
    assert result.exit_code == 0, result.output
    with transaction(engine) as session:
        row = get_model(session, "sft-cli")
        fields = ("kind", "base_model", "project_id", "data_hash", "data_rows", "params", "parent_id")
        assert {k: getattr(row, k) for k in fields} == {k: job_row[k] for k in fields}
    assert job_row["params"]["learning_rate"] == 1e-4 and job_row["name"] == "sft-rows-job5"
