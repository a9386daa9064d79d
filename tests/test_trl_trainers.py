"""Policy training through TRL's DPOTrainer, GRPOTrainer and RLOOTrainer (ppo.dpo, ppo.grpo) on a
tiny Llama-style chat model built in the test (tests/tiny_lm.py), with tiny lengths.

    .venv/bin/python -m pytest -q tests/test_trl_trainers.py

DPO: the loss falls and the chosen-minus-rejected log-probability margin, computed here from the
saved model, rises. GRPO and RLOO: a rule-based reward's mean rises over a few dozen steps. A tiny
BERT reward model with a word-level tokenizer (not the policy's BPE) scores exactly the decoded
completions. Jobs and the CLI register the policy with its lineage; bad options exit 2 with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from reward_fixtures import save_reward_models  # noqa: E402
from tiny_lm import one_thread, save_tiny_policy  # noqa: E402

from ppo.dpo import DPOOptions, dpo_rows, train_dpo  # noqa: E402
from ppo.errors import PPOError  # noqa: E402
from ppo.grpo import GRPOOptions, completion_texts, reward_model_function, train_grpo, train_rloo  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAIRS = [
    {"prompt": "ping", "chosen": "pong pong", "rejected": "the cat"},
    {"prompt": "hello", "chosen": "world", "rejected": "no no"},
    {"prompt": "tell me a story", "chosen": "a dog and a red ball", "rejected": "never"},
    {"prompt": "yes or no", "chosen": "yes", "rejected": "maybe sometimes"},
]
PROMPTS = ["ping", "hello", "tell me a story", [{"role": "user", "content": "yes or no"}]]
FP32 = dict(precision="fp32")  # tests set the precision plan themselves, whatever the machine has


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    return save_reward_models(tmp_path_factory.mktemp("rm"))


def completion_logprob(model_dir, prompt: str, completion: str) -> float:
    """Summed log-probability of the completion tokens (and EOS) after the chat-formatted prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    target = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([list(prompt_ids) + target])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0, len(prompt_ids) - 1: -1]
    return float(logp.gather(-1, torch.tensor(target)[:, None]).sum())


def margin(model_dir) -> float:
    """Mean over PAIRS of log p(chosen) - log p(rejected) under the model."""
    return sum(completion_logprob(model_dir, p["prompt"], p["chosen"]) - completion_logprob(model_dir, p["prompt"], p["rejected"])
               for p in PAIRS) / len(PAIRS)


def vowel_o(prompts, completions, **kwargs) -> list[float]:
    """A rule-based reward: the share of the completion's characters that are "o" (dense enough for a tiny model)."""
    return [t.count("o") / max(1, len(t)) for t in completion_texts(completions)]


# --------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_lowers_the_loss_and_widens_the_chosen_minus_rejected_margin(base, tmp_path, lora):
    before = margin(base)
    out = tmp_path / "dpo"
    steps = []
    options = DPOOptions(max_steps=20, learning_rate=2e-2 if lora else 5e-3, batch_size=4, lora=lora, lora_r=4, **FP32)
    result = train_dpo(PAIRS, out, base=base, options=options, progress=lambda f, m: steps.append(f))
    after = margin(out)
    m = result.metrics
    print(f"DPO {'lora' if lora else 'full'}: loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, TRL reward margin "
          f"{m['first_reward_margin']:.3f} -> {m['final_reward_margin']:.3f}, log-prob margin {before:.3f} -> {after:.3f}")
    assert m["final_loss"] < m["first_loss"] / 4 and m["first_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert m["final_reward_margin"] > 1.0 and m["final_reward_accuracy"] == 1.0
    assert after > before + 10  # beta * (margin gain) is the implicit reward margin TRL logs
    assert len(steps) == 20 and steps[-1] == pytest.approx(1.0)
    assert not (out / "adapter_config.json").exists()  # adapters merged: a plain model directory
    saved = json.loads((out / "dpo.json").read_text())
    assert saved["params"]["trainer"] == "dpo" and saved["params"]["compute_precision"] == "fp32"
    assert saved["params"]["reference"] == ("base with adapters off" if lora else "frozen copy of the base")
    assert (out / "metrics.jsonl").is_file() and not list(tmp_path.glob(".*partial*"))


def test_dpo_rows_follow_the_tokenizer_conversational_or_standard():
    from types import SimpleNamespace

    pairs = [SimpleNamespace(prompt="q", chosen=" good ", rejected="bad"),
             {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}], "rejected": "no"},
             {"prompt": "same", "chosen": "x", "rejected": "x"}, {"prompt": "empty", "chosen": "", "rejected": "x"}]
    chat = dpo_rows(pairs, has_chat_template=True)
    assert chat == [
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
    ]
    plain = dpo_rows(pairs[:1], has_chat_template=False)
    assert plain == [{"prompt": "q", "chosen": " good", "rejected": " bad"}]


