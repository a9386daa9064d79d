"""The policy side's use cases, each written once for the CLI, the worker and the pages: the
trainers (sft, dpo, grpo, rloo, ppo), eval_policy and generate.

    result = sft(SFTSpec(project="demo", lora=True), RunContext(output_dir=Path("runs/sft-1"), engine=engine, settings=s))
    result = ppo(PPOSpec.from_params({"reward_model": "runs/rm-1", "prompts_project": "demo", "steps": 20}), ctx)

`rlhf sft|dpo|grpo|rloo|ppo|eval-policy|generate` call these in process, the jobs of the same
kinds call them in the worker, and the PPO page submits a job after validating its spec, so a bad
value shows on the form. Each returns an annotation.runs.RunResult; a trainer's row registers the
trained policy. The specs import no torch (the CLI reads its options from them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from annotation.errors import JobCancelled
from annotation.runs import RunContext, RunResult, spec_from_params
from ppo.config import PPOConfig
from ppo.dpo import DPOOptions
from ppo.errors import PPOError
from ppo.grpo import GRPOOptions
from ppo.options import SampleOptions
from ppo.sft import SFTOptions

AGGREGATIONS = ("majority", "dawid-skene")


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


# --------------------------------------------------------------------------- what the trainers' specs share


@dataclasses.dataclass
class PolicyRegistration:
    """How a trained policy is registered."""

    name: str | None = None
    """Registry name of the trained policy."""
    parent_id: int | None = None
    """Registry id of the parent policy; default: the registered policy at the starting policy's path, if any."""


@dataclasses.dataclass
class TrainingData(PolicyRegistration):
    """Where an SFT or DPO run's examples come from (a file or a project's aggregated pairs) and the policy it starts from."""

    data: str | None = None
    """Training file; give this or project."""
    project: str | None = None
    """Train on a project's aggregated pairs instead."""
    aggregation: str = "majority"
    """Label aggregation for a project: majority or dawid-skene."""
    base: str | None = None
    """Starting policy: a model directory or hub id (default: the fetched SmolLM2-135M-Instruct)."""

    def check_source(self) -> None:
        if bool(self.data) == bool(self.project):
            raise PPOError("give exactly one of --data FILE or --project NAME")
        if self.aggregation not in AGGREGATIONS:
            raise PPOError(f"--aggregation {self.aggregation!r} is invalid; expected one of {', '.join(AGGREGATIONS)}")
        self.name = _check_name(self.name)

    def source(self) -> dict:
        return {"project": self.project} if self.project else {"data": str(self.data)}

    def source_name(self) -> str:
        """What a job names its policy after: the project, or the data file's stem."""
        return self.project or Path(str(self.data)).stem


@dataclasses.dataclass
class PromptSource:
    """Where the prompts of an online trainer, an evaluation or a generation come from."""

    prompts: str | None = None
    """JSONL (or Parquet) of prompts, in any import format: only the prompts are used; give this or prompts_project."""
    prompts_project: str | None = None
    """Take the prompts of a project instead."""

    def check_prompts(self, n: int | None, option: str) -> None:
        if bool(self.prompts) == bool(self.prompts_project):
            raise PPOError("give exactly one of --prompts FILE or --prompts-project NAME")
        if n is not None and n < 1:
            raise PPOError(f"{option} {n}: expected a number of prompts >= 1")

    def read_prompts(self, engine, n: int | None) -> list:
        from ppo.prompts import project_prompts, read_prompts

        return read_prompts(self.prompts, n) if self.prompts else project_prompts(engine, self.prompts_project, n)

    def source(self) -> dict:
        return {"project": self.prompts_project} if self.prompts_project else {"prompts": str(self.prompts)}

    def source_name(self) -> str:
        """What a job names its policy after: the prompts' project, or the prompts file's stem."""
        return self.prompts_project or Path(str(self.prompts)).stem


def _required(value, option: str, what: str) -> None:
    if not value:
        raise PPOError(f"{option} is required: {what}")


