"""Policy commands around PPO: supervised fine-tuning, evaluation against a reference, and
generation of new items for the next round of annotation.

    rlhf sft --data instructions.jsonl --output runs/sft-1 [--base PATH] [--lora] [--epochs 1] [--json]
    rlhf sft --project demo --output runs/sft-demo          # on the chosen responses of a project
    rlhf eval-policy --policy runs/ppo-1/policy --reference data/models/SmolLM2-135M-Instruct \\
        --reward-model runs/rm-1 --prompts heldout.jsonl [--n 100] [--judge runs/rm-2 ...] [--json]
    rlhf generate --policy runs/ppo-1/policy [--policy-b runs/sft-1] --prompts prompts.jsonl --project round-2
    rlhf dpo --data pairs.jsonl --output runs/dpo-1 [--base runs/sft-1] [--lora] [--beta 0.1] [--loss-type sigmoid]
    rlhf grpo --reward-model runs/rm-1 --prompts prompts.jsonl --output runs/grpo-1 [--policy runs/sft-1] [--steps 100]
    rlhf rloo --reward-model runs/rm-1 --prompts-project demo --output runs/rloo-1 [--lora]

--policy, --policy-b, --reward-model and --judge also take a registered model's id or name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from app.cli import JsonOpt, cli, emit, engine
from app.options import spec_options
from ppo.usecases import DPOSpec, EvalPolicySpec, GenerateSpec, GRPOSpec, RLOOSpec, SFTSpec

# Options and their defaults and help come from the use cases' specs (ppo.usecases, which imports no
# torch, so `rlhf --help` stays fast); the options below are the commands' own.
OutputOpt = typer.Option(..., "--output", "-o", help="Model directory to create; must not exist or be empty.")
NameOpt = typer.Option(None, "--name", help="Registry name (default: the output directory's name).")
RegisterOpt = typer.Option(True, "--register/--no-register", help="Record the policy in the registry when training has finished.")
TRAINER_OPTIONS = ("learning_rate", "batch_size", "gradient_accumulation_steps", "lora", "lora_r", "lora_alpha", "lora_dropout",
                   "seed", "precision", "report_to")
"""ppo.options.TrainerOptions' fields that sft, dpo, grpo and rloo take (each with its trainer's default)."""
TRAINING_DATA = ("data", "project", "aggregation", "base")
FLAGS = {"learning_rate": ("--lr", "--learning-rate"), "judges": ("--judge",)}


def _progress(as_json: bool):
    if as_json:
        return None
    return lambda fraction, message: typer.echo(f"[{fraction:4.0%}] {message}", err=True)


def _store_for(*models: Optional[str], needed: bool = False):
    """The store's engine when the command needs one: `needed`, or a model given by registered id or name (not a path)."""
    return engine() if needed or any(m and not Path(str(m)).exists() for m in models) else None


def _run_context(output_dir: Path, eng, what: str, *, logs: bool, progress: bool):
    """The RunContext of a command: the run's log lines (`logs`) and progress (`progress`) on the terminal, or neither."""
    import logging

    from annotation.runs import RunContext
    from app.settings import get_settings

    if logs:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx = RunContext(output_dir=output_dir, engine=eng, settings=get_settings(), log=logging.getLogger(f"rlhf.{what}"))
    if progress:
        ctx.progress = _progress(False)
    return ctx


def _train(spec_cls, what: str, options: dict, output: str, name: Optional[str], register: bool, as_json: bool, *,
           progress: bool = False) -> dict | None:
    """Build the trainer's spec from the command's options (the registry name refused now, not after
    training), run its use case (ppo.usecases.<what>) into --output and register the policy once
    training has finished; the payload to print, or None on the other processes under accelerate
    launch (the first one reports). The store is opened only when something needs it."""
    from annotation.names import registry_name
    from annotation.runs import register_result
    from ppo import usecases
    from reward.train import main_process

    spec = spec_cls(**options, name=registry_name(name, Path(output).name) if register else name).validate()
    eng = _store_for(getattr(spec, "policy", None), getattr(spec, "reward_model", None),
                     needed=register or bool(spec.source().get("project")))
    ctx = _run_context(Path(output), eng, what, logs=not as_json, progress=progress and not as_json)
    result = getattr(usecases, what)(spec, ctx)
    if not main_process():
        return None
    model_id = register_result(eng, result)[0] if register else None
    return {"model_id": model_id, "path": str(output), **result.extra, "metrics": result.metrics}


def _trained(payload: dict) -> str:
    return f"policy trained: {payload['path']}" + (f" (model id {payload['model_id']})" if payload["model_id"] else "")


@cli.command()
@spec_options(SFTSpec, *TRAINING_DATA, "epochs", "max_steps", "max_length", *TRAINER_OPTIONS, flags=FLAGS)
def sft(output: str = OutputOpt, name: Optional[str] = NameOpt, register: bool = RegisterOpt, as_json: bool = JsonOpt,
        **options) -> None:
    """Supervised fine-tuning (TRL SFTTrainer) with the chat template; the result is registered as a policy."""
    p = _train(SFTSpec, "sft", options, output, name, register, as_json)
    if p is not None:
        m = p["metrics"]
        emit(p, as_json, f"{_trained(p)}\n{p['rows']} rows, {m['steps']} steps, "
             f"loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, {m['runtime_s']:.0f} s")


