"""The job queue on the `jobs` table, and the worker that runs jobs in subprocesses.

    rlhf jobs submit export --param project=sample --param format=trl
    rlhf worker                  # runs queued jobs until stopped; --once runs at most one
    python -m app.jobs run 7     # what the worker starts for job 7 (one subprocess per job)

Lifecycle: `submit_job` queues a job; a worker claims it atomically (`claim_next`: FOR UPDATE SKIP
LOCKED on PostgreSQL, the write lock taken at BEGIN IMMEDIATE on SQLite), starts
`python -m app.jobs run ID`, writes a heartbeat while the child lives and terminates it when a
cancel is requested (SIGTERM, then SIGKILL after a grace period). The child calls the handler named
in HANDLERS with a JobContext, then registers the models listed in the result's "register" list and
marks the job succeeded in ONE transaction, so a job that fails, is cancelled or loses its worker
registers nothing. A worker that starts marks failed every running job whose heartbeat is stale or
whose worker process is gone, so a killed worker never leaves a job "running" forever.

Handlers: `handler(params: dict, ctx: JobContext) -> dict`; poll `ctx.cancelled()` between steps
(or call `ctx.raise_if_cancelled()`). For tests only, RLHF_EXTRA_JOB_HANDLERS adds kinds:
"kind=module:function[,kind=module:function...]".

Several processes (GPUs): with the setting accelerate_config (RLHF_ACCELERATE_CONFIG, e.g.
configs/accelerate/ddp.yaml) the worker starts training jobs (ACCELERATE_KINDS) as
`python -m accelerate.commands.launch --config_file CFG -m app.jobs run ID`. Every process (rank)
then runs the handler; only rank 0 writes to the jobs table and to the job's run dir, and it
commits success only once every rank's handler has returned (see run_job). A cancel sends SIGTERM
to the launcher, which passes it on to every rank.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from annotation.errors import AnnotationError, JobCancelled  # JobCancelled: re-exported for handlers and tests
from annotation.store import JOB_KINDS, JOB_STATUSES, Job, User, is_sqlite, make_engine, transaction, utcnow

@dataclasses.dataclass(frozen=True)
class JobKind:
    """One kind of job: what runs it, what checks its params when it is submitted, how it is launched."""

    handler: str
    """"module:function" that the worker's child process runs: handler(params, ctx) -> dict."""
    spec: str | None = None
    """"module:Class" of the use case's spec, checked when the job is submitted (a page shows a bad
    value on its form, `rlhf jobs submit` refuses it); None where the handler checks its params."""
    accelerate: bool = False
    """Started through `accelerate launch` when the accelerate_config setting is set."""


# The one table of job kinds (annotation.store.JOB_KINDS must name the same; a test holds them equal).
JOB_TABLE: dict[str, JobKind] = {
    "train_rm": JobKind("reward.jobs:train_rm", "reward.usecases:TrainRMSpec", accelerate=True),
    "eval_rm": JobKind("reward.jobs:eval_rm", "reward.usecases:EvalRMSpec"),
    "sft": JobKind("ppo.jobs:sft", "ppo.usecases:SFTSpec", accelerate=True),
    "ppo": JobKind("ppo.jobs:ppo", "ppo.usecases:PPOSpec", accelerate=True),
    "dpo": JobKind("ppo.jobs:dpo", "ppo.usecases:DPOSpec", accelerate=True),
    "grpo": JobKind("ppo.jobs:grpo", "ppo.usecases:GRPOSpec", accelerate=True),
    "rloo": JobKind("ppo.jobs:rloo", "ppo.usecases:RLOOSpec", accelerate=True),
    "eval_policy": JobKind("ppo.jobs:eval_policy", "ppo.usecases:EvalPolicySpec"),
    "generate": JobKind("ppo.jobs:generate", "ppo.usecases:GenerateSpec"),
    "export": JobKind("app.jobs:export_job", "annotation.usecases:ExportSpec"),
    "score_queue": JobKind("reward.jobs:score_queue", "reward.usecases:ScoreQueueSpec"),
}
HANDLERS: dict[str, str] = {kind: job.handler for kind, job in JOB_TABLE.items()}
SPEC_CHECKS: dict[str, str] = {kind: job.spec for kind, job in JOB_TABLE.items() if job.spec}
ACCELERATE_KINDS = tuple(kind for kind, job in JOB_TABLE.items() if job.accelerate)
EXTRA_HANDLERS_ENV = "RLHF_EXTRA_JOB_HANDLERS"
CANCEL_GRACE_SECONDS = 10.0
"""How long a job may take to stop after SIGTERM before the worker sends SIGKILL."""
LOG_NAME = "job.log"