def _trained(ctx: RunContext, what: str, train):
    """Run `train()`; a stop that ctx.should_stop asked for becomes JobCancelled."""
    try:
        return train()
    except PPOError:
        ctx.stop_if_asked(what)
        raise


def _policy_result(result, spec, ctx: RunContext, base: str, project: str | None, **extra) -> RunResult:
    """The RunResult of a TRL trainer's run (ppo.sft.SFTResult): one policy row with its lineage."""
    row = result.registration(name=spec.name or Path(ctx.output_dir).name, project_id=project_id_of(ctx.engine, project),
                              parent_id=spec.parent_id or registered_policy_id(ctx.engine, base))
    row["path"] = str(Path(row["path"]).resolve())
    row["params"] = {**row["params"], "source": spec.source()}
    return RunResult(register=[row], path=row["path"], metrics=result.metrics,
                     extra={"base_model": base, **extra, "rows": result.rows, "data_hash": result.data_hash})


# --------------------------------------------------------------------------- SFT


@dataclasses.dataclass
class SFTSpec(SFTOptions, TrainingData):
    """An SFT run: where the rows come from, the base, how the result is registered, and every SFTOptions field."""

    data: str | None = None
    """Instruction JSONL: "messages", "prompt"+"completion" or "text" rows; give this or project."""
    project: str | None = None
    """Train on the chosen responses of a project's aggregated pairs."""

    def options(self) -> SFTOptions:
        return SFTOptions.of(self)

    def validate(self) -> "SFTSpec":
        self.options()
        self.check_source()
        return self


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


def _train_on_data(spec: TrainingData, ctx: RunContext, what: str, unit: str, read, train) -> RunResult:
    """SFT or DPO: `read` the examples (rows, pairs) of spec's file or project, `train` the base on them
    into ctx.output_dir, and register the policy."""
    from ppo.sft import resolve_base

    spec.validate()
    base = resolve_base(spec.base, ctx.settings.model_dir)
    ctx.progress(0.0, f"reading {unit} from {'project ' + repr(spec.project) if spec.project else spec.data}")
    examples = read(ctx.engine, spec.data, spec.project, spec.aggregation)
    ctx.log.info("%d %s, base %s", len(examples), unit, base)
    result = _trained(ctx, what, lambda: train(
        examples, ctx.output_dir, base=base, options=spec.options(), log=ctx.log.info,
        progress=lambda f, m: ctx.progress(0.02 + 0.97 * f, m), should_stop=ctx.should_stop))
    return _policy_result(result, spec, ctx, base, spec.project)


def sft(spec: SFTSpec, ctx: RunContext) -> RunResult:
    """Supervised fine-tuning (TRL SFTTrainer) into ctx.output_dir; the result registers the policy."""
    from ppo.sft import train_sft

    return _train_on_data(spec, ctx, "SFT", "SFT rows", sft_rows, train_sft)


# --------------------------------------------------------------------------- DPO


@dataclasses.dataclass
class DPOSpec(DPOOptions, TrainingData):
    """A DPO run: where the pairs come from, the base, how the result is registered, and every DPOOptions field."""

    data: str | None = None
    """Preference JSONL: TRL prompt/chosen/rejected (standard or conversational) or hh; give this or project."""
    base: str | None = None
    """Starting policy, usually an SFT run: a model directory or hub id (default: the fetched SmolLM2-135M-Instruct)."""

    def options(self) -> DPOOptions:
        return DPOOptions.of(self)

    def validate(self) -> "DPOSpec":
        self.options()
        self.check_source()
        return self


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


def dpo(spec: DPOSpec, ctx: RunContext) -> RunResult:
    """DPO (TRL DPOTrainer) on preference pairs into ctx.output_dir; the result registers the policy."""
    from ppo.dpo import train_dpo

    return _train_on_data(spec, ctx, "DPO", "pairs", dpo_pairs, train_dpo)


# --------------------------------------------------------------------------- GRPO and RLOO


