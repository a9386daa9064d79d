"""Projects: creation with validated settings, lookup by name, completion figures."""

from __future__ import annotations

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from annotation.errors import AnnotationError
from annotation.names import can_be_looked_up, check_project_name
from annotation.selection import DEFAULT_RANDOM_SHARE, check_selection, reset_queue
from annotation.store import CHOICES, Item, Project, Prompt, reading, transaction


def validate_settings(overlap: int, choices: list[str], gold_rate: float, lease_seconds: int) -> None:
    if overlap < 1:
        raise AnnotationError(f"overlap k must be at least 1, got {overlap}")
    bad = [c for c in choices if c not in CHOICES]
    if bad or not {"a", "b"} <= set(choices):
        raise AnnotationError(f"choices must include a and b and come from {', '.join(CHOICES)}; got {', '.join(choices)}")
    if not 0.0 <= gold_rate < 1.0:
        raise AnnotationError(f"gold rate must be in [0, 1), got {gold_rate}")
    if lease_seconds < 10:
        raise AnnotationError(f"lease must be at least 10 seconds, got {lease_seconds}")


def create_project(
    session: Session,
    name: str,
    *,
    overlap: int = 3,
    guidelines: str = "",
    choices: list[str] | None = None,
    criteria: list[str] | None = None,
    gold_rate: float = 0.0,
    lease_seconds: int = 600,
    selection: str = "random",
    random_share: float = DEFAULT_RANDOM_SHARE,
    suggestions: bool = False,
    created_by: int | None = None,
) -> Project:
    name = check_project_name(name)
    choices = list(choices) if choices is not None else list(CHOICES)
    validate_settings(overlap, choices, gold_rate, lease_seconds)
    check_selection(selection, random_share)
    if session.scalar(select(Project).where(Project.name == name)) is not None:
        raise AnnotationError(f"project '{name}' already exists")
    project = Project(
        name=name, overlap=overlap, guidelines=guidelines, choices=choices, criteria=list(criteria or []),
        gold_rate=gold_rate, lease_seconds=lease_seconds, selection=selection, random_share=float(random_share),
        suggestions=bool(suggestions), created_by=created_by,
    )
    session.add(project)
    session.flush()
    return project


def get_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name)) if can_be_looked_up(name) else None
    if project is None:
        known = session.scalars(select(Project.name).order_by(Project.name).limit(20)).all()
        raise AnnotationError(f"no project named '{name}'" + (f"; known: {', '.join(known)}" if known else "; none exist yet"))
    return project


def get_or_create_project(session: Session, name: str, created_by: int | None = None) -> Project:
    project = session.scalar(select(Project).where(Project.name == name)) if can_be_looked_up(name) else None
    return project if project is not None else create_project(session, name, created_by=created_by)


def completion(session: Session, project: Project) -> dict:
    """Items, annotations, and the share of the wanted k annotations per item that exist (capped at k)."""
    # items.annotation_count is kept by database triggers (migration 0002), so this reads one row per item
    # instead of joining every annotation.
    n = Item.annotation_count
    n_items, n_annotations, done, complete = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(n), 0),
            func.coalesce(func.sum(case((n > project.overlap, project.overlap), else_=n)), 0),
            func.coalesce(func.sum(case((n >= project.overlap, 1), else_=0)), 0),
        ).where(Item.project_id == project.id)
    ).one()
    n_prompts = session.scalar(select(func.count()).select_from(Prompt).where(Prompt.project_id == project.id)) or 0
    wanted = n_items * project.overlap
    return {
        "items": n_items,
        "prompts": n_prompts,
        "annotations": int(n_annotations),
        "items_complete": int(complete),
        "completion": (done / wanted) if wanted else 0.0,
    }


def project_summaries(session: Session) -> list[dict]:
    return [{"name": p.name, "overlap": p.overlap, "selection": p.selection, **completion(session, p)}
            for p in session.scalars(select(Project).order_by(Project.name))]


def update_project(
    session: Session,
    project: Project,
    *,
    overlap: int | None = None,
    guidelines: str | None = None,
    choices: list[str] | None = None,
    criteria: list[str] | None = None,
    gold_rate: float | None = None,
    lease_seconds: int | None = None,
    selection: str | None = None,
    random_share: float | None = None,
    suggestions: bool | None = None,
) -> Project:
    """Change a project's settings (None keeps a value); validated like create_project. Turning
    selection to random puts the queue back in its plain order at once (annotation.selection);
    turning it to uncertainty takes effect when the project is next scored (a job)."""
    new = {
        "overlap": project.overlap if overlap is None else overlap,
        "choices": list(project.choices) if choices is None else list(choices),
        "gold_rate": project.gold_rate if gold_rate is None else gold_rate,
        "lease_seconds": project.lease_seconds if lease_seconds is None else lease_seconds,
    }
    validate_settings(**new)
    new_selection = project.selection if selection is None else selection
    new_share = project.random_share if random_share is None else float(random_share)
    check_selection(new_selection, new_share)
    for key, value in new.items():
        setattr(project, key, value)
    if new_selection == "random" and project.selection != "random":
        reset_queue(session, project.id)
    project.selection, project.random_share = new_selection, new_share
    if suggestions is not None:
        project.suggestions = bool(suggestions)
    if guidelines is not None:
        project.guidelines = guidelines
    if criteria is not None:
        project.criteria = [c.strip() for c in criteria if c.strip()]
    session.flush()
    return project


# --------------------------------------------------------------------------- for pages and commands
# The functions above take a Session so that an import or a use case can join them to its own
# transaction; these take an Engine and own theirs, so a page never opens one.


def new_project(engine, name: str, *, created_by: int | None = None, **settings) -> str:
    """Create a project (settings as create_project takes them) in its own transaction; its name."""
    with transaction(engine) as session:
        return create_project(session, name, created_by=created_by, **settings).name


def save_project_settings(engine, project_id: int, **settings) -> None:
    """Change a project's settings (as update_project takes them) in its own transaction."""
    with transaction(engine) as session:
        project = session.get(Project, project_id)
        if project is None:
            raise AnnotationError(f"no project with id {project_id}")
        update_project(session, project, **settings)


def summaries(engine) -> list[dict]:
    """project_summaries, read without taking SQLite's write lock."""
    with reading(engine) as session:
        return project_summaries(session)

