"""The `rlhf` command line: thin commands over annotation/, reward/ and ppo/.

    rlhf --help
    rlhf init --sample
    rlhf import data/samples/hh_items.jsonl --project demo

Every command prints readable text by default and one JSON object with --json. Errors from the
layers below are turned into a message and an exit code here, in `main`, and nowhere else.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from annotation.errors import AnnotationError, StoreError
from ppo.errors import PPOError
from reward.errors import RewardError

from app.settings import SettingsError

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="RLHF Studio: preference data, reward models and PPO.")
user_cli = typer.Typer(no_args_is_help=True, help="Manage users.")
project_cli = typer.Typer(no_args_is_help=True, help="Manage projects.")
models_cli = typer.Typer(no_args_is_help=True, help="Default models.")
cli.add_typer(user_cli, name="user")
cli.add_typer(project_cli, name="project")
cli.add_typer(models_cli, name="models")

USER_ERRORS = (AnnotationError, RewardError, PPOError, SettingsError)

JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of text.")


def emit(payload: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    """Print `payload` as JSON, or `text` (default: key: value lines) for people."""
    if as_json:
        typer.echo(json.dumps(payload, default=str))
    elif text is not None:
        typer.echo(text)
    else:
        for key, value in payload.items():
            typer.echo(f"{key}: {value}")


def engine():
    """The store's engine, schema brought to the newest migration."""
    from annotation.store import init_db

    from app.settings import get_settings

    return init_db(get_settings().db_url)


def read_password(prompt: str = "Password") -> str:
    """A password from the terminal (asked twice) or, when stdin is not a terminal, its first line."""
    if sys.stdin.isatty():
        return typer.prompt(prompt, hide_input=True, confirmation_prompt=True)
    line = sys.stdin.readline()
    if not line.strip():
        raise AnnotationError("no password on standard input; pipe it in, or run in a terminal to be asked")
    return line.rstrip("\r\n")


@cli.command()
def init(
    sample: bool = typer.Option(False, "--sample", help="Also load the sample project and create a first admin."),
    as_json: bool = JsonOpt,
) -> None:
    """Create or upgrade the database schema; with --sample, load the sample project."""
    from app.settings import get_settings
    from app.setup import initialise

    payload = initialise(get_settings(), sample=sample)
    text = f"database ready at {payload['db_url']}"
    if payload.get("admin_password"):
        text += (
            f"\nfirst admin created: username '{payload['admin_username']}' password '{payload['admin_password']}'"
            "\n(shown once; change it on the Users page)"
        )
    if payload.get("sample"):
        text += f"\nsample project '{payload['sample']['project']}': {payload['sample']['items']} items, {payload['sample']['prompts']} prompts"
    emit(payload, as_json, text)


@user_cli.command("add")
def user_add(
    username: str = typer.Argument(..., help="Login name, unique."),
    role: str = typer.Option("annotator", "--role", help="annotator, researcher or admin."),
    as_json: bool = JsonOpt,
) -> None:
    """Add a user; the password is read from a prompt or standard input, never from the command line."""
    from annotation.auth import check_new_user, create_user
    from annotation.store import reading, transaction

    db = engine()
    # Everything that can be refused is checked before the password is asked for (create_user
    # checks again, inside its transaction).
    with reading(db) as session:
        username = check_new_user(session, username, role)
    password = read_password()
    with transaction(db) as session:
        user = create_user(session, username, password, role)
        payload = {"id": user.id, "username": user.username, "role": user.role}
    emit(payload, as_json, f"user '{username}' ({role}) created")