@dataclasses.dataclass
class GRPOSpec(GRPOOptions, PromptSource, PolicyRegistration):
    """A GRPO run: the reward model, the prompts, the starting policy, how the result is registered,
    and every GRPOOptions field. RLOOSpec is the same for RLOO."""

    ALGORITHM: ClassVar[str] = "grpo"

    reward_model: str = ""
    """Reward model that scores the completions: a run directory or a registered reward model's id or name."""
    policy: str | None = None
    """Starting policy: a directory, hub id or registered policy (default: the fetched SmolLM2-135M-Instruct)."""
    n_prompts: int | None = None
    """Use the first N distinct prompts."""

    def options(self) -> GRPOOptions:
        return GRPOOptions.of(self).check_for(self.ALGORITHM)

    def validate(self) -> "GRPOSpec":
        self.options()
        _required(self.reward_model, "--reward-model", "a reward model directory, or a registered reward model's id or name")
        self.check_prompts(self.n_prompts, "--n-prompts")
        self.name = _check_name(self.name)
        return self


@dataclasses.dataclass
class RLOOSpec(GRPOSpec):
    """An RLOO run: GRPOSpec's fields but loss_type (RLOO has one loss)."""

    ALGORITHM: ClassVar[str] = "rloo"


def _online(spec: GRPOSpec, ctx: RunContext) -> RunResult:
    from ppo.generate import resolve_policy
    from ppo.grpo import check_generation_backend, train_online
    from ppo.sft import resolve_base

    spec.validate()
    check_generation_backend(spec.options())  # before anything is read or loaded
    what = spec.ALGORITHM.upper()
    prompts = spec.read_prompts(ctx.engine, spec.n_prompts)
    if spec.policy:
        policy, _ = resolve_policy(None if Path(spec.policy).exists() else ctx.engine, str(spec.policy))
    else:
        policy = resolve_base(None, ctx.settings.model_dir)
    reward = reward_model_path(ctx.engine, spec.reward_model)
    options = spec.options()
    ctx.log.info("%s: policy %s, reward model %s, %d prompts, %d steps", what, policy, reward, len(prompts), options.steps)
    ctx.progress(0.0, f"loading models; {len(prompts)} prompts")
    result = _trained(ctx, what, lambda: train_online(
        spec.ALGORITHM, prompts, ctx.output_dir, base=policy, reward=reward, options=options, log=ctx.log.info,
        progress=lambda f, m: ctx.progress(0.02 + 0.97 * f, m), should_stop=ctx.should_stop))
    return _policy_result(result, spec, ctx, policy, spec.prompts_project, reward_model=reward)


def grpo(spec: GRPOSpec, ctx: RunContext) -> RunResult:
    """GRPO (TRL GRPOTrainer) of a policy on one of our reward models into ctx.output_dir; the result registers the policy."""
    return _online(spec, ctx)


def rloo(spec: RLOOSpec, ctx: RunContext) -> RunResult:
    """RLOO (TRL RLOOTrainer) of a policy on one of our reward models into ctx.output_dir; the result registers the policy."""
    return _online(spec, ctx)


# --------------------------------------------------------------------------- evaluating a policy, generating items


@dataclasses.dataclass
class EvalPolicySpec(SampleOptions, PromptSource):
    """Evaluate a policy against a reference on held-out prompts, judged by a reward model (and
    judges): the sampling settings (SampleOptions) and what is compared."""

    policy: str = ""
    """Policy to evaluate: a model directory or a registered policy's id or name."""
    reference: str | None = None
    """Reference policy (default: the fetched SmolLM2-135M-Instruct)."""
    reward_model: str = ""
    """Reward model run directory (or registered id/name) that judges."""
    n: int | None = None
    """Use the first N distinct prompts."""
    samples: int = 5
    """Sample responses shown side by side."""
    judges: list[str] = dataclasses.field(default_factory=list)
    """Other reward models (directories or registered ids/names) whose win rates are shown beside the reward model's."""

    def validate(self) -> "EvalPolicySpec":
        SampleOptions.of(self)
        _required(self.policy, "--policy", "a model directory or a registered policy's id or name")
        _required(self.reward_model, "--reward-model", "a reward model directory, or a registered reward model's id or name")
        self.check_prompts(self.n, "--n")
        if self.samples < 0:
            raise PPOError(f"--samples {self.samples}: expected a number of samples >= 0")
        if isinstance(self.judges, (str, int)):
            self.judges = [self.judges]
        return self


