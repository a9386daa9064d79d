"""Reward-model benchmark: our default MiniLM reward model vs. a plain TRL RewardTrainer script, same run.

    .venv/bin/python benchmarks/rm_bench.py [--data ../shared/data/hh-rlhf-harmless/dev.jsonl]
        [--base /path/to/all-MiniLM-L6-v2] [--plain-steps 12] [--held-out 0.2]

Both arms train all-MiniLM-L6-v2 (default: settings.model_dir/all-MiniLM-L6-v2, i.e. after
`rlhf models fetch`) on the same training split of the HH-RLHF harmless dev pairs; each arm runs in
its own subprocess so that its peak memory (max RSS) is its own.

- ours: reward.train with its default TrainParams (fp32 and no checkpointing on a CPU without
  native bf16, every core, left truncation to 256 tokens, dynamic padding grouped by length), then
  held-out accuracy, log-loss and ECE with reward.evaluate.
- probe (--arm probe): no fine-tuning; a logistic regression on frozen MiniLM embeddings and the
  rule "prefer the shorter response", on the same split: what the data gives without the recipe.
- plain: TRL's RewardTrainer on the standard {"prompt", "chosen", "rejected"} dataset with
  RewardConfig defaults (bf16, gradient checkpointing, max_length 1024, random batches), timed
  over --plain-steps steps. Two defaults cannot run on a BERT model and are changed, and the
  script says so: eos_token (BERT has none; TRL's EOS appending fails) and max_length=512
  (BERT has 512 positions; longer sequences would index past them).

Prints pairs/s, tokens/s (non-pad tokens, chosen + rejected), peak RSS and the throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"


def _split(args):
    from annotation.io import read_pairs
    from reward.data import split_pairs

    train, held = split_pairs(read_pairs(args.data), args.held_out)
    # --limit-* take the first N of each split (a reduced run for a busy machine; the report says so).
    return train[: args.limit_train or None], held[: args.limit_held_out or None]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def arm_ours(args) -> dict:
    from reward.train import TrainParams, train_reward_model

    train, held = _split(args)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("max_length", args.max_length),
                                   ("length_balance", args.length_balance or None), ("ensemble", args.ensemble)) if v is not None}
    params = TrainParams(base=args.base, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_reward_model(train, Path(tmp) / "run", params, eval_pairs=held)
    m = result["metrics"]
    return {"arm": "ours", "train_pairs": len(train), "held_out_pairs": len(held), "params": params.to_dict(),
            "held_out_accuracy": m["eval_accuracy"], "held_out_log_loss": m["eval_log_loss"], "held_out_ece": m["eval_ece"],
            "accuracy_chosen_shorter": m["eval"]["length_bias"]["chosen_shorter"]["accuracy"],
            "accuracy_chosen_longer": m["eval"]["length_bias"]["chosen_longer"]["accuracy"],
            "pairs_per_s": m["pairs_per_s"], "tokens_per_s": m["tokens_per_s"], "train_seconds": m["train_seconds"],
            "torch_threads": m["torch_threads"], "precision": m["compute_precision"],
            "gradient_checkpointing": m["gradient_checkpointing"], "prompt_truncated": m["prompt_truncated"],
            "first_loss": m["first_logged_loss"], "last_loss": m["last_logged_loss"], "peak_rss_mb": _peak_mb()}


def arm_probe(args) -> dict:
    """How far the data carries without fine-tuning, on the same split: a Bradley-Terry logistic
    regression on frozen MiniLM features (benchmarks/active_bench.Features: the mean-pooled
    embeddings of prompt + response and of the response alone), C picked by 5-fold cross-validation
    on the training pairs; beside it the rule "prefer the shorter response". If fine-tuning
    barely beats the frozen probe, the recipe is not what limits the accuracy."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV

    from benchmarks.active_bench import Features
    from reward.evaluate import evaluate_scores

    train, held = _split(args)
    features = Features(train + held, Path(args.base), REPO / "benchmarks" / "out" / "rm_probe_features.npz")

    def diff(pairs):
        prompts = [p.prompt for p in pairs]
        return features.of(prompts, [p.chosen for p in pairs]) - features.of(prompts, [p.rejected for p in pairs])

    x = diff(train)
    # Both orientations of every pair: the model has no intercept to learn "first is better" from.
    fit = LogisticRegressionCV(Cs=10, cv=5, fit_intercept=False, max_iter=2000).fit(
        np.concatenate([x, -x]), np.concatenate([np.ones(len(x)), np.zeros(len(x))]))
    # Scored as reward.evaluate scores a trained model (a tie counts half), the rule as a reward of -length.
    probe = evaluate_scores(diff(held) @ fit.coef_[0], np.zeros(len(held)), held)
    rule = evaluate_scores([-len(p.chosen) for p in held], [-len(p.rejected) for p in held])
    return {"arm": "probe", "train_pairs": len(train), "held_out_pairs": len(held), "C": float(fit.C_[0]),
            "held_out_accuracy": probe["accuracy"],
            "accuracy_chosen_shorter": probe["length_bias"]["chosen_shorter"]["accuracy"],
            "accuracy_chosen_longer": probe["length_bias"]["chosen_longer"]["accuracy"],
            "prefer_shorter_accuracy": rule["accuracy"], "peak_rss_mb": _peak_mb()}


