"""First-run set-up behind `rlhf init [--sample]`: the schema, the sample project, the first admin.

    rlhf init              # create or upgrade the schema
    rlhf init --sample     # also load data/samples/ into project "sample" and create a first admin

Idempotent: run twice, the second run adds nothing, creates no second admin and shows no password.
The first admin's password is random, returned once to be printed, and stored only as a hash.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from sqlalchemy import select

from annotation.errors import AnnotationError
from annotation.store import User, init_db, transaction
from app.settings import REPO_ROOT

SAMPLES_DIR = REPO_ROOT / "data" / "samples"
SAMPLE_PROJECT = "sample"
SAMPLE_ITEMS = "hh_items.jsonl"
SAMPLE_PROMPTS = "prompts.jsonl"
ADMIN_USERNAME = "admin"


def _create_first_admin(engine) -> dict:
    """Create user 'admin' with a random password when no admin exists; {} when one does."""
    from annotation.auth import create_user

    with transaction(engine) as session:
        if session.scalar(select(User.id).where(User.role == "admin").limit(1)) is not None:
            return {}
        if session.scalar(select(User.id).where(User.username == ADMIN_USERNAME)) is not None:
            raise AnnotationError(
                f"no admin exists, and the name '{ADMIN_USERNAME}' is taken by a non-admin user; "
                "create an admin with `rlhf user add NAME --role admin`"
            )
        password = secrets.token_urlsafe(12)
        create_user(session, ADMIN_USERNAME, password, "admin")
    return {"admin_username": ADMIN_USERNAME, "admin_password": password}


def _load_samples(engine, settings, samples_dir: Path) -> dict:
    from annotation.io import import_file
    from annotation.projects import completion, get_project

    reports = {}
    for kind, name in (("items", SAMPLE_ITEMS), ("prompts", SAMPLE_PROMPTS)):
        path = Path(samples_dir) / name
        if not path.is_file():
            raise AnnotationError(f"sample file {path} is missing; the sample project needs {SAMPLE_ITEMS} and {SAMPLE_PROMPTS}")
        reports[kind] = import_file(engine, path, SAMPLE_PROJECT, max_field_chars=settings.max_field_chars)
    with transaction(engine) as session:
        totals = completion(session, get_project(session, SAMPLE_PROJECT))
    return {
        "project": SAMPLE_PROJECT,
        "items": totals["items"],
        "prompts": totals["prompts"],
        "items_added": reports["items"].items_added,
        "prompts_added": reports["prompts"].prompts_added,
    }


def initialise(settings, sample: bool = False, *, samples_dir: Path | str = SAMPLES_DIR) -> dict:
    """Bring the schema to the newest migration; with `sample`, load the sample project and make sure
    an admin exists. Returns {"db_url", "sample"?, "admin_username"?, "admin_password"?}; the
    password only on the run that created the admin."""
    engine = init_db(settings.db_url)
    try:
        payload: dict = {"db_url": engine.url.render_as_string(hide_password=True)}
        if sample:
            # Samples first: if they fail, no admin has been created whose password nobody saw.
            payload["sample"] = _load_samples(engine, settings, Path(samples_dir))
            payload.update(_create_first_admin(engine))
        return payload
    finally:
        engine.dispose()