def test_a_stopped_dpo_run_raises_and_leaves_nothing(base, tmp_path):
    with pytest.raises(PPOError, match="stopped"):
        train_dpo(PAIRS, tmp_path / "stopped", base=base, options=DPOOptions(max_steps=20, **FP32), should_stop=lambda: True)
    assert not (tmp_path / "stopped").exists() and not list(tmp_path.glob(".*partial*"))


class FakeContext:
    """What a job handler gets from the worker, minus the worker (app.jobs.JobContext's fields)."""

    def __init__(self, engine, settings, run_dir, cancel_after=None):
        import logging

        self.job_id, self.engine, self.settings, self.run_dir = 7, engine, settings, run_dir
        self.log = logging.getLogger("test.trl.job")
        self.calls, self.cancel_after = [], cancel_after

    def progress(self, fraction, message=""):
        self.calls.append(fraction)

    def cancelled(self):
        return self.cancel_after is not None and len(self.calls) >= self.cancel_after


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def register_base(engine, base) -> int:
    from annotation.registry import register_model
    from annotation.store import transaction

    with transaction(engine) as session:
        return register_model(session, kind="policy", name="sft-base", path=str(base)).id


def test_dpo_job_registers_the_policy_with_its_lineage_and_stops_when_cancelled(sqlite_engine, base, tmp_path):
    from app.jobs import HANDLERS, JobCancelled, resolve_handler
    from app.settings import Settings
    from annotation.store import JOB_KINDS

    assert {"dpo", "grpo", "rloo"} <= set(JOB_KINDS) & set(HANDLERS)
    dpo = resolve_handler("dpo")
    parent = register_base(sqlite_engine, base)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    settings = Settings(data_dir=tmp_path / "data")
    ctx = FakeContext(sqlite_engine, settings, tmp_path / "job-7")
    result = dpo({"data": str(data), "base": str(base), "max_steps": 3, "learning_rate": 5e-3, **FP32}, ctx)
    (row,) = result["register"]
    assert row["kind"] == "policy" and row["name"] == "dpo-pairs-job7" and row["parent_id"] == parent
    assert row["path"] == str(tmp_path / "job-7" / "policy") and (tmp_path / "job-7" / "policy" / "model.safetensors").is_file()
    assert row["base_model"] == str(base) and row["data_rows"] == 4 and len(row["data_hash"]) == 64
    assert row["params"]["source"] == {"data": str(data)} and row["params"]["beta"] == 0.1
    assert row["metrics"]["steps"] == 3 and {"final_reward_margin", "final_reward_accuracy"} <= set(row["metrics"])
    assert ctx.calls[-1] == pytest.approx(0.99)

    stopped = FakeContext(sqlite_engine, settings, tmp_path / "job-8", cancel_after=2)
    with pytest.raises(JobCancelled):
        dpo({"data": str(data), "base": str(base), "max_steps": 20}, stopped)
    assert not (tmp_path / "job-8" / "policy").exists()
    with pytest.raises(PPOError, match="unknown param"):
        dpo({"data": str(data), "betta": 0.2}, ctx)


