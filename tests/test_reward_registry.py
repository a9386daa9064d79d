"""The model registry on SQLite and PostgreSQL: lineage fields, lookup, one active reward model per project."""

from __future__ import annotations

import pytest

from annotation.errors import AnnotationError
from annotation.projects import create_project
from annotation.registry import active_model, get_model, list_models, register_model, set_active
from annotation.store import RegisteredModel, transaction


def _setup(engine):
    with transaction(engine) as s:
        p1, p2 = create_project(s, "p1"), create_project(s, "p2")
        a = register_model(s, kind="reward", name="rm-a", path="/runs/a", base_model="minilm", project_id=p1.id,
                           data_hash="h" * 64, data_rows=10, params={"seed": 1}, metrics={"eval_accuracy": 0.7})
        b = register_model(s, kind="reward", name="rm-b", path="/runs/b", project_id=p1.id, parent_id=a.id)
        c = register_model(s, kind="reward", name="rm-c", path="/runs/c", project_id=p2.id, active=True)
        pol = register_model(s, kind="policy", name="pol", path="/runs/pol", project_id=p1.id)
        return p1.id, p2.id, a.id, b.id, c.id, pol.id


def test_one_active_reward_model_per_project(engine):
    p1, p2, a, b, c, pol = _setup(engine)
    with transaction(engine) as s:
        set_active(s, a)
    with transaction(engine) as s:
        set_active(s, b)
    with transaction(engine) as s:
        assert active_model(s, p1).id == b
        assert s.get(RegisteredModel, a).active is False
        # Another project's active model is untouched.
        assert active_model(s, p2).id == c
        assert sum(m.active for m in list_models(s, kind="reward")) == 2


def test_lineage_lookup_and_listing(engine):
    p1, p2, a, b, c, pol = _setup(engine)
    with transaction(engine) as s:
        row = get_model(s, "rm-b")
        assert row.id == b and row.parent_id == a
        first = get_model(s, str(a))
        assert (first.data_hash, first.data_rows, first.params, first.metrics) == ("h" * 64, 10, {"seed": 1}, {"eval_accuracy": 0.7})
        assert {m.id for m in list_models(s, project_id=p1)} == {a, b, pol}
        assert [m.kind for m in list_models(s, kind="policy")] == ["policy"]
        ids = [m.id for m in list_models(s)]
        assert ids == sorted(ids, reverse=True)  # newest first


def test_registry_errors_are_clear(engine):
    p1, p2, a, b, c, pol = _setup(engine)
    with transaction(engine) as s:
        with pytest.raises(AnnotationError, match="only reward models can be marked active"):
            set_active(s, pol)
        with pytest.raises(AnnotationError, match="no registered model with id or name 'nope'"):
            get_model(s, "nope")
        with pytest.raises(AnnotationError, match="model kind 'critic' is unknown"):
            register_model(s, kind="critic", name="x", path="/x")
        with pytest.raises(AnnotationError, match="unknown model field"):
            register_model(s, kind="reward", name="x", path="/x", accuracy=1)
