"""Mixed precision (reward.precision): trained weights stay fp32 under every plan, so a small
learning rate moves them under the bf16 plan as it does under fp32. Each test sets the plan
itself ("fp32" or "bf16"), so it means the same on CPUs with and without native bf16.

Pure-bf16 weights, what the code did before, rounded an AdamW step of lr 1e-5 away for most
weights (1.1% of SmolLM2's weights changed in a 4-step PPO run against 82% in fp32)."""

from __future__ import annotations

import pytest
import torch

from reward.errors import RewardError
from reward.precision import AUTO_BF16_STAGES, STAGES, precision_plan
from test_ppo_train import share_of_yes, small_config, tiny_policy, tiny_prompts
from tiny_lm import one_thread, save_tiny_policy


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def weight_change(before: dict, after: dict) -> tuple[float, float]:
    """(fraction of weights that changed, L2 norm of the whole update) over the shared tensors."""
    changed = total = 0
    sq = 0.0
    for name, old in before.items():
        new = after[name].float()
        diff = new - old.float()
        changed += int((diff != 0).sum())
        total += diff.numel()
        sq += float(diff.double().pow(2).sum())
    return changed / total, sq ** 0.5


def assert_bf16_moves_like_fp32(fp32: tuple[float, float], bf16: tuple[float, float]) -> None:
    (frac32, norm32), (frac16, norm16) = fp32, bf16
    assert frac32 > 0.5, "the fp32 run itself must move most weights, or the comparison says nothing"
    # Tolerances: bf16 compute changes the gradients' low bits, not which weights get a step or
    # Adam's step size (about lr per weight), so both figures agree closely; pure-bf16 weights
    # fail both by an order of magnitude.
    assert frac16 >= 0.9 * frac32, (fp32, bf16)
    assert 0.8 <= norm16 / norm32 <= 1.25, (fp32, bf16)


def test_plans_are_set_by_mode_not_by_the_machine(monkeypatch):
    import reward.precision as precision

    assert precision_plan("fp32", "cpu").bf16_stages == frozenset()
    assert precision_plan("bf16", "cpu").bf16_stages == frozenset(STAGES)
    assert precision_plan("bf16", "cpu").label("sft") == "bf16-mixed"
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: False)
    assert precision_plan("auto", "cpu").bf16_stages == frozenset()
    assert precision_plan("auto", "cuda").bf16_stages == frozenset()
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: True)
    assert precision_plan("auto", "cpu").bf16_stages == AUTO_BF16_STAGES["cpu"]
    assert precision_plan("auto", "cuda").bf16_stages == AUTO_BF16_STAGES["cuda"]
    with pytest.raises(RewardError, match="precision 'fp16' is invalid"):
        precision_plan("fp16")


def test_autocast_computes_in_bf16_only_for_the_stages_in_the_plan():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    plan = precision_plan("bf16", "cpu")
    with plan.autocast("ppo_update"):
        assert layer(x).dtype == torch.bfloat16
    with precision_plan("fp32", "cpu").autocast("ppo_update"):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32


def _ppo_change(tmp_path, precision: str) -> tuple[float, float]:
    from ppo.models import load_policy
    from ppo.train import train

    base = tmp_path / f"base-{precision}"
    model, tok = tiny_policy(seed=3)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    # Loaded the way `rlhf ppo` loads a policy: the path where pure-bf16 weights came from.
    policy, tokenizer = load_policy(base)
    assert next(policy.parameters()).dtype == torch.float32
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    config = small_config(steps=2, ppo_epochs=2, learning_rate=1e-5, precision=precision, batch_size=16,
                          mini_batch_size=8)
    result = train(config, (policy, tokenizer), share_of_yes, tiny_prompts(), tmp_path / f"run-{precision}")
    saved, _ = load_policy(result["policy_path"], dtype=None)
    assert {p.dtype for p in saved.parameters()} == {torch.float32}
    return weight_change(before, saved.state_dict())


def test_ppo_at_lr_1e5_moves_weights_under_the_bf16_plan_as_under_fp32(tmp_path):
    assert_bf16_moves_like_fp32(_ppo_change(tmp_path, "fp32"), _ppo_change(tmp_path, "bf16"))


def _sft_change(base, tmp_path, precision: str) -> tuple[float, float]:
    from safetensors.torch import load_file

    from ppo.sft import SFTOptions, train_sft

    rows = [{"prompt": "ping", "completion": "pong pong"}, {"prompt": "hello", "completion": "world"}]
    out = tmp_path / f"sft-{precision}"
    result = train_sft(rows, out, base=base, options=SFTOptions(max_steps=3, learning_rate=1e-5, batch_size=2,
                                                                 precision=precision))
    assert result.params["compute_precision"] == ("bf16-mixed" if precision == "bf16" else "fp32")
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert {t.dtype for t in after.values()} == {torch.float32}
    return weight_change(before, after)


def test_sft_at_lr_1e5_moves_weights_under_the_bf16_plan_as_under_fp32(tmp_path):
    base = save_tiny_policy(tmp_path / "base")
    assert_bf16_moves_like_fp32(_sft_change(base, tmp_path, "fp32"), _sft_change(base, tmp_path, "bf16"))