def test_dpo_cli_registers_the_policy_as_a_child_of_its_registered_base(settings, base, tmp_path):
    from typer.testing import CliRunner

    import app.cli_policy  # noqa: F401  (adds the policy commands to the app)
    from annotation.registry import list_models
    from annotation.store import init_db, transaction
    from app.cli import cli

    eng = init_db(settings.db_url)
    parent = register_base(eng, base)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "cli-dpo"
    result = CliRunner().invoke(cli, ["dpo", "--data", str(data), "--output", str(out), "--base", str(base), "--max-steps", "2",
                                      "--lr", "5e-3", "--beta", "0.2", "--precision", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    with transaction(eng) as s:
        row = next(r for r in list_models(s, kind="policy") if r.id == payload["model_id"])
        assert (row.name, row.path, row.parent_id, row.data_rows) == ("cli-dpo", str(out.resolve()), parent, 4)
        assert row.params["beta"] == 0.2 and row.params["source"] == {"data": str(data)} and row.metrics["steps"] == 2
    eng.dispose()


# The fields of a registry row that say what was trained, on what, how: the same whichever caller ran it.
SAME_FIELDS = ("kind", "base_model", "project_id", "data_hash", "data_rows", "params", "parent_id")


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "runtime_s"}


def job_context(engine, settings, run_dir):
    import logging
    from types import SimpleNamespace

    return SimpleNamespace(job_id=5, run_dir=run_dir, engine=engine, settings=settings, log=logging.getLogger("t"),
                           progress=lambda f, m="": None, cancelled=lambda: False)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_rlhf_dpo_and_the_dpo_job_run_one_use_case_and_register_the_same_policy(settings, base, tmp_path):
    """DPO is written once (ppo.usecases.dpo): the CLI and the job register the same row but for its
    path and name; both apply "1e-5 with LoRA" (before, only the CLI did)."""
    from typer.testing import CliRunner

    from annotation.registry import get_model
    from annotation.store import init_db, transaction
    from app.cli import _register_commands, cli
    from ppo.jobs import dpo

    engine = init_db(settings.db_url)
    parent = register_base(engine, base)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    (job_row,) = dpo({"data": str(data), "base": str(base), "max_steps": 2, "batch_size": 2, "lora": True, "lora_r": 4,
                      "beta": 0.2, **FP32}, job_context(engine, settings, tmp_path / "job"))["register"]
    _register_commands()
    result = CliRunner().invoke(cli, ["dpo", "--data", str(data), "--base", str(base), "--max-steps", "2", "--batch-size", "2",
                                      "--lora", "--lora-r", "4", "--beta", "0.2", "--precision", "fp32",
                                      "-o", str(tmp_path / "cli"), "--name", "dpo-cli"])
    assert result.exit_code == 0, result.output
    with transaction(engine) as session:
        row = get_model(session, "dpo-cli")
        assert {k: getattr(row, k) for k in SAME_FIELDS} == {k: job_row[k] for k in SAME_FIELDS}
        assert untimed(row.metrics) == untimed(job_row["metrics"])
    assert job_row["parent_id"] == parent and job_row["params"]["learning_rate"] == 1e-5 and job_row["name"] == "dpo-pairs-job5"
    assert row.path == str((tmp_path / "cli").resolve()) and job_row["path"] == str((tmp_path / "job" / "policy").resolve())
    engine.dispose()


# --------------------------------------------------------------------------- GRPO and RLOO


def test_grpo_raises_the_mean_of_a_rule_based_reward(base, tmp_path):
    out = tmp_path / "grpo"
    result = train_grpo(PROMPTS, out, base=base, reward=vowel_o, options=GRPOOptions(
        steps=40, learning_rate=1e-2, batch_size=8, num_generations=4, max_completion_length=8, **FP32))
    m = result.metrics
    print(f"GRPO: mean reward {m['reward_first_quarter']:.3f} (first 10 steps) -> {m['reward_last_quarter']:.3f} (last 10)")
    assert m["steps"] == 40 and m["reward_last_quarter"] > m["reward_first_quarter"] + 0.15
    saved = json.loads((out / "grpo.json").read_text())
    assert saved["params"]["trainer"] == "grpo" and saved["params"]["loss_type"] == "dapo" and saved["params"]["beta"] == 0.0
    assert saved["params"]["reward_function"] == "vowel_o" and saved["rows"] == 4
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".*partial*"))