@project_cli.command("create")
def project_create(
    name: str = typer.Argument(..., help="Project name, unique."),
    overlap: int = typer.Option(3, "--overlap", "-k", help="Annotations wanted per item."),
    guidelines: Optional[str] = typer.Option(None, "--guidelines", help="Markdown file with the annotation guidelines."),
    criteria: str = typer.Option("", "--criteria", help="Comma-separated criteria, e.g. helpfulness,harmlessness."),
    selection: str = typer.Option("random", "--selection", help="Which item goes next: random (import order) or uncertainty "
                                  "(the items the active reward model is least sure of; see `rlhf project score`)."),
    random_share: float = typer.Option(0.2, "--random-share", help="With uncertainty selection, the share of items handed out at random, for calibration."),
    suggestions: bool = typer.Option(False, "--suggestions/--no-suggestions", help="Show annotators the reward model's preference (off: it biases labels; recorded with each answer when on)."),
    as_json: bool = JsonOpt,
) -> None:
    """Create a project."""
    from annotation.projects import create_project
    from annotation.store import transaction

    text = ""
    if guidelines:
        try:
            with open(guidelines, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise AnnotationError(f"--guidelines {guidelines}: cannot read: {exc.strerror}") from None
    with transaction(engine()) as session:
        project = create_project(
            session, name, overlap=overlap, guidelines=text, criteria=[c.strip() for c in criteria.split(",") if c.strip()],
            selection=selection, random_share=random_share, suggestions=suggestions,
        )
        payload = {"id": project.id, "name": project.name, "overlap": project.overlap, "selection": project.selection}
    emit(payload, as_json, f"project '{name}' created (k={overlap})")


@project_cli.command("set")
def project_set(
    name: str = typer.Argument(..., help="Project name."),
    overlap: Optional[int] = typer.Option(None, "--overlap", "-k", help="Annotations wanted per item."),
    gold_rate: Optional[float] = typer.Option(None, "--gold-rate", help="Share of requests answered with a gold item."),
    lease_seconds: Optional[int] = typer.Option(None, "--lease-seconds", help="How long an item stays with one annotator."),
    selection: Optional[str] = typer.Option(None, "--selection", help="random or uncertainty (scored by a score_queue job)."),
    random_share: Optional[float] = typer.Option(None, "--random-share", help="With uncertainty selection, the share handed out at random."),
    suggestions: Optional[bool] = typer.Option(None, "--suggestions/--no-suggestions", help="Show annotators the reward model's preference."),
    as_json: bool = JsonOpt,
) -> None:
    """Change a project's settings; with uncertainty selection and an active reward model, queue the scoring job."""
    from annotation.projects import get_project, update_project
    from annotation.store import transaction

    from app.jobs import queue_rescore

    eng = engine()
    with transaction(eng) as session:
        project = update_project(session, get_project(session, name), overlap=overlap, gold_rate=gold_rate,
                                 lease_seconds=lease_seconds, selection=selection, random_share=random_share,
                                 suggestions=suggestions)
        payload = {"name": project.name, "overlap": project.overlap, "gold_rate": project.gold_rate,
                   "lease_seconds": project.lease_seconds, "selection": project.selection,
                   "random_share": project.random_share, "suggestions": project.suggestions}
    # a changed selection, share or suggestions setting wants fresh scores (queue_rescore checks the project needs them)
    changed = any(v is not None for v in (selection, random_share, suggestions))
    payload["score_job"] = queue_rescore(eng, name) if changed else None
    text = "\n".join([f"project '{name}': " + ", ".join(f"{k} {v}" for k, v in payload.items() if k not in ("name", "score_job"))]
                     + ([f"queued job {payload['score_job']} to score the project with its active reward model (needs `rlhf worker`)"]
                        if payload["score_job"] else []))
    emit(payload, as_json, text)


@project_cli.command("score")
def project_score(
    name: str = typer.Argument(..., help="Project name."),
    model: Optional[str] = typer.Option(None, "--model", help="Registered reward model id or name, or a model directory (default: the project's active one)."),
    measure: str = typer.Option("auto", "--measure", help="margin, disagreement (ensembles) or auto."),
    seed: int = typer.Option(0, "--seed", help="Which items the calibration share draws."),
    as_json: bool = JsonOpt,
) -> None:
    """Score the project's open items with a reward model and order its queue, least sure first (what the score_queue job does)."""
    import tempfile
    from pathlib import Path

    from annotation.runs import RunContext
    from reward.usecases import ScoreQueueSpec, score_queue

    spec = ScoreQueueSpec(project=name, model=model, measure=measure, seed=seed).validate()
    eng = engine()
    with tempfile.TemporaryDirectory(prefix="rlhf-score-") as tmp:
        result = score_queue(spec, RunContext(output_dir=Path(tmp), engine=eng))
    m = result.metrics
    if result.extra.get("selection") == "uncertainty":
        text = (f"scored {m['scored']} items of '{name}' by {m['measure']}: {m['queued']} ordered, "
                f"{m['calibration']} drawn at random for calibration")
    else:
        text = (f"scored {m['scored']} items of '{name}' by {m['measure']}; the project uses random selection, so its "
                "queue order is unchanged (the scores serve suggestions, and the order once selection is uncertainty)")
    emit({**m, "model": result.extra.get("model"), "selection": result.extra.get("selection")}, as_json, text)


@project_cli.command("list")
def project_list(as_json: bool = JsonOpt) -> None:
    """List projects with their completion."""
    from annotation.projects import project_summaries
    from annotation.store import transaction

    with transaction(engine()) as session:
        rows = project_summaries(session)
    emit({"projects": rows}, as_json, "\n".join(f"{r['name']}: {r['items']} items, {r['completion']:.0%} complete" for r in rows) or "no projects")


@models_cli.command("fetch")
def models_fetch(as_json: bool = JsonOpt) -> None:
    """Download and unpack the default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2); a no-op when present."""
    from app.fetch import fetch_default_models
    from app.settings import get_settings

    payload = fetch_default_models(get_settings().model_dir, log=lambda m: typer.echo(m, err=True))
    emit(payload, as_json, "\n".join(f"{k}: {v}" for k, v in payload.items()))


@cli.command()
def serve(
    port: int = typer.Option(8501, "--port", help="Port on localhost."),
    address: str = typer.Option("localhost", "--address", help="Address to listen on."),
) -> None:
    """Start the Streamlit app."""
    import subprocess

    raise typer.Exit(subprocess.call(streamlit_command(port, address)))


def streamlit_command(port: int, address: str) -> list[str]:
    """The command that serves the app; the browser tests serve it with the same one."""
    from pathlib import Path

    home = Path(__file__).with_name("Home.py")
    return [sys.executable, "-m", "streamlit", "run", str(home), "--server.port", str(port), "--server.address", address,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            # No "Deploy" button or developer menu for annotators, and no tracebacks or file paths in
            # the browser: an unexpected error shows a generic message, the details go to the console.
            "--client.toolbarMode", "minimal", "--client.showErrorDetails", "none"]


def _register_commands() -> None:
    # Each area keeps its commands in a module of its own; importing it adds them to `cli`.
    import importlib

    for name in ("app.cli_data", "app.cli_agreement", "app.cli_reward", "app.cli_ppo", "app.cli_policy", "app.cli_jobs", "app.cli_serve", "app.cli_plan", "app.cli_leaderboard"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def _run():
    try:
        return cli(standalone_mode=False)
    finally:
        if "torch.distributed" in sys.modules:  # a command run under `accelerate launch`
            from app.jobs import leave_process_group

            leave_process_group()


def _database_error(exc: Exception) -> str | None:
    """The one-line message for a database that could not be opened or stopped answering, naming
    the setting that chose it; None when `exc` is not that."""
    from app.settings import setting_source

    if isinstance(exc, StoreError):
        return f"{setting_source('db_url')}: {exc}"
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.OperationalError):
        from annotation.store import driver_message, masked_url
        from app.settings import get_settings

        url = get_settings().db_url
        return f"{setting_source('db_url')}: the database {masked_url(url) or ''} failed: {driver_message(url, exc)}"
    return None


def _click_exceptions() -> tuple[type, ...]:
    """Usage errors (no such option, a bad value for an option's type): click's, and the copy of
    click that Typer 0.2x bundles and raises its own from."""
    kinds = []
    for module in ("click", "typer._click.exceptions"):
        try:
            kinds.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(kinds)


def main() -> None:
    _register_commands()
    try:
        rc = _run()
    except StoreError as exc:
        typer.echo(f"error: {_database_error(exc)}", err=True)
        sys.exit(2)
    except USER_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # click's usage errors carry their own exit code
        if isinstance(exc, _click_exceptions()):
            exc.show()
            sys.exit(exc.exit_code)
        message = _database_error(exc)
        if message is not None:
            typer.echo(f"error: {message}", err=True)
            sys.exit(2)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    # Under `python -m app.cli` this file runs as __main__, while the area modules register their
    # commands on `app.cli.cli`: run that module's main so both see the same Typer app.
    from app.cli import main as _main

    _main()