class JobError(AnnotationError):
    """A job request that cannot be done (unknown kind, bad params, no such job); the message says why."""


# --------------------------------------------------------------------------- handlers


def handler_table() -> dict[str, str]:
    """HANDLERS plus the test-only kinds named in RLHF_EXTRA_JOB_HANDLERS."""
    table = dict(HANDLERS)
    extra = os.environ.get(EXTRA_HANDLERS_ENV, "").strip()
    for entry in filter(None, (e.strip() for e in extra.split(","))):
        kind, sep, target = entry.partition("=")
        if not sep or ":" not in target:
            raise JobError(f"{EXTRA_HANDLERS_ENV}: entry '{entry}' is malformed; expected kind=module:function")
        table[kind.strip()] = target.strip()
    return table


def resolve_handler(kind: str) -> Callable[[dict, "JobContext"], dict]:
    table = handler_table()
    if kind not in table:
        raise JobError(f"unknown job kind '{kind}'; expected one of {', '.join(sorted(table))}")
    module_name, _, func_name = table[kind].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


# --------------------------------------------------------------------------- queue operations


def _json_safe(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise JobError(f"{what} must be JSON-serialisable: {exc}") from None


def _validate_params(kind: str, params: Any) -> dict:
    if not isinstance(params, dict):
        raise JobError(f"job params must be a JSON object (key: value), got {type(params).__name__}")
    bad_keys = [k for k in params if not isinstance(k, str) or not k]
    if bad_keys:
        raise JobError(f"job params keys must be non-empty strings; got {bad_keys!r}")
    if kind == "export":
        missing = [k for k in ("project", "format") if not params.get(k)]
        if missing:
            raise JobError(f"an export job needs param(s) {', '.join(missing)} (e.g. --param project=NAME --param format=trl)")
        if "filename" in params:
            _export_filename(params["filename"])
    params = _json_safe(params, "job params")
    validate = SPEC_CHECKS.get(kind)
    if validate is not None:
        _check_spec(validate, kind, params)
    return params


def _check_spec(target: str, kind: str, params: dict) -> None:
    from annotation.runs import spec_from_params

    module_name, _, name = target.partition(":")
    spec_cls = getattr(importlib.import_module(module_name), name)
    from ppo.errors import PPOError
    from reward.errors import RewardError

    try:
        if "from_params" in vars(spec_cls):  # its own reader (PPOSpec: spec fields and PPOConfig fields)
            spec_cls.from_params(dict(params), kind)
        else:
            spec_from_params(spec_cls, dict(params), kind, JobError)
    except (AnnotationError, RewardError, PPOError) as exc:
        raise JobError(str(exc) if str(exc).startswith(kind) else f"{kind}: {exc}") from None


def submit_job(engine: Engine, kind: str, params: dict | None = None, created_by: int | None = None) -> int:
    """Queue a job and return its id."""
    known = set(JOB_KINDS) | set(handler_table())
    if kind not in known:
        raise JobError(f"unknown job kind '{kind}'; expected one of {', '.join(sorted(known))}")
    params = _validate_params(kind, params if params is not None else {})
    with transaction(engine) as session:
        if created_by is not None and session.get(User, created_by) is None:
            raise JobError(f"no user with id {created_by} to record as the job's creator")
        job = Job(kind=kind, params=params, status="queued", created_by=created_by, created_at=utcnow())
        session.add(job)
        session.flush()
        return job.id


ADDS_ITEMS = ("generate",)
"""Job kinds that add items to their params' project: a project ordered by uncertainty is scored again after them."""


def queue_rescore(engine: Engine, project: str, created_by: int | None = None) -> int | None:
    """Queue a score_queue job for `project` if it orders its queue by uncertainty and has an active
    reward model, unless one is queued for it already; the job id (new or queued), or None when
    the project needs no scoring. Called when a reward model is activated, items arrive or the
    selection changes: scores are computed by a job, never in a request."""
    from annotation.selection import wants_scores

    if not wants_scores(engine, project):
        return None
    with transaction(engine) as session:
        queued = session.scalars(select(Job).where(Job.kind == "score_queue", Job.status == "queued")).all()
        for job in queued:
            if (job.params or {}).get("project") == project:
                return job.id
    return submit_job(engine, "score_queue", {"project": project}, created_by=created_by)


def job_dict(job: Job, username: str | None = None) -> dict:
    """A job as plain JSON-ready data."""
    iso = lambda t: t.isoformat(timespec="seconds") if t is not None else None  # noqa: E731
    return {
        "id": job.id, "kind": job.kind, "status": job.status, "progress": job.progress, "message": job.message,
        "params": job.params, "result": job.result, "log_path": job.log_path, "cancel_requested": job.cancel_requested,
        "worker": job.worker, "created_by": job.created_by, "created_by_name": username,
        "created_at": iso(job.created_at), "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
        "heartbeat_at": iso(job.heartbeat_at),
    }


def list_jobs(engine: Engine, status: str | None = None, kind: str | None = None, limit: int = 100) -> list[dict]:
    """Jobs, newest first, optionally of one status and kind."""
    if status is not None and status not in JOB_STATUSES:
        raise JobError(f"unknown job status '{status}'; expected one of {', '.join(JOB_STATUSES)}")
    query = select(Job, User.username).outerjoin(User, User.id == Job.created_by)
    if status is not None:
        query = query.where(Job.status == status)
    if kind is not None:
        query = query.where(Job.kind == kind)
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    with transaction(engine) as session:
        return [job_dict(job, name) for job, name in session.execute(query)]


def get_job(engine: Engine, job_id: int) -> dict:
    with transaction(engine) as session:
        row = session.execute(
            select(Job, User.username).outerjoin(User, User.id == Job.created_by).where(Job.id == job_id)
        ).first()
        if row is None:
            raise JobError(f"no job with id {job_id}; `rlhf jobs list` shows them")
        return job_dict(*row)


def log_tail(job: dict, lines: int = 40) -> str:
    """The last lines of a job's log ('' when it has none yet)."""
    path = job.get("log_path")
    if not path or not Path(path).is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 64 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def cancel_job(engine: Engine, job_id: int, *, by_user_id: int | None = None) -> str:
    """Cancel a job: a queued one at once, a running one by asking its worker. Returns the new status.
    `by_user_id`: the app user asking, checked here to be an active researcher or admin (None: the
    command line, whose operator owns the database)."""
    from annotation.auth import require_role

    with transaction(engine) as session:
        if by_user_id is not None:
            require_role(session.get(User, by_user_id), "researcher")
        job = session.get(Job, job_id)
        if job is None:
            raise JobError(f"no job with id {job_id}; `rlhf jobs list` shows them")
        if job.status == "queued":
            job.status, job.finished_at, job.message = "cancelled", utcnow(), "cancelled before it started"
            return "cancelled"
        if job.status == "running":
            job.cancel_requested = True
            return "cancel_requested"
        raise JobError(f"job {job_id} has already {job.status}; there is nothing to cancel")


def claim_next(engine: Engine, worker_id: str) -> dict | None:
    """Atomically move the oldest queued job to running for `worker_id`; None when none is queued.

    PostgreSQL: the candidate row is locked with FOR UPDATE SKIP LOCKED, so concurrent workers
    each take a different job without waiting on each other. SQLite: the store begins every
    transaction IMMEDIATE, so the select and the update below run under the database's write lock.
    On both, the update re-checks status='queued' and its row count must be 1.
    """
    candidate = select(Job.id).where(Job.status == "queued").order_by(Job.created_at, Job.id).limit(1)
    if not is_sqlite(engine):
        candidate = candidate.with_for_update(skip_locked=True)
    with transaction(engine) as session:
        job_id = session.scalar(candidate)
        if job_id is None:
            return None
        now = utcnow()
        claimed = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued")
            .values(status="running", worker=worker_id, started_at=now, heartbeat_at=now, message="started")
        )
        if claimed.rowcount != 1:
            return None
        return job_dict(session.get(Job, job_id))


