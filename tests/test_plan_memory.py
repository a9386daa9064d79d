"""ppo.memory and `rlhf plan-memory`: the textbook's 70B PPO table, the mixed-precision accounting,
ZeRO sharding and the activation formula, each against numbers worked out by hand here.

    .venv/bin/python -m pytest tests/test_plan_memory.py

Where deepspeed is importable, the ZeRO-2/3 model states are also compared with DeepSpeed's own
estimators; deepspeed is not a dependency, so that test skips elsewhere.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ppo.errors import PPOError
from ppo.memory import (
    MemorySpec,
    ModelShape,
    activation_bytes,
    kv_cache_bytes,
    lora_params,
    model_state_bytes,
    parse_model_size,
    plan_memory,
    plan_rows,
)

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def by_name(plan):
    return {m["name"]: m for m in plan["models"]}


def states(model):
    b = model["bytes"]
    return b["weights"] + b["gradients"] + b["master_weights"] + b["optimizer_state"]


# ---- the textbook accounting ------------------------------------------------------------------

def test_textbook_70b_ppo_table_is_280_280_140_140_840_gb_and_12_gpus():
    plan = plan_memory(MemorySpec(algo="ppo", model_size="70b", accounting="textbook"))
    models = by_name(plan)
    # Trained: 70e9 x (2 B bf16 weights + 2 B bf16 gradients); frozen: 70e9 x 2 B.
    assert [models[n]["total"] / GB for n in ("policy", "value", "reference", "reward")] == [280, 280, 140, 140]
    assert models["policy"]["bytes"] == {"weights": 140 * GB, "gradients": 140 * GB}
    assert models["reference"]["bytes"] == {"weights": 140 * GB, "gradients": 0.0}
    assert plan["total"] / GB == 840
    # 840 GB over 70 GB usable per A100 80 GB = 12 (840 / 80 = 10.5 would give 11).
    assert plan["gpus_needed_80gb"] == 12
    assert plan["min_gpus_80gb"] == 16  # 840 / 8 = 105 > 70; 840 / 16 = 52.5
    # What it leaves out: 12 B more per trained parameter (fp32 master 4 + Adam 8) on 140e9 of them.
    assert plan["left_out"]["master_weights"] / GB == 560
    assert plan["left_out"]["optimizer_state"] / GB == 1120
    assert plan["total_with_left_out"] / GB == 2520
    assert plan["gpus_needed_80gb_with_left_out"] == 36
    assert plan["left_out"]["activations_per_gpu"] > 0
    rows = plan_rows(plan)
    assert [r["total"] for r in rows] == [280, 280, 140, 140, 840]


def test_textbook_dpo_and_grpo_hold_fewer_models():
    dpo = plan_memory(MemorySpec(algo="dpo", model_size="70b", accounting="textbook"))
    assert [m["name"] for m in dpo["models"]] == ["policy", "reference"] and dpo["total"] / GB == 420
    grpo = plan_memory(MemorySpec(algo="grpo", model_size="70b", accounting="textbook"))
    assert [m["name"] for m in grpo["models"]] == ["policy", "reference", "reward"] and grpo["total"] / GB == 560
    no_kl = plan_memory(MemorySpec(algo="grpo", model_size="70b", beta=0.0, accounting="textbook"))
    assert [m["name"] for m in no_kl["models"]] == ["policy", "reward"] and no_kl["total"] / GB == 420


def test_separate_reward_and_value_sizes():
    # InstructGPT-like: 70B policy, 7B reward model and value model (value defaults to the reward size).
    plan = plan_memory(MemorySpec(algo="ppo", model_size="70b", reward_size="7b", accounting="textbook"))
    assert [m["total"] / GB for m in plan["models"]] == [280, 28, 140, 14]
    plan = plan_memory(MemorySpec(algo="ppo", model_size="70b", reward_size="7b", value_size="13b", accounting="textbook"))
    assert by_name(plan)["value"]["total"] / GB == 52


# ---- mixed precision, by hand -----------------------------------------------------------------

def test_mixed_precision_small_case_by_hand():
    # PPO on the 1b preset (h=2048, 16 layers, 32 heads, 8 KV heads of 64), one GPU, no ZeRO,
    # seq 512, micro-batch 2, no checkpointing.
    plan = plan_memory(MemorySpec(algo="ppo", model_size="1b", seq_len=512, micro_batch=2))
    models = by_name(plan)
    policy = models["policy"]["bytes"]
    assert policy["weights"] == 2e9 and policy["gradients"] == 2e9
    assert policy["master_weights"] == 4e9 and policy["optimizer_state"] == 8e9  # 16 B/param in all
    # Korthikanti et al.: per layer 34*s*b*h + 5*a*s^2*b = 34*512*2*2048 + 5*32*512*512*2
    per_layer = 71_303_168 + 83_886_080
    assert policy["activations"] == 16 * per_layer == 2_483_027_968
    # KV cache: 2 (K, V) x 16 layers x 2 seqs x 512 tokens x 8 heads x 64 dims x 2 B
    assert policy["kv_cache"] == 33_554_432
    assert models["value"]["bytes"]["activations"] == 16 * per_layer and models["value"]["bytes"]["kv_cache"] == 0
    for frozen in ("reference", "reward"):
        assert models[frozen]["bytes"] == {"weights": 2e9, "gradients": 0.0, "master_weights": 0.0,
                                           "optimizer_state": 0.0, "activations": 0.0, "kv_cache": 0.0}
    per_gpu = plan["per_gpu"]
    assert per_gpu["model_states"] == 16e9 + 16e9 + 2e9 + 2e9
    # Generation and the backward pass do not overlap: the larger of the two counts.
    assert per_gpu["total"] == 36e9 + 2 * 2_483_027_968
    assert plan["fits"] == {"24": False, "40": False, "48": True, "80": True, "141": True}  # 40.97 GB; 0.875 x 48 = 42
    assert plan["min_gpus_80gb"] == 1


def test_pure_bf16_and_fp32_bytes_per_parameter():
    bf16 = by_name(plan_memory(MemorySpec(algo="dpo", model_size="1b", precision="bf16")))
    assert states(bf16["policy"]) == 8e9 and bf16["reference"]["bytes"]["weights"] == 2e9  # 2 + 2 + 0 + 4 B
    fp32 = by_name(plan_memory(MemorySpec(algo="dpo", model_size="1b", precision="fp32")))
    assert states(fp32["policy"]) == 16e9 and fp32["policy"]["bytes"]["master_weights"] == 0  # 4 + 4 + 8 B
    assert fp32["reference"]["bytes"]["weights"] == 4e9
    mixed = by_name(plan_memory(MemorySpec(algo="dpo", model_size="1b")))
    assert fp32["policy"]["bytes"]["activations"] == 2 * mixed["policy"]["bytes"]["activations"]


def test_dpo_runs_two_sequences_per_pair_and_generates_nothing():
    dpo = by_name(plan_memory(MemorySpec(algo="dpo", model_size="1b", micro_batch=1)))
    grpo = by_name(plan_memory(MemorySpec(algo="grpo", model_size="1b", micro_batch=2)))
    assert dpo["policy"]["bytes"]["activations"] == grpo["policy"]["bytes"]["activations"]
    assert dpo["policy"]["bytes"]["kv_cache"] == 0 and grpo["policy"]["bytes"]["kv_cache"] > 0


# ---- ZeRO sharding, by the ZeRO paper's formulas ---------------------------------------------

@pytest.mark.parametrize("stage, expected", [
    (0, (2 + 2 + 12) * 7e9),                # nothing sharded: 16 B/param
    (1, (2 + 2) * 7e9 + 12 * 7e9 / 8),      # optimizer state (fp32 master + Adam) / N
    (2, 2 * 7e9 + (2 + 12) * 7e9 / 8),      # and gradients
    (3, (2 + 2 + 12) * 7e9 / 8),            # and parameters
])
def test_zero_stages_shard_as_the_zero_paper_says(stage, expected):
    parts = model_state_bytes(7e9, 7e9, "bf16-mixed", stage, 8)
    assert sum(parts.values()) == pytest.approx(expected, rel=1e-12)
    policy = by_name(plan_memory(MemorySpec(algo="ppo", model_size="7b", zero=stage, gpus=8)))["policy"]
    assert states(policy) == pytest.approx(expected, rel=1e-12)


def test_frozen_weights_shard_only_at_stage_3_and_fsdp_counts_as_stage_3():
    for stage, weights in ((0, 14e9), (1, 14e9), (2, 14e9), (3, 14e9 / 8)):
        ref = by_name(plan_memory(MemorySpec(algo="ppo", model_size="7b", zero=stage, gpus=8)))["reference"]
        assert ref["bytes"]["weights"] == pytest.approx(weights)
    fsdp = plan_memory(MemorySpec(algo="ppo", model_size="7b", fsdp=True, gpus=8))
    zero3 = plan_memory(MemorySpec(algo="ppo", model_size="7b", zero=3, gpus=8))
    assert fsdp["per_gpu"] == zero3["per_gpu"] and fsdp["sharding"] == "fsdp (full shard)"


def test_smallest_gpu_count_on_80_gb():
    # 70B PPO, ZeRO-3, checkpointing: states (16 + 16 + 2 + 2) B x 70e9 / N = 2520 GB / N; activations
    # of policy and value 2 x (2*s*b*h x 80 layers) = 2.68 GB. Usable 70 GB: 32 GPUs hold 78.75 + 2.68,
    # too much; 64 hold 39.4 + 2.68.
    plan = plan_memory(MemorySpec(algo="ppo", model_size="70b", zero=3, grad_checkpointing=True))
    assert plan["min_gpus_80gb"] == 64
    assert plan["per_gpu"]["activations"] == 2 * 80 * 2 * 1024 * 1 * 8192
    # Without ZeRO nothing shrinks with more GPUs: none fits, and the plan says what would.
    plan = plan_memory(MemorySpec(algo="ppo", model_size="70b"))
    assert plan["min_gpus_80gb"] is None
    assert "with --zero 3 --grad-checkpointing: 64 GPUs" in plan["hints"]


# ---- LoRA ---------------------------------------------------------------------------------------

def test_lora_adapter_count_by_hand_and_it_shrinks_trained_state():
    shape = parse_model_size("7b")
    # Per layer, r x (d_in + d_out) for q, o (4096x4096), k, v (4096x4096: no GQA in 7b), gate, up
    # (4096x11008), down (11008x4096); 32 layers.
    per_layer = 16 * (2 * (4096 + 4096) + 2 * (4096 + 4096) + 3 * (4096 + 11008))
    assert lora_params(shape, 16) == 32 * per_layer == 39_976_960
    assert lora_params(shape, 8) * 2 == lora_params(shape, 16)
    full = by_name(plan_memory(MemorySpec(algo="ppo", model_size="7b")))
    lora = by_name(plan_memory(MemorySpec(algo="ppo", model_size="7b", lora=True, lora_r=16)))
    n = 39_976_960
    policy = lora["policy"]["bytes"]
    assert policy["gradients"] == 2 * n and policy["master_weights"] == 4 * n and policy["optimizer_state"] == 8 * n
    assert policy["weights"] == 2 * 7e9 + 2 * n  # frozen bf16 base + bf16 adapters
    assert states(lora["policy"]) < states(full["policy"]) / 7
    # The reference is the policy with adapters off: nothing more to hold.
    assert states(lora["reference"]) == 0 and "adapters off" in lora["reference"]["note"]


# ---- activations and KV cache --------------------------------------------------------------------

ONE_LAYER = ModelShape(params=13e6, hidden=1024, layers=1, heads=16, kv_heads=4, ffn=4096)


def test_activation_formula_for_one_layer_by_hand():
    # s=128, b=4, h=1024, a=16: s*b*h*(34 + 5*a*s/h) = 524288 x (34 + 10)
    assert activation_bytes(ONE_LAYER, 128, 4, checkpointing=False) == 524_288 * 44 == 23_068_672
    # Full recomputation keeps the 16-bit layer input: 2*s*b*h.
    assert activation_bytes(ONE_LAYER, 128, 4, checkpointing=True) == 2 * 524_288 == 1_048_576
    assert activation_bytes(ONE_LAYER, 128, 4, checkpointing=False, bytes_per_value=4) == 2 * 23_068_672
    # K and V, 4 heads of 64, 128 tokens x 4 sequences, 2 B.
    assert kv_cache_bytes(ONE_LAYER, 128, 4) == 2 * 4 * 128 * 4 * 64 * 2


def test_checkpointing_lowers_activations_and_nothing_else():
    off = plan_memory(MemorySpec(algo="ppo", model_size="7b", seq_len=2048, micro_batch=4))
    on = plan_memory(MemorySpec(algo="ppo", model_size="7b", seq_len=2048, micro_batch=4, grad_checkpointing=True))
    assert on["per_gpu"]["activations"] < off["per_gpu"]["activations"] / 10
    assert on["per_gpu"]["model_states"] == off["per_gpu"]["model_states"]
    assert on["per_gpu"]["kv_cache"] == off["per_gpu"]["kv_cache"]


# ---- sizes and validation --------------------------------------------------------------------

def test_model_sizes_parse_as_presets_or_counts():
    assert parse_model_size("70B").params == 70e9 and parse_model_size("70b").hidden == 8192
    shaped = parse_model_size("3b")
    assert shaped.params == 3e9 and shaped.name == "7b-shaped"  # nearest preset in log size
    assert parse_model_size(70e9).params == 70e9 and parse_model_size("70e9").layers == 80
    assert parse_model_size("350m").params == 350e6
    with pytest.raises(PPOError, match="--reward-size 'big'"):
        parse_model_size("big", "--reward-size")


@pytest.mark.parametrize("fields, message", [
    ({"algo": "sft"}, "--algo 'sft'"),
    ({"zero": 4}, "--zero 4"),
    ({"fsdp": True, "zero": 2}, "--fsdp with --zero 2"),
    ({"gpus": 0}, "--gpus 0"),
    ({"precision": "fp16"}, "--precision 'fp16'"),
    ({"accounting": "book"}, "--accounting 'book'"),
    ({"model_size": "0.5"}, "--model-size '0.5'"),
])
def test_bad_values_name_the_option(fields, message):
    with pytest.raises(PPOError, match=re.escape(message)):
        plan_memory(MemorySpec(**fields))


# ---- DeepSpeed's own estimators, where deepspeed is installed ---------------------------------

def _gpu_gib(printed: str, options: str) -> float:
    """The per-GPU GiB of the estimator's printed line whose options end with `options`."""
    for line in printed.splitlines():
        match = re.match(r"\s*[\d.]+GB \|\s*([\d.]+)GB \| (.*)$", line)
        if match and match.group(2).strip().endswith(options):
            return float(match.group(1))
    raise AssertionError(f"no line with {options!r} in:\n{printed}")


