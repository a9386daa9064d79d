"""Model versions in the `models` table: register, list, look up, and mark one reward model active per project.

Reward models and policies alike are written here, beside the table (DESIGN.md: one registry
function for every caller): the reward side, the policy side and the app all reach down to it.

Functions take a session and never commit: the caller's `transaction(engine)` decides, so that a
job's result and its registered models land together or not at all.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from annotation.errors import AnnotationError
from annotation.store import MODEL_KINDS, RegisteredModel

FIELDS = ("kind", "name", "path", "base_model", "parent_id", "project_id", "job_id", "data_hash", "data_rows",
          "params", "metrics", "active")


def register_model(session: Session, **fields) -> RegisteredModel:
    """Insert one model row. Required: kind, name, path; the rest of FIELDS are optional."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise AnnotationError(f"unknown model field(s) {', '.join(unknown)}; expected some of {', '.join(FIELDS)}")
    for required in ("kind", "name", "path"):
        if not fields.get(required):
            raise AnnotationError(f"a registered model needs '{required}'")
    if fields["kind"] not in MODEL_KINDS:
        raise AnnotationError(f"model kind '{fields['kind']}' is unknown; expected one of {', '.join(MODEL_KINDS)}")
    fields["path"] = str(fields["path"])
    fields.setdefault("params", {})
    fields.setdefault("metrics", {})
    active = bool(fields.pop("active", False))
    row = RegisteredModel(**fields, active=False)
    session.add(row)
    session.flush()
    if active:
        set_active(session, row.id)
    return row


def list_models(session: Session, kind: str | None = None, project_id: int | None = None) -> list[RegisteredModel]:
    """Models, newest first, optionally of one kind and one project."""
    query = select(RegisteredModel).order_by(RegisteredModel.created_at.desc(), RegisteredModel.id.desc())
    if kind is not None:
        query = query.where(RegisteredModel.kind == kind)
    if project_id is not None:
        query = query.where(RegisteredModel.project_id == project_id)
    return list(session.scalars(query))


def get_model(session: Session, id_or_name: int | str) -> RegisteredModel:
    """A model by id, or the newest one with that name."""
    row = None
    if isinstance(id_or_name, int) or (isinstance(id_or_name, str) and id_or_name.isdigit()):
        row = session.get(RegisteredModel, int(id_or_name))
    if row is None and isinstance(id_or_name, str):
        row = session.scalars(
            select(RegisteredModel).where(RegisteredModel.name == id_or_name)
            .order_by(RegisteredModel.created_at.desc(), RegisteredModel.id.desc()).limit(1)
        ).first()
    if row is None:
        raise AnnotationError(f"no registered model with id or name '{id_or_name}'; `rlhf models list` shows them")
    return row


def set_active(session: Session, model_id: int) -> RegisteredModel:
    """Mark a reward model active, and every other reward model of the same project inactive."""
    row = session.get(RegisteredModel, int(model_id))
    if row is None:
        raise AnnotationError(f"no registered model with id {model_id}")
    if row.kind != "reward":
        raise AnnotationError(f"model {model_id} is a {row.kind} model; only reward models can be marked active")
    same_project = (RegisteredModel.project_id.is_(None) if row.project_id is None
                    else RegisteredModel.project_id == row.project_id)
    session.execute(
        update(RegisteredModel).where(RegisteredModel.kind == "reward", same_project, RegisteredModel.id != row.id)
        .values(active=False)
    )
    row.active = True
    session.flush()
    return row


def active_model(session: Session, project_id: int | None) -> RegisteredModel | None:
    """The project's active reward model, if one is marked."""
    same_project = RegisteredModel.project_id.is_(None) if project_id is None else RegisteredModel.project_id == project_id
    return session.scalars(
        select(RegisteredModel).where(RegisteredModel.kind == "reward", RegisteredModel.active.is_(True), same_project)
    ).first()


# --------------------------------------------------------------------------- for the app and the CLI


REWARD_METRICS = ("eval_accuracy", "eval_log_loss", "eval_ece", "eval_mean_margin", "train_loss", "pairs_per_s")
POLICY_METRICS = ("win_rate", "reward_mean", "kl", "final_loss", "steps")


def model_rows(engine, project_id: int | None = None, kind: str = "reward", metric_keys: tuple | None = None) -> list[dict]:
    """Registered models as plain dicts (newest first) with the headline metrics of their kind flattened."""
    from annotation.store import reading

    keys = metric_keys or (REWARD_METRICS if kind == "reward" else POLICY_METRICS)
    with reading(engine) as session:
        rows = list_models(session, kind=kind, project_id=project_id)
        return [{
            "id": m.id, "name": m.name, "active": m.active, "base_model": m.base_model, "parent_id": m.parent_id,
            "project_id": m.project_id, "job_id": m.job_id, "data_rows": m.data_rows,
            "data_hash": (m.data_hash or "")[:12], "path": m.path, "created_at": m.created_at.isoformat(timespec="seconds"),
            **{k: (m.metrics or {}).get(k) for k in keys},
            "epochs": (m.params or {}).get("epochs"), "lr": (m.params or {}).get("lr"),
            "ensemble": (m.params or {}).get("ensemble"),
        } for m in rows]


def activate(engine, model_id: int) -> str | None:
    """Mark a reward model active in its own transaction; the name of its project (None if it has none)."""
    from annotation.store import Project, transaction

    with transaction(engine) as session:
        row = set_active(session, model_id)
        project = session.get(Project, row.project_id) if row.project_id is not None else None
        return project.name if project is not None else None


def run_files(path: str) -> dict:
    """What a run directory holds for display: its training curve rows and metrics.json ({} when missing)."""
    import json
    from pathlib import Path

    run = Path(path)
    curve_file = run / "training_curve.jsonl"
    if not curve_file.is_file() and (run / "member_0" / "training_curve.jsonl").is_file():
        curve_file = run / "member_0" / "training_curve.jsonl"  # an ensemble: show its first member's curve
    curve = [json.loads(line) for line in curve_file.read_text().splitlines() if line.strip()] if curve_file.is_file() else []
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    return {"curve": curve, "metrics": metrics}