def _finish(engine: Engine, job_id: int, status: str, message: str, **extra) -> bool:
    """Move a running job to a final status; False when it was no longer running (someone else decided)."""
    with transaction(engine) as session:
        done = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "running")
            .values(status=status, message=message[:4000], finished_at=utcnow(), **extra)
        )
        return done.rowcount == 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_gone(worker: str | None) -> bool:
    """True when `worker` ("host:pid") ran on this host and its process no longer exists."""
    host, _, pid = (worker or "").rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def reap_stale_jobs(engine: Engine, stale_after_seconds: float, log: Callable[[str], None] = print) -> list[int]:
    """Mark failed every running job whose heartbeat is older than `stale_after_seconds` or whose
    worker process (on this host) is gone. Returns their ids."""
    import datetime as dt

    cutoff = utcnow() - dt.timedelta(seconds=stale_after_seconds)
    with transaction(engine) as session:
        running = session.execute(select(Job.id, Job.worker, Job.heartbeat_at).where(Job.status == "running")).all()
    reaped = []
    for job_id, worker, beat in running:
        gone = _worker_gone(worker)
        if gone or beat is None or beat < cutoff:
            why = f"its worker {worker} is gone" if gone else f"no heartbeat since {beat} (stale after {stale_after_seconds:g}s)"
            if _finish(engine, job_id, "failed", f"worker lost: {why}; nothing was registered"):
                reaped.append(job_id)
                log(f"job {job_id}: marked failed, {why}")
    return reaped


