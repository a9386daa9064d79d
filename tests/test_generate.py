"""Iterated RLHF (ppo.generate): sampled responses become new items of a project through the
import path, named after the models that wrote them; a rerun adds nothing. Tiny Llama-style
policies built in the test; both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from annotation.store import Item, Project, transaction
from ppo.errors import PPOError
from ppo.evaluate import SampleOptions, sample_responses
from ppo.generate import generate_items, resolve_policy
from ppo.prompts import project_prompts, read_prompts
from tiny_lm import one_thread, save_tiny_policy

PROMPTS = ["ping", "hello world", [{"role": "user", "content": "tell me a story"}], "the cat"]
OPTS = SampleOptions(max_new_tokens=8, temperature=1.0, batch_size=4, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    return save_tiny_policy(root / "sft-1", seed=0), save_tiny_policy(root / "ppo-2" / "policy", seed=1)


def items_of(engine, project):
    with transaction(engine) as s:
        return [(i.prompt, i.response_a, i.response_b, i.source_a, i.source_b, i.meta)
                for i in s.scalars(select(Item).join(Project, Project.id == Item.project_id).where(Project.name == project).order_by(Item.id))]


def test_two_samples_per_prompt_become_items_and_a_rerun_adds_nothing(engine, policies):
    a, _ = policies
    result = generate_items(engine, "round-2", PROMPTS, str(a), options=OPTS)
    assert result["prompts"] == 4
    assert result["items_added"] + result["identical"] + result["empty_response"] == 4 and result["items_added"] >= 3
    rows = items_of(engine, "round-2")
    assert len(rows) == result["items_added"]
    for prompt, ra, rb, sa, sb, meta in rows:
        assert prompt in PROMPTS and ra != rb and sa == sb == "sft-1"
        assert meta["generated_by"] == "rlhf generate" and meta["temperature"] == 1.0
    # The first response of each item is the policy's seeded sample: what sample_responses gives.
    from ppo.models import load_policy

    model, tok = load_policy(str(a))
    expected = sample_responses(model, tok, PROMPTS, OPTS).texts
    assert {(str(p), ra) for p, ra, *_ in rows} <= {(str(p), t) for p, t in zip(PROMPTS, expected)}

    again = generate_items(engine, "round-2", PROMPTS, str(a), options=OPTS)
    assert again["items_added"] == 0 and again["duplicates"] == result["items_added"]
    assert len(items_of(engine, "round-2")) == result["items_added"]


def test_two_policies_give_one_response_each_named_after_their_model(sqlite_engine, policies):
    a, b = policies
    result = generate_items(sqlite_engine, "duel", PROMPTS[:2], str(a), policy_b=str(b), options=OPTS)
    rows = items_of(sqlite_engine, "duel")
    assert len(rows) == result["items_added"] >= 1
    assert all(sa == "sft-1" and sb == "ppo-2/policy" for _, _, _, sa, sb, _ in rows)


def test_prompts_come_from_files_of_any_import_format_and_from_projects(sqlite_engine, policies, tmp_path):
    hh = tmp_path / "hh.jsonl"
    hh.write_text('{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away"}\n'
                  '{"prompt": "ignored", "chosen": "x", "rejected": "y"}\n', encoding="utf-8")
    with pytest.raises(Exception, match="mixed formats"):
        read_prompts(hh)
    hh.write_text('{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away"}\n' * 2,
                  encoding="utf-8")
    assert read_prompts(hh) == [[{"role": "user", "content": "Hi"}]]  # HH transcripts become chat turns, deduplicated
    generate_items(sqlite_engine, "src", PROMPTS, str(policies[0]), options=OPTS)
    assert {str(p) for p in project_prompts(sqlite_engine, "src")} <= {str(p) for p in PROMPTS}
    with pytest.raises(Exception, match="no project named 'nope'"):
        project_prompts(sqlite_engine, "nope")


def test_unknown_policy_is_a_clear_error(sqlite_engine, tmp_path):
    with pytest.raises(PPOError, match="no such model directory or registered policy"):
        resolve_policy(sqlite_engine, str(tmp_path / "missing"))


def test_generate_cli_and_job_write_items_named_after_registered_policies(settings, policies, tmp_path):
    import json
    import logging

    from typer.testing import CliRunner

    import app.cli_policy  # noqa: F401  (adds the policy commands to the app)
    from annotation.registry import register_model
    from annotation.store import init_db
    from app.cli import cli
    from ppo.jobs import generate

    engine = init_db(settings.db_url)
    with transaction(engine) as s:
        register_model(s, kind="policy", name="policy-v3", path=str(policies[1]))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["generate", "--policy", "policy-v3", "--prompts", str(prompts), "--project", "r3",
                                      "--n", "2", "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    rows = items_of(engine, "r3")
    assert len(rows) == payload["items_added"] >= 1 and all(r[3] == r[4] == "policy-v3" for r in rows)

    class Ctx:
        job_id, run_dir, log = 9, tmp_path / "job-9", logging.getLogger("test.generate.job")

        def __init__(self, stop):
            self.engine, self.settings, self.stop = engine, settings, stop

        def progress(self, fraction, message=""):
            pass

        def cancelled(self):
            return self.stop

    params = {"policy": str(policies[0]), "policy_b": "policy-v3", "prompts_project": "r3", "project": "r4",
              "max_new_tokens": 6}
    from app.jobs import JobCancelled

    with pytest.raises(JobCancelled):
        generate(params, Ctx(stop=True))
    assert items_of(engine, "r4") == []
    done = generate(params, Ctx(stop=False))
    assert done["items_added"] == len(items_of(engine, "r4")) >= 1
    assert {(r[3], r[4]) for r in items_of(engine, "r4")} == {("sft-1", "policy-v3")}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_rlhf_generate_and_the_generate_job_run_one_use_case_and_write_the_same_items(settings, policies, tmp_path):
    """generate is written once (ppo.usecases.generate): with the same prompts, policies and seed, the
    CLI and the job write the same items (responses, sources, metadata), and report the same counts."""
    import json
    import logging
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from annotation.store import init_db
    from app.cli import _register_commands, cli
    from ppo.jobs import generate

    engine = init_db(settings.db_url)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n", encoding="utf-8")
    ctx = SimpleNamespace(job_id=4, run_dir=tmp_path / "job", engine=engine, settings=settings, log=logging.getLogger("t"),
                          progress=lambda f, m="": None, cancelled=lambda: False)
    job = generate({"policy": str(policies[0]), "policy_b": str(policies[1]), "prompts": str(prompts), "project": "by-job",
                    "max_new_tokens": 6, "seed": 5}, ctx)
    _register_commands()
    result = CliRunner().invoke(cli, ["generate", "--policy", str(policies[0]), "--policy-b", str(policies[1]), "--prompts",
                                      str(prompts), "--project", "by-cli", "--max-new-tokens", "6", "--seed", "5", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    # score_job: the CLI says whether it queued a rescore (the job runner does that after the job); none here
    assert printed.pop("score_job") is None
    assert {k: v for k, v in printed.items() if k != "project"} == {k: v for k, v in job["metrics"].items() if k != "project"}
    assert items_of(engine, "by-cli") == items_of(engine, "by-job") and len(items_of(engine, "by-job")) == job["items_added"] >= 1
    # Both used generate's own default temperature (1.0), not eval-policy's.
    assert {row[5]["temperature"] for row in items_of(engine, "by-job")} == {1.0}
    assert json.loads((tmp_path / "job" / "generate.json").read_text())["items_added"] == job["items_added"]
    engine.dispose()
