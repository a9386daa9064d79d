"""Does bf16 compute pay on this machine? Each training stage timed in fp32 and in bf16 autocast
(fp32 weights, the plan reward.precision applies), same model, same batch, same run.

    .venv/bin/python benchmarks/precision_bench.py [--repeats 3] [--stages reward,sft,ppo_update,ppo_generate]

Stages, at the sizes the defaults train with (default models from `rlhf models fetch`):
- reward: all-MiniLM-L6-v2 with a score head, one AdamW step on 16 pairs (32 sequences) of 128 tokens
- sft: SmolLM2-135M-Instruct, one AdamW step on 4 rows of 256 tokens
- ppo_update: SmolLM2 policy + a value copy, forward, backward and AdamW step on a mini-batch of 4
  episodes of 96 prompt + 53 response tokens (PPO's default mini-batch and response length)
- ppo_generate: SmolLM2 samples 53 new tokens for 16 prompts of 96 tokens with a KV cache; also
  timed with a bf16 copy of the weights (what an inference engine would hold), for reference

Prints seconds per call (best of --repeats, after one warm-up) for each precision and the ratio
fp32 / bf16 (above 1: bf16 is faster). reward.precision.AUTO_BF16_STAGES records the choice.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from reward.precision import cpu_has_native_bf16  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(model, optimizer, batch, bf16: bool, loss_of):
    def step():
        with autocast(bf16):
            out = model(**batch)
        loss = loss_of(out).float()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def stage_reward(models: Path, bf16: bool, repeats: int) -> float:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(models / "all-MiniLM-L6-v2", num_labels=1, dtype=torch.float32)
    ids = torch.randint(1000, 20000, (32, 128))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def bt_loss(out):  # Bradley-Terry on (chosen, rejected) halves
        r = out.logits.squeeze(-1).float()
        return -torch.nn.functional.logsigmoid(r[:16] - r[16:]).mean()

    return best_of(train_step(model, opt, batch, bf16, bt_loss), repeats)


def stage_sft(models: Path, bf16: bool, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models / "SmolLM2-135M-Instruct", dtype=torch.float32)
    ids = torch.randint(100, 40000, (4, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    return best_of(train_step(model, opt, batch, bf16, lambda out: out.loss), repeats)


def stage_ppo_update(models: Path, bf16: bool, repeats: int) -> float:
    from ppo.models import PolicyAndValue, value_model_from_policy
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(models / "SmolLM2-135M-Instruct", dtype=torch.float32)
    wrapped = PolicyAndValue(policy, value_model_from_policy(policy))
    ids = torch.randint(100, 40000, (4, 96 + 53))
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(1) - 1)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with autocast(bf16):
            logits, values = wrapped(ids, mask, pos, 53)
        loss = logits.float().log_softmax(-1).mean() + values.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return best_of(step, repeats)


def stage_ppo_generate(models: Path, bf16: bool, repeats: int, bf16_weights: bool = False) -> float:
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = torch.bfloat16 if bf16_weights else torch.float32
    model = AutoModelForCausalLM.from_pretrained(models / "SmolLM2-135M-Instruct", dtype=dtype)
    ids = torch.randint(100, 40000, (16, 96))
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=53, min_new_tokens=53,
                              pad_token_id=0, eos_token_id=None)

    def step():
        torch.manual_seed(0)
        with torch.no_grad(), autocast(bf16 and not bf16_weights):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)

    return best_of(step, repeats)


STAGES = {"reward": stage_reward, "sft": stage_sft, "ppo_update": stage_ppo_update, "ppo_generate": stage_ppo_generate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(REPO / "data" / "models"), help="Where `rlhf models fetch` put the models.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = Path(args.models)
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}; torch {torch.__version__}; {args.threads} threads")
    print(f"{'stage':<14}{'fp32 s':>10}{'bf16 s':>10}{'fp32/bf16':>11}")
    for name in args.stages.split(","):
        fn = STAGES[name]
        fp32 = fn(models, False, args.repeats)
        bf16 = fn(models, True, args.repeats)
        print(f"{name:<14}{fp32:>10.3f}{bf16:>10.3f}{fp32 / bf16:>10.2f}x", flush=True)
        if name == "ppo_generate":
            held = stage_ppo_generate(models, True, args.repeats, bf16_weights=True)
            print(f"{'  bf16 weights':<14}{fp32:>10.3f}{held:>10.3f}{fp32 / held:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