def test_model_states_agree_with_deepspeeds_estimators(capsys):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    P, N, largest = 7e9, 8, 250e6
    tol = 0.006 * 2**30  # the estimators print GiB to two decimals
    capsys.readouterr()
    estimate_zero2_model_states_mem_needs_all_cold(total_params=P, num_gpus_per_node=N, num_nodes=1)
    ds2 = _gpu_gib(capsys.readouterr().out, "offload_optimizer=none") * 2**30
    estimate_zero3_model_states_mem_needs_all_cold(total_params=P, largest_layer_params=largest, num_gpus_per_node=N, num_nodes=1)
    ds3 = _gpu_gib(capsys.readouterr().out, "offload_param=none, offload_optimizer=none, zero_init=1") * 2**30
    ours2 = sum(model_state_bytes(P, P, "bf16-mixed", 2, N).values())  # 2P + 14P/N
    ours3 = sum(model_state_bytes(P, P, "bf16-mixed", 3, N).values())  # 16P/N
    # DeepSpeed counts what the ZeRO paper's formulas leave out, and nothing else: an fp32 gradient
    # partition (4P/N) and, in older releases, a whole 16-bit gradient buffer (2P) at
    # stage 2; at stage 3 the gathered largest layer (4 B x its params) and the 16-bit gradient
    # partition counted twice (2P/N).
    assert ours2 - tol <= ds2 <= ours2 + 4 * P / N + 2 * P + tol
    assert ours3 - tol <= ds3 <= ours3 + 4 * largest + 4 * P / N + tol
    # ZeRO-3 shards everything, so it must come out far below ZeRO-2 in both.
    assert ours3 < ours2 and ds3 < ds2