# --------------------------------------------------------------------------- inside the job process


@dataclasses.dataclass
class JobContext:
    """What a handler gets besides its params: where to write, how to log, report and check for cancel.

    Under `accelerate launch` each rank gets its own context; on ranks other than 0, run_dir is a
    scratch dir deleted when the job ends, so files a handler writes on every rank are rank 0's once.
    """

    job_id: int
    run_dir: Path
    engine: Engine
    settings: Any
    log: logging.Logger
    rank: int = 0
    """This process's rank under `accelerate launch`; only rank 0 reports and its run_dir is the job's."""
    world_size: int = 1
    """How many processes run the job (1 without accelerate launch)."""

    def progress(self, fraction: float, message: str = "") -> None:
        """Record progress (clamped to 0..1) and a message; also counts as a heartbeat. Rank 0 only."""
        if self.rank != 0:
            return
        fraction = min(1.0, max(0.0, float(fraction)))
        with transaction(self.engine) as session:
            session.execute(
                update(Job).where(Job.id == self.job_id, Job.status == "running")
                .values(progress=fraction, message=message[:4000], heartbeat_at=utcnow())
            )
        if message:
            self.log.info("progress %.0f%%: %s", fraction * 100, message)

    def cancelled(self) -> bool:
        """True when a cancel was requested, or the job is no longer ours to run (its worker was lost).

        Always False on ranks other than 0: they stop when rank 0 leaves (their next collective
        fails) or when the launcher passes on the worker's SIGTERM, so only rank 0 decides."""
        if self.rank != 0:
            return False
        with transaction(self.engine) as session:
            row = session.execute(select(Job.status, Job.cancel_requested).where(Job.id == self.job_id)).first()
        return row is None or row.status != "running" or bool(row.cancel_requested)

    def raise_if_cancelled(self) -> None:
        if self.cancelled():
            raise JobCancelled(f"job {self.job_id} cancelled")


