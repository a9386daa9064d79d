"""PPO, DPO and GRPO on the default models, on this CPU, judged on held-out prompts: the `rlhf`
commands a user would type, one after the other, and the win rates they report.

    .venv/bin/python benchmarks/winrate_bench.py [--out benchmarks/out/winrate] [--trainers ppo,dpo,grpo]
        [--ppo-config configs/ppo/cpu.yaml] [--dpo-steps 40] [--grpo-steps 30] [--eval-prompts 64]
        [--rm-epochs 1] [--quick]

1. The HH-RLHF harmless dev pairs are split in two halves by pair hash (reward.data.split_pairs):
   A trains, B is held out.
2. Two reward models (MiniLM, `rlhf train-rm` defaults but --epochs): the proxy on A, the judge on
   B. The judge never saw a pair the policies trained on, and PPO and GRPO never optimised it.
3. `rlhf ppo --config` (the first tour's CPU profile by default) and `rlhf grpo` on the proxy with
   A's prompts, `rlhf dpo --data A`; all LoRA on SmolLM2-135M-Instruct.
4. `rlhf eval-policy` of each against the untouched SmolLM2-135M-Instruct on B's first
   --eval-prompts prompts (never trained on), by the proxy and by the judge (--judge). PPO's
   policy is evaluated at its config's response and prompt lengths (PPOConfig's defaults where
   the file sets none), the others at --max-new-tokens.

Prints one line per policy (with PPO's wall time against the first tour's 30 minutes and the
judge's win rate against 0.65 at KL < 6) and writes every command's JSON under --out. --quick
shrinks everything for a smoke run (minutes; the figures then mean nothing).
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
TARGET_WIN_RATE, TARGET_KL, TARGET_SECONDS = 0.65, 6.0, 30 * 60
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
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "winrate")
    parser.add_argument("--trainers", default="ppo,dpo,grpo", help="Comma-separated: which of ppo, dpo, grpo to run.")
    parser.add_argument("--ppo-config", type=Path, default=REPO / "configs" / "ppo" / "cpu.yaml")
    parser.add_argument("--ppo-steps", type=int, default=None, help="Override the PPO config's steps.")
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
        args.ppo_steps = args.ppo_steps or 2
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = sorted(set(trainers) - {"ppo", "dpo", "grpo"})
    if unknown:
        parser.error(f"--trainers: unknown {', '.join(unknown)}; expected ppo, dpo or grpo")
    if "ppo" in trainers:  # what `rlhf ppo --config` will run, checked before anything is trained
        from ppo.config import PPOConfig
        from ppo.errors import PPOError

        try:
            ppo_config = PPOConfig.from_yaml(args.ppo_config)
        except PPOError as exc:
            parser.error(f"--ppo-config: {exc}")

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
    policies, lengths = {}, {}
    if "ppo" in trainers:
        ppo_dir = out / "ppo-a"
        lengths["ppo"] = (str(ppo_config.max_new_tokens), str(ppo_config.max_prompt_length))
        if not (ppo_dir / "policy" / "config.json").is_file():
            steps = ["--steps", str(args.ppo_steps)] if args.ppo_steps else []
            if args.quick:
                steps += ["--set", "batch_size=2", "--set", "mini_batch_size=2", "--set", "max_new_tokens=8"]
            rlhf(out, "ppo", "ppo", "--reward-model", str(proxy), "--prompts", str(prompts_a), "--output", str(ppo_dir),
                 "--config", str(args.ppo_config), *steps, "--no-register")
        policies["ppo"] = ppo_dir / "policy"
    if "dpo" in trainers:
        dpo_dir = out / "dpo-a"
        if not (dpo_dir / "config.json").is_file():
            rlhf(out, "dpo", "dpo", "--data", str(data_a), "--output", str(dpo_dir), "--lora", "--lr", args.lr,
                 "--max-steps", str(args.dpo_steps), "--batch-size", "4", "--max-length", "256")
        policies["dpo"] = dpo_dir
    if "grpo" in trainers:
        grpo_dir = out / "grpo-a"
        if not (grpo_dir / "config.json").is_file():
            rlhf(out, "grpo", "grpo", "--reward-model", str(proxy), "--prompts", str(prompts_a), "--output", str(grpo_dir),
                 "--lora", "--lr", args.lr, "--steps", str(args.grpo_steps), "--num-generations", "4", "--batch-size", "8",
                 "--max-completion-length", "32")
        policies["grpo"] = grpo_dir
    rows = []
    for name, policy in policies.items():
        lengths_args = (["--max-new-tokens", lengths[name][0], "--max-prompt-length", lengths[name][1]] if name in lengths
                        else ["--max-new-tokens", args.max_new_tokens])
        r = rlhf(out, f"eval-{name}", "eval-policy", "--policy", str(policy), "--reward-model", str(proxy),
                 "--judge", str(judge), "--prompts", str(prompts_b), "--n", str(args.eval_prompts), *lengths_args,
                 "--seed", "1")
        j = next(iter(r.get("judges", {}).values()))
        rows.append((name, r, j))
    print("\npolicy  prompts  proxy win rate        judge win rate        KL (nats)")
    for name, r, j in rows:
        print(f"{name:<7} {r['n_prompts']:>7}  {r['win_rate']:.3f} ± {r['win_rate_stderr']:.3f}         "
              f"{j['win_rate']:.3f} ± {j['win_rate_stderr']:.3f}         {r['kl']:.3f}")
    ppo_run = out / "ppo.json"
    if "ppo" in policies and ppo_run.is_file():
        seconds = json.loads(ppo_run.read_text())["_seconds"]
        _, r, j = next(row for row in rows if row[0] == "ppo")
        met = j["win_rate"] >= TARGET_WIN_RATE and r["kl"] < TARGET_KL and seconds < TARGET_SECONDS
        print(f"\nppo ({args.ppo_config.name}): {seconds / 60:.1f} min of `rlhf ppo`; judge win rate {j['win_rate']:.3f} on "
              f"{r['n_prompts']} held-out prompts at KL {r['kl']:.2f} (first-tour target: >= {TARGET_WIN_RATE} at KL < "
              f"{TARGET_KL:g} in under {TARGET_SECONDS / 60:.0f} min: {'met' if met else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
