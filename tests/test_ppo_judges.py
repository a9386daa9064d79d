"""PPO judged by reward models it does not train on (Gao, Schulman and Hilton 2022): on the tiny
policy of test_ppo_train, a proxy that can be hacked (the count of "yes", unbounded) and a judge
that disagrees (one "yes" is good, each more is worse). The proxy's held-out reward rises, the
judge's peaks and falls, diagnostics say over_optimisation, and keep_best=judge keeps the peak.
Also: judging leaves training exactly as it was, the over_optimisation check on hand-made rows,
the held-out split, the refusals, and the CLI, job and page wiring."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ppo import diagnostics
from ppo.errors import PPOError
from ppo.train import PPOConfig, split_heldout, train
from test_ppo_train import rows, small_config, tiny_policy, tiny_prompts


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def count_yes(prompts, responses):
    """The proxy: how many words "yes" a response has (unbounded, so the policy can hack it)."""
    return torch.tensor([float(sum(w == "yes" for w in t.split())) for t in responses])


def one_yes(prompts, responses):
    """The judge: one "yes" scores 1, each further one takes 0.5 off (repetition is bad)."""
    out = []
    for text in responses:
        k = sum(w == "yes" for w in text.split())
        out.append(min(k, 1) - 0.5 * max(k - 1, 0))
    return torch.tensor(out)


one_yes.name = "one-yes"
HELDOUT = tiny_prompts(32, seed=1)


def weights(path):
    from ppo.models import load_policy

    model, _ = load_policy(path, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------- the key test
def test_the_proxy_rises_while_the_judge_peaks_and_falls_and_keep_best_keeps_the_peak(tmp_path):
    config = small_config(steps=12, learning_rate=5e-3, judge_every=2, keep_best="judge")
    result = train(config, tiny_policy(), count_yes, tiny_prompts(), tmp_path / "run", judges=[one_yes],
                   heldout_prompts=HELDOUT)
    history = rows(tmp_path / "run")
    judged = [r for r in history if "judge_reward" in r]
    # Every second step, and only there, carries the judge fields.
    assert [r["step"] for r in judged] == [2, 4, 6, 8, 10, 12]
    assert all("judge_reward" not in r and "proxy_reward_heldout" not in r for r in history if r["step"] % 2)
    for r in judged:
        assert {"proxy_reward_heldout", "kl_heldout", "judge_reward", "judge_reward_stderr", "judge_reward/one-yes"} <= set(r)
        assert r["judge_reward"] == r["judge_reward/one-yes"]  # one judge: its mean is the mean
    proxy = [r["proxy_reward_heldout"] for r in judged]
    judge = [r["judge_reward"] for r in judged]
    # Seen on this machine: proxy 0.28 -> 4.44 (count of "yes" on 8 tokens), judge 0.28, 0.38,
    # 0.47 (peak, step 6, KL 3.4), then -0.03, -0.31, -0.72 as the responses fill with "yes".
    assert proxy[-1] > proxy[0] + 2.0 and proxy[-1] == max(proxy)
    peak = judge.index(max(judge))
    assert 0 < peak < len(judge) - 1, judge
    assert judge[-1] < judge[peak] - 0.5 and judge[peak] > judge[0]
    assert judged[-1]["kl_heldout"] > judged[peak]["kl_heldout"] > 0
    assert "over_optimisation" in {w["code"] for w in result["diagnostics"]}
    peak_step = judged[peak]["step"]

    # keep_best=judge: policy/ is the peak step's policy, policy-last/ the last step's.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kept_step"] == result["kept_step"] == peak_step and summary["keep_best"] == "judge"
    assert summary["judges"] == ["one-yes"] and summary["heldout_prompts"] == 32
    assert summary["metrics"]["judge_peak_step"] == peak_step
    assert json.loads((tmp_path / "run" / "policy" / "kept.json").read_text())["step"] == peak_step
    assert not (tmp_path / "run" / "best-policy").exists()
    kept, last = weights(tmp_path / "run" / "policy"), weights(tmp_path / "run" / "policy-last")
    assert any(not torch.equal(kept[n], last[n]) for n in kept)
    # The kept weights are the peak step's: a run stopped there (constant schedule, no judges)
    # ends with exactly these weights.
    short = train(small_config(steps=peak_step, learning_rate=5e-3), tiny_policy(), count_yes, tiny_prompts(),
                  tmp_path / "short")
    stopped = weights(short["policy_path"])
    assert all(torch.equal(kept[n], stopped[n]) for n in kept)


def test_judges_do_not_change_training(tmp_path):
    """The judges sample under their own seed with the RNG forked: the training stream, and so
    every training metric and the final weights, are the same with and without them."""
    config = small_config(steps=4, learning_rate=5e-3, judge_every=1)
    train(config, tiny_policy(), count_yes, tiny_prompts(), tmp_path / "judged", judges=[one_yes],
          heldout_prompts=HELDOUT)
    train(small_config(steps=4, learning_rate=5e-3), tiny_policy(), count_yes, tiny_prompts(), tmp_path / "plain")
    judged, plain = rows(tmp_path / "judged"), rows(tmp_path / "plain")
    assert all("judge_reward" in r for r in judged) and not any("judge_reward" in r for r in plain)
    training = lambda r: {k: v for k, v in r.items() if not k.startswith(("time_", "judge_", "proxy_", "kl_heldout"))}
    assert [training(r) for r in judged] == [training(r) for r in plain]
    assert [r["reward_mean"] for r in judged] == [r["reward_mean"] for r in plain]
    a, b = weights(tmp_path / "judged" / "policy"), weights(tmp_path / "plain" / "policy")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_the_judges_sample_the_same_way_at_every_evaluation(tmp_path):
    # No update (lr ~0): the policy never changes, so every evaluation must see the same responses.
    config = small_config(steps=3, learning_rate=1e-12, judge_every=1, ppo_epochs=1)
    train(config, tiny_policy(), count_yes, tiny_prompts(), tmp_path / "run", judges={"one-yes": one_yes, "count": count_yes},
          heldout_prompts=HELDOUT)
    judged = rows(tmp_path / "run")
    assert len({r["judge_reward"] for r in judged}) == 1 and len({r["proxy_reward_heldout"] for r in judged}) == 1
    r = judged[0]
    # Two judges: judge_reward is their mean; the "count" judge is the proxy itself here.
    assert r["judge_reward"] == pytest.approx((r["judge_reward/one-yes"] + r["judge_reward/count"]) / 2)
    assert r["judge_reward/count"] == pytest.approx(r["proxy_reward_heldout"])


def test_a_resumed_run_judges_exactly_as_the_uninterrupted_one(tmp_path):
    import shutil

    config = small_config(steps=4, learning_rate=5e-3, judge_every=2, save_every=2)
    train(config, tiny_policy(), count_yes, tiny_prompts(), tmp_path / "a", judges=[one_yes], heldout_prompts=HELDOUT)
    full = rows(tmp_path / "a")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000002", tmp_path / "b" / "checkpoints" / "step-000002")
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:2]))
    torch.rand(1000)  # the checkpoint restores the RNG; the judges' fork must not have shifted it
    train(config, tiny_policy(), count_yes, tiny_prompts(), tmp_path / "b", judges=[one_yes], heldout_prompts=HELDOUT,
          resume=True)
    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith("time_")}
    assert [untimed(r) for r in rows(tmp_path / "b")] == [untimed(r) for r in full]


def test_judging_needs_held_out_prompts_and_keep_best_judge_needs_a_judge(tmp_path):
    with pytest.raises(PPOError, match="held-out prompts"):
        train(small_config(steps=1), tiny_policy(), count_yes, tiny_prompts(), tmp_path / "a", judges=[one_yes])
    with pytest.raises(PPOError, match="keep_best=judge needs at least one judge"):
        train(small_config(steps=1, keep_best="judge"), tiny_policy(), count_yes, tiny_prompts(), tmp_path / "b")
    with pytest.raises(PPOError, match="keep_best must be 'last' or 'judge'"):
        PPOConfig(keep_best="best").validate()
    with pytest.raises(PPOError, match="judge_every must be >= 0"):
        PPOConfig(judge_every=-1).validate()
    assert PPOConfig().judge_interval(True) == 10 and PPOConfig().judge_interval(False) == 0
    assert PPOConfig(judge_every=3).judge_interval(True) == 3


def test_held_out_prompts_are_a_seeded_split():
    prompts = [f"p{i}" for i in range(20)]
    train_part, heldout = split_heldout(prompts, 5, seed=0)
    assert len(heldout) == 5 and len(train_part) == 15 and sorted(train_part + heldout) == sorted(prompts)
    assert split_heldout(prompts, 5, seed=0) == (train_part, heldout)
    assert split_heldout(prompts, 5, seed=1)[1] != heldout
    assert train_part == [p for p in prompts if p in train_part]  # order kept
    with pytest.raises(PPOError, match="judge_prompts=20"):
        split_heldout(prompts, 20, seed=0)


# ---------------------------------------------------------------------------------- diagnostics
def judged_rows(judge, proxy, stderr=0.05):
    return [{"step": 2 * (i + 1), "reward_mean": p, "reward_std": 1.0, "kl": float(i), "kl_heldout": float(i),
             "truncated_fraction": 0.0, "value_loss": 0.1, "judge_reward": j, "judge_reward_stderr": stderr,
             "proxy_reward_heldout": p}
            for i, (j, p) in enumerate(zip(judge, proxy))]


def test_diagnostics_over_optimisation():
    # The judge peaks at step 6 and falls well past its noise while the proxy keeps rising.
    history = judged_rows([0.2, 0.4, 0.5, 0.1, -0.3], [0.3, 0.7, 1.8, 3.0, 4.4])
    w = diagnostics.over_optimisation(history)
    assert w and w["code"] == "over_optimisation" and "step 6" in w["message"]
    assert "init_kl_coef" in w["suggestion"] and "keep_best=judge" in w["suggestion"] and "steps=6" in w["suggestion"]
    assert "over_optimisation" in {x["code"] for x in diagnostics.check(history, PPOConfig())}
    # Rows of steps without a judge evaluation in between change nothing.
    plain = {"step": 11, "reward_mean": 4.0, "reward_std": 1.0, "kl": 4.5, "truncated_fraction": 0.0, "value_loss": 0.1}
    assert diagnostics.over_optimisation(history + [plain])["code"] == "over_optimisation"


def test_diagnostics_no_over_optimisation():
    # Judge and proxy rise together: healthy.
    assert diagnostics.over_optimisation(judged_rows([0.2, 0.3, 0.4, 0.5], [0.3, 0.6, 0.9, 1.2])) is None
    # The judge dips by less than its standard error: noise.
    assert diagnostics.over_optimisation(judged_rows([0.2, 0.4, 0.5, 0.47], [0.3, 0.7, 1.8, 3.0], stderr=0.05)) is None
    # The judge falls, but so does the proxy: not the proxy being exploited.
    assert diagnostics.over_optimisation(judged_rows([0.2, 0.5, 0.1], [0.3, 1.8, 1.0])) is None
    # Too few evaluations, or no judge at all.
    assert diagnostics.over_optimisation(judged_rows([0.5, 0.1], [0.3, 1.8])) is None
    assert diagnostics.over_optimisation([{"step": 1, "reward_mean": 0.0}]) is None


# ---------------------------------------------------------------------------------- run_ppo, CLI, job, page
class RuleScorer:
    """reward.score's contract (.score(prompts, responses) -> tensor) with a rule chosen by the
    directory's name: a directory named judge* is the one-yes judge, any other the proxy."""

    def __init__(self, path, device=None):
        self.path = str(path)

    def score(self, prompts, responses, batch_size=32):
        return (one_yes if Path(self.path).name.startswith("judge") else count_yes)(prompts, responses)