@cli.command("eval-policy")
@spec_options(EvalPolicySpec, "policy", "reference", "reward_model", "prompts", "prompts_project", "n", "max_new_tokens",
              "max_prompt_length", "temperature", "seed", "batch_size", "samples", "judges", flags=FLAGS,
              required=("policy", "reward_model"))
def eval_policy(as_json: bool = JsonOpt, **options) -> None:
    """Win rate of a policy over its reference as judged by a reward model (and by each --judge), both mean rewards,
    KL to the reference; `self_judged` marks a verdict by the reward model the policy was trained on."""
    import tempfile

    from ppo.evaluate import format_report
    from ppo.usecases import eval_policy as eval_policy_usecase

    spec = EvalPolicySpec(**options).validate()
    # The registry is opened where it is already in use: registered models, a project's prompts, or judges.
    eng = _store_for(spec.policy, spec.reward_model, *spec.judges, needed=bool(spec.prompts_project or spec.judges))
    with tempfile.TemporaryDirectory(prefix="rlhf-eval-policy-") as tmp:
        result = eval_policy_usecase(spec, _run_context(Path(tmp), eng, "eval_policy", logs=False, progress=not as_json))
    emit(result.metrics, as_json, format_report(result.metrics))


@cli.command()
@spec_options(GenerateSpec, "policy", "policy_b", "prompts", "prompts_project", "project", "n", "max_new_tokens", "temperature",
              "seed", "batch_size", required=("policy", "project"))
def generate(as_json: bool = JsonOpt, **options) -> None:
    """Two sampled responses per prompt become new items of a project, for the next round of annotation."""
    import tempfile

    from ppo.usecases import generate as generate_usecase

    from app.jobs import queue_rescore

    spec = GenerateSpec(**options).validate()
    eng = engine()
    with tempfile.TemporaryDirectory(prefix="rlhf-generate-") as tmp:
        result = generate_usecase(spec, _run_context(Path(tmp), eng, "generate", logs=False, progress=not as_json))
    r = dict(result.metrics)
    r["score_job"] = queue_rescore(eng, spec.project) if r.get("items_added") else None  # as the generate job does
    emit(r, as_json, f"{r['items_added']} new items in project '{spec.project}' from {r['prompts']} prompts "
         f"({r['source_a']} vs {r['source_b']}); {r['duplicates']} already there, "
         f"{r['identical']} with identical responses, {r['empty_response']} with an empty response left out"
         + (f"\nqueued job {r['score_job']} to score the new items (uncertainty selection)" if r["score_job"] else ""))


# --------------------------------------------------------------------------- dpo, grpo, rloo (TRL trainers)


@cli.command()
@spec_options(DPOSpec, *TRAINING_DATA, "beta", "loss_type", "label_smoothing", "epochs", "max_steps", "max_length",
              *TRAINER_OPTIONS, flags=FLAGS)
def dpo(output: str = OutputOpt, name: Optional[str] = NameOpt, register: bool = RegisterOpt, as_json: bool = JsonOpt,
        **options) -> None:
    """DPO (TRL DPOTrainer) on preference pairs; the result is registered as a policy with its data lineage."""
    p = _train(DPOSpec, "dpo", options, output, name, register, as_json)
    if p is not None:
        m = p["metrics"]
        emit(p, as_json, f"{_trained(p)}\n{p['rows']} pairs, {m['steps']} steps, "
             f"loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, "
             f"reward margin {m['first_reward_margin']:.3f} -> {m['final_reward_margin']:.3f}, "
             f"accuracy {m['final_reward_accuracy']:.2f}, {m['runtime_s']:.0f} s")


def _online_command(algorithm: str):
    """`rlhf grpo` and `rlhf rloo`: one set of options (GRPOSpec's; RLOOSpec's are the same), two TRL trainers."""
    S = GRPOSpec if algorithm == "grpo" else RLOOSpec

    @spec_options(S, "reward_model", "prompts", "prompts_project", "n_prompts", "policy", "steps", "num_generations",
                  "max_completion_length", "temperature", "beta", "loss_type", "ensemble_spread_coef", *TRAINER_OPTIONS,
                  "use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_gpu_memory_utilization", flags=FLAGS,
                  required=("reward_model",))
    def command(output: str = OutputOpt, name: Optional[str] = NameOpt, register: bool = RegisterOpt, as_json: bool = JsonOpt,
                **options) -> None:
        p = _train(S, algorithm, options, output, name, register, as_json, progress=True)
        if p is not None:
            m = p["metrics"]
            emit(p, as_json, f"{_trained(p)}\n{p['rows']} prompts, {m['steps']} steps, mean reward "
                 f"{m['reward_first_quarter']:.3f} (first quarter) -> {m['reward_last_quarter']:.3f} (last quarter), "
                 f"{m['runtime_s']:.0f} s")

    command.__name__ = algorithm
    return command


cli.command("grpo", help="GRPO (TRL GRPOTrainer) on one of our reward models: completions scored against their "
                         "prompt's group; the result is registered as a policy.")(_online_command("grpo"))
cli.command("rloo", help="RLOO (TRL RLOOTrainer) on one of our reward models: each completion's baseline is its "
                         "siblings' mean reward; the result is registered as a policy.")(_online_command("rloo"))
