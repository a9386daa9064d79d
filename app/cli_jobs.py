"""`rlhf worker` and `rlhf jobs ...`: the job queue from the command line.

    rlhf worker [--once] [--poll 1.0]
    rlhf jobs submit export --param project=sample --param format=trl [--user alice] [--json]
    rlhf jobs submit train_rm --params-json '{"project": "sample", "base": "minilm"}'
    rlhf jobs list [--status running] [--json]
    rlhf jobs show 3 [--json]
    rlhf jobs cancel 3

The CLI runs with shell access to the database, so it acts as a trusted operator; --user only
records who submitted a job.
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from annotation.store import JOB_KINDS
from app.cli import JsonOpt, cli, emit, engine

jobs_cli = typer.Typer(no_args_is_help=True, help="Submit, list, inspect and cancel background jobs.")
cli.add_typer(jobs_cli, name="jobs")


def _parse_value(raw: str):
    """A --param value: JSON when it parses (numbers, true/false, lists), otherwise the plain string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _params(pairs: List[str], params_json: Optional[str]) -> dict:
    from app.jobs import JobError

    params: dict = {}
    if params_json:
        try:
            params = json.loads(params_json)
        except ValueError as exc:
            raise JobError(f"--params-json is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise JobError("--params-json must be a JSON object, e.g. '{\"project\": \"sample\"}'")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise JobError(f"--param '{pair}' is malformed; expected key=value")
        params[key.strip()] = _parse_value(value)
    return params


def _user_id(username: Optional[str]) -> Optional[int]:
    if not username:
        return None
    from sqlalchemy import select

    from annotation.store import User, transaction
    from app.jobs import JobError

    with transaction(engine()) as session:
        user_id = session.scalar(select(User.id).where(User.username == username))
    if user_id is None:
        raise JobError(f"--user {username}: no such user (`rlhf user add` creates one)")
    return user_id


def _line(job: dict) -> str:
    who = f" by {job['created_by_name']}" if job.get("created_by_name") else ""
    flag = " (cancel requested)" if job["cancel_requested"] and job["status"] == "running" else ""
    return (f"#{job['id']} {job['kind']:<9} {job['status']:<10}{flag} {job['progress']:4.0%}  "
            f"{job['message'] or ''}  [{job['created_at']}{who}]")


@cli.command()
def worker(
    once: bool = typer.Option(False, "--once", help="Run at most one queued job, then exit (exit at once if none)."),
    poll: float = typer.Option(1.0, "--poll", help="Seconds between checks for new jobs and cancel requests."),
) -> None:
    """Run queued jobs one at a time, each in its own process, until stopped (Ctrl-C)."""
    from app.jobs import run_worker
    from app.settings import get_settings

    if poll <= 0:
        raise typer.BadParameter("must be positive", param_hint="--poll")
    run_worker(get_settings(), once=once, poll=poll, log=lambda m: typer.echo(m, err=True))


@jobs_cli.command("submit")
def jobs_submit(
    kind: str = typer.Argument(..., help="One of " + ", ".join(JOB_KINDS) + "."),
    param: List[str] = typer.Option([], "--param", "-p", help="key=value (value parsed as JSON when it parses); repeatable."),
    params_json: Optional[str] = typer.Option(None, "--params-json", help="All params as one JSON object; --param entries override its keys."),
    user: Optional[str] = typer.Option(None, "--user", help="Record this user as the job's creator."),
    as_json: bool = JsonOpt,
) -> None:
    """Queue a job; a running `rlhf worker` picks it up."""
    from app.jobs import get_job, submit_job

    eng = engine()
    job_id = submit_job(eng, kind, _params(param, params_json), created_by=_user_id(user))
    job = get_job(eng, job_id)
    emit(job, as_json, f"job {job_id} ({kind}) queued; `rlhf jobs show {job_id}` follows it")


@jobs_cli.command("list")
def jobs_list(
    status: Optional[str] = typer.Option(None, "--status", help="Only jobs with this status (queued, running, succeeded, failed, cancelled)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Only jobs of this kind."),
    limit: int = typer.Option(50, "--limit", help="At most this many, newest first."),
    as_json: bool = JsonOpt,
) -> None:
    """List jobs, newest first."""
    from app.jobs import list_jobs

    jobs = list_jobs(engine(), status=status, kind=kind, limit=limit)
    emit({"jobs": jobs}, as_json, "\n".join(_line(j) for j in jobs) or "no jobs")


@jobs_cli.command("show")
def jobs_show(
    job_id: int = typer.Argument(..., help="Job id."),
    lines: int = typer.Option(40, "--lines", help="How many lines of the log to show."),
    as_json: bool = JsonOpt,
) -> None:
    """A job's status, progress, result and the tail of its log."""
    from app.jobs import get_job, log_tail

    job = get_job(engine(), job_id)
    tail = log_tail(job, lines)
    text = "\n".join(
        [_line(job), f"params: {json.dumps(job['params'])}"]
        + ([f"result: {json.dumps(job['result'])}"] if job["result"] is not None else [])
        + ([f"log: {job['log_path']}", tail] if job["log_path"] else ["log: none yet"])
    )
    emit({**job, "log_tail": tail}, as_json, text)


@jobs_cli.command("cancel")
def jobs_cancel(job_id: int = typer.Argument(..., help="Job id."), as_json: bool = JsonOpt) -> None:
    """Cancel a job: a queued one at once; a running one is stopped by its worker."""
    from app.jobs import cancel_job

    status = cancel_job(engine(), job_id)
    text = f"job {job_id} cancelled" if status == "cancelled" else f"job {job_id}: cancel requested; its worker will stop it"
    emit({"id": job_id, "status": status}, as_json, text)
