"""Job handlers of the policy side for the worker (named in app.jobs.HANDLERS): sft, generate, ppo, dpo, grpo, rloo.

    rlhf jobs submit sft --params-json '{"project": "demo", "epochs": 1, "lora": true}'
    rlhf jobs submit generate --params-json '{"policy": "runs/job-7/policy", "prompts_project": "demo", "project": "round-2"}'

Each handler is `handler(params, ctx) -> dict`. Models are written under the job's run dir and
returned in "register"; the job runner inserts the rows when it marks the job succeeded, so a
failed or cancelled job registers nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from annotation.errors import JobCancelled
from ppo.errors import PPOError
# Shared with the CLI and the other handlers; defined once, with the use cases.
from ppo.usecases import prompts_hash, project_id_of, registered_policy_id, reward_model_path, sft_rows  # noqa: F401

GENERATE_KEYS = ("policy", "policy_b", "prompts", "prompts_project", "project", "n", "name", "name_b")


def _cancelled_error(ctx):
    return JobCancelled(f"job {ctx.job_id} cancelled")


def _unknown(kind: str, params: dict, known) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise PPOError(f"{kind}: unknown param(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")


def _run_context(ctx, output_dir: Path):
    from annotation.runs import RunContext

    return RunContext(output_dir=output_dir, engine=ctx.engine, settings=ctx.settings, progress=ctx.progress,
                      should_stop=ctx.cancelled, log=ctx.log)


def sft(params: dict, ctx) -> dict:
    """The sft job: ppo.usecases.sft into the job's run dir (its policy/ folder); params are SFTSpec's fields."""
    from annotation.names import registry_name
    from annotation.runs import spec_from_params
    from ppo import usecases

    spec = spec_from_params(usecases.SFTSpec, params, "sft", PPOError)
    spec.name = registry_name(spec.name, f"sft-{spec.project or Path(str(spec.data)).stem}-job{ctx.job_id}", "sft: param 'name'")
    try:
        return usecases.sft(spec, _run_context(ctx, Path(ctx.run_dir) / "policy")).as_job_result()
    except JobCancelled:
        raise _cancelled_error(ctx) from None


def generate(params: dict, ctx) -> dict:
    """New items from the current policy; params: policy, policy_b?, prompts or prompts_project, project, n, and SampleOptions fields."""
    from ppo.evaluate import SampleOptions
    from ppo.generate import generate_items, resolve_policy
    from ppo.prompts import project_prompts, read_prompts

    known = {f.name for f in dataclasses.fields(SampleOptions)}
    _unknown("generate", params, known | set(GENERATE_KEYS))
    if not params.get("policy") or not params.get("project"):
        raise PPOError("generate: params 'policy' and 'project' are required")
    if bool(params.get("prompts")) == bool(params.get("prompts_project")):
        raise PPOError("generate: give exactly one of 'prompts' (a file) or 'prompts_project'")
    options = SampleOptions(**{k: v for k, v in params.items() if k in known}).validate()
    n = params.get("n")
    prompts = (read_prompts(params["prompts"], n) if params.get("prompts")
               else project_prompts(ctx.engine, params["prompts_project"], n))
    policy, name = resolve_policy(ctx.engine, str(params["policy"]))
    policy_b, name_b = resolve_policy(ctx.engine, str(params["policy_b"])) if params.get("policy_b") else (None, None)
    ctx.progress(0.0, f"{len(prompts)} prompts")
    try:
        return generate_items(ctx.engine, params["project"], prompts, policy, policy_b=policy_b,
                              name=params.get("name") or name, name_b=params.get("name_b") or name_b, options=options,
                              progress=ctx.progress, should_stop=ctx.cancelled)
    except PPOError:
        if ctx.cancelled():
            raise _cancelled_error(ctx) from None
        raise


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

    spec = usecases.PPOSpec.from_params(params, "ppo")
    spec.name = registry_name(spec.name, f"ppo-{spec.prompts_project or Path(str(spec.prompts)).stem}-job{ctx.job_id}",
                              "ppo: param 'name'")
    try:
        result = usecases.ppo(spec, _run_context(ctx, job_run_dir(ctx.run_dir)))
    except JobCancelled:
        raise _cancelled_error(ctx) from None
    from ppo.runs import job_run_dir
    if not result.register:
        # Under accelerate launch only the main process saves models; the other ranks' results
        # are not the job's (app.jobs keeps rank 0's).
        return {}
    return result.as_job_result()


# --------------------------------------------------------------------------- dpo, grpo, rloo (TRL trainers)
# Written like `sft` above: options from the trainer's options dataclass, the model at <run dir>/policy,
# one registry row with its data lineage, cancel through ctx.cancelled.

DPO_SOURCE_KEYS = ("data", "project", "aggregation", "base", "name", "parent_id")
ONLINE_SOURCE_KEYS = ("policy", "reward_model", "prompts", "prompts_project", "n_prompts", "name", "parent_id")


def dpo_pairs(engine, data: str | None, project: str | None, aggregation: str = "majority") -> list:
    """Preference pairs from a labelled file (trl, trl-conversational, hh) or a project's aggregated labels (exactly one)."""
    if bool(data) == bool(project):
        raise PPOError("give exactly one of --data FILE or --project NAME")
    if data:
        from annotation.io import read_pairs

        if not Path(data).is_file():
            raise PPOError(f"--data {data}: no such file; expected a JSONL file of preference pairs")
        pairs = read_pairs(str(data))
        if not pairs:
            raise PPOError(f"--data {data}: no labelled pairs (TRL prompt/chosen/rejected lines) to train on")
        return pairs
    from annotation.io import project_pairs

    pairs = project_pairs(engine, project, aggregation=aggregation)
    if not pairs:
        raise PPOError(f"project '{project}' has no aggregated pairs yet (ties and both-bad are left out); annotate some first")
    return pairs


