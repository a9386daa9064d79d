"""PPO benchmark: our PPO (ppo.train) against TRL 1.12's experimental PPOTrainer, same run, on this machine.

    .venv/bin/python benchmarks/ppo_bench.py [--steps 4] [--batch-size 16] [--eval-prompts 32]
        [--reward-model DIR] [--policy DIR] [--skip-trl] [--trl full|lora|both] [--ours both|full|lora]
        [--value-model separate|shared|both] [--precision fp32|bf16] [--seeds 0,1,2]

Setup, done by the script when missing (cached under benchmarks/, both gitignored):
- benchmarks/.venv-trl112: `python3.11 -m venv` + `pip install trl==1.12.* torch==2.13.0
  transformers==5.24.0 accelerate peft datasets` (TRL 1.12 needs transformers>=4.56.2; the
  project's own 5.24.0 satisfies it, so both arms run the same transformers and torch).
- benchmarks/out/rm-hh: a reward model trained by `rlhf train-rm --data <HH dev> --no-register`
  (all-MiniLM-L6-v2, train-rm's defaults; --rm-epochs overrides the epochs), unless --reward-model
  names one.

Arms, each in its own subprocess so that its peak memory (VmHWM, read after the last training
step, before any saving) is its own:
- ours-full, ours-lora: ppo.train.train on the default policy (SmolLM2-135M-Instruct from
  `rlhf models fetch`); then, on held-out prompts never used in training, ppo.evaluate's win rate
  over the reference (the untrained policy) and KL, judged by the same reward model.
- trl-full and/or trl-lora (--trl; --trl-lora is --trl both): trl.experimental.ppo.PPOTrainer,
  LoRA r 16 / alpha 32 on every linear layer as ours, same policy, reward
  model, prompts (token ids from the same chat-template encoding) and settings. TRL's PPO feeds
  the policy's token ids to the reward model, which has another tokenizer here, so the reward
  model is wrapped in a module with TRL's reward-model interface that decodes the tokens back to
  (prompt, response) text and scores it with reward.score, exactly as our PPO does. Two settings
  differ from TRL's defaults and the script says so: the pad token is <|endoftext|> (SmolLM2
  pads with <|im_end|>, its EOS, which TRL would mask out of every prompt), and the value head
  starts at zero (as ours does).

Shared settings: fixed KL coefficient (TRL 1.12 has no adaptive controller), k1 KL estimator,
no reward whitening, temperature 0.7, top_k 0 / top_p 1, 53 new tokens, gamma 1, lam 0.95,
clip 0.2, vf_coef 0.1, AdamW at --lr with linear decay, batch_size episodes per step split in
mini-batches of --mini-batch-size (one optimizer step each), --ppo-epochs epochs, no gradient
checkpointing, dropout off, and one --precision for every arm: fp32 (default), or bf16 mixed
(fp32 weights; our precision plan forced to bf16, TRL's `bf16=True` plus
ACCELERATE_MIXED_PRECISION=bf16, without which TRL 1.12's PPOTrainer silently stays fp32).
Two optimiser settings differ unless set: ours clips the gradient norm at 1.0 and uses AdamW eps
1e-5 (PPOConfig's defaults); TRL 1.12's PPO loop never clips and uses eps 1e-8. --max-grad-norm
and --adam-eps set ours (e.g. 1e6 and 1e-8 for TRL's).

With --seeds 0,1,2 every arm runs once per seed (the seed also picks the prompts) and a second
table compares learning per step: each arm's training-reward slope per step, reward gained (last
third of the steps against the first), KL at the last step and reward gained per nat, as mean ±
standard error over the seeds, and our slope minus TRL's.

Prints per arm: episodes/s, seconds per step split into generation, scoring and the rest
(rollout forwards + update), peak RSS, reward and KL at the last step; then the ratios against
the targets (throughput >= TRL's, LoRA peak memory <= 0.6x full, held-out win rate >= 0.65 at
KL < 6 nats), and the machine load, since other work shares these cores. JSON goes to
benchmarks/out/ppo_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = REPO / "benchmarks" / "out"
TRL_VENV = REPO / "benchmarks" / ".venv-trl112"
HH_DEV = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"
TRL_PACKAGES = ["trl==1.12.*", "torch==2.13.0", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0",
                "peft==0.21.2", "numpy==2.4.6"]
TARGET_WIN_RATE, TARGET_KL, TARGET_MEMORY_RATIO, TARGET_SPEEDUP = 0.65, 6.0, 0.6, 2.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="PPO steps per arm (small: 2 shared cores).")
    p.add_argument("--batch-size", type=int, default=16, help="Episodes per PPO step.")
    p.add_argument("--mini-batch-size", type=int, default=4, help="Episodes per optimizer step.")
    p.add_argument("--ppo-epochs", type=int, default=4, help="Passes over each batch.")
    p.add_argument("--lr", type=float, default=1e-5, help="Learning rate (both arms; LoRA arms use --lora-lr).")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="Learning rate of the LoRA arms.")
    p.add_argument("--kl-coef", type=float, default=0.05, help="Fixed KL coefficient.")
    p.add_argument("--max-new-tokens", type=int, default=53, help="Response length limit.")
    p.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature.")
    p.add_argument("--max-prompt-length", type=int, default=128, help="Prompt tokens kept (the end).")
    p.add_argument("--train-prompts", type=int, default=256, help="Prompts PPO samples from.")
    p.add_argument("--eval-prompts", type=int, default=32, help="Held-out prompts for the win rate (0: skip).")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="Compute precision of every arm: fp32, or bf16 mixed (autocast; fp32 weights) in both.")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="Our arms' gradient-norm clip (default: PPOConfig's 1.0; TRL 1.12's PPO loop never clips).")
    p.add_argument("--adam-eps", type=float, default=None,
                   help="Our arms' AdamW epsilon (default: PPOConfig's 1e-5; TRL's is 1e-8).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="Comma-separated seeds: run every arm once per seed and compare learning per step "
                        "(reward slope, reward gained, KL) across seeds; overrides --seed.")
    p.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default, one per core).")
    p.add_argument("--policy", default=None, help="Policy directory (default: <model_dir>/SmolLM2-135M-Instruct).")
    p.add_argument("--reward-model", default=None, help="Reward model run dir (default: train benchmarks/out/rm-hh).")
    p.add_argument("--rm-epochs", type=float, default=None,
                   help="Epochs of `rlhf train-rm` when the script trains the reward model (default: train-rm's).")
    p.add_argument("--skip-trl", action="store_true", help="Run our arms only.")
    p.add_argument("--ours", choices=("both", "full", "lora"), default="both",
                   help="Which of our arms to run (one arm alone: a long win-rate run, no memory ratio).")
    p.add_argument("--trl", choices=("full", "lora", "both"), default="full",
                   help="Which TRL arms to run: full fine-tuning, LoRA (TRL's policy adapters; its value model stays a "
                        "full copy, as TRL 1.12 builds it), or both.")
    p.add_argument("--trl-lora", action="store_true", help="Same as --trl both (kept for old commands).")
    p.add_argument("--value-model", choices=("separate", "shared", "both"), default="separate",
                   help="Our arms' value model: a second model (separate), one head on the policy (shared), or both arms.")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm in this process
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ============================================================================ helpers used by both venvs


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit_result(result: dict) -> None:
    print("BENCH-RESULT " + json.dumps(result), flush=True)


# ============================================================================ our arm (project venv)


def arm_ours(args) -> dict:
    import torch

    from ppo.evaluate import SampleOptions, evaluate_policy
    from ppo.models import load_policy
    from ppo.train import PPOConfig, train
    from reward.score import load_reward_model

    prompts = json.loads(Path(args.prompts_file).read_text())
    suffix = "-shared" if args.value_model == "shared" else ""
    out = OUT / f"run-ours-{'lora' if args.lora else 'full'}{suffix}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    config = PPOConfig(
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.ppo_epochs, learning_rate=args.lora_lr if args.lora else args.lr,
        max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        init_kl_coef=args.kl_coef, adap_kl_ctrl=False, kl_penalty="k1", lora=args.lora, samples_every=max(1, args.steps),
        tensorboard=False, save_every=0, keep_checkpoints=1, value_model=args.value_model,
        precision=args.precision,
        **{k: v for k, v in (("max_grad_norm", args.max_grad_norm), ("adam_eps", args.adam_eps)) if v is not None},
    )
    scorer = load_reward_model(args.reward_model)
    peak = {"mb": 0.0}

    def progress(fraction, message):
        peak["mb"] = peak_rss_mb()  # after each step's update; the final save comes later

    policy = load_policy(args.policy)
    t0 = time.perf_counter()
    result = train(config, policy, scorer.score, prompts["train"], out, progress=progress)
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row = summarise(("ours-lora" if args.lora else "ours-full") + suffix, history, args.batch_size,
                    gen=[h["time_generate"] for h in history], score=[h["time_score"] for h in history],
                    step=[h["time_step"] for h in history], reward=[h["reward_mean"] for h in history],
                    kl=[h["kl"] for h in history], peak=peak["mb"], wall=wall)
    if args.eval_prompts and prompts["heldout"]:
        del policy
        import gc

        gc.collect()
        options = SampleOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed + 1,
                                max_prompt_length=args.max_prompt_length, batch_size=8)
        trained = load_policy(result["policy_path"])
        reference = load_policy(args.policy)
        t1 = time.perf_counter()
        ev = evaluate_policy(trained, reference, scorer.score, prompts["heldout"], options, n_samples=3)
        row.update(eval_prompts=ev["n_prompts"], win_rate=ev["win_rate"], win_rate_stderr=ev["win_rate_stderr"],
                   eval_reward_policy=ev["reward_policy"], eval_reward_reference=ev["reward_reference"], eval_kl=ev["kl"],
                   eval_seconds=time.perf_counter() - t1, eval_samples=ev["samples"])
    row["threads"] = torch.get_num_threads()
    return row


def summarise(name, history, batch_size, *, gen, score, step, reward, kl, peak, wall) -> dict:
    """Per-arm figures. The first step carries one-off costs (allocations, lazy init), so the
    per-step times and episodes/s leave it out when there is more than one step."""
    skip = 1 if len(step) > 1 else 0
    n = len(step) - skip
    avg = lambda xs: sum(xs[skip:]) / n  # noqa: E731
    return {
        "arm": name, "steps": len(step), "episodes_per_s": batch_size * n / sum(step[skip:]),
        "s_per_step": avg(step), "s_generate": avg(gen), "s_score": avg(score),
        "s_rest": avg(step) - avg(gen) - avg(score), "peak_rss_mb": peak,
        "reward_first": reward[0], "reward_last": reward[-1], "kl_last": kl[-1], "train_wall_s": wall,
        "reward_curve": list(reward), "kl_curve": list(kl),
    }


# ============================================================================ TRL arm (benchmarks/.venv-trl112)


def arm_trl(args) -> dict:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    import trl
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer

    from ppo.rollout import encode_prompts
    from reward.score import load_reward_model

    assert trl.__version__.startswith("1.12"), trl.__version__
    prompts = json.loads(Path(args.prompts_file).read_text())["train"]
    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    tok.pad_token = "<|endoftext|>"  # SmolLM2 pads with its EOS; TRL treats every pad id as padding
    rows = encode_prompts(tok, prompts, args.max_prompt_length)
    by_ids = {tuple(r): p for r, p in zip(rows, prompts)}
    lengths = sorted({len(r) for r in rows})
    timers = {"generate": 0.0, "score": 0.0}
    scorer = load_reward_model(args.reward_model)

    class _TextRewardBackbone(nn.Module):
        """Policy token ids -> (prompt, response) text -> our reward model's score at every position."""

        def forward(self, input_ids, attention_mask, **_):
            t0 = time.perf_counter()
            found, texts = [], []
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                real = [i for i, m in zip(ids, mask) if m]
                n = next(n for n in lengths if tuple(real[:n]) in by_ids)
                found.append(by_ids[tuple(real[:n])])
                texts.append(tok.decode(real[n:], skip_special_tokens=True))
            scores = scorer.score(found, texts).to(input_ids.device)
            timers["score"] += time.perf_counter() - t0
            hidden = scores[:, None, None].expand(input_ids.shape[0], input_ids.shape[1], 1)
            return type("Out", (), {"hidden_states": (hidden,)})()

    class TextRewardModel(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = _TextRewardBackbone()
            self.score = nn.Identity()

    original_generation = trl_ppo.batch_generation

    def timed_generation(*a, **k):
        t0 = time.perf_counter()
        try:
            return original_generation(*a, **k)
        finally:
            timers["generate"] += time.perf_counter() - t0

    trl_ppo.batch_generation = timed_generation

    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    policy.generation_config.pad_token_id = tok.pad_token_id
    ref = None if args.lora else AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.policy, num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tok.pad_token_id
    nn.init.zeros_(value.score.weight)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({"input_ids": rows})
    out = OUT / f"run-trl-{'lora' if args.lora else 'full'}"
    config = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=args.batch_size // args.mini_batch_size, local_rollout_forward_batch_size=args.batch_size,
        total_episodes=args.steps * args.batch_size, num_ppo_epochs=args.ppo_epochs,
        learning_rate=args.lora_lr if args.lora else args.lr, response_length=args.max_new_tokens,
        temperature=args.temperature, kl_coef=args.kl_coef, kl_estimator="k1", stop_token="eos", missing_eos_penalty=None,
        whiten_rewards=False, bf16=args.precision == "bf16", fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, num_sample_generations=0, seed=args.seed, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if args.precision == "bf16":
        # TRL 1.12's PPOTrainer builds its Accelerator without a mixed_precision argument, and
        # transformers 5 no longer exports `bf16=True` to accelerate: without this the arm runs fp32.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    marks, collected, peak = [], [], {"mb": 0.0}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append((time.perf_counter(), dict(timers)))

        def on_step_end(self, *a, **k):
            marks.append((time.perf_counter(), dict(timers)))
            peak["mb"] = peak_rss_mb()

        def on_log(self, args_, state, control, logs=None, **k):
            if logs:
                collected.append(dict(logs))

    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=TextRewardModel(),
                         train_dataset=dataset, value_model=value, eval_dataset=dataset.select(range(args.batch_size)),
                         peft_config=peft_config, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    step = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    gen = [b[1]["generate"] - a[1]["generate"] for a, b in zip(marks, marks[1:])]
    score = [b[1]["score"] - a[1]["score"] for a, b in zip(marks, marks[1:])]
    metrics = [entry for entry in collected if "objective/scores" in entry]
    row = summarise("trl-lora" if args.lora else "trl-full", metrics, args.batch_size, gen=gen, score=score, step=step,
                    reward=[m["objective/scores"] for m in metrics], kl=[m["objective/kl"] for m in metrics],
                    peak=peak["mb"], wall=wall)
    row["threads"] = torch.get_num_threads()
    row["trl_version"] = trl.__version__
    return row


# ============================================================================ orchestration (project venv)


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    probe = [str(python), "-c", "import trl, sys; sys.exit(0 if trl.__version__.startswith('1.12') else 1)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"setting up {TRL_VENV} (pip install {' '.join(TRL_PACKAGES)}) ...", flush=True)
    subprocess.run(["python3.11", "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    return python


def ensure_reward_model(args) -> str:
    if args.reward_model:
        return args.reward_model
    rm = OUT / "rm-hh"
    if (rm / "config.json").exists():
        return str(rm)
    epochs = ["--epochs", str(args.rm_epochs)] if args.rm_epochs else []
    print(f"training the reward model: rlhf train-rm --data {HH_DEV} {' '.join(epochs)} -> {rm}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "app.cli", "train-rm", "--data", str(HH_DEV), "--output", str(rm), *epochs,
                    "--no-register", "--json"], check=True, cwd=REPO)
    print(f"reward model trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return str(rm)


def write_prompts(args) -> Path:
    """Train and held-out prompts from the HH dev file, disjoint, in a seeded order.

    Also writes them as prompt JSONL for the CLI: prompts-train.jsonl (what PPO samples from, for
    `rlhf ppo --resume` to continue an arm's run) and prompts-heldout.jsonl (every other prompt;
    its first --eval-prompts are the bench's held-out set, `rlhf eval-policy --n N` takes more)."""
    from ppo.prompts import read_prompts

    prompts = read_prompts(HH_DEV)
    random.Random(args.seed).shuffle(prompts)
    cut = args.eval_prompts + args.train_prompts
    heldout, train = prompts[: args.eval_prompts], prompts[args.eval_prompts: cut]
    for name, rows in (("train", train), ("heldout", heldout + prompts[cut:])):
        with open(OUT / f"prompts-{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"prompt": p}) + "\n" for p in rows)
    path = OUT / "prompts.json"
    path.write_text(json.dumps({"train": train, "heldout": heldout}), encoding="utf-8")
    return path


def run_arm(python: Path, arm: str, lora: bool, argv: list[str], prompts: Path, policy: str, rm: str,
            value_model: str = "separate") -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), *argv, "--arm", arm, "--prompts-file", str(prompts),
           "--policy", policy, "--reward-model", rm] + (["--lora"] if lora else [])
    if arm == "ours":
        cmd += ["--value-model", value_model]
    name = f"{arm}-{'lora' if lora else 'full'}" + ("-shared" if value_model == "shared" else "")
    print(f"--- {name} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        print(f"{name} failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"arm": name, "error": tail}
    row = json.loads(lines[-1][len("BENCH-RESULT "):])
    print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
    return row


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against the step number 1..n."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n + 1) / 2, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(range(1, n + 1), ys)) / sum((x - mx) ** 2 for x in range(1, n + 1))


# --ours / --trl: which arms run, as their LoRA settings.
LORA_CHOICES = {"both": (False, True), "full": (False,), "lora": (True,)}
OURS_ARMS = ("ours-full", "ours-full-shared", "ours-lora", "ours-lora-shared")


def trl_peer(ours: str) -> str:
    """The TRL arm an arm of ours is compared with: LoRA with LoRA, full fine-tuning with full."""
    return "trl-lora" if ours.startswith("ours-lora") else "trl-full"


def rows_by_arm(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows that ran, grouped by arm (one row per seed), in the order the arms ran."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            by.setdefault(r["arm"], []).append(r)
    return by


def learning_report(rows: list[dict]) -> str:
    """Learning per step, arm by arm, over seeds: the training reward's slope per step, the reward
    gained (mean of the last third of the steps minus the first third), the KL from the reference
    at the last step, and the reward gained per nat of KL; mean ± standard error over seeds. The
    per-step reward is a batch mean over fresh prompts, so the slope over many steps (not the
    last step) is the figure; the ratio against TRL compares slopes."""
    import statistics

    def mean_se(xs):
        return statistics.fmean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))

    by = {arm: kept for arm, group in rows_by_arm(rows).items()
          if (kept := [r for r in group if len(r.get("reward_curve", [])) >= 3])}
    lines = [f"{'arm':<17} {'seeds':>5} {'reward slope/step':>22} {'reward gained':>18} {'KL last':>16} {'gained per nat':>16}"]
    summary = {}
    for arm, group in by.items():
        slopes = [slope(r["reward_curve"]) for r in group]
        gained = []
        for r in group:
            c, k = r["reward_curve"], max(1, len(r["reward_curve"]) // 3)
            gained.append(sum(c[-k:]) / k - sum(c[:k]) / k)
        kls = [r["kl_curve"][-1] for r in group]
        per_nat = [g / k if k > 0 else float("nan") for g, k in zip(gained, kls)]
        summary[arm] = s, se = mean_se(slopes)
        (g, gse), (kl, kse), (pn, pse) = mean_se(gained), mean_se(kls), mean_se(per_nat)
        lines.append(f"{arm:<17} {len(group):5d} {s:+10.4f} ± {se:.4f}   {g:+8.3f} ± {gse:.3f}   {kl:7.3f} ± {kse:.3f}   "
                     f"{pn:+7.3f} ± {pse:.3f}")
    for ours in OURS_ARMS:
        trl_arm = trl_peer(ours)
        if ours in summary and trl_arm in summary:
            (a, ase), (b, bse) = summary[ours], summary[trl_arm]
            diff_se = (ase ** 2 + bse ** 2) ** 0.5
            verdict = "at least as fast" if a >= b else ("slower, within noise" if b - a <= 2 * diff_se else "slower")
            lines.append(f"reward slope {ours} - {trl_arm}: {a - b:+.4f} ± {diff_se:.4f} per step ({verdict})")
    return "\n".join(lines)


def report(rows: list[dict], load: tuple) -> str:
    ok = [r for r in rows if "error" not in r]
    head = f"{'arm':<17} {'eps/s':>7} {'s/step':>7} {'gen':>6} {'score':>6} {'rest':>6} {'peak MiB':>9} {'reward 1st->last':>18} {'KL last':>8}"
    lines = [head]
    for r in ok:
        label = r["arm"] + (f" s{r['seed']}" if "seed" in r else "")
        lines.append(f"{label:<17} {r['episodes_per_s']:7.3f} {r['s_per_step']:7.1f} {r['s_generate']:6.1f} {r['s_score']:6.2f} "
                     f"{r['s_rest']:6.1f} {r['peak_rss_mb']:9.0f} {r['reward_first']:8.3f} -> {r['reward_last']:6.3f} {r['kl_last']:8.3f}")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['arm']:<10} FAILED (see above)")
    # With several seeds: an arm's mean episodes/s and its highest peak over its runs.
    by = {arm: dict(group[-1], episodes_per_s=sum(x["episodes_per_s"] for x in group) / len(group),
                    peak_rss_mb=max(x["peak_rss_mb"] for x in group))
          for arm, group in rows_by_arm(rows).items()}
    lines.append("")
    for ours in OURS_ARMS:
        trl_arm = trl_peer(ours)
        if ours in by and trl_arm in by:
            ratio = by[ours]["episodes_per_s"] / by[trl_arm]["episodes_per_s"]
            lines.append(f"throughput {ours}/{trl_arm}: {ratio:.2f}x  (target >= {TARGET_SPEEDUP}: "
                         f"{'met' if ratio >= TARGET_SPEEDUP else 'NOT met'})")
    if "ours-full" in by and "ours-lora" in by:
        mem = by["ours-lora"]["peak_rss_mb"] / by["ours-full"]["peak_rss_mb"]
        lines.append(f"peak memory LoRA/full (ours): {mem:.2f}x  (target <= {TARGET_MEMORY_RATIO}: {'met' if mem <= TARGET_MEMORY_RATIO else 'NOT met'})")
    for name in ("full", "lora"):
        a, b = by.get(f"ours-{name}"), by.get(f"ours-{name}-shared")
        if a and b:
            lines.append(f"shared value head vs separate value model ({name}): {b['episodes_per_s'] / a['episodes_per_s']:.2f}x "
                         f"episodes/s, peak memory {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x; reward first -> last "
                         f"{a['reward_first']:.3f} -> {a['reward_last']:.3f} (separate), {b['reward_first']:.3f} -> "
                         f"{b['reward_last']:.3f} (shared)")
    for name in ("ours-full", "ours-lora", "ours-full-shared", "ours-lora-shared"):
        r = by.get(name, {})
        if "win_rate" in r:
            met = r["win_rate"] >= TARGET_WIN_RATE and r["eval_kl"] < TARGET_KL
            lines.append(f"{name}: held-out win rate {r['win_rate']:.3f} ± {r['win_rate_stderr']:.3f} over the reference on "
                         f"{r['eval_prompts']} prompts at KL {r['eval_kl']:.2f} nats; reward {r['eval_reward_reference']:.3f} -> "
                         f"{r['eval_reward_policy']:.3f} (target >= {TARGET_WIN_RATE} at KL < {TARGET_KL}: {'met' if met else 'NOT met'})")
    lines.append(f"load average (1, 5, 15 min) at start {load[0]}, at end {tuple(round(x, 2) for x in os.getloadavg())}; "
                 f"{os.cpu_count()} cores shared with other work")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.arm and args.threads:
        import torch

        # On an oversubscribed machine a second OpenMP thread mostly spins; the same count for every arm.
        torch.set_num_threads(args.threads)
    if args.arm == "ours":
        emit_result(arm_ours(args))
        return
    if args.arm == "trl":
        emit_result(arm_trl(args))
        return

    from app.settings import get_settings

    OUT.mkdir(parents=True, exist_ok=True)
    load = tuple(round(x, 2) for x in os.getloadavg())
    policy = args.policy or str(get_settings().model_dir / "SmolLM2-135M-Instruct")
    if not (Path(policy) / "config.json").exists():
        sys.exit(f"no policy at {policy}: run `rlhf models fetch` or pass --policy")
    rm = ensure_reward_model(args)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    rows = []
    for seed in seeds:
        args.seed = seed
        rows += [dict(row, seed=seed) for row in run_all_arms(args, policy, rm)]
    text = report(rows, load)
    if len(seeds) > 1:
        text += "\n\n" + learning_report(rows)
    print("\n" + text)
    settings = {k: v for k, v in vars(args).items() if k not in ("arm", "lora", "prompts_file")}
    (OUT / "ppo_bench.json").write_text(json.dumps({"settings": {**settings, "seeds": seeds, "policy": policy, "reward_model": rm},
                                                    "arms": rows, "report": text}, indent=2, default=str))


def run_all_arms(args, policy: str, rm: str) -> list[dict]:
    """Every arm the options ask for, once, at args.seed (which also picks the prompts)."""
    prompts = write_prompts(args)
    shared = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--mini-batch-size", str(args.mini_batch_size),
              "--ppo-epochs", str(args.ppo_epochs), "--lr", str(args.lr), "--lora-lr", str(args.lora_lr),
              "--kl-coef", str(args.kl_coef), "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
              "--max-prompt-length", str(args.max_prompt_length), "--eval-prompts", str(args.eval_prompts), "--seed", str(args.seed),
              "--threads", str(args.threads), "--precision", args.precision]
    shared += [x for k, v in (("--max-grad-norm", args.max_grad_norm), ("--adam-eps", args.adam_eps)) if v is not None
               for x in (k, str(v))]
    values = ("separate", "shared") if args.value_model == "both" else (args.value_model,)
    rows = [run_arm(Path(sys.executable), "ours", lora, shared, prompts, policy, rm, value)
            for lora in LORA_CHOICES[args.ours] for value in values]
    if not args.skip_trl:
        trl_python = ensure_trl_venv()
        trl = "both" if args.trl_lora else args.trl
        for lora in LORA_CHOICES[trl]:
            rows.append(run_arm(trl_python, "trl", lora, shared, prompts, policy, rm))
    return rows


if __name__ == "__main__":
    main()