def eval_policy(spec: EvalPolicySpec, ctx: RunContext) -> RunResult:
    """Win rate of spec.policy over its reference as judged by the reward model and each judge, both
    mean rewards and the KL to the reference (ppo.evaluate); writes eval.json into ctx.output_dir."""
    import json

    from ppo.evaluate import run_eval_policy, training_reward_model
    from ppo.generate import resolve_policy
    from ppo.sft import resolve_base

    spec.validate()
    prompts = spec.read_prompts(ctx.engine, spec.n)
    policy, _ = resolve_policy(None if Path(spec.policy).exists() else ctx.engine, spec.policy)
    reference = resolve_base(spec.reference, ctx.settings.model_dir)
    judges = [reward_model_path(ctx.engine, str(j), "--judge") for j in spec.judges]
    reward = reward_model_path(ctx.engine, spec.reward_model)
    # The run's files first; the registry where there is one.
    trained_on = training_reward_model(policy) or (training_reward_model(policy, ctx.engine) if ctx.engine is not None else None)
    ctx.stop_if_asked("policy evaluation")
    ctx.progress(0.0, f"loading models; {len(prompts)} prompts")
    result = run_eval_policy(policy, reference, reward, prompts, SampleOptions.of(spec), n_samples=spec.samples,
                             progress=ctx.progress, judges=judges, trained_on=trained_on)
    result.pop("rows")
    out = Path(ctx.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    ctx.log.info("win rate %.3f over %d prompts", result["win_rate"], result["n_prompts"])
    return RunResult(register=[], path=str(out / "eval.json"), metrics=result)


@dataclasses.dataclass
class GenerateSpec(SampleOptions, PromptSource):
    """New items for the next round of annotation: two sampled responses per prompt, from one policy
    or one from each of two (ppo.generate), with the sampling settings (SampleOptions)."""

    temperature: float = 1.0
    """Sampling temperature; 1.0 gives more varied pairs to compare."""
    policy: str = ""
    """Policy that writes the responses: a model directory or a registered policy's id or name."""
    policy_b: str | None = None
    """A second policy: one response from each instead of two from policy."""
    project: str = ""
    """Project that receives the new items (created if missing)."""
    n: int | None = None
    """Use the first N distinct prompts."""
    name: str | None = None
    """Source name of policy's responses (default: its registry name, or its directory's)."""
    name_b: str | None = None
    """Source name of policy_b's responses (default: its registry name, or its directory's)."""

    def validate(self) -> "GenerateSpec":
        SampleOptions.of(self)
        _required(self.policy, "--policy", "a model directory or a registered policy's id or name")
        _required(self.project, "--project", "the project that receives the new items")
        self.check_prompts(self.n, "--n")
        return self


def generate(spec: GenerateSpec, ctx: RunContext) -> RunResult:
    """Sample two responses per prompt and import them as items of spec.project (ppo.generate);
    writes generate.json into ctx.output_dir. A stop asked for before the import imports nothing."""
    import json

    from ppo.generate import generate_items, resolve_policy

    spec.validate()
    prompts = spec.read_prompts(ctx.engine, spec.n)
    policy, name = resolve_policy(ctx.engine, spec.policy)
    policy_b, name_b = resolve_policy(ctx.engine, spec.policy_b) if spec.policy_b else (None, None)
    ctx.progress(0.0, f"{len(prompts)} prompts")
    result = _trained(ctx, "generation", lambda: generate_items(
        ctx.engine, spec.project, prompts, policy, policy_b=policy_b, name=spec.name or name, name_b=spec.name_b or name_b,
        options=SampleOptions.of(spec), progress=ctx.progress, should_stop=ctx.should_stop))
    out = Path(ctx.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return RunResult(register=[], path=str(out / "generate.json"), metrics=result, extra=result)


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