@pytest.fixture
def files(tmp_path, monkeypatch):
    import reward.score

    monkeypatch.setattr(reward.score, "load_reward_model", RuleScorer)
    model, tok = tiny_policy()
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny_prompts(12)), encoding="utf-8")
    for name in ("rm", "judge-a"):
        (tmp_path / name).mkdir()
    return SimpleNamespace(policy=tmp_path / "policy", prompts=prompts, rm=tmp_path / "rm", judge=tmp_path / "judge-a")


FAST = ["--set", "batch_size=8", "--set", "mini_batch_size=8", "--set", "max_new_tokens=4", "--set", "ppo_epochs=1",
        "--set", "tensorboard=false", "--set", "precision=fp32", "--set", "judge_prompts=4", "--set", "judge_every=1"]


def invoke(args):
    from typer.testing import CliRunner

    import app.cli_policy  # noqa: F401  (adds the policy commands to the app)
    import app.cli_ppo  # noqa: F401  (adds the ppo commands to the app)
    from app.cli import cli

    return CliRunner().invoke(cli, args)


def test_rlhf_ppo_judge_and_eval_policy_judge_wire_through(files, settings, tmp_path, caplog):
    import logging

    out = tmp_path / "run"
    args = ["ppo", "--reward-model", str(files.rm), "--prompts", str(files.prompts), "--output", str(out),
            "--policy", str(files.policy), "--steps", "2", *FAST, "--judge", str(files.judge), "--keep-best", "judge",
            "--name", "ppo-judged"]
    with caplog.at_level(logging.INFO, logger="ppo.train"):
        result = invoke(args + ["--json"])
    assert result.exit_code == 0, result.output
    assert any("4 held-out prompts split off" in r.getMessage() and "other 8" in r.getMessage() for r in caplog.records)
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["judges"] == {"judge-a": str(files.judge)} and payload["kept_step"] in (1, 2)
    history = rows(out)
    assert all({"judge_reward", "judge_reward/judge-a", "proxy_reward_heldout"} <= set(r) for r in history)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_model"] == str(files.rm) and summary["heldout_prompts"] == 4
    assert summary["kept_step"] == payload["kept_step"]

    from annotation.registry import get_model
    from annotation.store import init_db, transaction

    with transaction(init_db(settings.db_url)) as session:
        row = get_model(session, "ppo-judged")
        assert row.params["judges"] == [str(files.judge)] and row.params["keep_best"] == "judge"
        assert row.params["kept_step"] == payload["kept_step"]

    # The proxy cannot judge itself.
    refused = invoke(["ppo", "--reward-model", str(files.rm), "--prompts", str(files.prompts), "--output",
                      str(tmp_path / "x"), "--policy", str(files.policy), "--steps", "1", *FAST, "--judge", str(files.rm)])
    assert isinstance(refused.exception, PPOError) and "--judge" in str(refused.exception)
    assert "reward model PPO trains on" in str(refused.exception)

    # eval-policy: each judge's win rate beside the reward model's; the run's summary.json says
    # which reward model the policy was trained on, so a verdict by it is self-judged.
    ev = ["eval-policy", "--policy", str(out / "policy"), "--reference", str(files.policy), "--reward-model", str(files.rm),
          "--prompts", str(files.prompts), "--n", "6", "--max-new-tokens", "4", "--samples", "1",
          "--judge", str(files.judge), "--judge", str(files.rm)]
    result = invoke(ev + ["--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["self_judged"] is True and payload["trained_on"] == str(files.rm)
    assert set(payload["judges"]) == {"judge-a", "rm"}
    assert payload["judges"]["judge-a"]["self_judged"] is False and payload["judges"]["rm"]["self_judged"] is True
    for j in payload["judges"].values():
        assert {"win_rate", "wins", "ties", "losses", "win_rate_stderr", "reward_policy", "reward_reference"} <= set(j)
    # The reward model judging again as a judge gives the same verdict as the reward model.
    assert payload["judges"]["rm"]["win_rate"] == payload["win_rate"]
    text = invoke(ev)
    assert text.exit_code == 0 and "win rate by judge judge-a" in text.stdout and "self_judged: true" in text.stdout


def _ctx(settings, run_dir):
    import logging

    from annotation.store import init_db

    return SimpleNamespace(job_id=9, run_dir=run_dir, engine=init_db(settings.db_url), settings=settings,
                           log=logging.getLogger("test.ppo.judges"), progress=lambda f, m="": None, cancelled=lambda: False)


def test_ppo_job_takes_judges(files, settings, tmp_path):
    from ppo.jobs import ppo

    params = {"policy": str(files.policy), "reward_model": str(files.rm), "prompts": str(files.prompts), "steps": 2,
              "batch_size": 8, "mini_batch_size": 8, "max_new_tokens": 4, "ppo_epochs": 1, "tensorboard": False,
              "precision": "fp32", "judge_prompts": 4, "judge_every": 2, "judges": [str(files.judge)]}
    result = ppo(params, _ctx(settings, tmp_path / "job"))
    (row,) = result["register"]
    assert row["params"]["judges"] == [str(files.judge)] and row["params"]["kept_step"] == 2
    history = rows(tmp_path / "job" / "ppo")
    assert "judge_reward" not in history[0] and "judge_reward/judge-a" in history[1]
    with pytest.raises(PPOError, match="reward model PPO trains on"):
        ppo({**params, "judges": [str(files.rm)]}, _ctx(settings, tmp_path / "job2"))


def test_ppo_page_submits_judges_and_draws_the_over_optimisation_curve(store, tmp_path):
    from sqlalchemy import select, update

    from annotation.registry import register_model
    from annotation.store import Job, session_factory, transaction
    from app.jobs import submit_job
    from app.settings import get_settings
    from browser_helpers import open_page_as

    page = Path(__file__).resolve().parent.parent / "app" / "pages" / "6_PPO.py"
    with transaction(store) as s:
        for name in ("rm-proxy", "rm-gold"):
            register_model(s, kind="reward", name=name, path=str(tmp_path / name))
    at = open_page_as(page, store, "res")
    at.selectbox(key="ppo_reward").set_value("rm-proxy (#1)")
    at.run()
    # The proxy is not offered as its own judge.
    assert at.multiselect(key="ppo_judges").options == ["rm-gold (#2)"]
    at.multiselect(key="ppo_judges").select("rm-gold (#2)")
    at.selectbox(key="ppo_keep_best").set_value("judge")
    next(b for b in at.button if b.label == "Start PPO run").click()
    at.run()
    assert not at.exception, at.exception
    with session_factory(store)() as s:
        (job,) = s.scalars(select(Job)).all()
    assert job.params["reward_model"] == str(tmp_path / "rm-proxy") and job.params["judges"] == [str(tmp_path / "rm-gold")]
    assert job.params["keep_best"] == "judge"

    # A finished run with judged steps: the proxy-and-judge-against-KL chart and the warning.
    job_id = submit_job(store, "ppo", {"reward_model": "rm", "prompts_project": "demo", "steps": 10})
    from ppo.runs import job_run_dir

    run = job_run_dir(Path(get_settings().runs_dir) / f"job-{job_id}")
    run.mkdir(parents=True)
    history = [{**r, "kl_coef": 0.05, "entropy": 2.0, "response_length": 8.0}
               for r in judged_rows([0.2, 0.4, 0.5, 0.1, -0.3], [0.3, 0.7, 1.8, 3.0, 4.4])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    with transaction(store) as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="succeeded", progress=1.0, message="done"))
    at = open_page_as(page, store, "res")
    at.selectbox(key="ppo_run_select").set_value(job_id)
    at.run()
    assert not at.exception, at.exception
    assert len(at.get("vega_lite_chart")) == 3
    assert any("over-optimising" in w.value for w in at.warning)