def arm_plain(args) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from annotation.io import pair_text

    train, _ = _split(args)
    ds = Dataset.from_list([{"prompt": pair_text(p.prompt), "chosen": p.chosen, "rejected": p.rejected} for p in train])
    changed: dict[str, str] = {}

    def config(**overrides):
        return RewardConfig(output_dir=str(Path(args.tmp) / "plain"), per_device_train_batch_size=args.batch_size,
                            max_steps=args.plain_steps, save_strategy="no", report_to="none", disable_tqdm=True,
                            **overrides)

    tok = AutoTokenizer.from_pretrained(args.base)
    # TRL's defaults exactly, then only the changes a BERT base on a CPU forces, each recorded with its error.
    fixes = [("use_cpu", True, "bf16 needs use_cpu=True on a machine without a GPU"),
             ("eos_token", tok.sep_token, "BERT has no EOS token for TRL to append; used [SEP]")]
    overrides: dict = {}
    for _ in range(len(fixes) + 1):
        try:
            RewardTrainer(model=args.base, args=config(**overrides), train_dataset=ds.select(range(4)), processing_class=tok)
            break
        except Exception as exc:  # noqa: BLE001 - the benchmark reports whatever TRL raises
            fix = next((f for f in fixes if f[0] not in overrides), None)
            if fix is None:
                raise
            overrides[fix[0]] = fix[1]
            changed[fix[0]] = f"{fix[2]} (default failed: {type(exc).__name__}: {str(exc)[:100]})"
    overrides["max_length"] = 512
    changed["max_length"] = "1024 -> 512: BERT has 512 positions (TRL then drops longer pairs)"
    args_ = config(**overrides)
    trainer = RewardTrainer(model=args.base, args=args_, train_dataset=ds, processing_class=tok)
    kept = len(trainer.train_dataset)
    started = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - started
    pairs = args.plain_steps * args.batch_size
    tokens = trainer._total_train_tokens
    return {"arm": "plain", "train_pairs_after_filter": kept, "dropped_by_max_length": len(train) - kept,
            "steps": args.plain_steps, "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds,
            "train_seconds": seconds, "bf16": args_.bf16, "gradient_checkpointing": args_.activation_checkpointing,
            "torch_threads": __import__("torch").get_num_threads(), "changed_defaults": changed,
            "train_loss": out.training_loss, "peak_rss_mb": _peak_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--base", default=None, help="MiniLM model dir (default: settings.model_dir/all-MiniLM-L6-v2)")
    parser.add_argument("--held-out", type=float, default=0.2, help="Share of pairs held out for accuracy.")
    parser.add_argument("--plain-steps", type=int, default=12, help="Steps the plain TRL script is timed over.")
    parser.add_argument("--epochs", type=float, default=None, help="Override our default (for tuning only).")
    parser.add_argument("--lr", type=float, default=None, help="Override our default (for tuning only).")
    parser.add_argument("--max-length", type=int, default=None, help="Override our default (for tuning only).")
    parser.add_argument("--length-balance", action="store_true", help="Train on a length-balanced subsample (TrainParams.length_balance).")
    parser.add_argument("--ensemble", type=int, default=None, help="Train N members (TrainParams.ensemble).")
    parser.add_argument("--limit-train", type=int, default=0, help="Use only the first N training pairs (0: all).")
    parser.add_argument("--limit-held-out", type=int, default=0, help="Evaluate on only the first N held-out pairs (0: all).")
    parser.add_argument("--arm", choices=["ours", "plain", "both", "probe"], default="both",
                        help="ours, plain (TRL's script), both (the throughput comparison) or probe (frozen features).")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()
    if args.base is None:
        from app.settings import get_settings
        from reward.train import resolve_base

        args.base = resolve_base("minilm", get_settings())
    from reward.train import TrainParams

    args.batch_size = TrainParams().batch_size
    if args.arm != "both":
        with tempfile.TemporaryDirectory() as tmp:
            args.tmp = tmp
            result = {"ours": arm_ours, "plain": arm_plain, "probe": arm_probe}[args.arm](args)
        print("RESULT " + json.dumps(result, default=float))
        if args.arm == "probe":
            gap = result["accuracy_chosen_shorter"] - result["accuracy_chosen_longer"]
            print(f"frozen-feature probe: held-out accuracy {result['held_out_accuracy']:.3f} on {result['held_out_pairs']} "
                  f"pairs (chosen shorter {result['accuracy_chosen_shorter']:.3f}, longer "
                  f"{result['accuracy_chosen_longer']:.3f}: gap {gap:.2f}); prefer-the-shorter rule "
                  f"{result['prefer_shorter_accuracy']:.3f}")
        return 0

    results = {}
    for arm in ("ours", "plain"):
        cmd = [sys.executable, __file__, "--arm", arm, "--data", args.data, "--base", args.base,
               "--held-out", str(args.held_out), "--plain-steps", str(args.plain_steps),
               "--limit-train", str(args.limit_train), "--limit-held-out", str(args.limit_held_out)]
        cmd += [x for k in ("epochs", "lr", "max_length") if getattr(args, k) is not None
                for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{arm} arm failed (exit {proc.returncode})")
        results[arm] = json.loads(line[len("RESULT "):])
        print(f"{arm}: " + json.dumps(results[arm], default=float), flush=True)
    ours, plain = results["ours"], results["plain"]
    print()
    print(f"held-out accuracy (ours, default config): {ours['held_out_accuracy']:.3f} on {ours['held_out_pairs']} pairs "
          f"(target >= 0.60); log-loss {ours['held_out_log_loss']:.3f}, ECE {ours['held_out_ece']:.3f}")
    print(f"{'':8}{'pairs/s':>10}{'tokens/s':>12}{'peak MB':>10}  setup")
    print(f"{'ours':8}{ours['pairs_per_s']:>10.2f}{ours['tokens_per_s']:>12.0f}{ours['peak_rss_mb']:>10.0f}  "
          f"{ours['precision']}, checkpointing {ours['gradient_checkpointing']}, {ours['torch_threads']} threads")
    print(f"{'plain':8}{plain['pairs_per_s']:>10.2f}{plain['tokens_per_s']:>12.0f}{plain['peak_rss_mb']:>10.0f}  "
          f"bf16 {plain['bf16']}, checkpointing {plain['gradient_checkpointing']}, {plain['torch_threads']} threads")
    print(f"throughput ratio ours/plain: {ours['pairs_per_s'] / plain['pairs_per_s']:.2f}x pairs/s, "
          f"{ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x tokens/s (target >= 1.5x)")
    print(f"plain TRL defaults changed: {json.dumps(plain['changed_defaults'])}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (shared with other work)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