def job_run_dir(settings, job_id: int) -> Path:
    return Path(settings.runs_dir) / f"job-{job_id}"


def _job_logger(job_id: int, path: Path, rank: int = 0, world_size: int = 1) -> logging.Logger:
    logger = logging.getLogger(f"rlhf.job.{job_id}")
    # Rank 0 tells the job's story; the other ranks would only repeat it, so they log problems only.
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False  # stderr already goes to the same file; propagating would log twice
    handler = logging.FileHandler(path, encoding="utf-8")
    who = f" rank{rank}" if world_size > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s{who} %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return logger


def _user_message(exc: BaseException) -> str:
    from ppo.errors import PPOError
    from reward.errors import RewardError

    if isinstance(exc, (AnnotationError, RewardError, PPOError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _on_sigterm(signum, frame):
    raise JobCancelled("stopped by its worker (SIGTERM)")


def _complete(engine: Engine, job_id: int, result: dict) -> list[int]:
    """Register the result's models and mark the job succeeded, together or not at all."""
    from annotation.registry import register_model

    if not isinstance(result, dict):
        raise JobError(f"the job handler returned {type(result).__name__}; expected a dict")
    to_register = result.get("register") or []
    if not isinstance(to_register, list) or not all(isinstance(r, dict) for r in to_register):
        raise JobError("the result's 'register' must be a list of model field dicts")
    with transaction(engine) as session:
        ids = [register_model(session, **{**fields, "job_id": job_id}).id for fields in to_register]
        stored = _json_safe({**{k: v for k, v in result.items() if k != "register"}, "registered_model_ids": ids}, "job result")
        # The job must still be ours and not cancelled at the moment of commit; otherwise roll
        # back, models included.
        done = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "running", Job.cancel_requested.is_(False))
            .values(status="succeeded", progress=1.0, message="done", result=stored, finished_at=utcnow())
        )
        if done.rowcount != 1:
            raise JobCancelled(f"job {job_id} was cancelled or lost its worker before it could finish")
    return ids


