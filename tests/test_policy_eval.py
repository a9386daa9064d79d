"""eval-policy (ppo.evaluate): win rate with ties counted half, mean rewards, and the KL of the
policy to the reference on the policy's own samples, checked against an unpadded one-prompt
computation; tiny Llama-style models built in the test and a rule-based reward."""

from __future__ import annotations

import pytest
import torch

from ppo.errors import PPOError
from ppo.evaluate import SampleOptions, evaluate_policy, format_report, sample_responses, win_rate
from tiny_lm import build_model, build_tokenizer, one_thread

PROMPTS = ["ping", "hello world", [{"role": "user", "content": "tell me a story"}], "yes", "the cat", "no"]
OPTS = SampleOptions(max_new_tokens=6, temperature=0.9, batch_size=4, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return build_model(tok, seed=0).eval(), build_model(tok, seed=1).eval()


def count_o(prompts, texts):
    """A rule-based reward: how many letters 'o' the response has."""
    return torch.tensor([float(t.count("o")) for t in texts])


def test_win_rate_counts_ties_as_half():
    result = win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0])
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate_stderr"] == pytest.approx((0.625 * 0.375 / 4) ** 0.5)
    with pytest.raises(PPOError):
        win_rate([], [])


def test_a_policy_against_itself_ties_everywhere_with_zero_kl(tok, models):
    policy, _ = models
    result = evaluate_policy((policy, tok), (policy, tok), count_o, PROMPTS, OPTS)
    assert result["n_prompts"] == len(PROMPTS)
    assert result["ties"] == len(PROMPTS) and result["win_rate"] == 0.5
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)
    assert all(r["policy"] == r["reference"] for r in result["rows"])


def test_kl_matches_an_unpadded_one_prompt_computation(tok, models):
    policy, reference = models
    samples = sample_responses(policy, tok, PROMPTS, OPTS, ref_model=reference)
    for i, prompt in enumerate(PROMPTS):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        ids = torch.tensor([list(prompt_ids) + samples.response_ids[i]])
        target = torch.tensor(samples.response_ids[i])
        sums = []
        for model in (policy, reference):
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt_ids) - 1: -1] / OPTS.temperature
            sums.append(float(logits.log_softmax(-1).gather(-1, target[:, None]).sum()))
        assert samples.logprob_sums[i] == pytest.approx(sums[0], abs=1e-4)
        assert samples.ref_logprob_sums[i] == pytest.approx(sums[1], abs=1e-4)
    assert samples.texts[0] == tok.decode(samples.response_ids[0], skip_special_tokens=True)


def test_evaluation_reports_rewards_win_rate_and_kl_of_both_models(tok, models):
    policy, reference = models
    result = evaluate_policy((policy, tok), (reference, tok), count_o, PROMPTS, OPTS, n_samples=2)
    rows = result["rows"]
    assert result["reward_policy"] == pytest.approx(sum(r["policy"].count("o") for r in rows) / len(rows))
    assert result["reward_reference"] == pytest.approx(sum(r["reference"].count("o") for r in rows) / len(rows))
    expected = sum(1.0 if r["reward_policy"] > r["reward_reference"] else 0.5 if r["reward_policy"] == r["reward_reference"] else 0.0
                   for r in rows) / len(rows)
    assert result["win_rate"] == pytest.approx(expected)
    samples = sample_responses(policy, tok, PROMPTS, OPTS, ref_model=reference)
    kls = [a - b for a, b in zip(samples.logprob_sums, samples.ref_logprob_sums)]
    assert [r["kl"] for r in rows] == pytest.approx(kls, abs=1e-5)
    assert result["kl"] == pytest.approx(sum(kls) / len(kls), abs=1e-5)
    assert result["kl"] > 0.1  # two differently initialised models really differ
    assert len(result["samples"]) == 2 and {"prompt", "policy", "reference", "reward_policy", "reward_reference", "kl"} <= set(rows[0])
    # Same seed, same answer: an evaluation can be repeated.
    again = evaluate_policy((policy, tok), (reference, tok), count_o, PROMPTS, OPTS)
    assert again["rows"] == rows
    text = format_report(result)
    assert "win rate of the policy" in text and "KL(policy || reference)" in text


def test_different_tokenizers_are_refused(tok, models):
    other = build_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(PPOError, match="different tokenizers"):
        evaluate_policy((models[0], tok), (models[1], other), count_o, PROMPTS, OPTS)


