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
from typing import List, Optional

import typer

from app.cli import JsonOpt, cli, emit, engine
from ppo.errors import PPOError
from app.options import spec_option
from reward.precision import HELP as PRECISION_HELP
from reward.reporting import HELP as REPORT_HELP
from ppo.usecases import SFTSpec

TemperatureOpt = typer.Option(0.7, "--temperature", help="Sampling temperature (PPO's default).")
MaxNewTokensOpt = typer.Option(53, "--max-new-tokens", help="Longest response in tokens (PPO's default).")
SeedOpt = typer.Option(0, "--seed", help="Sampling seed; the same seed gives the same responses.")
BatchSizeOpt = typer.Option(8, "--batch-size", help="Prompts per generation batch.")
MaxPromptLengthOpt = typer.Option(256, "--max-prompt-length", help="Prompt tokens kept, the end of longer ones (PPO's default).")
# The defaults above repeat PPOConfig's (importing it here would load torch for `rlhf --help`);
# tests/test_ppo_cli.py checks that they agree.


def _reward_model_path(value: str, option: str = "--reward-model") -> str:
    """ppo.usecases.reward_model_path, opening the store only for a registered id or name."""
    from ppo.usecases import reward_model_path

    return value if Path(value).is_dir() else reward_model_path(engine(), value, option)


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
    data: Optional[str] = spec_option(SFTSpec, "data"),
    project: Optional[str] = spec_option(SFTSpec, "project"),
    output: str = typer.Option(..., "--output", "-o", help="Run directory to create; must not exist or be empty."),
    base: Optional[str] = spec_option(SFTSpec, "base"),
    lora: bool = spec_option(SFTSpec, "lora"),
    epochs: float = spec_option(SFTSpec, "epochs"),
    max_steps: int = spec_option(SFTSpec, "max_steps"),
    lr: Optional[float] = spec_option(SFTSpec, "learning_rate", "--lr"),
    batch_size: int = spec_option(SFTSpec, "batch_size"),
    max_length: int = spec_option(SFTSpec, "max_length"),
    aggregation: str = spec_option(SFTSpec, "aggregation"),
    seed: int = spec_option(SFTSpec, "seed"),
    precision: str = spec_option(SFTSpec, "precision"),
    report_to: str = spec_option(SFTSpec, "report_to"),
    lora_r: int = spec_option(SFTSpec, "lora_r"),
    lora_alpha: int = spec_option(SFTSpec, "lora_alpha"),
    lora_dropout: float = spec_option(SFTSpec, "lora_dropout"),
    gradient_accumulation_steps: int = spec_option(SFTSpec, "gradient_accumulation_steps"),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the output directory's name)."),
    register: bool = typer.Option(True, "--register/--no-register", help="Record the policy in the registry when training has finished."),
    as_json: bool = JsonOpt,
) -> None:
    """Supervised fine-tuning (TRL SFTTrainer) with the chat template; the result is registered as a policy."""
    import logging

    from annotation.names import registry_name
    from annotation.runs import RunContext, register_result
    from app.settings import get_settings
    from ppo import usecases

    spec = SFTSpec(data=data, project=project, base=base, lora=lora, epochs=epochs, max_steps=max_steps, learning_rate=lr,
                   batch_size=batch_size, max_length=max_length, aggregation=aggregation, seed=seed, precision=precision,
                   lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, report_to=report_to,
                   gradient_accumulation_steps=gradient_accumulation_steps,
                   name=registry_name(name, Path(output).name) if register else name).validate()
    eng = engine() if (project or register) else None
    log = logging.getLogger("rlhf.sft")
    if not as_json:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = usecases.sft(spec, RunContext(output_dir=Path(output), engine=eng, settings=get_settings(), log=log))
    model_id = register_result(eng, result)[0] if register else None  # only now: the model directory is complete
    m = result.metrics
    payload = {"model_id": model_id, "path": str(output), "base_model": result.extra["base_model"], "rows": result.extra["rows"],
               "data_hash": result.extra["data_hash"], "metrics": m}
    emit(payload, as_json, f"policy trained: {output}" + (f" (model id {model_id})" if model_id else "")
         + f"\n{result.extra['rows']} rows, {m['steps']} steps, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, {m['runtime_s']:.0f} s")


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


