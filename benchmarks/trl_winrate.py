"""DPO and GRPO on the default models, on this CPU, judged on held-out prompts: the `rlhf` commands a
user would type, one after the other, and the win rates they report.

    .venv/bin/python benchmarks/trl_winrate.py [--out benchmarks/out/trl] [--dpo-steps 40] [--grpo-steps 30]
        [--eval-prompts 64] [--quick]

1. The HH-RLHF harmless dev pairs are split in two halves by pair hash (reward.data.split_pairs):
   A trains, B is held out.
2. Two reward models (MiniLM, `rlhf train-rm` defaults but --epochs): the proxy on A, the judge on
   B. The judge never saw a pair the policies trained on, and GRPO never optimised it.
3. `rlhf dpo --data A` (LoRA, SmolLM2-135M-Instruct) and `rlhf grpo` on the proxy with A's prompts
   (LoRA), for a few dozen optimiser steps each.
4. `rlhf eval-policy` of each against the untouched SmolLM2-135M-Instruct on B's first
   --eval-prompts prompts (never trained on), by the proxy and by the judge (--judge).

Prints one line per policy and writes every command's JSON under --out. --quick shrinks
everything for a smoke run (minutes; the figures then mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"


def rlhf(out: Path, name: str, *args: str) -> dict:
    """Run `rlhf ARGS --json` in a subprocess; its last JSON line, also saved as out/NAME.json."""
    cmd = [sys.executable, "-m", "app.cli", *args, "--json"]
    print("$ rlhf " + " ".join(args), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"rlhf {args[0]} failed with exit code {proc.returncode}")
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    payload["_seconds"] = round(time.time() - t0, 1)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"  done in {payload['_seconds']:.0f} s", flush=True)
    return payload


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "trl")
    parser.add_argument("--rm-epochs", default="1")
    parser.add_argument("--dpo-steps", type=int, default=40)
    parser.add_argument("--grpo-steps", type=int, default=30)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", default="48")
    parser.add_argument("--lr", default="5e-5", help="LoRA learning rate of DPO and GRPO (a few dozen steps need more than 1e-5).")
    parser.add_argument("--quick", action="store_true", help="A smoke run: tiny sizes, figures meaningless.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rm_epochs, args.dpo_steps, args.grpo_steps, args.eval_prompts, args.max_new_tokens = "0.05", 2, 2, 4, "8"

    from annotation.io import read_pairs
    from reward.data import split_pairs

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pairs = read_pairs(args.data)
    a, b = split_pairs(pairs, 0.5)
    data_a = write_jsonl(out / "half-a.jsonl", ({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in a))
    data_b = write_jsonl(out / "half-b.jsonl", ({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in b))
    prompts_a = write_jsonl(out / "prompts-a.jsonl", ({"prompt": p} for p in dict.fromkeys(p.prompt for p in a)))
    held = list(dict.fromkeys(p.prompt for p in b))[: args.eval_prompts]
    prompts_b = write_jsonl(out / "prompts-b.jsonl", ({"prompt": p} for p in held))
    print(f"{len(a)} pairs train (A), {len(b)} held out (B); {len(held)} held-out prompts", flush=True)

    proxy, judge = out / "rm-proxy-a", out / "rm-judge-b"
    for path, data, name in ((proxy, data_a, "rm-proxy"), (judge, data_b, "rm-judge")):
        if not (path / "reward_config.json").is_file():  # reward.data.ENCODER_FILE: a finished run
            rlhf(out, name, "train-rm", "--data", str(data), "--output", str(path), "--epochs", args.rm_epochs, "--no-register")
    dpo_dir, grpo_dir = out / "dpo-a", out / "grpo-a"
    if not (dpo_dir / "config.json").is_file():
        rlhf(out, "dpo", "dpo", "--data", str(data_a), "--output", str(dpo_dir), "--lora", "--lr", args.lr, "--max-steps", str(args.dpo_steps),
             "--batch-size", "4", "--max-length", "256")
    if not (grpo_dir / "config.json").is_file():
        rlhf(out, "grpo", "grpo", "--reward-model", str(proxy), "--prompts", str(prompts_a), "--output", str(grpo_dir),
             "--lora", "--lr", args.lr, "--steps", str(args.grpo_steps), "--num-generations", "4", "--batch-size", "8",
             "--max-completion-length", "32")
    rows = []
    for name, policy in (("dpo", dpo_dir), ("grpo", grpo_dir)):
        r = rlhf(out, f"eval-{name}", "eval-policy", "--policy", str(policy), "--reward-model", str(proxy),
                 "--judge", str(judge), "--prompts", str(prompts_b), "--n", str(args.eval_prompts),
                 "--max-new-tokens", args.max_new_tokens, "--seed", "1")
        j = next(iter(r.get("judges", {}).values()))
        rows.append((name, r, j))
    print("\npolicy  prompts  proxy win rate        judge win rate        KL (nats)")
    for name, r, j in rows:
        print(f"{name:<7} {r['n_prompts']:>7}  {r['win_rate']:.3f} ± {r['win_rate_stderr']:.3f}         "
              f"{j['win_rate']:.3f} ± {j['win_rate_stderr']:.3f}         {r['kl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