def test_rloo_raises_the_mean_of_a_rule_based_reward(base, tmp_path):
    # beta=0: at this scale TRL's default KL penalty (0.05 x the summed log-ratio) outweighs a 0..1 reward.
    result = train_rloo(PROMPTS, tmp_path / "rloo", base=base, reward=vowel_o, options=GRPOOptions(
        steps=40, learning_rate=1e-2, batch_size=8, num_generations=4, max_completion_length=8, beta=0.0, **FP32))
    m = result.metrics
    print(f"RLOO: mean reward {m['reward_first_quarter']:.3f} (first 10 steps) -> {m['reward_last_quarter']:.3f} (last 10)")
    assert m["steps"] == 40 and m["reward_last_quarter"] > m["reward_first_quarter"] + 0.15
    assert json.loads((tmp_path / "rloo" / "rloo.json").read_text())["params"]["trainer"] == "rloo"


def test_a_reward_model_with_another_tokenizer_scores_the_decoded_completions(base, reward_models, tmp_path):
    from transformers import AutoTokenizer

    from reward.score import load_reward_model

    scorer = load_reward_model(reward_models["single"])
    policy_tok = AutoTokenizer.from_pretrained(base)
    assert scorer.tokenizer.get_vocab() != policy_tok.get_vocab()  # word-level BERT vs byte-level BPE
    score = reward_model_function(scorer)
    calls = []

    def recorded(prompts, completions, **kwargs):
        rewards = score(prompts, completions, **kwargs)
        calls.append((kwargs, completions, rewards))
        return rewards

    train_grpo(PROMPTS, tmp_path / "grpo-rm", base=base, reward=recorded, options=GRPOOptions(
        steps=2, learning_rate=1e-3, batch_size=8, num_generations=4, max_completion_length=6, **FP32))
    assert len(calls) == 2
    for kwargs, completions, rewards in calls:
        texts = [policy_tok.decode(ids, skip_special_tokens=True) for ids in kwargs["completion_ids"]]
        assert completion_texts(completions) == texts
        given = [json.loads(p) for p in kwargs["reward_prompt"]]
        assert all(p in PROMPTS for p in given)  # the prompt as given (text or messages), not the policy's chat form
        assert rewards == pytest.approx(scorer.score(given, texts).tolist(), abs=1e-6)
    # Through the whole run, the reward model named as a directory:
    result = train_rloo(PROMPTS, tmp_path / "rloo-rm", base=base, reward=reward_models["single"], options=GRPOOptions(
        steps=1, batch_size=4, num_generations=2, max_completion_length=4, **FP32))
    assert result.params["reward_model"] == str(reward_models["single"]) and result.params["reward_function"] == "reward_model"


def test_an_ensemble_reward_is_the_mean_minus_k_spreads():
    import torch

    class Ensemble:
        def score_with_spread(self, prompts, responses, batch_size=32):
            return torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])

        def score(self, prompts, responses, batch_size=32):
            return torch.tensor([1.0, 2.0])

    completions = [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]
    prompts = [[{"role": "user", "content": "q"}]] * 2
    assert reward_model_function(Ensemble(), spread_coef=2.0)(prompts, completions) == [0.0, 0.0]
    assert reward_model_function(Ensemble())(prompts, completions) == [1.0, 2.0]


def test_a_real_ensemble_scores_mean_minus_k_spread(reward_models):
    from reward.score import load_reward_model

    scorer = load_reward_model(reward_models["ensemble"])
    prompts, texts = ["w1 w2", "w3"], ["good w4", "bad"]
    mean, spread = scorer.score_with_spread(prompts, texts)
    got = reward_model_function(scorer, spread_coef=1.5)(prompts, texts, reward_prompt=[json.dumps(p) for p in prompts])
    assert spread.abs().sum() > 0 and got == pytest.approx((mean - 1.5 * spread).tolist(), abs=1e-6)