# --------------------------------------------------------------------------- dpo, grpo, rloo (TRL trainers)
# Defaults come from the options dataclasses (ppo.dpo and ppo.grpo import no torch), so they are written once.

from ppo.dpo import LOSS_TYPES as DPO_LOSS_TYPES, DPOOptions  # noqa: E402
from ppo.grpo import GRPO_LOSS_TYPES, GRPOOptions  # noqa: E402

_DPO = DPOOptions()
_ONLINE = GRPOOptions()


def _register_policy(result, eng, name: str, output: str, project: Optional[str], source: dict, base: str) -> int:
    """The models-table row of a finished TRL run, with its lineage: parent = the base's row when it is registered."""
    from annotation.registry import register_model
    from annotation.store import transaction
    from ppo.jobs import project_id_of, registered_policy_id

    row = result.registration(name=name, project_id=project_id_of(eng, project), parent_id=registered_policy_id(eng, base))
    row["path"] = str(Path(output).resolve())
    row["params"] = {**row["params"], "source": source}
    with transaction(eng) as session:
        return register_model(session, **row).id


def _log(as_json: bool, what: str):
    import logging

    if not as_json:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return logging.getLogger(f"rlhf.{what}").info


@cli.command()
def dpo(
    data: Optional[str] = typer.Option(None, "--data", help="Preference JSONL: TRL prompt/chosen/rejected (standard or conversational) or hh."),
    project: Optional[str] = typer.Option(None, "--project", help="Train on a project's aggregated pairs instead."),
    output: str = typer.Option(..., "--output", "-o", help="Model directory to create; must not exist or be empty."),
    base: Optional[str] = typer.Option(None, "--base", help="Starting policy (usually an SFT run): a model directory or hub id (default: the fetched SmolLM2-135M-Instruct)."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (merged into the saved model); the reference is the model with adapters off."),
    lora_r: int = typer.Option(_DPO.lora_r, "--lora-r", help="LoRA rank."),
    beta: float = typer.Option(_DPO.beta, "--beta", help="Pull towards the reference: higher stays closer."),
    loss_type: str = typer.Option(_DPO.loss_type, "--loss-type", help="TRL's DPO loss: " + ", ".join(DPO_LOSS_TYPES) + "."),
    label_smoothing: float = typer.Option(_DPO.label_smoothing, "--label-smoothing", help="Label-flip probability for robust, exo_pair, aot."),
    epochs: float = typer.Option(_DPO.epochs, "--epochs", help="Passes over the pairs."),
    max_steps: int = typer.Option(_DPO.max_steps, "--max-steps", help="Stop after this many optimizer steps (-1: all epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", "--learning-rate", help=f"Peak learning rate (default {_DPO.learning_rate:g}, or 1e-5 with --lora)."),
    batch_size: int = typer.Option(_DPO.batch_size, "--batch-size", help="Pairs per forward pass."),
    gradient_accumulation_steps: int = typer.Option(_DPO.gradient_accumulation_steps, "--gradient-accumulation-steps", help="Forward passes per optimizer step."),
    max_length: int = typer.Option(_DPO.max_length, "--max-length", help="Tokens per prompt + response after the chat template."),
    aggregation: str = typer.Option("majority", "--aggregation", help="Label aggregation for --project: majority or dawid-skene."),
    seed: int = typer.Option(_DPO.seed, "--seed", help="Seed for data order and adapter initialisation."),
    precision: str = typer.Option(_DPO.precision, "--precision", help=PRECISION_HELP),
    report_to: str = typer.Option("none", "--report-to", help=REPORT_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the output directory's name)."),
    register: bool = typer.Option(True, "--register/--no-register", help="Record the policy in the registry when training has finished."),
    as_json: bool = JsonOpt,
) -> None:
    """DPO (TRL DPOTrainer) on preference pairs; the result is registered as a policy with its data lineage."""
    from annotation.names import registry_name
    from app.settings import get_settings
    from ppo.dpo import train_dpo
    from ppo.jobs import dpo_pairs
    from ppo.sft import resolve_base
    from reward.train import main_process

    if register:
        name = registry_name(name, Path(output).name)  # refused now, not after training
    options = DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, epochs=epochs, max_steps=max_steps,
                         learning_rate=lr if lr is not None else (1e-5 if lora else _DPO.learning_rate), batch_size=batch_size,
                         gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length, lora=lora,
                         lora_r=lora_r, seed=seed, precision=precision, report_to=report_to).validate()
    base_path = resolve_base(base, get_settings().model_dir)
    eng = engine() if (project or register) else None
    pairs = dpo_pairs(eng, data, project, aggregation)
    result = train_dpo(pairs, output, base=base_path, options=options, log=_log(as_json, "dpo"))
    if not main_process():
        return  # under accelerate launch the first process registers and reports the run
    model_id = None
    if register:
        model_id = _register_policy(result, eng, name or Path(output).name, output, project,
                                    {"project": project} if project else {"data": str(data)}, base_path)
    m = result.metrics
    payload = {"model_id": model_id, "path": str(output), "base_model": base_path, "rows": result.rows,
               "data_hash": result.data_hash, "metrics": m}
    emit(payload, as_json, f"policy trained: {output}" + (f" (model id {model_id})" if model_id else "")
         + f"\n{result.rows} pairs, {m['steps']} steps, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, "
         f"reward margin {m['first_reward_margin']:.3f} -> {m['final_reward_margin']:.3f}, "
         f"accuracy {m['final_reward_accuracy']:.2f}, {m['runtime_s']:.0f} s")


def _online_command(algorithm: str):
    """`rlhf grpo` and `rlhf rloo`: one set of options (GRPOOptions), two TRL trainers."""

    def command(
        reward_model: str = typer.Option(..., "--reward-model", help="Reward model run directory (or registered id/name) that scores the completions."),
        prompts: Optional[str] = typer.Option(None, "--prompts", help="JSONL of prompts (any import format: only the prompts are used)."),
        prompts_project: Optional[str] = typer.Option(None, "--prompts-project", help="Take the prompts of a project instead."),
        n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="Use the first N distinct prompts."),
        output: str = typer.Option(..., "--output", "-o", help="Model directory to create; must not exist or be empty."),
        policy: Optional[str] = typer.Option(None, "--policy", help="Starting policy: a directory or registered policy (default: SmolLM2-135M-Instruct)."),
        steps: int = typer.Option(_ONLINE.steps, "--steps", help="Optimizer steps."),
        num_generations: int = typer.Option(_ONLINE.num_generations, "--num-generations", help="Completions per prompt (the group compared)."),
        batch_size: int = typer.Option(_ONLINE.batch_size, "--batch-size", help="Completions per forward pass; a multiple of --num-generations."),
        gradient_accumulation_steps: int = typer.Option(_ONLINE.gradient_accumulation_steps, "--gradient-accumulation-steps", help="Forward passes per optimizer step."),
        max_completion_length: int = typer.Option(_ONLINE.max_completion_length, "--max-completion-length", help="Longest completion in tokens."),
        temperature: float = typer.Option(_ONLINE.temperature, "--temperature", help="Sampling temperature."),
        lr: Optional[float] = typer.Option(None, "--lr", "--learning-rate", help=f"Peak learning rate (default {_ONLINE.learning_rate:g}, or 1e-5 with --lora)."),
        beta: Optional[float] = typer.Option(None, "--beta", help="KL coefficient to the reference (default TRL's: grpo 0.0, rloo 0.05)."),
        loss_type: Optional[str] = typer.Option(None, "--loss-type", help="grpo only: " + ", ".join(GRPO_LOSS_TYPES) + " (default dapo)."),
        ensemble_spread_coef: float = typer.Option(_ONLINE.ensemble_spread_coef, "--ensemble-spread-coef", help="With an ensemble: reward = mean - this * spread."),
        lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (merged into the saved model); the reference is the model with adapters off."),
        lora_r: int = typer.Option(_ONLINE.lora_r, "--lora-r", help="LoRA rank."),
        seed: int = typer.Option(_ONLINE.seed, "--seed", help="Seed for sampling, data order and adapters."),
        precision: str = typer.Option(_ONLINE.precision, "--precision", help=PRECISION_HELP),
        report_to: str = typer.Option("none", "--report-to", help=REPORT_HELP),
        use_vllm: bool = typer.Option(False, "--use-vllm", help="GPU and vllm installed: generate with vLLM (TRL's use_vllm)."),
        vllm_mode: str = typer.Option(_ONLINE.vllm_mode, "--vllm-mode", help="colocate (in this process) or server (a running `trl vllm-serve`)."),
        vllm_server_base_url: Optional[str] = typer.Option(None, "--vllm-server-base-url", help="With --vllm-mode server: its URL."),
        vllm_gpu_memory_utilization: float = typer.Option(_ONLINE.vllm_gpu_memory_utilization, "--vllm-gpu-memory-utilization", help="With colocate: GPU memory share for vLLM."),
        name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the output directory's name)."),
        register: bool = typer.Option(True, "--register/--no-register", help="Record the policy in the registry when training has finished."),
        as_json: bool = JsonOpt,
    ) -> None:
        from annotation.names import registry_name
        from app.settings import get_settings
        from ppo.generate import resolve_policy
        from ppo.grpo import train_online
        from ppo.sft import resolve_base
        from reward.train import main_process

        if register:
            name = registry_name(name, Path(output).name)  # refused now, not after training
        options = GRPOOptions(
            steps=steps, num_generations=num_generations, batch_size=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps, max_completion_length=max_completion_length,
            temperature=temperature, learning_rate=lr if lr is not None else (1e-5 if lora else _ONLINE.learning_rate),
            beta=beta, loss_type=loss_type, ensemble_spread_coef=ensemble_spread_coef, lora=lora, lora_r=lora_r, seed=seed,
            precision=precision, report_to=report_to, use_vllm=use_vllm, vllm_mode=vllm_mode, vllm_server_base_url=vllm_server_base_url,
            vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
        ).check_for(algorithm)
        prompt_list = _prompts(prompts, prompts_project, n_prompts)
        if policy:
            policy_path, _ = resolve_policy(None if Path(policy).exists() else engine(), policy)
        else:
            policy_path = resolve_base(None, get_settings().model_dir)
        reward_path = _reward_model_path(reward_model)
        result = train_online(algorithm, prompt_list, output, base=policy_path, reward=reward_path, options=options,
                              log=_log(as_json, algorithm), progress=_progress(as_json))
        if not main_process():
            return  # under accelerate launch the first process registers and reports the run
        model_id = None
        if register:
            model_id = _register_policy(result, engine(), name or Path(output).name, output, prompts_project,
                                        {"project": prompts_project} if prompts_project else {"prompts": str(prompts)},
                                        policy_path)
        m = result.metrics
        payload = {"model_id": model_id, "path": str(output), "base_model": policy_path, "reward_model": reward_path,
                   "rows": result.rows, "data_hash": result.data_hash, "metrics": m}
        emit(payload, as_json, f"policy trained: {output}" + (f" (model id {model_id})" if model_id else "")
             + f"\n{result.rows} prompts, {m['steps']} steps, mean reward {m['reward_first_quarter']:.3f} (first quarter) -> "
             f"{m['reward_last_quarter']:.3f} (last quarter), {m['runtime_s']:.0f} s")

    command.__name__ = algorithm
    return command


cli.command("grpo", help="GRPO (TRL GRPOTrainer) on one of our reward models: completions scored against their "
                         "prompt's group; the result is registered as a policy.")(_online_command("grpo"))
cli.command("rloo", help="RLOO (TRL RLOOTrainer) on one of our reward models: each completion's baseline is its "
                         "siblings' mean reward; the result is registered as a policy.")(_online_command("rloo"))