def launch_rank() -> tuple[int, int]:
    """(rank, world size) of this process as set by `accelerate launch` (torchrun); (0, 1) when run alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _prepare_rank() -> None:
    """Set up one of several processes that `accelerate launch` started for a job."""
    # torchrun starts each rank in a session of its own, out of reach of the worker's SIGKILL to the
    # launcher's process group: a rank dies with its launcher instead, so none outlives a killed job.
    _die_with_parent(os.getppid())()
    import torch

    if not torch.cuda.is_available():
        # The launcher that starts N local processes does not pass a config's use_cpu on, and
        # accelerate on a host without CUDA would make every rank a separate one-process run.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def _wait_for_all_ranks() -> None:
    """Barrier over the job's processes: a rank whose handler failed never arrives, so rank 0 cannot
    mark the job succeeded (its barrier fails, or the launcher stops it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # the handler used no process group; torchrun's env says where to meet
    try:
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - the backend's error type varies; the cause is another rank
        raise JobError(f"another process of this job failed before finishing ({type(exc).__name__}); see the log") from None


def leave_process_group() -> None:
    """Destroy this process's torch.distributed group, if it joined one. A rank that exits with a
    gloo group alive can die in interpreter teardown (SIGABRT, "terminate called without an active
    exception"), failing a run that had finished; every launched process calls this on the way out."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to find nothing to leave
    if dist is None:
        return
    with contextlib.suppress(Exception):
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_job(job_id: int, settings=None) -> int:
    """Run one claimed job in this process (the worker's child). Returns the process exit code.

    Under `accelerate launch` every rank runs this. Rank 0 does what a lone process does. The other
    ranks read the job's kind and params once and never touch its row again; their handler writes
    into a scratch dir under the run dir, deleted at the end, so only rank 0's outputs are the job's
    even for a handler that saves on every rank. Rank 0 commits success only after every rank's
    handler has returned; a SIGTERM without a cancel request (the launcher stopping rank 0 because
    another rank failed) fails the job.
    """
    from app.settings import get_settings

    rank, world = launch_rank()
    if world > 1:
        _prepare_rank()
    settings = settings or get_settings()
    engine = make_engine(settings.db_url)
    with transaction(engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "running":
            print(f"job {job_id} is not claimed by a worker (status {job.status if job else 'missing'})", file=sys.stderr)
            return 3
        kind, params = job.kind, dict(job.params or {})
    run_dir = job_run_dir(settings, job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    work_dir = run_dir if rank == 0 else run_dir / f".rank{rank}"
    work_dir.mkdir(exist_ok=True)
    log = _job_logger(job_id, run_dir / LOG_NAME, rank, world)
    ctx = JobContext(job_id=job_id, run_dir=work_dir, engine=engine, settings=settings, log=log, rank=rank,
                     world_size=world)
    signal.signal(signal.SIGTERM, _on_sigterm)
    log.info("job %d (%s) started%s, params %s", job_id, kind,
             f" in {world} processes (accelerate launch), this is rank 0" if world > 1 else "",
             json.dumps(params, default=str))
    try:
        handler = resolve_handler(kind)
        result = handler(params, ctx)
        if world > 1:
            _wait_for_all_ranks()
        # From here on the outcome is one commit; a SIGTERM now would only race it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if rank != 0:
            return 0
        ids = _complete(engine, job_id, result if result is not None else {})
        log.info("job %d succeeded%s", job_id, f"; registered models {ids}" if ids else "")
        if kind in ADDS_ITEMS and params.get("project"):
            with contextlib.suppress(AnnotationError, SQLAlchemyError):  # the items are in; a missed rescore is not a failure
                rescore = queue_rescore(engine, str(params["project"]))
                if rescore is not None:
                    log.info("queued job %d to score project '%s' again (uncertainty selection)", rescore, params["project"])
        return 0
    except JobCancelled as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if rank != 0:
            return 0
        if world > 1 and not _beat(engine, job_id, write=False)[0]:
            # Under accelerate launch, a stop nobody asked for is the launcher ending the job because
            # another of its processes failed.
            log.error("job %d stopped (%s) with no cancel request: another process of the job failed", job_id, exc)
            _finish(engine, job_id, "failed", "another process of this job failed and the launcher stopped the rest; "
                                              "see the log; nothing was registered")
            return 1
        log.info("job %d cancelled: %s", job_id, exc)
        _finish(engine, job_id, "cancelled", f"cancelled: {exc}; nothing was registered")
        return 0
    except BaseException as exc:  # noqa: BLE001 - any failure must end as a failed job, with its traceback
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.error("job %d failed:\n%s", job_id, traceback.format_exc())
        if rank == 0:
            _finish(engine, job_id, "failed", _user_message(exc))
        return 1
    finally:
        for h in list(log.handlers):
            h.close()
            log.removeHandler(h)
        engine.dispose()
        if rank != 0:
            shutil.rmtree(work_dir, ignore_errors=True)
        if world > 1:
            leave_process_group()


# --------------------------------------------------------------------------- the worker


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: make the job process die if its worker dies (Linux), so an orphan never finishes
    a job whose worker is gone."""

    def setup() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the worker died before prctl took effect
            os._exit(1)

    return setup


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _beat(engine: Engine, job_id: int, write: bool) -> tuple[bool, bool]:
    """(cancel wanted, still running); writes the heartbeat when `write`."""
    with transaction(engine) as session:
        if write:
            session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(heartbeat_at=utcnow()))
        row = session.execute(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).first()
    return bool(row and row.cancel_requested), bool(row and row.status == "running")


def accelerate_config_path(settings) -> Path | None:
    """The accelerate config file the settings name (relative: to the working directory, else to the
    repository, where configs/accelerate/ lives); None when unset."""
    from app.settings import REPO_ROOT

    value = str(getattr(settings, "accelerate_config", "") or "")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise JobError(f"accelerate_config (RLHF_ACCELERATE_CONFIG) {value}: no such file; expected an accelerate "
                       f"config YAML such as configs/accelerate/ddp.yaml")
    return path.resolve()


def job_command(settings, job_id: int, kind: str) -> list[str]:
    """The command of a job's process: `python -m app.jobs run ID`, started through `accelerate launch`
    for training kinds when the accelerate_config setting names a config."""
    run = ["-m", "app.jobs", "run", str(job_id)]
    config = accelerate_config_path(settings) if kind in ACCELERATE_KINDS else None
    if config is None:
        return [sys.executable, *run]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *run]


