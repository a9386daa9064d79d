"""PPO end to end on a tiny Llama-style policy built here (32-token word vocabulary, hidden 32,
2 layers) with a rule-based reward (the share of the word "yes" in the response), plus LoRA,
exact resume, config validation, rollout details and diagnostics."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ppo import diagnostics
from ppo.errors import PPOError
from ppo.train import PPOConfig, train

WORDS = ["yes", "no"] + [f"w{i}" for i in range(28)]
PAD, EOS = 0, 1


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared by many processes; one thread is ~30x faster than two
    # threads fighting over oversubscribed cores for a model this small.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_policy(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS,
        # Untied by default, so that a LoRA adapter on lm_head does not also move the input embeddings when merged.
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tiny_tokenizer()


def share_of_yes(prompts, responses):
    """Rule-based reward: the share of the words in a response that are "yes" (0 for empty)."""
    out = []
    for text in responses:
        words = text.split()
        out.append(sum(w == "yes" for w in words) / max(len(words), 1))
    return torch.tensor(out)


def tiny_prompts(n=32, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[2:]) for _ in range(rng.randint(2, 5))) for _ in range(n)]


def small_config(**over):
    base = dict(batch_size=32, mini_batch_size=32, ppo_epochs=4, max_new_tokens=8, temperature=1.0,
                lr_scheduler="constant", init_kl_coef=0.05, target=6.0, tensorboard=False, samples_every=5,
                # The plan is set here, not taken from the machine: results must not depend on it.
                precision="fp32")
    base.update(over)
    return PPOConfig(**base)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean(xs):
    return sum(xs) / len(xs)


def test_ppo_raises_reward_while_kl_stays_under_target(tmp_path):
    config = small_config(steps=12, learning_rate=5e-3)
    result = train(config, tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "run")
    history = rows(tmp_path / "run")
    assert [r["step"] for r in history] == list(range(1, 13))
    first, last = mean([r["reward_mean"] for r in history[:3]]), mean([r["reward_mean"] for r in history[-3:]])
    # Chance level is about 1/31 per word; the policy must clearly learn to say "yes"
    # (seen on this machine: 0.039 -> 0.276 over the first and last three steps).
    assert first < 0.08 and last > first + 0.15 and last > 4 * first, (first, last)
    assert max(r["kl"] for r in history) < config.target
    # KL stayed under target, so the adaptive controller lowered the coefficient.
    assert history[-1]["kl_coef"] < history[0]["kl_coef"] == config.init_kl_coef
    # The KL starts at exactly 0: the rollout and reference forwards agree before any update.
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    # A saved policy directory that load_policy can read back, and the same outputs.
    from ppo.models import load_policy

    model, tok = load_policy(result["policy_path"], dtype=torch.float32)
    assert tok.padding_side == "left"
    for key in ("reward_mean", "kl", "entropy", "approx_kl", "policy_clipfrac", "value_clipfrac", "value_loss",
                "response_length", "kl_coef", "time_generate", "time_score", "time_update"):
        assert key in history[-1]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "response", "score"} <= set(samples[0])


def test_ppo_with_lora_raises_reward_and_keeps_base_weights(tmp_path):
    from ppo.models import get_lora_policy

    model, tok = tiny_policy()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Adapters on the blocks alone cannot do it on this random model: the final RMSNorm bounds
    # the hidden state (norm sqrt(32)) and lm_head rows have norm ~0.02 * sqrt(32), so no hidden
    # state lifts p("yes") above ~e^0.64 / (e^0.64 + 31) = 0.06 (checked: supervised training of
    # block-only adapters plateaus there). An adapter on lm_head (untied here) removes the bound.
    config = small_config(steps=12, learning_rate=1e-2, lora=True, lora_r=8, lora_alpha=32,
                          lora_target_modules="q_proj,v_proj,o_proj,down_proj,lm_head")
    lora_model = get_lora_policy(model, config.lora_options())

    def base_weights_drift():
        worst = 0.0
        for name, p in lora_model.get_base_model().named_parameters():
            plain = name.replace(".base_layer", "")
            if "lora_" not in name and plain in base_before:
                worst = max(worst, (p - base_before[plain]).abs().max().item())
        return worst

    # Only adapters train: the base weights under them stay exactly as they were during the run,
    # which is what makes "adapters off" a faithful reference.
    drift_during = []
    result = train(config, (lora_model, tok), share_of_yes, tiny_prompts(), tmp_path / "run",
                   progress=lambda f, m: drift_during.append(base_weights_drift()))
    assert len(drift_during) == config.steps and max(drift_during) == 0.0
    # Saving merges the adapters in place and unmerges them: back to within float rounding.
    assert base_weights_drift() < 1e-6
    history = rows(tmp_path / "run")
    first, last = mean([r["reward_mean"] for r in history[:3]]), mean([r["reward_mean"] for r in history[-3:]])
    # Seen on this machine: 0.036 -> 0.194 over the first and last three steps.
    assert last > first + 0.1 and last > 3 * first, (first, last)
    assert max(r["kl"] for r in history) < config.target
    # The merged policy on disk differs from the base (the adapters were merged in).
    from ppo.models import load_policy

    merged, _ = load_policy(result["policy_path"], dtype=torch.float32)
    assert not torch.equal(merged.lm_head.weight, base_before["lm_head.weight"])
    ids = torch.randint(2, 32, (3, 7))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, lora_model(input_ids=ids).logits, atol=1e-4)


def _lora_with_random_adapters(tie: bool, targets="q_proj,v_proj,down_proj,lm_head", seed=1):
    """A tiny LoRA policy whose adapters are not zero (fresh ones are: B starts at 0)."""
    from ppo.models import get_lora_policy

    model, tok = tiny_policy(tie=tie)
    lora = get_lora_policy(model.eval(), small_config(lora=True, lora_r=4, lora_target_modules=targets).lora_options())
    randomise_adapters(lora, seed)
    return lora, tok


def randomise_adapters(lora, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
def test_sampling_copy_is_the_lora_policy_and_follows_its_adapters(tie):
    from ppo.models import SamplingCopy

    lora, _ = _lora_with_random_adapters(tie)
    assert SamplingCopy.supports(lora)
    base_before = {n: p.detach().clone() for n, p in lora.get_base_model().named_parameters() if "lora_" not in n}
    sampler = SamplingCopy(lora)
    ids = torch.randint(2, 32, (3, 9))
    with torch.no_grad():
        live = lora(input_ids=ids).logits
        assert torch.allclose(sampler()(input_ids=ids).logits, live, atol=1e-5)
        # The adapters move (an optimizer step): the next call merges the new ones.
        randomise_adapters(lora, seed=2)
        moved = lora(input_ids=ids).logits
        assert (moved - live).abs().max() > 0.1
        assert torch.allclose(sampler()(input_ids=ids).logits, moved, atol=1e-5)
    # The policy's own frozen weights, the reference, are untouched bit for bit; with tied
    # embeddings the copy's input embeddings keep the base weights, not the adapted lm_head's.
    for n, p in lora.get_base_model().named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert torch.equal(sampler.model.get_input_embeddings().weight, base_before["model.embed_tokens.weight"])
    assert sampler.model.lm_head.weight.data_ptr() != sampler.model.get_input_embeddings().weight.data_ptr()


def test_sampling_copy_in_bf16_holds_bf16_weights_close_to_the_policy():
    from ppo.models import SamplingCopy

    lora, _ = _lora_with_random_adapters(tie=True)
    sampler = SamplingCopy(lora, torch.bfloat16)
    assert {p.dtype for p in sampler.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in lora.parameters()} == {torch.float32}  # the policy keeps fp32 masters
    ids = torch.randint(2, 32, (3, 9))
    with torch.no_grad():
        live = torch.log_softmax(lora(input_ids=ids).logits, -1)
        merged = torch.log_softmax(sampler()(input_ids=ids).logits.float(), -1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = torch.log_softmax(lora(input_ids=ids).logits.float(), -1)
    # Not exact (8 bits of mantissa), but no further from the fp32 policy than the policy's own
    # bf16 autocast forward is (measured: 0.44 and 0.41 on logits of size 33).
    assert 0 < (merged - live).abs().max() < 2 * (autocast - live).abs().max()


def test_sampling_copy_draws_the_same_tokens_as_the_adapters():
    from ppo.models import SamplingCopy
    from ppo.rollout import generate, left_pad

    lora, tok = _lora_with_random_adapters(tie=False)
    rows = [tok(p)["input_ids"] for p in tiny_prompts(6)]
    ids, mask = left_pad(rows, PAD)
    sampler = SamplingCopy(lora)
    torch.manual_seed(3)
    through_adapters = generate(lora, tok, ids, mask, max_new_tokens=8, temperature=1.0)
    torch.manual_seed(3)
    merged = generate(sampler(), tok, ids, mask, max_new_tokens=8, temperature=1.0)
    for a, b in zip(through_adapters, merged):
        assert torch.equal(a, b)


def test_sampling_copy_hands_lm_head_a_contiguous_input():
    # transformers slices the prompt's last position for lm_head; for bf16 weights and inputs
    # torch's CPU matmul copies the weight once per row of a non-contiguous input (1.2 s for
    # SmolLM2 and 16 prompts against 4 ms), so the copy makes it contiguous first.
    from ppo.models import SamplingCopy
    from ppo.rollout import generate, left_pad

    lora, tok = _lora_with_random_adapters(tie=False)
    sampler = SamplingCopy(lora, torch.bfloat16)
    seen = []
    sampler.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids, mask = left_pad([tok(p)["input_ids"] for p in tiny_prompts(4)], PAD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate(sampler(), tok, ids, mask, max_new_tokens=3, temperature=1.0)
    assert seen and all(seen)


def test_sampling_copy_declines_a_lora_policy_it_cannot_merge():
    from ppo.models import SamplingCopy

    lora, _ = _lora_with_random_adapters(tie=False)
    assert SamplingCopy.supports(lora)
    lora.get_base_model().lm_head.base_layer.weight.requires_grad_(True)  # a trained weight outside the adapters
    assert not SamplingCopy.supports(lora)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
def test_sampling_copy_of_a_fully_trained_policy_is_bf16_and_follows_its_weights(tie):
    from ppo.models import SamplingCopy

    model, _ = tiny_policy(tie=tie)
    model.eval()
    assert SamplingCopy.supports(model)
    sampler = SamplingCopy(model, torch.bfloat16)
    assert {p.dtype for p in sampler.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the policy keeps fp32 masters
    tied = sampler.model.lm_head.weight.data_ptr() == sampler.model.get_input_embeddings().weight.data_ptr()
    assert tied == tie
    ids = torch.randint(2, 32, (3, 9))
    with torch.no_grad():
        before = sampler()(input_ids=ids).logits.float()
        for p in model.parameters():  # an optimizer step
            p.add_(torch.randn_like(p) * 0.05)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            live = model(input_ids=ids).logits.float()
        after = sampler()(input_ids=ids).logits.float()
    # The copy holds the policy's weights rounded to bf16: each of them exactly, after the step too.
    for name, p in model.named_parameters():
        assert torch.equal(sampler.model.get_parameter(name), p.detach().to(torch.bfloat16)), name
    assert (after - before).abs().max() > 0.05
    assert (after - live).abs().max() < 0.1 * (after - before).abs().max()


def test_sampling_copy_says_so_when_it_samples_from_the_policy(tmp_path, caplog):
    from ppo.models import get_lora_policy

    model, tok = tiny_policy()
    config = small_config(steps=1, lora=True, lora_r=4, lora_target_modules="q_proj,v_proj", sampling="copy")
    lora = get_lora_policy(model, config.lora_options())
    lora.get_base_model().lm_head.weight.requires_grad_(True)  # trained outside the adapters: cannot merge
    with caplog.at_level("WARNING", logger="ppo.train"):
        train(config, (lora, tok), share_of_yes, tiny_prompts(), tmp_path / "lora")
    assert any("outside plain LoRA adapters" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ppo.train"):  # full fine-tuning computing in fp32
        train(small_config(steps=1, sampling="copy"), tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "full")
    assert any("generation runs in fp32" in r.getMessage() for r in caplog.records)


def test_full_ppo_under_the_bf16_plan_samples_from_a_bf16_copy(tmp_path, monkeypatch):
    import ppo.models

    built = []

    class Recording(ppo.models.SamplingCopy):
        def __init__(self, policy, dtype=None):
            built.append(dtype)
            super().__init__(policy, dtype)

    monkeypatch.setattr(ppo.models, "SamplingCopy", Recording)
    train(small_config(steps=2, learning_rate=1e-2, precision="bf16"), tiny_policy(), share_of_yes, tiny_prompts(),
          tmp_path / "bf16")
    assert built == [torch.bfloat16]
    train(small_config(steps=1, precision="fp32"), tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "fp32")
    train(small_config(steps=1, precision="bf16", sampling="policy"), tiny_policy(), share_of_yes, tiny_prompts(),
          tmp_path / "off")
    assert built == [torch.bfloat16]  # no copy in fp32, none when switched off
    history = rows(tmp_path / "bf16")
    assert history[0]["ratio"] == pytest.approx(1.0, abs=0.05)  # log-probs are the policy's, not the copy's


def test_sampling_auto_copies_on_cpu_only_old_names_read_and_bad_values_are_named():
    assert PPOConfig().sampling_copy("cpu") and not PPOConfig().sampling_copy("cuda")
    assert PPOConfig(sampling="copy").sampling_copy("cuda")
    assert not PPOConfig(sampling="policy").sampling_copy("cpu")
    # A config written before the option covered full fine-tuning (a run's config.yaml on --resume).
    assert PPOConfig.from_dict({"lora_sampling": "merged"}).sampling == "copy"
    assert PPOConfig.from_dict({"lora_sampling": "adapters"}).sampling == "policy"
    with pytest.raises(PPOError, match="sampling must be one of auto, copy, policy, got 'fused'"):
        PPOConfig(sampling="fused").validate()


def test_lora_ppo_learns_the_same_sampling_from_the_merged_copy_or_the_adapters(tmp_path):
    from ppo.models import get_lora_policy

    histories = {}
    for merged in (True, False):
        model, tok = tiny_policy()
        config = small_config(steps=3, learning_rate=1e-2, lora=True, lora_r=8, lora_alpha=32,
                              lora_target_modules="q_proj,v_proj,o_proj,down_proj,lm_head",
                              sampling="copy" if merged else "policy")
        train(config, (get_lora_policy(model, config.lora_options()), tok), share_of_yes, tiny_prompts(),
              tmp_path / f"run-{merged}")
        histories[merged] = rows(tmp_path / f"run-{merged}")
    # Same seed, same draws: the merged copy samples the tokens the adapters would (fp32 here).
    for a, b in zip(histories[True], histories[False]):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    assert histories[True][-1]["reward_mean"] != histories[True][0]["reward_mean"]


def _autocast_logits_and_adapter_grads(lora, ids):
    lora.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lora(input_ids=ids).logits
    logits.float().logsumexp(-1).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
def test_frozen_linears_held_in_bf16_compute_the_same_under_autocast(tie):
    from ppo.models import hold_frozen_linears

    lora, _ = _lora_with_random_adapters(tie)
    ids = torch.randint(2, 32, (3, 9))
    logits_before, grads_before = _autocast_logits_and_adapter_grads(lora, ids)
    assert hold_frozen_linears(lora, torch.bfloat16) > 0
    base = lora.get_base_model()
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # frozen, not adapted
    # What trains stays fp32; so do the embeddings, and an lm_head tied to them.
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
    assert base.get_input_embeddings().weight.dtype == torch.float32
    assert (base.lm_head.base_layer.weight.dtype == torch.float32) == tie
    logits_after, grads_after = _autocast_logits_and_adapter_grads(lora, ids)
    assert torch.equal(logits_after, logits_before)
    assert grads_after.keys() == grads_before.keys()
    for name in grads_before:
        assert torch.equal(grads_after[name], grads_before[name]), name


def test_a_policy_with_bf16_frozen_weights_saves_merged_in_fp32_and_keeps_them(tmp_path):
    from ppo.checkpoint import save_model
    from ppo.models import hold_frozen_linears, load_policy

    lora, tok = _lora_with_random_adapters(tie=False)
    hold_frozen_linears(lora, torch.bfloat16)
    q = lora.get_base_model().model.layers[0].self_attn.q_proj
    held = {n: p.detach().clone() for n, p in lora.named_parameters()}
    save_model(lora, tmp_path / "policy", tok)
    # The frozen weights are the same bf16 values as before the save: no merge rounded them.
    for n, p in lora.named_parameters():
        assert p.dtype == held[n].dtype and torch.equal(p, held[n]), n
    saved, _ = load_policy(tmp_path / "policy")
    expected = q.base_layer.weight.float() + q.get_delta_weight("default")
    assert saved.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert torch.allclose(saved.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6, rtol=0)


def test_lora_ppo_under_the_bf16_plan_is_the_same_with_frozen_weights_in_bf16(tmp_path, monkeypatch):
    import ppo.models
    from ppo.models import get_lora_policy

    policies, histories = {}, {}
    for held in (True, False):
        if not held:  # the same run with the frozen weights left in fp32
            monkeypatch.setattr(ppo.models, "hold_frozen_linears", lambda model, dtype: 0)
        model, tok = tiny_policy()
        config = small_config(steps=2, learning_rate=1e-2, lora=True, lora_r=8, precision="bf16",
                              lora_target_modules="q_proj,v_proj,down_proj,lm_head", sampling="policy")
        policies[held] = get_lora_policy(model, config.lora_options())
        train(config, (policies[held], tok), share_of_yes, tiny_prompts(), tmp_path / f"run-{held}")
        histories[held] = rows(tmp_path / f"run-{held}")
    frozen_dtypes = lambda m: {p.dtype for n, p in m.named_parameters() if "base_layer" in n}
    assert frozen_dtypes(policies[True]) == {torch.bfloat16} and frozen_dtypes(policies[False]) == {torch.float32}
    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith("time_")}
    assert [untimed(r) for r in histories[True]] == [untimed(r) for r in histories[False]]
    assert histories[True][-1]["reward_mean"] != histories[True][0]["reward_mean"]


def test_resume_from_checkpoint_gives_the_same_next_step(tmp_path):
    config = small_config(steps=3, save_every=2, learning_rate=2e-3)
    first = train(config, tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "a")
    full = rows(tmp_path / "a")
    assert (tmp_path / "a" / "checkpoints" / "step-000002" / "state.pt").exists()
    # A second directory that starts from the step-2 checkpoint of the first run.
    import shutil

    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000002", tmp_path / "b" / "checkpoints" / "step-000002")
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:2]))
    # Burn some random numbers: the checkpoint must restore the RNG, not rely on a fresh seed.
    torch.rand(1000)
    resumed = train(config, tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "b", resume=True)
    again = rows(tmp_path / "b")
    assert [r["step"] for r in again] == [1, 2, 3]
    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith("time_")}
    assert untimed(again[2]) == untimed(full[2])
    from ppo.models import load_policy

    a, _ = load_policy(first["policy_path"], dtype=torch.float32)
    b, _ = load_policy(resumed["policy_path"], dtype=torch.float32)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


class _RunsOnLoad:
    """A pickle payload: unpickling it calls os.system. weights_only loading must refuse it."""

    def __reduce__(self):
        import os

        return (os.system, ("touch ran-on-load",))


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, "config": _RunsOnLoad()}, ckpt / "state.pt")
    with pytest.raises(PPOError, match="is not a PPO checkpoint this version can read"):
        train(small_config(steps=2), tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "run", resume=True)
    assert not (tmp_path / "ran-on-load").exists()


def test_resume_refuses_a_changed_config(tmp_path):
    train(small_config(steps=1, learning_rate=2e-3), tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "a")
    with pytest.raises(PPOError, match="learning_rate"):
        train(small_config(steps=2, learning_rate=1e-3), tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "a",
              resume=True)


# ---------------------------------------------------------------------------------- config
def test_config_validation_names_every_bad_field():
    with pytest.raises(PPOError, match=r"batch_size \(10\) must be a multiple of mini_batch_size \(4\)"):
        PPOConfig(batch_size=10, mini_batch_size=4).validate()
    with pytest.raises(PPOError, match=r"mini_batch_size \(4\) must be a multiple of gradient_accumulation_steps \(3\)"):
        PPOConfig(batch_size=8, mini_batch_size=4, gradient_accumulation_steps=3).validate()
    with pytest.raises(PPOError) as err:
        PPOConfig(kl_penalty="k2", gamma=1.5, learning_rate=0).validate()
    message = str(err.value)
    assert "kl_penalty must be 'k1' or 'k3'" in message and "gamma must be in (0, 1]" in message
    assert "learning_rate must be > 0" in message
    sizes = PPOConfig(batch_size=16, mini_batch_size=8, gradient_accumulation_steps=2).sizes(num_processes=2)
    assert (sizes.local_batch_size, sizes.num_mini_batches, sizes.local_mini_batch_size, sizes.micro_batch_size) == (8, 2, 4, 2)


def test_config_from_yaml_with_overrides_and_clear_errors(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("learning_rate: 3.0e-6\nbatch_size: 32\nmini_batch_size: 8\nkl_penalty: k3\napprox_kl_stop: null\n")
    config = PPOConfig.from_yaml(path, ["steps=7", "adap_kl_ctrl=false", "approx_kl_stop=0.1"])
    assert (config.learning_rate, config.batch_size, config.kl_penalty, config.steps) == (3e-6, 32, "k3", 7)
    assert config.adap_kl_ctrl is False and config.approx_kl_stop == 0.1
    path.write_text("learning_rate: 1e-5\nlearnin_rate: 2\n")
    with pytest.raises(PPOError, match=rf"config {path}: unknown key 'learnin_rate'"):
        PPOConfig.from_yaml(path)
    path.write_text("batch_size: lots\n")
    with pytest.raises(PPOError, match=rf"config {path}: 'batch_size' must be a whole number, got 'lots'"):
        PPOConfig.from_yaml(path)
    with pytest.raises(PPOError, match=r"--set gama: unknown key 'gama'"):
        PPOConfig.from_yaml(None, ["gama=0.9"])
    with pytest.raises(PPOError, match=r"batch_size \(12\) must be a multiple of mini_batch_size \(8\)"):
        PPOConfig.from_yaml(None, ["batch_size=12", "mini_batch_size=8"])
    path.write_text("- a list\n")
    with pytest.raises(PPOError, match="expected a mapping"):
        PPOConfig.from_yaml(path)


# ---------------------------------------------------------------------------------- rollout
def test_truncate_after_first_eos():
    from ppo.rollout import truncate_after_eos

    ids = torch.tensor([[5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, 9, 9, 9]])
    out, mask, has_eos = truncate_after_eos(ids, [EOS], PAD)
    assert out.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_rollout_logprobs_match_the_sampling_distribution():
    """Left padding must not shift positions: the log-probs the rollout recomputes equal the ones
    generate() sampled from (same temperature, no top-k/top-p)."""
    from ppo.models import PolicyAndValue, value_model_from_policy
    from ppo.rollout import collect, encode_prompts

    model, tok = tiny_policy()
    prompts = ["w1 w2", "w3 w4 w5 w6 w7", "yes"]
    rows_ = encode_prompts(tok, prompts, 32)
    wrapped = PolicyAndValue(model, value_model_from_policy(model)).eval()
    seen = {}
    original = model.generate

    def spy(**kwargs):
        out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
        seen["logits"] = torch.stack(out.logits, 1)
        return out.sequences

    model.generate = spy
    torch.manual_seed(3)
    ro = collect(wrapped, model, tok, prompts, rows_, share_of_yes, max_new_tokens=6, temperature=0.7, device=torch.device("cpu"))
    sampled = torch.log_softmax(seen["logits"].float() / 0.7, -1).gather(-1, ro.response_ids.unsqueeze(-1)).squeeze(-1)
    m = ro.response_mask.bool()
    assert torch.allclose(ro.logprobs[m], sampled[m], atol=1e-4)
    # The reference here is the policy itself, so KL is 0 and values start at 0 (zero head).
    assert torch.allclose(ro.ref_logprobs[m], ro.logprobs[m])
    assert torch.all(ro.values == 0)
    assert ro.scores.shape == (3,) and len(ro.responses_text) == 3


def test_missing_eos_penalty_lowers_the_score_of_unfinished_responses(tmp_path):
    # EOS can never be sampled when its logit is -inf-like, so every response is cut.
    model, tok = tiny_policy()
    with torch.no_grad():
        model.lm_head.weight[EOS] = 0
        model.lm_head.bias = None
    bias = torch.zeros(32)
    bias[EOS] = -1e4
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    config = small_config(steps=1, ppo_epochs=1, missing_eos_penalty=2.0, learning_rate=1e-9)
    train(config, (model, tok), share_of_yes, tiny_prompts(), tmp_path / "run")
    row = rows(tmp_path / "run")[0]
    assert row["truncated_fraction"] == 1.0 and row["response_length"] == 8
    assert row["reward_penalised_mean"] == pytest.approx(row["reward_mean"] - 2.0, abs=1e-5)


def test_value_model_from_policy_copies_the_backbone_and_zeroes_the_head():
    from ppo.models import value_model_from_policy

    model, _ = tiny_policy()
    value = value_model_from_policy(model)
    assert torch.equal(value.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert value.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.all(value.score.weight == 0)


# ---------------------------------------------------------------------------------- diagnostics
def history_of(n, **series):
    out = []
    for i in range(n):
        row = {"step": i + 1, "reward_mean": 0.0, "reward_std": 1.0, "kl": 1.0, "truncated_fraction": 0.0, "value_loss": 0.1}
        for key, values in series.items():
            row[key] = values[i]
        out.append(row)
    return out


def test_diagnostics_reward_hacking():
    rising = [0.1 * i for i in range(10)]
    kl_up = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    w = diagnostics.reward_hacking(history_of(10, reward_mean=rising, kl=kl_up), target=6.0)
    assert w and w["code"] == "reward_hacking" and "init_kl_coef" in w["suggestion"]
    # Same reward rise with KL under its target: a healthy run.
    assert diagnostics.reward_hacking(history_of(10, reward_mean=rising, kl=[0.5 * k for k in kl_up]), target=6.0) is None
    # KL high but reward flat: not hacking (other checks cover divergence).
    assert diagnostics.reward_hacking(history_of(10, kl=kl_up), target=6.0) is None


def test_diagnostics_divergence():
    assert diagnostics.divergence(history_of(3, kl=[1, 2, 25]), kl_limit=18.0)["code"] == "divergence"
    assert diagnostics.divergence(history_of(3, kl=[1, 2, 17]), kl_limit=18.0) is None
    assert diagnostics.divergence(history_of(1, kl=[float("nan")]), kl_limit=18.0) is not None


def test_diagnostics_mode_collapse():
    shrinking = [1.0] * 5 + [0.05] * 5
    assert diagnostics.mode_collapse(history_of(10, reward_std=shrinking))["code"] == "mode_collapse"
    assert diagnostics.mode_collapse(history_of(10, reward_std=[1.0] * 5 + [0.5] * 5)) is None


def test_diagnostics_length_limit():
    w = diagnostics.length_limit(history_of(5, truncated_fraction=[0.9] * 5), max_new_tokens=53)
    assert w["code"] == "length_limit" and "53 tokens" in w["message"] and "missing_eos_penalty" in w["suggestion"]
    assert diagnostics.length_limit(history_of(5, truncated_fraction=[0.2] * 5)) is None


def test_diagnostics_value_loss_exploding():
    w = diagnostics.value_loss_exploding(history_of(10, value_loss=[0.1] * 5 + [5.0] * 5))
    assert w["code"] == "value_loss_exploding"
    assert diagnostics.value_loss_exploding(history_of(10, value_loss=[0.1] * 5 + [0.3] * 5)) is None
    assert diagnostics.value_loss_exploding(history_of(2, value_loss=[0.1, float("inf")])) is not None


def test_diagnostics_check_runs_all_with_a_config():
    cfg = PPOConfig(target=6.0)
    assert diagnostics.check(history_of(10), cfg) == []
    codes = {w["code"] for w in diagnostics.check(history_of(10, kl=[30.0] * 10, truncated_fraction=[1.0] * 10), cfg)}
    assert codes == {"divergence", "length_limit"}


# ---------------------------------------------------------------------------------- smaller features
def test_approx_kl_stop_ends_the_update_early(tmp_path):
    # One mini-batch per epoch. The first optimiser step sees ratio 1 exactly (approx KL 0), the
    # second sees the moved policy, passes the tiny limit, and ends the update: 2 of 4 steps.
    config = small_config(steps=1, learning_rate=5e-3, approx_kl_stop=1e-9)
    train(config, tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "run")
    row = rows(tmp_path / "run")[0]
    assert row["early_stopped"] is True and row["optimizer_steps"] == 2
    train(small_config(steps=1, learning_rate=5e-3), tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "full")
    assert rows(tmp_path / "full")[0]["optimizer_steps"] == 4


def test_ensemble_reward_is_mean_minus_k_times_spread():
    from ppo.rollout import ensemble_reward_fn

    class Ensemble:
        def score_with_spread(self, prompts, responses):
            return torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0])

    # 1.0 - 0.5 * 0.5 = 0.75; 2.0 - 0.5 * 2.0 = 1.0
    assert ensemble_reward_fn(Ensemble(), 0.5)(["p", "q"], ["a", "b"]).tolist() == [0.75, 1.0]


def test_learning_rate_schedules():
    from ppo.train import lr_factor

    # linear over 4 steps after 2 warm-up steps: warm-up 1/2, 2/2, then 1 - k/4 for k = 0..3
    cfg = PPOConfig(steps=6, warmup_steps=2, lr_scheduler="linear")
    assert [lr_factor(cfg, s) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    # cosine: 0.5 * (1 + cos(pi * k / 4)) = 1, 0.853553, 0.5, 0.146447
    cos = PPOConfig(steps=4, lr_scheduler="cosine")
    assert [round(lr_factor(cos, s), 6) for s in range(4)] == [1.0, 0.853553, 0.5, 0.146447]
    assert lr_factor(PPOConfig(steps=4, lr_scheduler="constant"), 3) == 1.0


def test_prompt_order_depends_only_on_seed_and_step():
    from ppo.train import PromptSampler

    a, b = PromptSampler(10, seed=1), PromptSampler(10, seed=1)
    # Each pass over the 10 prompts is a permutation; step 3 of size 4 spans passes 1 and 2.
    first_pass = a.indices(1, 4) + a.indices(2, 4) + a.indices(3, 4)[:2]
    assert sorted(first_pass) == list(range(10))
    assert b.indices(3, 4) == PromptSampler(10, seed=1).indices(3, 4) == a.indices(3, 4)
    assert PromptSampler(10, seed=2).indices(1, 10) != a.indices(1, 10)


def test_normalised_rewards_and_the_k3_penalty(tmp_path):
    # normalize_reward: the first batch is scaled by its own moments, so its mean becomes 0.
    config = small_config(steps=2, learning_rate=5e-3, normalize_reward=True, kl_penalty="k3")
    train(config, tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "run")
    first, second = rows(tmp_path / "run")
    assert first["reward_penalised_mean"] == pytest.approx(0.0, abs=1e-5) and first["reward_mean"] > 0
    # With kl_penalty=k3 the logged and controlled KL is the k3 sum, which is never negative.
    assert second["kl"] == second["kl_k3"] > 0 and second["kl_k3"] != second["kl_k1"]


# --------------------------------------------------------------------------- a shared-backbone value head


def test_shared_value_head_reads_the_policy_hidden_state_in_one_forward():
    from ppo.models import PolicyAndValue, value_head_for

    model, _ = tiny_policy()
    head = value_head_for(model)
    torch.nn.init.normal_(head.head.weight)
    wrapped = PolicyAndValue(model, head)
    assert wrapped.shared
    ids = torch.randint(2, 32, (2, 9))
    mask = torch.ones_like(ids)
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        logits, values = wrapped(ids, mask, pos, 4)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    # positions 4..7 predict the last 4 tokens; the values are the head on the same hidden states
    assert torch.allclose(logits, out.logits[:, 4:8], atol=1e-5)
    assert torch.allclose(values, head(out.hidden_states[-1][:, 4:8]), atol=1e-5)
    assert values.shape == (2, 4)


def test_ppo_with_a_shared_value_head_learns_and_saves_the_head(tmp_path):
    from safetensors.torch import load_file

    config = small_config(steps=12, learning_rate=5e-3, value_model="shared", save_every=6)
    result = train(config, tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "run")
    history = rows(tmp_path / "run")
    first, last = mean([r["reward_mean"] for r in history[:3]]), mean([r["reward_mean"] for r in history[-3:]])
    assert last > first + 0.1 and last > 3 * first, (first, last)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # rollout and update forwards agree
    assert history[0]["value_mean"] == pytest.approx(0.0, abs=1e-6)  # the head starts at zero ...
    assert abs(history[-1]["value_mean"]) > 1e-4  # ... and learns
    assert not (tmp_path / "run" / "value").exists()
    weights = load_file(result["value_path"])
    assert set(weights) == {"head.weight", "head.bias"} and weights["head.weight"].abs().sum() > 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000012" / "state.pt", weights_only=True)
    assert set(state["value"]) == {"head.weight", "head.bias"}


def test_shared_value_head_resumes_exactly(tmp_path):
    import shutil

    config = small_config(steps=3, save_every=2, learning_rate=2e-3, value_model="shared")
    train(config, tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "a")
    full = rows(tmp_path / "a")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000002", tmp_path / "b" / "checkpoints" / "step-000002")
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:2]))
    train(config, tiny_policy(), share_of_yes, tiny_prompts(), tmp_path / "b", resume=True)
    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith("time_")}
    assert untimed(rows(tmp_path / "b")[2]) == untimed(full[2])


def test_shared_value_head_refuses_value_init_reward():
    with pytest.raises(PPOError, match="value_init=reward needs value_model=separate"):
        PPOConfig(value_model="shared", value_init="reward").validate()
    with pytest.raises(PPOError, match="value_model must be 'separate' or 'shared'"):
        PPOConfig(value_model="twin").validate()


def test_shared_value_head_with_lora_trains_adapters_and_head_only(tmp_path):
    from ppo.models import get_lora_policy

    model, tok = tiny_policy()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = small_config(steps=2, learning_rate=1e-2, lora=True, lora_r=4, value_model="shared",
                          lora_target_modules="q_proj,v_proj")
    lora_model = get_lora_policy(model, config.lora_options())
    result = train(config, (lora_model, tok), share_of_yes, tiny_prompts(), tmp_path / "run")
    for name, p in lora_model.get_base_model().named_parameters():
        plain = name.replace(".base_layer", "")
        if "lora_" not in name and plain in base_before:
            assert torch.allclose(p, base_before[plain], atol=1e-6), name
    assert result["value_path"].endswith("value_head.safetensors")