class CountO:
    """reward.score.load_reward_model's stand-in: a "reward model" that counts the letters 'o'."""

    def __init__(self, path):
        self.path = path

    def score(self, prompts, responses, batch_size=32):
        return count_o(prompts, responses)


@pytest.fixture
def eval_files(tmp_path, monkeypatch):
    """A policy and a reference (tiny models), a prompts file and a reward-model directory scored by CountO."""
    import json
    from types import SimpleNamespace

    import reward.score
    from tiny_lm import save_tiny_policy

    monkeypatch.setattr(reward.score, "load_reward_model", CountO)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n", encoding="utf-8")
    (tmp_path / "rm").mkdir()
    return SimpleNamespace(policy=save_tiny_policy(tmp_path / "pol", seed=1), reference=save_tiny_policy(tmp_path / "ref", seed=0),
                           prompts=prompts, rm=tmp_path / "rm")


def test_eval_policy_cli_prints_the_json_keys_and_the_side_by_side_table(eval_files):
    import json

    from typer.testing import CliRunner

    from app.cli import _register_commands, cli

    _register_commands()
    policy, reference, prompts = eval_files.policy, eval_files.reference, eval_files.prompts
    args = ["eval-policy", "--policy", str(policy), "--reference", str(reference), "--reward-model", str(eval_files.rm),
            "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "5", "--samples", "2"]
    result = CliRunner().invoke(cli, args + ["--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"win_rate", "reward_policy", "reward_reference", "kl", "n_prompts"} <= set(payload)
    assert payload["n_prompts"] == 4 and len(payload["samples"]) == 2 and "rows" not in payload
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0 and "win rate of the policy" in text.stdout and "| policy" in text.stdout


def test_eval_policy_cli_refuses_bad_sampling_options_naming_the_option(tmp_path):
    from typer.testing import CliRunner

    import app.cli_policy  # noqa: F401  (adds the policy commands to the app)
    from app.cli import cli

    args = ["eval-policy", "--policy", str(tmp_path / "p"), "--reward-model", str(tmp_path / "rm"),
            "--prompts", str(tmp_path / "prompts.jsonl")]
    for option, value, field in (("--max-prompt-length", "0", "max_prompt_length"), ("--batch-size", "-1", "batch_size"),
                                 ("--max-new-tokens", "0", "max_new_tokens")):
        result = CliRunner().invoke(cli, args + [option, value])
        assert isinstance(result.exception, PPOError), result.output
        assert f"{field}={value} is invalid" in str(result.exception)


def test_rlhf_eval_policy_and_the_eval_policy_job_report_the_same_evaluation(eval_files, tmp_path):
    """eval-policy is written once (ppo.usecases.eval_policy): the CLI prints what the job writes to
    its run dir's eval.json, win rates, rewards, KL and samples alike (same prompts, same seed)."""
    import json
    import logging
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from app.cli import _register_commands, cli
    from ppo.jobs import eval_policy

    (tmp_path / "judge").mkdir()
    params = {"policy": str(eval_files.policy), "reference": str(eval_files.reference), "reward_model": str(eval_files.rm),
              "prompts": str(eval_files.prompts), "n": 4, "max_new_tokens": 5, "samples": 2, "seed": 7,
              "judges": [str(tmp_path / "judge")]}
    ctx = SimpleNamespace(job_id=3, run_dir=tmp_path / "job", engine=None, settings=SimpleNamespace(model_dir=tmp_path),
                          log=logging.getLogger("t"), progress=lambda f, m="": None, cancelled=lambda: False)
    job = eval_policy(params, ctx)
    _register_commands()
    result = CliRunner().invoke(cli, ["eval-policy", "--policy", params["policy"], "--reference", params["reference"],
                                      "--reward-model", params["reward_model"], "--prompts", params["prompts"], "--n", "4",
                                      "--max-new-tokens", "5", "--samples", "2", "--seed", "7", "--judge", str(tmp_path / "judge"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    written = json.loads((tmp_path / "job" / "eval.json").read_text())
    assert printed == written == json.loads(json.dumps(job["metrics"], default=str))
    assert job["path"] == str(tmp_path / "job" / "eval.json") and job["register"] == []
    assert printed["n_prompts"] == 4 and printed["sampling"]["seed"] == 7 and len(printed["samples"]) == 2
    assert list(printed["judges"]) and printed["self_judged"] is None