def run_claimed(engine: Engine, settings, job: dict, *, poll: float = 1.0, grace: float = CANCEL_GRACE_SECONDS,
                log: Callable[[str], None] = print) -> str:
    """Run a claimed job in a subprocess until it ends; returns its final status."""
    job_id = job["id"]
    run_dir = job_run_dir(settings, job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / LOG_NAME
    with transaction(engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(log_path=str(log_path)))
    cmd = job_command(settings, job_id, job["kind"])
    launched = "accelerate.commands.launch" in cmd
    log(f"job {job_id} ({job['kind']}): started{' under accelerate launch' if launched else ''}, log {log_path}")
    heartbeat = max(0.2, float(settings.heartbeat_seconds))
    check_every = max(0.1, min(poll, heartbeat))
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    term_at = stray_since = None
    last_beat = last_check = time.monotonic()
    try:
        while proc.poll() is None:
            time.sleep(0.1)
            now = time.monotonic()
            if term_at is not None and now - term_at > grace:
                log(f"job {job_id}: still alive {grace:g}s after SIGTERM, killing it")
                _signal_group(proc, signal.SIGKILL)
                term_at = float("inf")
            if now - last_check < check_every:
                continue
            last_check = now
            write = now - last_beat >= heartbeat
            try:
                cancel, running = _beat(engine, job_id, write)
            except SQLAlchemyError as exc:
                # A database hiccup must not kill a long job: retry at the next check; if it
                # lasts, the heartbeat goes stale and the next worker start marks the job failed.
                log(f"job {job_id}: heartbeat failed ({type(exc).__name__}: {exc}); retrying")
                continue
            if write:
                last_beat = now
            if not running and stray_since is None:
                stray_since = now  # finished by the job itself (it is exiting) or marked lost by a reaper
            if term_at is None and (cancel or (stray_since is not None and now - stray_since > grace)):
                log(f"job {job_id}: {'cancel requested' if cancel else 'no longer running but its process is'}, stopping it")
                _signal_group(proc, signal.SIGTERM)
                term_at = now
    except BaseException:
        # The worker itself is stopping (Ctrl-C, SIGTERM): take the job down with it, and say so.
        # Marked first, so the job's own "cancelled" on SIGTERM does not hide why it stopped.
        with contextlib.suppress(SQLAlchemyError):
            _finish(engine, job_id, "failed", "the worker was stopped while the job ran; nothing was registered")
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        raise
    rc = proc.returncode
    # The child normally records its own outcome; if it could not (killed, crashed), do it here.
    cancel, still_running = _beat(engine, job_id, write=False)
    if still_running:
        if cancel:
            _finish(engine, job_id, "cancelled", "cancelled: the job process was stopped; nothing was registered")
        else:
            _finish(engine, job_id, "failed", f"the job process exited with code {rc} without finishing; see its log")
    final = get_job(engine, job_id)
    log(f"job {job_id}: {final['status']} ({final['message']})")
    return final["status"]


def run_worker(settings=None, *, once: bool = False, poll: float = 1.0, grace: float = CANCEL_GRACE_SECONDS,
               worker_id: str | None = None, log: Callable[[str], None] = print) -> int:
    """Run queued jobs one at a time until stopped (or, with once, at most one). Returns how many ran."""
    from annotation.store import init_db
    from app.settings import get_settings

    settings = settings or get_settings()
    accelerate_config = accelerate_config_path(settings)  # a missing file stops the worker now, not each job
    engine = init_db(settings.db_url)
    worker_id = worker_id or default_worker_id()
    stale = float(settings.stale_after_seconds)
    reap_stale_jobs(engine, stale, log)
    previous = None
    if threading_is_main():
        # SIGTERM to the worker unwinds like Ctrl-C, so the running job is stopped and marked.
        previous = signal.signal(signal.SIGTERM, _stop_worker)
    ran = 0
    last_reap = time.monotonic()
    log(f"worker {worker_id} waiting for jobs on {engine.url.render_as_string(hide_password=True)}"
        + (f"; {', '.join(ACCELERATE_KINDS)} jobs run under accelerate launch --config_file {accelerate_config}"
           if accelerate_config else ""))
    try:
        while True:
            try:
                job = claim_next(engine, worker_id)
            except SQLAlchemyError as exc:
                log(f"worker {worker_id}: cannot claim a job ({type(exc).__name__}: {exc}); retrying in {poll:g}s")
                job = None
                if once:
                    raise
            if job is None:
                if once:
                    break
                time.sleep(poll)
                if time.monotonic() - last_reap > stale / 2:
                    reap_stale_jobs(engine, stale, log)  # other workers' jobs, on this host or others
                    last_reap = time.monotonic()
                continue
            run_claimed(engine, settings, job, poll=poll, grace=grace, log=log)
            ran += 1
            if once:
                break
    except KeyboardInterrupt:
        log(f"worker {worker_id} stopped")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        engine.dispose()
    return ran


def _stop_worker(signum, frame):
    raise KeyboardInterrupt


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------- built-in handlers


def _export_filename(filename) -> str:
    # Only a name: the job writes inside its own run dir, never where a submitter points it.
    filename = str(filename)
    if Path(filename).name != filename or not filename.endswith((".jsonl", ".parquet")):
        raise JobError(f"export param filename={filename!r}: expected a plain file name ending .jsonl or .parquet")
    return filename


def export_job(params: dict, ctx: JobContext) -> dict:
    """The export job: annotation.usecases.export into the job's run dir (params: ExportSpec's fields;
    filename, if given, a plain name ending .jsonl or .parquet)."""
    from annotation.runs import RunContext, spec_from_params
    from annotation.usecases import ExportSpec, export

    spec = spec_from_params(ExportSpec, params, "export", JobError)
    _export_filename(spec.file_name())
    result = export(spec, RunContext(output_dir=Path(ctx.run_dir), engine=ctx.engine, settings=ctx.settings,
                                     progress=ctx.progress, should_stop=ctx.cancelled, log=ctx.log))
    return _json_safe(result.as_job_result(), "export report")


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "run" or not argv[1].isdigit():
        print("usage: python -m app.jobs run JOB_ID", file=sys.stderr)
        return 2
    # Import through the package, not __main__, so handlers that import app.jobs share this one copy of it.
    from app.jobs import run_job as run

    return run(int(argv[1]))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
