"""Reward-model training on tiny BERT-style and Llama-style models built from configs in the test.

The synthetic task (tests/reward_fixtures.py): the chosen response contains "good", the rejected one
"bad"; training must lower the loss and lift held-out accuracy well above chance.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from reward_fixtures import FakePair, save_tiny_bert, save_tiny_llama, synthetic_pairs  # noqa: E402

from reward.data import PairEncoder, pairs_hash  # noqa: E402
from reward.errors import RewardError  # noqa: E402
from reward.score import load_reward_model  # noqa: E402
from reward.train import TrainParams, resolve_base, train_reward_model  # noqa: E402

TINY = dict(epochs=2, lr=3e-3, batch_size=8, max_length=32, precision="fp32")


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "base")


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "base")


def _check_learned(result, run: Path, train_pairs, n_held: int):
    m = result["metrics"]
    assert m["last_logged_loss"] < m["first_logged_loss"] - 0.15, m
    assert m["eval_accuracy"] >= 0.8, m
    assert m["eval_n_pairs"] == n_held
    # Every core, recorded from inside the trainer; the plan the test set (TINY forces fp32), no checkpointing on CPU.
    assert m["torch_threads"] == os.cpu_count()
    assert m["compute_precision"] == "fp32" and m["gradient_checkpointing"] is False
    for name in ("config.json", "model.safetensors", "reward_config.json", "params.json", "data.json",
                 "metrics.json", "training_curve.jsonl"):
        assert (run / name).is_file(), name
    assert json.loads((run / "data.json").read_text())["data_hash"] == pairs_hash(train_pairs)
    assert json.loads((run / "params.json").read_text())["seed"] == 42
    curve = [json.loads(line) for line in (run / "training_curve.jsonl").read_text().splitlines()]
    assert sum("loss" in row for row in curve) >= 5
    assert not (run / "_trainer").exists()


def test_tiny_bert_reward_model_learns_the_preference(bert_base, tmp_path):
    train, held = synthetic_pairs(160, seed=1), synthetic_pairs(48, seed=2)
    run = tmp_path / "run"
    result = train_reward_model(train, run, TrainParams(base=str(bert_base), **TINY), eval_pairs=held)
    _check_learned(result, run, train, len(held))
    # BERT layout: [CLS] prompt [SEP] response [SEP], no EOS (the tokenizer has none).
    scorer = load_reward_model(run)
    ids, _, _ = scorer.encoder.encode("w1 w2", "good w3")
    tok = scorer.tokenizer
    assert ids == [tok.cls_token_id, *tok.convert_tokens_to_ids(["w1", "w2"]), tok.sep_token_id,
                   *tok.convert_tokens_to_ids(["good", "w3"]), tok.sep_token_id]
    # The saved model scores a fresh pair the right way round.
    s = scorer.score(["w5 w6", "w5 w6"], ["w1 good w2", "w1 bad w2"])
    assert s.shape == (2,) and s[0] > s[1]


def test_tiny_llama_reward_model_learns_the_preference(llama_base, tmp_path):
    train, held = synthetic_pairs(160, seed=3), synthetic_pairs(48, seed=4)
    run = tmp_path / "run"
    result = train_reward_model(train, run, TrainParams(base=str(llama_base), **TINY), eval_pairs=held)
    _check_learned(result, run, train, len(held))
    scorer = load_reward_model(run)
    tok = scorer.tokenizer
    ids, _, _ = scorer.encoder.encode("w1", "good")
    # Causal layout: prompt response </s> (this tokenizer adds no BOS); the EOS is distinct from <pad>,
    # so the score head, which reads the last non-pad token, reads it.
    assert ids == [*tok.convert_tokens_to_ids(["w1", "good"]), tok.eos_token_id]
    assert scorer.model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id


def test_scores_do_not_depend_on_batch_padding(bert_base, tmp_path):
    # Dynamic padding must not change a pair's score: one at a time vs. mixed-length batches.
    train = synthetic_pairs(32, seed=5)
    run = tmp_path / "run"
    train_reward_model(train, run, TrainParams(base=str(bert_base), epochs=1, lr=1e-3, batch_size=16, max_length=32))
    scorer = load_reward_model(run)
    prompts = ["w1", "w1 w2 w3 w4 w5 w6 w7 w8", "w9 w9"]
    responses = ["good", "bad w1 w2 w3", "w4 good w5 w6 w7 w8 w9"]
    batched = scorer.score(prompts, responses, batch_size=3)
    single = torch.stack([scorer.score([p], [r])[0] for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_long_prompts_are_cut_from_the_left_and_counted(bert_base):
    from transformers import AutoTokenizer

    from reward.data import build_dataset

    tok = AutoTokenizer.from_pretrained(bert_base)
    enc = PairEncoder(tok, max_length=10)
    prompt = " ".join(f"w{i}" for i in range(20))
    ids, p_cut, r_cut = enc.encode(prompt, "w30 good w31")
    # 10 = [CLS] + 4 prompt tokens + [SEP] + 3 response tokens + [SEP]: the END of the prompt survives.
    assert len(ids) == 10 and p_cut and not r_cut
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "w16", "w17", "w18", "w19", "[SEP]", "w30", "good", "w31", "[SEP]"]
    # A response longer than the budget loses its end, and the whole prompt.
    ids, p_cut, r_cut = enc.encode("w1", " ".join(["w2"] * 12))
    assert len(ids) == 10 and p_cut and r_cut
    pairs = [FakePair(prompt, "good", "bad"), FakePair("w1", "good", "bad")]
    ds, stats = build_dataset(pairs, enc)
    assert len(ds) == 2 and stats.prompt_truncated == 1 and stats.response_truncated == 0
    assert max(ds["length"]) == 10


def test_margin_column_reaches_the_loss(bert_base):
    from transformers import AutoTokenizer

    from reward.data import build_dataset

    enc = PairEncoder(AutoTokenizer.from_pretrained(bert_base), max_length=32)
    pairs = [FakePair("w1", "good", "bad", margin=0.5), FakePair("w1", "good", "bad", margin=None)]
    ds, _ = build_dataset(pairs, enc, use_margin=True)
    assert ds["margin"] == [0.5, 0.0]
    ds, _ = build_dataset(pairs, enc, use_margin=False)
    assert "margin" not in ds.column_names


def test_ensemble_gives_mean_and_spread(bert_base, tmp_path):
    train = synthetic_pairs(48, seed=6)
    run = tmp_path / "ens"
    result = train_reward_model(train, run, TrainParams(base=str(bert_base), ensemble=2, seed=7, epochs=1, lr=1e-3,
                                                        batch_size=16, max_length=32))
    manifest = json.loads((run / "ensemble.json").read_text())
    assert manifest["members"] == ["member_0", "member_1"] and manifest["seeds"] == [7, 8]
    assert [m["seed"] for m in result["metrics"]["members"]] == [7, 8]
    scorer = load_reward_model(run)
    prompts, responses = ["w1", "w2 w3"], ["good w4", "bad"]
    mean, std = scorer.score_with_spread(prompts, responses)
    members = torch.stack([load_reward_model(run / d).score(prompts, responses) for d in manifest["members"]])
    torch.testing.assert_close(mean, members.mean(0))
    torch.testing.assert_close(std, members.std(0, unbiased=False))
    assert (std > 0).all()  # different seeds and bootstrap draws give different members


def test_bad_params_and_bases_are_clear_errors(tmp_path):
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(RewardError, match="--batch-size 0 is invalid"):
        TrainParams(batch_size=0).validate()
    with pytest.raises(RewardError, match="rlhf models fetch"):
        resolve_base("minilm", settings)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="no config.json"):
        resolve_base(str(tmp_path / "empty"), settings)
    assert resolve_base("org/model", settings) == "org/model"


@pytest.mark.slow
def test_lora_adapters_are_trained_and_merged_into_a_plain_model(llama_base, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "lora"
    train_reward_model(synthetic_pairs(48, seed=8), run, TrainParams(base=str(llama_base), lora=True, lora_r=4, epochs=1,
                                                                     lr=3e-3, batch_size=8, max_length=32))
    assert not (run / "adapter_config.json").exists()  # merged: PPO and eval load it like any model
    merged, original = load_file(run / "model.safetensors"), load_file(llama_base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], original[key])  # the adapter's update B @ A is folded in
    assert "score.weight" in merged
    s = load_reward_model(run).score(["w1", "w1"], ["good", "bad"])
    assert s.shape == (2,) and torch.isfinite(s).all()


def test_length_balance_keeps_as_many_chosen_longer_as_chosen_shorter_pairs():
    from collections import namedtuple

    from reward.train import length_balanced

    P = namedtuple("P", "prompt chosen rejected")
    pairs = [P("q", "a" * 3, "b" * 9)] * 7 + [P("q", "a" * 9, "b" * 3)] * 3 + [P("q", "aa", "bb")] * 2
    kept = length_balanced(pairs, seed=1)
    shorter = sum(len(p.chosen) < len(p.rejected) for p in kept)
    longer = sum(len(p.chosen) > len(p.rejected) for p in kept)
    assert (shorter, longer, len(kept)) == (3, 3, 8)
    assert length_balanced(pairs, seed=1) == kept  # seeded
