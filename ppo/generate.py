"""Iterated RLHF: the current policy writes fresh items into a project for the next round of annotation.

    rlhf generate --policy runs/ppo-1/policy --prompts prompts.jsonl --project round-2
    rlhf generate --policy runs/ppo-1/policy --policy-b runs/sft-1 --prompts-project round-1 --project round-2

Each prompt gets two sampled responses, both from one policy (two independent samples) or one
from each of two policies. They are written to a temporary JSONL file in the `pairs` format and
imported with annotation.io.import_file, the same validated, all-or-nothing, idempotent path as
`rlhf import`: source_a/source_b carry the model names, and running the same generation again
adds nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ppo.errors import PPOError
from ppo.evaluate import SampleOptions, sample_responses

# The second sample of a one-policy run uses seeds this far from the first's, so the two
# samples of a prompt are independent draws.
SECOND_SAMPLE_SEED_OFFSET = 1_000_003


def resolve_policy(engine, value: str) -> tuple[str, str]:
    """(path, name) for a model directory or a registered policy's id or name."""
    from annotation.registry import list_models
    from annotation.store import transaction

    path = Path(value)
    if path.exists():
        name = None
        if engine is not None:
            with transaction(engine) as session:
                for row in list_models(session, kind="policy"):
                    if Path(row.path).resolve() == path.resolve():
                        name = row.name
                        break
        return str(path), name or _dir_name(path)
    if engine is not None:
        from annotation.errors import AnnotationError
        from annotation.registry import get_model

        try:
            with transaction(engine) as session:
                row = get_model(session, value)
                kind, row_path, row_name = row.kind, row.path, row.name
        except AnnotationError:
            pass
        else:
            if kind != "policy":
                raise PPOError(f"--policy {value}: registered model is a {kind} model, not a policy")
            return row_path, row_name
    raise PPOError(f"--policy {value}: no such model directory or registered policy")


def _dir_name(path: Path) -> str:
    # PPO runs keep the model in <run>/policy; the run's name says more than "policy".
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name in ("policy", "model") else path.name


def generate_items(
    engine,
    project: str,
    prompts: list,
    policy: str,
    *,
    policy_b: str | None = None,
    name: str | None = None,
    name_b: str | None = None,
    options: SampleOptions | None = None,
    created_by: int | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Sample two responses per prompt and import them as items of `project` (created if missing).

    Returns the import's counts (items_added, duplicates, skipped per reason, ...) plus
    `identical` (prompts whose two responses came out the same and were left out). When
    `should_stop()` turns true during sampling, PPOError("stopped") is raised and nothing is imported."""
    from annotation.io import import_file
    from ppo.models import load_policy

    options = (options or SampleOptions()).validate()
    if not prompts:
        raise PPOError("no prompts to generate from")
    name = name or _dir_name(Path(policy))

    def report(fraction: float, message: str) -> None:
        if should_stop is not None and should_stop():
            raise PPOError("stopped: generation was cancelled before its items were imported; nothing was imported")
        if progress is not None:
            progress(fraction, message)

    model_a, tok_a = load_policy(policy)
    n = len(prompts)
    first = sample_responses(model_a.eval(), tok_a, prompts, options,
                             progress=lambda k: report(0.45 * k / n, f"{name}: {k}/{n} prompts"))
    if policy_b is None:
        second = sample_responses(model_a, tok_a, prompts, options, seed_offset=SECOND_SAMPLE_SEED_OFFSET,
                                  progress=lambda k: report(0.45 + 0.45 * k / n, f"{name} (second sample): {k}/{n} prompts"))
        name_b = name
    else:
        # Responses are compared as text, so the second policy may even use another tokenizer.
        del model_a
        model_b, tok_b = load_policy(policy_b)
        name_b = name_b or _dir_name(Path(policy_b))
        second = sample_responses(model_b.eval(), tok_b, prompts, options,
                                  progress=lambda k: report(0.45 + 0.45 * k / n, f"{name_b}: {k}/{n} prompts"))

    meta = {"generated_by": "rlhf generate", "policy_a": str(policy), "policy_b": str(policy_b or policy),
            **{k: v for k, v in dataclasses.asdict(options).items() if k != "batch_size"}}
    lines, identical, empty = [], 0, 0
    for prompt, a, b in zip(prompts, first.texts, second.texts):
        if not a.strip() or not b.strip():
            empty += 1
        elif a == b:
            identical += 1
        else:
            lines.append({"prompt": prompt, "response_a": a, "response_b": b, "source_a": name[:200], "source_b": name_b[:200],
                          "metadata": meta})
    result: dict[str, Any] = {"project": project, "prompts": n, "identical": identical, "empty_response": empty,
                              "items_added": 0, "duplicates": 0, "source_a": name, "source_b": name_b}
    if lines:
        report(0.92, f"importing {len(lines)} items into project '{project}'")
        fd, tmp = tempfile.mkstemp(prefix="rlhf-generate-", suffix=".jsonl")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                for line in lines:
                    fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            imported = import_file(engine, tmp, project, format="items", created_by=created_by)
        finally:
            os.unlink(tmp)
        result.update(items_added=imported.items_added, duplicates=imported.duplicates, skipped=imported.skipped)
    if progress is not None:
        progress(1.0, f"{result['items_added']} new items in project '{project}'")
    return result
