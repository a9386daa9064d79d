"""Job handlers of the policy side for the worker (named in app.jobs.JOB_TABLE): sft, dpo, grpo, rloo,
ppo, eval_policy, generate. Each builds its use case's spec from the params (ppo.usecases: the
spec's fields are the params) and runs the same function as the CLI command of that name.

    rlhf jobs submit sft --params-json '{"project": "demo", "epochs": 1, "lora": true}'
    rlhf jobs submit generate --params-json '{"policy": "runs/job-7/policy", "prompts_project": "demo", "project": "round-2"}'

Each handler is `handler(params, ctx) -> dict`. Models are written under the job's run dir and
returned in "register"; the job runner inserts the rows when it marks the job succeeded, so a
failed or cancelled job registers nothing.
"""

from __future__ import annotations

from pathlib import Path

from annotation.errors import JobCancelled
from ppo.errors import PPOError
# Shared with the CLI and the other handlers; defined once, with the use cases.
from ppo.usecases import prompts_hash, project_id_of, registered_policy_id, reward_model_path, sft_rows  # noqa: F401


def _cancelled_error(ctx):
    return JobCancelled(f"job {ctx.job_id} cancelled")


def _run_context(ctx, output_dir: Path):
    from annotation.runs import RunContext

    return RunContext(output_dir=output_dir, engine=ctx.engine, settings=ctx.settings, progress=ctx.progress,
                      should_stop=ctx.cancelled, log=ctx.log)


def _run(usecase, spec, ctx, output_dir: Path) -> dict:
    try:
        return usecase(spec, _run_context(ctx, output_dir)).as_job_result()
    except JobCancelled:
        raise _cancelled_error(ctx) from None


def _trainer_job(kind: str, params: dict, ctx) -> dict:
    """A TRL trainer's job (sft, dpo, grpo, rloo): ppo.usecases.<kind> into the job's run dir (its
    policy/ folder); params are the fields of the kind's spec; the policy is named after the job by default."""
    from annotation.names import registry_name
    from annotation.runs import spec_from_params
    from ppo import usecases

    spec_cls = {"sft": usecases.SFTSpec, "dpo": usecases.DPOSpec, "grpo": usecases.GRPOSpec, "rloo": usecases.RLOOSpec}[kind]
    spec = spec_from_params(spec_cls, params, kind, PPOError)
    spec.name = registry_name(spec.name, f"{kind}-{spec.source_name()}-job{ctx.job_id}", f"{kind}: param 'name'")
    return _run(getattr(usecases, kind), spec, ctx, Path(ctx.run_dir) / "policy")


def sft(params: dict, ctx) -> dict:
    """The sft job: ppo.usecases.sft (params: SFTSpec's fields)."""
    return _trainer_job("sft", params, ctx)


def dpo(params: dict, ctx) -> dict:
    """The dpo job: ppo.usecases.dpo, TRL's DPOTrainer on preference pairs (params: DPOSpec's fields)."""
    return _trainer_job("dpo", params, ctx)


def grpo(params: dict, ctx) -> dict:
    """The grpo job: ppo.usecases.grpo, TRL's GRPOTrainer on a reward model (params: GRPOSpec's fields)."""
    return _trainer_job("grpo", params, ctx)


def rloo(params: dict, ctx) -> dict:
    """The rloo job: ppo.usecases.rloo, TRL's RLOOTrainer on a reward model (params: RLOOSpec's fields, GRPOSpec's but loss_type)."""
    return _trainer_job("rloo", params, ctx)


def eval_policy(params: dict, ctx) -> dict:
    """The eval_policy job: ppo.usecases.eval_policy, eval.json in the job's run dir (params: EvalPolicySpec's fields)."""
    from annotation.runs import spec_from_params
    from ppo import usecases

    spec = spec_from_params(usecases.EvalPolicySpec, params, "eval_policy", PPOError)
    return _run(usecases.eval_policy, spec, ctx, Path(ctx.run_dir))


def generate(params: dict, ctx) -> dict:
    """The generate job: ppo.usecases.generate, new items in params' project (params: GenerateSpec's fields)."""
    from annotation.runs import spec_from_params
    from ppo import usecases

    spec = spec_from_params(usecases.GenerateSpec, params, "generate", PPOError)
    return _run(usecases.generate, spec, ctx, Path(ctx.run_dir))


# --------------------------------------------------------------------------- ppo
# `ppo(params, ctx)` (the PPO training job) belongs to ppo/train.py's owner and goes below.
# The PPO page (app/pages/6_PPO.py) submits params {"policy": dir, "reward_model": dir,
# "prompts": file | "prompts_project": name, "name"?: str, "judges"?: [dir | id | name], and PPOConfig fields by name}, and
# reads the run's metrics.jsonl at its fixed place, ppo.runs.job_run_dir(the job's dir) = job-N/ppo.

def ppo(params: dict, ctx) -> dict:
    """The ppo job: ppo.usecases.ppo into the job's run dir (its ppo/ folder); params are PPOSpec's
    fields (policy?, reward_model, prompts or prompts_project, name?, parent_id?, n_prompts?, resume?,
    judges?) and PPOConfig fields by name."""
    from annotation.names import registry_name
    from ppo import usecases
    from ppo.runs import job_run_dir

    spec = usecases.PPOSpec.from_params(params, "ppo")
    spec.name = registry_name(spec.name, f"ppo-{spec.prompts_project or Path(str(spec.prompts)).stem}-job{ctx.job_id}",
                              "ppo: param 'name'")
    try:
        result = usecases.ppo(spec, _run_context(ctx, job_run_dir(ctx.run_dir)))
    except JobCancelled:
        raise _cancelled_error(ctx) from None
    if not result.register:
        # Under accelerate launch only the main process saves models; the other ranks' results
        # are not the job's (app.jobs keeps rank 0's).
        return {}
    return result.as_job_result()