def _trained(ctx, train):
    """Run `train()`; a stop asked for by a cancel becomes JobCancelled."""
    try:
        return train()
    except PPOError:
        if ctx.cancelled():
            raise _cancelled_error(ctx) from None
        raise


def dpo(params: dict, ctx) -> dict:
    """DPO (TRL DPOTrainer); params: data or project, aggregation, base, name, parent_id, and DPOOptions fields."""
    from annotation.names import registry_name
    from ppo.dpo import DPOOptions, train_dpo
    from ppo.sft import resolve_base

    known = {f.name for f in dataclasses.fields(DPOOptions)}
    _unknown("dpo", params, known | set(DPO_SOURCE_KEYS))
    project, data = params.get("project"), params.get("data")
    name = registry_name(params.get("name"), f"dpo-{project or Path(str(data)).stem}-job{ctx.job_id}", "dpo: param 'name'")
    options = DPOOptions.from_params({k: v for k, v in params.items() if k in known})
    base = resolve_base(params.get("base"), ctx.settings.model_dir)
    ctx.progress(0.0, f"reading pairs from {'project ' + repr(project) if project else data}")
    pairs = dpo_pairs(ctx.engine, data, project, params.get("aggregation", "majority"))
    ctx.log.info("%d pairs, base %s", len(pairs), base)
    result = _trained(ctx, lambda: train_dpo(pairs, Path(ctx.run_dir) / "policy", base=base, options=options, log=ctx.log.info,
                                             progress=lambda f, m: ctx.progress(0.02 + 0.97 * f, m), should_stop=ctx.cancelled))
    row = result.registration(name=name, project_id=project_id_of(ctx.engine, project),
                              parent_id=params.get("parent_id") or registered_policy_id(ctx.engine, base))
    row["params"] = {**row["params"], "source": {"project": project} if project else {"data": str(data)}}
    return {"register": [row], "path": str(result.output_dir), "metrics": result.metrics}


def _online(algorithm: str, params: dict, ctx) -> dict:
    from annotation.names import registry_name
    from ppo.generate import resolve_policy
    from ppo.grpo import GRPOOptions, train_online
    from ppo.prompts import project_prompts, read_prompts
    from ppo.sft import resolve_base

    known = {f.name for f in dataclasses.fields(GRPOOptions)}
    _unknown(algorithm, params, known | set(ONLINE_SOURCE_KEYS))
    if not params.get("reward_model"):
        raise PPOError(f"{algorithm}: param 'reward_model' (a directory, or a registered reward model's id or name) is required")
    if bool(params.get("prompts")) == bool(params.get("prompts_project")):
        raise PPOError(f"{algorithm}: give exactly one of 'prompts' (a file) or 'prompts_project'")
    options = GRPOOptions.from_params({k: v for k, v in params.items() if k in known}, algorithm)
    project = params.get("prompts_project")
    name = registry_name(params.get("name"), f"{algorithm}-{project or Path(str(params.get('prompts'))).stem}-job{ctx.job_id}",
                         f"{algorithm}: param 'name'")
    n = params.get("n_prompts")
    prompts = read_prompts(params["prompts"], n) if params.get("prompts") else project_prompts(ctx.engine, project, n)
    policy = (resolve_policy(ctx.engine, str(params["policy"]))[0] if params.get("policy")
              else resolve_base(None, ctx.settings.model_dir))
    reward = reward_model_path(ctx.engine, params["reward_model"])
    ctx.log.info("%s: policy %s, reward model %s, %d prompts, %d steps", algorithm.upper(), policy, reward, len(prompts),
                 options.steps)
    ctx.progress(0.0, f"loading models; {len(prompts)} prompts")
    result = _trained(ctx, lambda: train_online(algorithm, prompts, Path(ctx.run_dir) / "policy", base=policy, reward=reward,
                                                options=options, log=ctx.log.info,
                                                progress=lambda f, m: ctx.progress(0.02 + 0.97 * f, m),
                                                should_stop=ctx.cancelled))
    row = result.registration(name=name, project_id=project_id_of(ctx.engine, project),
                              parent_id=params.get("parent_id") or registered_policy_id(ctx.engine, policy))
    row["params"] = {**row["params"], "source": {"project": project} if project else {"prompts": str(params["prompts"])}}
    return {"register": [row], "path": str(result.output_dir), "metrics": result.metrics}


def grpo(params: dict, ctx) -> dict:
    """GRPO (TRL GRPOTrainer) on a reward model; params: policy?, reward_model, prompts or prompts_project,
    n_prompts?, name?, parent_id?, and GRPOOptions fields."""
    return _online("grpo", params, ctx)


def rloo(params: dict, ctx) -> dict:
    """RLOO (TRL RLOOTrainer) on a reward model; params as for grpo (GRPOOptions fields but loss_type)."""
    return _online("rloo", params, ctx)
