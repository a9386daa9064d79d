"""The policy side's training use cases, each written once for the CLI, the worker and the pages.

    result = sft(SFTSpec(project="demo", lora=True), RunContext(output_dir=Path("runs/sft-1"), engine=engine, settings=s))
    result = ppo(PPOSpec.from_params({"reward_model": "runs/rm-1", "prompts_project": "demo", "steps": 20}), ctx)

`rlhf sft` / `rlhf ppo` call these in process, the `sft` / `ppo` jobs call them in the worker,
and the PPO page submits the job after validating the spec, so a bad value shows on the form.
Each returns an annotation.runs.RunResult whose row registers the trained policy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from annotation.errors import JobCancelled
from annotation.runs import RunContext, RunResult, spec_from_params
from ppo.errors import PPOError
from ppo.sft import SFTOptions
from ppo.config import PPOConfig

AGGREGATIONS = ("majority", "dawid-skene")
LORA_LEARNING_RATE = 1e-4


def _check_name(name: str | None) -> str | None:
    if name is None:
        return None
    from annotation.names import registry_name

    return registry_name(name, name, "--name")


def project_id_of(engine, project: str | None) -> int | None:
    """The project's id (None for no project): reward.data's lookup, for the policy side too."""
    from reward.data import project_id_of as lookup

    return lookup(engine, project or None)


def registered_policy_id(engine, path: str) -> int | None:
    """The id of the registered policy stored at `path`, if any (the parent of a model trained from it)."""
    if engine is None:
        return None
    from annotation.registry import list_models
    from annotation.store import reading

    target = Path(path).resolve()
    with reading(engine) as session:
        for row in list_models(session, kind="policy"):
            if Path(row.path).resolve() == target:
                return row.id
    return None


# --------------------------------------------------------------------------- SFT


@dataclasses.dataclass
class SFTSpec(SFTOptions):
    """An SFT run: where the rows come from, the base, how the result is registered, and every SFTOptions field."""

    learning_rate: float | None = None
    """Peak AdamW learning rate; default 2e-5 (TRL's SFT default), or 1e-4 with lora."""
    data: str | None = None
    """Instruction JSONL: "messages", "prompt"+"completion" or "text" rows; give this or project."""
    project: str | None = None
    """Train on the chosen responses of a project's aggregated pairs."""
    aggregation: str = "majority"
    """Label aggregation for a project: majority or dawid-skene."""
    base: str | None = None
    """Base policy: a model directory or hub id (default: the fetched SmolLM2-135M-Instruct)."""
    name: str | None = None
    """Registry name of the trained policy."""
    parent_id: int | None = None
    """Registry id of the parent policy; default: the registered policy at the base's path, if any."""

    def options(self) -> SFTOptions:
        own = {f.name for f in dataclasses.fields(SFTOptions)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in own}
        if values["learning_rate"] is None:
            values["learning_rate"] = LORA_LEARNING_RATE if self.lora else SFTOptions.learning_rate
        return SFTOptions(**values)

    def validate(self) -> "SFTSpec":
        self.options().validate()
        if bool(self.data) == bool(self.project):
            raise PPOError("give exactly one of --data FILE or --project NAME")
        if self.aggregation not in AGGREGATIONS:
            raise PPOError(f"--aggregation {self.aggregation!r} is invalid; expected one of {', '.join(AGGREGATIONS)}")
        self.name = _check_name(self.name)
        return self

    def source(self) -> dict:
        return {"project": self.project} if self.project else {"data": str(self.data)}


def sft_rows(engine, data: str | None, project: str | None, aggregation: str = "majority") -> list[dict]:
    """SFT rows from an instruction file or from a project's chosen responses (exactly one of the two)."""
    from ppo.sft import read_sft_file, rows_from_pairs

    if bool(data) == bool(project):
        raise PPOError("give exactly one of --data FILE or --project NAME")
    if data:
        return read_sft_file(data)
    from annotation.io import project_pairs

    rows = rows_from_pairs(project_pairs(engine, project, aggregation=aggregation))
    if not rows:
        raise PPOError(f"project '{project}' has no aggregated pairs yet (ties and both-bad are left out); annotate some first")
    return rows


def sft(spec: SFTSpec, ctx: RunContext) -> RunResult:
    """Supervised fine-tuning (TRL SFTTrainer) into ctx.output_dir; the result registers the policy."""
    from ppo.sft import resolve_base, train_sft

    spec.validate()
    base = resolve_base(spec.base, ctx.settings.model_dir)
    ctx.progress(0.0, f"reading SFT rows from {'project ' + repr(spec.project) if spec.project else spec.data}")
    rows = sft_rows(ctx.engine, spec.data, spec.project, spec.aggregation)
    ctx.log.info("%d SFT rows, base %s", len(rows), base)
    try:
        result = train_sft(rows, ctx.output_dir, base=base, options=spec.options(), log=ctx.log.info,
                           progress=lambda f, m: ctx.progress(0.02 + 0.97 * f, m), should_stop=ctx.should_stop)
    except PPOError:
        ctx.stop_if_asked("SFT")
        raise
    row = result.registration(name=spec.name or Path(ctx.output_dir).name, project_id=project_id_of(ctx.engine, spec.project),
                              parent_id=spec.parent_id or registered_policy_id(ctx.engine, base))
    row["path"] = str(Path(row["path"]).resolve())
    row["params"] = {**row["params"], "source": spec.source()}
    return RunResult(register=[row], path=row["path"], metrics=result.metrics,
                     extra={"base_model": base, "rows": result.rows, "data_hash": result.data_hash})


# --------------------------------------------------------------------------- PPO


@dataclasses.dataclass
class PPOSpec:
    """A PPO run: the models, the prompts, how the result is registered, and the PPOConfig."""

    reward_model: str = ""
    """Reward model that PPO trains on: a run directory or a registered reward model's id or name."""
    prompts: str | None = None
    """JSONL (or Parquet) of prompts, in any import format: only the prompts are used; give this or prompts_project."""
    prompts_project: str | None = None
    """Take the prompts of a project instead."""
    policy: str | None = None
    """Starting policy: a directory, hub id or registered policy (default: the fetched SmolLM2-135M-Instruct)."""
    judges: list = dataclasses.field(default_factory=list)
    """Reward models (directories or registered ids/names) PPO does not train on, scoring held-out prompts."""
    n_prompts: int | None = None
    """Use the first N distinct prompts."""
    resume: bool = False
    """Continue the run in the output directory from its newest checkpoint."""
    name: str | None = None
    """Registry name of the trained policy."""
    parent_id: int | None = None
    """Registry id of the parent policy; default: the registered policy at the starting policy's path, if any."""
    config: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    """Every PPO hyperparameter (see `rlhf ppo-options`)."""

    @classmethod
    def from_params(cls, params: dict, what: str = "ppo") -> "PPOSpec":
        """A spec from a job's flat params: the spec's own keys, and PPOConfig fields by name."""
        own = {f.name for f in dataclasses.fields(cls)} - {"config"}
        known = own | {f.name for f in dataclasses.fields(PPOConfig)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise PPOError(f"{what}: unknown param(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
        config = PPOConfig.from_dict({k: v for k, v in params.items() if k not in own}, f"{what} job params")
        spec = spec_from_params(cls, {k: v for k, v in params.items() if k in own}, what, PPOError)
        spec.config = config
        return spec.validate()

    def validate(self) -> "PPOSpec":
        if not self.reward_model:
            raise PPOError("ppo: reward_model (a directory, or a registered reward model's id or name) is required")
        if bool(self.prompts) == bool(self.prompts_project):
            raise PPOError("give exactly one of --prompts FILE or --prompts-project NAME")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise PPOError(f"--n-prompts {self.n_prompts}: expected a number of prompts >= 1")
        if isinstance(self.judges, (str, int)):
            self.judges = [self.judges]
        self.config.validate()
        self.name = _check_name(self.name)
        return self

    def source(self) -> dict:
        return {"project": self.prompts_project} if self.prompts_project else {"prompts": str(self.prompts)}


def prompts_hash(prompts: list) -> str:
    """A short fingerprint of the prompt set a policy was trained on (the models table's data_hash)."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps(p, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def reward_model_path(engine, value: str, option: str = "--reward-model") -> str:
    """A reward model directory, or a registered reward model's id or name resolved to its path."""
    if Path(str(value)).is_dir():
        return str(value)
    if engine is None:
        raise PPOError(f"{option} {value}: not a directory")
    from annotation.registry import get_model
    from annotation.store import reading

    with reading(engine) as session:
        row = get_model(session, str(value))
        if row.kind != "reward":
            raise PPOError(f"{option} {value}: registered model {row.id} is a {row.kind} model, not a reward model")
        return row.path


def ppo(spec: PPOSpec, ctx: RunContext) -> RunResult:
    """PPO (ppo.train) of a policy on a reward model into ctx.output_dir (the run directory, with the
    policy at policy/); the result registers the policy. Under accelerate launch only the main
    process has a policy to register: the others return an empty result."""
    from ppo.generate import resolve_policy
    from ppo.prompts import project_prompts, read_prompts
    from ppo.sft import resolve_base
    from ppo.train import TrainingCancelled, run_ppo

    spec.validate()
    config = spec.config
    out = Path(ctx.output_dir)
    if spec.resume:
        if not (out / "checkpoints").is_dir():
            raise PPOError(f"--resume: {out} has no checkpoints/ to resume from")
    elif out.exists() and any(out.iterdir()):
        raise PPOError(f"--output {out} already holds files; pass --resume to continue that run, or choose a new directory")
    prompts = (read_prompts(spec.prompts, spec.n_prompts) if spec.prompts
               else project_prompts(ctx.engine, spec.prompts_project, spec.n_prompts))
    if spec.policy:
        policy, _ = resolve_policy(None if Path(spec.policy).exists() else ctx.engine, str(spec.policy))
    else:
        policy = resolve_base(None, ctx.settings.model_dir)
    reward = reward_model_path(ctx.engine, spec.reward_model)
    judges = [reward_model_path(ctx.engine, str(j), "--judge") for j in spec.judges]
    ctx.log.info("PPO: policy %s, reward model %s, judges %s, %d prompts, %d steps", policy, reward, judges or "none",
                 len(prompts), config.steps)
    ctx.progress(0.0, f"loading models; {len(prompts)} prompts")
    try:
        result = run_ppo(reward, prompts, out, policy=policy, config=config, progress=ctx.progress,
                         cancelled=ctx.should_stop, resume=spec.resume or None, judges=judges)
    except TrainingCancelled:
        raise JobCancelled("PPO was cancelled") from None
    if "policy_path" not in result:
        return RunResult(register=[], path=str(out), metrics={})
    for warning in result.get("diagnostics", []):
        ctx.log.warning("%s: %s %s", warning["code"], warning["message"], warning["suggestion"])
    row = {
        "kind": "policy",
        "name": spec.name or out.name,
        "path": str(Path(result["policy_path"]).resolve()),
        "base_model": policy,
        "project_id": project_id_of(ctx.engine, spec.prompts_project),
        "data_hash": prompts_hash(prompts),
        "data_rows": len(prompts),
        "params": {**config.to_dict(), "reward_model": reward, "judges": judges, "kept_step": result.get("kept_step"),
                   "source": spec.source()},
        "metrics": result.get("metrics", {}),
        "parent_id": spec.parent_id or registered_policy_id(ctx.engine, policy),
    }
    return RunResult(register=[row], path=row["path"], metrics=row["metrics"],
                     extra={"output_dir": result["output_dir"], "diagnostics": result.get("diagnostics", []),
                            "kept_step": result.get("kept_step"), "judges": result.get("judges", []),
                            "judge_paths": result.get("judge_paths", judges), "policy_path": result["policy_path"]})