# ---- the command line ----------------------------------------------------------------------------

def rlhf(*args):
    return subprocess.run([sys.executable, "-m", "app.cli", "plan-memory", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_cli_json_is_one_object_with_the_textbook_table():
    proc = rlhf("--algo", "ppo", "--model-size", "70b", "--accounting", "textbook", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [m["total"] for m in plan["models"]] == [280e9, 280e9, 140e9, 140e9]
    assert plan["total"] == 840e9 and plan["gpus_needed_80gb"] == 12


def test_cli_text_table_and_mixed_precision_options():
    proc = rlhf("--algo", "ppo", "--model-size", "70b", "--accounting", "textbook")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^policy\s+trained\s+70B\s+140\s+140\s+280$", proc.stdout, re.M)
    assert re.search(r"^total\s.*\s840$", proc.stdout, re.M) and "80 GB GPUs needed: 12" in proc.stdout
    assert "Adam moments 1120 GB" in proc.stdout
    proc = rlhf("--algo", "grpo", "--model-size", "13b", "--reward-size", "1b", "--lora", "--lora-r", "8",
                "--fsdp", "--gpus", "4", "--grad-checkpointing", "--seq-len", "2048", "--micro-batch", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["sharding"] == "fsdp (full shard)" and plan["gpus"] == 4 and plan["lora"] is True
    assert [m["name"] for m in plan["models"]] == ["policy", "reference", "reward"]
    assert plan["models"][2]["params"] == 1e9 and plan["min_gpus_80gb"] == 1


@pytest.mark.parametrize("args, option", [
    (["--zero", "5"], "--zero 5"),
    (["--algo", "sft"], "--algo 'sft'"),
    (["--model-size", "huge"], "--model-size 'huge'"),
    (["--fsdp", "--zero", "1"], "--fsdp"),
])
def test_cli_bad_value_is_one_line_and_exit_2(args, option):
    proc = rlhf(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0]


def test_the_planner_imports_no_torch():
    code = ("import sys, app.cli_plan, ppo.memory; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app.cli_plan.cli, ['plan-memory', '--model-size', '7b']); "
            "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


# ---- the PPO page's planner -----------------------------------------------------------------

def test_ppo_page_plans_memory_with_the_same_function(store):
    from browser_helpers import open_page_as

    at = open_page_as(REPO / "app" / "pages" / "6_PPO.py", store, "res")
    assert not at.exception, at.exception
    assert any(e.label == "Plan memory for a larger run" for e in at.expander)
    at.text_input(key="plan_size").set_value("70b")
    at.selectbox(key="plan_accounting").set_value("textbook")
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table["model"]) == ["policy", "value", "reference", "reward", "total"]
    assert list(table["total"]) == [280, 280, 140, 140, 840]
    assert any("12 GPUs of 80 GB" in c.value for c in at.caption)
    at.selectbox(key="plan_accounting").set_value("mixed-precision")
    at.selectbox(key="plan_zero").set_value(3)
    at.selectbox(key="plan_gpus").set_value(64)
    at.checkbox(key="plan_checkpointing").check()
    at.run()
    expected = plan_memory(MemorySpec(model_size="70b", zero=3, gpus=64, grad_checkpointing=True))
    assert at.dataframe[0].value["total"].iloc[-1] == round(expected["per_gpu"]["total"] / GB, 2)
    at.text_input(key="plan_size").set_value("huge")
    at.run()
    assert any("--model-size 'huge'" in e.value for e in at.error)
