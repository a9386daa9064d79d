"""Policy commands around PPO: supervised fine-tuning, evaluation against a reference, and
generation of new items for the next round of annotation.

    rlhf sft --data instructions.jsonl --output runs/sft-1 [--base PATH] [--lora] [--epochs 1] [--json]
    rlhf sft --project demo --output runs/sft-demo          # on the chosen responses of a project
    rlhf eval-policy --policy runs/ppo-1/policy --reference data/models/SmolLM2-135M-Instruct \\
        --reward-model runs/rm-1 --prompts heldout.jsonl [--n 100] [--judge runs/rm-2 ...] [--json]
    rlhf generate --policy runs/ppo-1/policy [--policy-b runs/sft-1] --prompts prompts.jsonl --project round-2

--policy, --policy-b, --reward-model and --judge also take a registered model's id or name.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from app.cli import JsonOpt, cli, emit, engine
from ppo.errors import PPOError
from reward.precision import HELP as PRECISION_HELP

TemperatureOpt = typer.Option(0.7, "--temperature", help="Sampling temperature (PPO's default).")
MaxNewTokensOpt = typer.Option(53, "--max-new-tokens", help="Longest response in tokens (PPO's default).")
SeedOpt = typer.Option(0, "--seed", help="Sampling seed; the same seed gives the same responses.")
BatchSizeOpt = typer.Option(8, "--batch-size", help="Prompts per generation batch.")
MaxPromptLengthOpt = typer.Option(256, "--max-prompt-length", help="Prompt tokens kept, the end of longer ones (PPO's default).")
# The defaults above repeat PPOConfig's (importing it here would load torch for `rlhf --help`);
# tests/test_ppo_cli.py checks that they agree.


def _reward_model_path(value: str, option: str = "--reward-model") -> str:
    if Path(value).is_dir():
        return value
    from annotation.registry import get_model
    from annotation.store import transaction

    with transaction(engine()) as session:
        row = get_model(session, value)
        if row.kind != "reward":
            raise PPOError(f"{option} {value}: registered model {row.id} is a {row.kind} model, not a reward model")
        return row.path


def _prompts(prompts: Optional[str], prompts_project: Optional[str], n: Optional[int]) -> list:
    from ppo.prompts import project_prompts, read_prompts

    if bool(prompts) == bool(prompts_project):
        raise PPOError("give exactly one of --prompts FILE or --prompts-project NAME")
    if n is not None and n < 1:
        raise PPOError(f"--n {n}: expected a number of prompts >= 1")
    return read_prompts(prompts, n) if prompts else project_prompts(engine(), prompts_project, n)


def _progress(as_json: bool):
    if as_json:
        return None
    return lambda fraction, message: typer.echo(f"[{fraction:4.0%}] {message}", err=True)


@cli.command()
def sft(
    data: Optional[str] = typer.Option(None, "--data", help='Instruction JSONL: "messages", "prompt"+"completion" or "text" rows.'),
    project: Optional[str] = typer.Option(None, "--project", help="Train on the chosen responses of a project's aggregated pairs."),
    output: str = typer.Option(..., "--output", "-o", help="Run directory to create; must not exist or be empty."),
    base: Optional[str] = typer.Option(None, "--base", help="Base policy: a model directory or hub id (default: the fetched SmolLM2-135M-Instruct)."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (merged into the saved model) instead of all weights."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the rows."),
    max_steps: int = typer.Option(-1, "--max-steps", help="Stop after this many optimizer steps (-1: all epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 2e-5, or 1e-4 with --lora)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Rows per forward pass."),
    max_length: int = typer.Option(512, "--max-length", help="Tokens per row after the chat template."),
    aggregation: str = typer.Option("majority", "--aggregation", help="Label aggregation for --project: majority or dawid-skene."),
    seed: int = typer.Option(0, "--seed", help="Seed for data order and adapter initialisation."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the output directory's name)."),
    register: bool = typer.Option(True, "--register/--no-register", help="Record the policy in the registry when training has finished."),
    as_json: bool = JsonOpt,
) -> None:
    """Supervised fine-tuning (TRL SFTTrainer) with the chat template; the result is registered as a policy."""
    import logging

    from annotation.registry import register_model
    from annotation.store import transaction
    from app.settings import get_settings
    from ppo.jobs import project_id_of, registered_policy_id, sft_rows
    from ppo.sft import SFTOptions, resolve_base, train_sft

    from annotation.names import registry_name

    if register:
        name = registry_name(name, Path(output).name)  # refused now, not after training
    options = SFTOptions(epochs=epochs, max_steps=max_steps, learning_rate=lr if lr is not None else (1e-4 if lora else 2e-5),
                         batch_size=batch_size, max_length=max_length, lora=lora, seed=seed,
                         precision=precision).validate()
    base_path = resolve_base(base, get_settings().model_dir)
    eng = engine() if (project or register) else None
    rows = sft_rows(eng, data, project, aggregation)
    log = logging.getLogger("rlhf.sft")
    if not as_json:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train_sft(rows, output, base=base_path, options=options, log=log.info)
    model_id = None
    if register:
        # Registered only now, after the model directory is complete.
        row = result.registration(name=name or Path(output).name, project_id=project_id_of(eng, project),
                                  parent_id=registered_policy_id(eng, base_path))
        row["path"] = str(Path(output).resolve())
        row["params"] = {**row["params"], "source": {"project": project} if project else {"data": str(data)}}
        with transaction(eng) as session:
            model_id = register_model(session, **row).id
    m = result.metrics
    payload = {"model_id": model_id, "path": str(output), "base_model": base_path, "rows": result.rows,
               "data_hash": result.data_hash, "metrics": m}
    emit(payload, as_json, f"policy trained: {output}" + (f" (model id {model_id})" if model_id else "")
         + f"\n{result.rows} rows, {m['steps']} steps, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, {m['runtime_s']:.0f} s")


@cli.command("eval-policy")
def eval_policy(
    policy: str = typer.Option(..., "--policy", help="Policy to evaluate: a model directory or a registered policy's id or name."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference policy (default: the fetched SmolLM2-135M-Instruct)."),
    reward_model: str = typer.Option(..., "--reward-model", help="Reward model run directory (or registered id/name) that judges."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="JSONL of prompts (any import format: only the prompts are used)."),
    prompts_project: Optional[str] = typer.Option(None, "--prompts-project", help="Take the prompts of a project instead."),
    n: Optional[int] = typer.Option(None, "--n", help="Use the first N distinct prompts."),
    max_new_tokens: int = MaxNewTokensOpt,
    max_prompt_length: int = MaxPromptLengthOpt,
    temperature: float = TemperatureOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchSizeOpt,
    samples: int = typer.Option(5, "--samples", help="Sample responses shown side by side."),
    judge: Optional[List[str]] = typer.Option(None, "--judge", help="Another reward model (directory or registered id/name) whose "
                                              "win rate is shown beside --reward-model's; repeatable."),
    as_json: bool = JsonOpt,
) -> None:
    """Win rate of a policy over its reference as judged by a reward model (and by each --judge), both mean rewards,
    KL to the reference; `self_judged` marks a verdict by the reward model the policy was trained on."""
    from app.settings import get_settings
    from ppo.evaluate import SampleOptions, format_report, run_eval_policy, training_reward_model
    from ppo.generate import resolve_policy
    from ppo.sft import resolve_base

    options = SampleOptions(max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length, temperature=temperature,
                            seed=seed, batch_size=batch_size).validate()
    prompt_list = _prompts(prompts, prompts_project, n)
    policy_path, _ = resolve_policy(None if Path(policy).exists() else engine(), policy)
    reference_path = resolve_base(reference, get_settings().model_dir)
    judge_paths = [_reward_model_path(j, "--judge") for j in judge or []]
    # The run's files first; the registry only where it is already in use (a registered policy, or judges).
    trained_on = training_reward_model(policy_path) or (
        training_reward_model(policy_path, engine()) if judge_paths or not Path(policy).exists() else None)
    result = run_eval_policy(policy_path, reference_path, _reward_model_path(reward_model), prompt_list, options,
                             n_samples=samples, progress=_progress(as_json), judges=judge_paths, trained_on=trained_on)
    result.pop("rows")
    emit(result, as_json, format_report(result))


@cli.command()
def generate(
    policy: str = typer.Option(..., "--policy", help="Policy that writes the responses: a model directory or a registered policy."),
    policy_b: Optional[str] = typer.Option(None, "--policy-b", help="A second policy: one response from each instead of two from --policy."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="JSONL of prompts (any import format: only the prompts are used)."),
    prompts_project: Optional[str] = typer.Option(None, "--prompts-project", help="Take the prompts of a project instead."),
    project: str = typer.Option(..., "--project", help="Project that receives the new items (created if missing)."),
    n: Optional[int] = typer.Option(None, "--n", help="Use the first N distinct prompts."),
    max_new_tokens: int = MaxNewTokensOpt,
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature; 1.0 gives more varied pairs to compare."),
    seed: int = SeedOpt,
    batch_size: int = BatchSizeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Two sampled responses per prompt become new items of a project, for the next round of annotation."""
    from ppo.evaluate import SampleOptions
    from ppo.generate import generate_items, resolve_policy

    options = SampleOptions(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size).validate()
    eng = engine()
    prompt_list = _prompts(prompts, prompts_project, n)
    path_a, name_a = resolve_policy(eng, policy)
    path_b, name_b = resolve_policy(eng, policy_b) if policy_b else (None, None)
    result = generate_items(eng, project, prompt_list, path_a, policy_b=path_b, name=name_a, name_b=name_b, options=options,
                            progress=_progress(as_json))
    text = (f"{result['items_added']} new items in project '{project}' from {result['prompts']} prompts "
            f"({result['source_a']} vs {result['source_b']}); {result['duplicates']} already there, "
            f"{result['identical']} with identical responses, {result['empty_response']} with an empty response left out")
    emit(result, as_json, text)
