"""Prompts for generation (eval-policy, generate, PPO) from a file or from a project.

A prompts file is any JSONL the importer reads (prompts, pairs, trl, trl-conversational, hh):
only the prompt of each line is used. A project gives its prompts table (imported with
`--format prompts`) or, when that is empty, the distinct prompts of its items. HH transcripts
become chat turns so that the policy's chat template renders them as a conversation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ppo.errors import PPOError


def normalise_prompt(prompt: Any) -> str | list[dict]:
    """Chat messages as they are; an HH transcript as its turns; other text unchanged."""
    from annotation.io.formats import HH_ASSISTANT, HH_HUMAN, text_to_messages

    if isinstance(prompt, str) and prompt.startswith(HH_HUMAN) and prompt.endswith(HH_ASSISTANT):
        return text_to_messages(prompt)
    return prompt


def _dedupe(prompts: list) -> list:
    from annotation.io.formats import canonical_json

    seen, out = set(), []
    for p in prompts:
        key = canonical_json(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def read_prompts(path: str | Path, limit: int | None = None) -> list:
    """Distinct prompts of a JSONL file, in file order (at most `limit`). Bad lines raise InputError."""
    from annotation.io.formats import PromptRecord, Record, iter_records

    prompts = []
    for rec in iter_records(path):
        if isinstance(rec, (Record, PromptRecord)):
            prompts.append(normalise_prompt(rec.prompt))
    prompts = _dedupe(prompts)
    if not prompts:
        raise PPOError(f"--prompts {path}: no prompts found; expected JSONL lines with a \"prompt\" (or chosen/rejected) field")
    return prompts[:limit] if limit else prompts


def save_uploaded_prompts(folder: str | Path, upload_name: str, data: bytes) -> Path:
    """Keep a prompts file uploaded through the app in `folder`, under a name of ours (never the
    upload's), after checking that it reads as prompts. The app offers an upload, not a server path,
    so that nobody can make the worker read an arbitrary file. A bad file raises PPOError naming the
    upload and keeps nothing."""
    import uuid

    from annotation.errors import InputError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"prompts-{uuid.uuid4().hex}.jsonl"
    path.write_bytes(data)
    try:
        read_prompts(path)
    except (InputError, PPOError) as exc:
        path.unlink(missing_ok=True)
        raise PPOError(str(exc).replace(str(path), upload_name)) from None
    return path


def project_prompts(engine, project: str, limit: int | None = None) -> list:
    """A project's prompts: its prompts table, else the distinct prompts of its items, oldest first."""
    from sqlalchemy import select

    from annotation.projects import get_project
    from annotation.store import Item, Prompt, transaction

    with transaction(engine) as session:
        proj = get_project(session, project)
        rows = list(session.scalars(select(Prompt.prompt).where(Prompt.project_id == proj.id).order_by(Prompt.id)))
        if not rows:
            rows = list(session.scalars(select(Item.prompt).where(Item.project_id == proj.id).order_by(Item.id)))
    prompts = _dedupe([normalise_prompt(p) for p in rows])
    if not prompts:
        raise PPOError(f"project '{project}' has no prompts or items to take prompts from; import some with `rlhf import`")
    return prompts[:limit] if limit else prompts