def test_grpo_job_registers_the_policy_with_its_reward_model_and_prompt_lineage(sqlite_engine, base, reward_models, tmp_path):
    from app.jobs import JobCancelled, resolve_handler
    from app.settings import Settings
    from ppo.evaluate import training_reward_model
    from ppo.jobs import prompts_hash

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    parent = register_base(sqlite_engine, base)
    settings = Settings(data_dir=tmp_path / "data")
    ctx = FakeContext(sqlite_engine, settings, tmp_path / "job-7")
    params = {"policy": str(base), "reward_model": str(reward_models["single"]), "prompts": str(prompts), "steps": 2,
              "batch_size": 4, "num_generations": 2, "max_completion_length": 4, **FP32}
    result = resolve_handler("grpo")(params, ctx)
    (row,) = result["register"]
    assert row["name"] == "grpo-prompts-job7" and row["parent_id"] == parent and row["data_rows"] == 4
    assert row["data_hash"].startswith(prompts_hash([p for p in PROMPTS]))  # the same fingerprint PPO records
    assert row["params"]["reward_model"] == str(reward_models["single"]) and row["params"]["source"] == {"prompts": str(prompts)}
    assert row["metrics"]["steps"] == 2 and ctx.calls[-1] == pytest.approx(0.99)

    from annotation.registry import register_model
    from annotation.store import transaction

    with transaction(sqlite_engine) as session:
        register_model(session, **row)
    assert training_reward_model(row["path"], sqlite_engine) == str(reward_models["single"])  # eval-policy's self_judged

    stopped = FakeContext(sqlite_engine, settings, tmp_path / "job-8", cancel_after=2)
    with pytest.raises(JobCancelled):
        resolve_handler("rloo")({**params, "steps": 20}, stopped)
    assert not (tmp_path / "job-8" / "policy").exists()
    with pytest.raises(PPOError, match="loss_type"):
        resolve_handler("rloo")({**params, "loss_type": "grpo"}, ctx)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_rlhf_grpo_or_rloo_and_its_job_run_one_use_case_and_register_the_same_policy(settings, base, reward_models, tmp_path,
                                                                                    algorithm):
    """GRPO and RLOO are written once (ppo.usecases.grpo / rloo): the CLI and the job register the same
    row (same seed, settings, prompts, reward model) but for its path and name."""
    from typer.testing import CliRunner

    from annotation.registry import get_model
    from annotation.store import init_db, transaction
    from app.cli import _register_commands, cli
    from app.jobs import resolve_handler

    engine = init_db(settings.db_url)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    params = {"policy": str(base), "reward_model": str(reward_models["single"]), "prompts": str(prompts), "steps": 2,
              "batch_size": 4, "num_generations": 2, "max_completion_length": 4, "seed": 3, **FP32}
    (job_row,) = resolve_handler(algorithm)(params, job_context(engine, settings, tmp_path / "job"))["register"]
    _register_commands()
    result = CliRunner().invoke(cli, [algorithm, "--policy", str(base), "--reward-model", str(reward_models["single"]),
                                      "--prompts", str(prompts), "--steps", "2", "--batch-size", "4", "--num-generations", "2",
                                      "--max-completion-length", "4", "--seed", "3", "--precision", "fp32",
                                      "-o", str(tmp_path / "cli"), "--name", f"{algorithm}-cli", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["reward_model"] == str(reward_models["single"]) and payload["rows"] == len(PROMPTS)
    with transaction(engine) as session:
        row = get_model(session, f"{algorithm}-cli")
        assert {k: getattr(row, k) for k in SAME_FIELDS} == {k: job_row[k] for k in SAME_FIELDS}
        assert untimed(row.metrics) == untimed(job_row["metrics"])
    assert job_row["params"]["trainer"] == algorithm and job_row["name"] == f"{algorithm}-prompts-job5"
    engine.dispose()


def test_sft_dpo_and_grpo_options_share_one_base_with_one_validation():
    """The fields every trainer takes are ppo.options.TrainerOptions' (validated there, once); each
    trainer keeps its own defaults, and its errors name the trainer, the field and the CLI option."""
    import dataclasses

    from annotation.runs import field_help
    from ppo.dpo import LOSS_TYPES
    from ppo.options import OfflineTrainerOptions, TrainerOptions
    from ppo.sft import SFTOptions
    from ppo.usecases import DPOSpec, GRPOSpec, RLOOSpec, SFTSpec

    shared = {f.name for f in dataclasses.fields(TrainerOptions)}
    assert {"learning_rate", "batch_size", "lora", "lora_r", "precision", "report_to", "seed"} <= shared
    assert issubclass(SFTOptions, OfflineTrainerOptions) and issubclass(DPOOptions, OfflineTrainerOptions)
    assert issubclass(GRPOOptions, TrainerOptions) and not issubclass(GRPOOptions, OfflineTrainerOptions)
    # Each trainer's own defaults: learning rate without and with LoRA, batch size.
    assert [(cls().validate().learning_rate, cls(lora=True).validate().learning_rate, cls().batch_size)
            for cls in (SFTOptions, DPOOptions, GRPOOptions)] == [(2e-5, 1e-4, 4), (1e-6, 1e-5, 4), (1e-6, 1e-5, 8)]
    for cls, trainer in ((SFTOptions, "SFT"), (DPOOptions, "DPO"), (GRPOOptions, "GRPO/RLOO")):
        with pytest.raises(PPOError, match=rf"^{trainer} option lora_dropout=1.0 \(--lora-dropout\) is invalid; expected a number in \[0, 1\)$"):
            cls(lora_dropout=1.0).validate()
        with pytest.raises(PPOError, match=rf"^{trainer} option precision='fp16' \(--precision\) is invalid"):
            cls(precision="fp16").validate()
    with pytest.raises(PPOError, match=r"^SFT option max_length=4 \(--max-length\) is invalid"):
        SFTOptions(max_length=4).validate()
    # Every field of every spec has its one line of help (the CLI, the job docs and the pages read it).
    for spec in (SFTSpec, DPOSpec, GRPOSpec, RLOOSpec):
        helps = field_help(spec)
        assert all(helps.get(f.name) for f in dataclasses.fields(spec)), spec
    assert all(loss in field_help(DPOSpec)["loss_type"] for loss in LOSS_TYPES)


# --------------------------------------------------------------------------- bad options


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """app.cli.main in-process: the one place that turns errors into a message and an exit code."""
    from app import cli as cli_mod

    monkeypatch.setattr(sys, "argv", ["rlhf", *args])
    with pytest.raises(SystemExit) as info:
        cli_mod.main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["dpo", "--beta", "0"], "--beta"),
    (["dpo", "--loss-type", "nope"], "--loss-type"),
    (["dpo", "--label-smoothing", "0.1"], "--label-smoothing"),
    (["dpo", "--batch-size", "0"], "--batch-size"),
    (["grpo", "--num-generations", "1"], "--num-generations"),
    (["grpo", "--batch-size", "6"], "--batch-size"),
    (["grpo", "--temperature", "0"], "--temperature"),
    (["grpo", "--vllm-mode", "remote"], "--vllm-mode"),
    (["grpo", "--use-vllm"], "--use-vllm"),
    (["rloo", "--loss-type", "grpo"], "--loss-type"),
    (["grpo", "--loss-type", "ppo"], "--loss-type"),
])
def test_bad_options_exit_2_with_one_line_naming_the_option(settings, base, reward_models, tmp_path, monkeypatch, capsys,
                                                           args, needle):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    source = (["--data", str(data), "--base", str(base)] if args[0] == "dpo"
              else ["--reward-model", str(reward_models["single"]), "--prompts", str(data), "--policy", str(base)])
    out = tmp_path / "out"
    code, err = run_main(monkeypatch, capsys, *args, *source, "--output", str(out))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


# --------------------------------------------------------------------------- accelerate launch


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_dpo_under_accelerate_launch_trains_in_two_processes_and_registers_one_run(settings, base, tmp_path):
    from annotation.registry import list_models
    from annotation.store import init_db, transaction

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "runs" / "dpo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu2.yaml"),
         "-m", "app.cli", "dpo", "--data", str(data), "--base", str(base), "--output", str(out), "--epochs", "2",
         "--batch-size", "1", "--lr", "5e-3", "--precision", "fp32", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    eng = init_db(settings.db_url)
    with transaction(eng) as s:
        (row,) = list_models(s, kind="policy")
        assert row.path == str(out.resolve()) and row.data_rows == 4
        # 4 pairs, 1 per process per step, 2 processes, 2 epochs: 4 steps (one process alone would take 8).
        assert row.metrics["steps"] == 4
    eng.dispose()
    assert (out / "model.safetensors").is_file() and [p.name for p in out.parent.iterdir()] == ["dpo"]
