"""`rlhf ppo`: PPO of a policy against a trained reward model, from the command line.

    rlhf ppo --reward-model runs/rm-1 --prompts prompts.jsonl --output runs/ppo-1 [--steps 100]
    rlhf ppo --reward-model runs/rm-1 --prompts-project demo --output runs/ppo-2 \\
        --config ppo.yaml --set learning_rate=3e-6 --set kl_penalty=k3 --lora
    rlhf ppo --reward-model runs/rm-1 --prompts prompts.jsonl --output runs/ppo-1 --resume
    rlhf ppo --reward-model runs/rm-1 --judge runs/rm-2 --keep-best judge --prompts prompts.jsonl -o runs/ppo-3
    rlhf ppo-options            # every PPO option with its default and meaning

--policy defaults to the fetched SmolLM2-135M-Instruct; --policy and --reward-model also take
a registered model's id or name, and so does --judge (repeatable): a reward model PPO does not
train on that scores held-out prompts every judge_every steps (see ppo.train). Options come from
ppo.train.PPOConfig: a YAML file of `key: value` lines (--config), then --set key=value
(repeatable), then --steps/--lora/--keep-best.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from app.cli import JsonOpt, cli, emit, engine


def format_warnings(warnings: list[dict]) -> str:
    if not warnings:
        return "diagnostics: no warnings"
    lines = ["diagnostics:"]
    for w in warnings:
        lines.append(f"  warning [{w['code']}] {w['message']}\n    suggested: {w['suggestion']}")
    return "\n".join(lines)


@cli.command()
def ppo(
    reward_model: str = typer.Option(..., "--reward-model", help="Reward model directory (or registered id/name) that scores responses."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="JSONL of prompts (any import format: only the prompts are used)."),
    prompts_project: Optional[str] = typer.Option(None, "--prompts-project", help="Take the prompts of a project instead."),
    output: str = typer.Option(..., "--output", "-o", help="Run directory: metrics.jsonl, checkpoints/, policy/ at the end."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Starting policy: a directory, hub id or registered policy (default: SmolLM2-135M-Instruct)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="PPO steps (overrides the config's `steps`)."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of PPO options (see `rlhf ppo-options`)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="key=value for any PPO option; repeatable; applied after --config."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters; the reference is the policy with adapters off."),
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="Use the first N distinct prompts."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its newest checkpoint."),
    judge: Optional[List[str]] = typer.Option(None, "--judge", help="A reward model (directory or registered id/name) PPO does not train on, "
                                              "scoring held-out prompts every judge_every steps; repeatable."),
    keep_best: Optional[str] = typer.Option(None, "--keep-best", help="last or judge: policy/ is the last step's, or the judged "
                                            "step's with the highest judge reward (overrides the config's keep_best)."),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the output directory's name)."),
    register: bool = typer.Option(True, "--register/--no-register", help="Record the policy in the registry when training has finished."),
    as_json: bool = JsonOpt,
) -> None:
    """PPO (our implementation, ppo.train) of a policy on a reward model; prints diagnostics warnings at the end."""
    import logging

    from annotation.names import registry_name
    from annotation.runs import RunContext, register_result
    from app.cli_policy import _progress
    from app.settings import get_settings
    from ppo.config import PPOConfig
    from ppo.usecases import PPOSpec, ppo as ppo_usecase

    overrides = list(set_ or [])
    if steps is not None:
        overrides.append(f"steps={steps}")
    if lora:
        overrides.append("lora=true")
    if keep_best is not None:
        overrides.append(f"keep_best={keep_best}")
    out = Path(output)
    spec = PPOSpec(reward_model=reward_model, prompts=prompts, prompts_project=prompts_project, policy=policy,
                   judges=list(judge or []), n_prompts=n_prompts, resume=resume,
                   name=registry_name(name, out.name) if register else name,  # refused now, not after training
                   config=PPOConfig.from_yaml(config, overrides)).validate()
    if not as_json:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # The store is opened only when something needs it: paths alone and --no-register run without one.
    named = [reward_model, *spec.judges] + ([policy] if policy else [])
    needs_store = register or prompts_project or any(not Path(str(v)).exists() for v in named)
    eng = engine() if needs_store else None
    ctx = RunContext(output_dir=out, engine=eng, settings=get_settings(), log=logging.getLogger("rlhf.ppo"))
    if not as_json:
        ctx.progress = _progress(as_json)
    run = ppo_usecase(spec, ctx)
    if not run.register:
        return  # under accelerate launch the first process registers and reports the run
    model_id = register_result(eng, run)[0] if register else None
    result = {**run.extra, "metrics": run.metrics}
    m = result["metrics"]
    payload = {"model_id": model_id, "output_dir": result["output_dir"], "policy_path": result["policy_path"],
               "steps": m.get("steps"), "kept_step": result["kept_step"], "judges": result["judge_paths"],
               "metrics": m, "diagnostics": result["diagnostics"]}
    judged = ""
    if "judge_reward" in m:
        judged = (f"\njudges ({', '.join(result['judges'])}): reward {m['judge_reward']:.3f} at the last step, peak "
                  f"{m['judge_reward_peak']:.3f} at step {m['judge_peak_step']}; policy/ is step {result['kept_step']}'s")
    text = (f"policy trained: {result['policy_path']}" + (f" (model id {model_id})" if model_id else "")
            + f"\n{m.get('steps')} steps: reward {m.get('reward_mean_first', 0):.3f} -> {m.get('reward_mean', 0):.3f}"
            f" (mean of the last steps), KL {m.get('kl', 0):.2f} nats, kl_coef {m.get('kl_coef', 0):.4f}"
            f"{judged}\n{format_warnings(result['diagnostics'])}")
    emit(payload, as_json, text)


@cli.command("ppo-options")
def ppo_options(as_json: bool = JsonOpt) -> None:
    """Every PPO option (YAML key / --set name) with its default and what it does."""
    from ppo.train import PPOConfig, field_docs

    docs = field_docs()
    defaults = PPOConfig().to_dict()
    rows = [{"name": k, "default": v, "help": docs.get(k, "")} for k, v in defaults.items()]
    emit({"options": rows}, as_json, "\n".join(f"{r['name']} = {r['default']!r}\n    {r['help']}" for r in rows))
