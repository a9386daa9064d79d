"""The reward model as a second opinion on the annotators: Bradley-Terry scores in one batched call,
agreement with the aggregated label and with each annotator (against scikit-learn), label-noise
candidates on a constructed project, the store path with a tiny reward model trained here (SQLite
and PostgreSQL), `rlhf agreement --with-model`, and the Quality page's section under AppTest.

    .venv/bin/python -m pytest tests/test_second_opinion.py
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, cohen_kappa_score

sys.path.insert(0, str(Path(__file__).parent))
from reward_fixtures import save_tiny_bert, synthetic_pairs  # noqa: E402

from annotation import second_opinion as so  # noqa: E402
from annotation.aggregate import aggregate, majority  # noqa: E402
from annotation.errors import AnnotationError  # noqa: E402
from reward import second_opinion as rso  # noqa: E402
from reward.errors import RewardError  # noqa: E402

QUALITY_PAGE = Path(__file__).resolve().parent.parent / "app" / "pages" / "4_Quality.py"
SCRIPT = "<script>alert('noise')</script>"


class WordScorer:
    """A stand-in with the scorer contract: reward = weight x (count of "good" - count of "bad")."""

    def __init__(self, weight: float = 3.0):
        self.weight, self.calls = weight, 0

    def score(self, prompts, responses):
        self.calls += 1
        assert len(prompts) == len(responses)
        return torch.tensor([self.weight * (r.split().count("good") - r.split().count("bad")) for r in responses])


class EnsembleStandIn:
    def __init__(self, *members):
        self.members, self.calls = members, 0

    def member_scores(self, prompts, responses):
        self.calls += 1
        return torch.stack([m.score(prompts, responses) for m in self.members])


def items_frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["item_id", "prompt", "response_a", "response_b"]).set_index("item_id")


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def opinion_for(p_a: dict) -> pd.DataFrame:
    """An opinion with the given P(A) per item (r_A = logit P, r_B = 0)."""
    ids = list(p_a)
    return rso.opinion_from_rewards(ids, [math.log(p / (1 - p)) for p in p_a.values()], [0.0] * len(ids))


def annotations_frame(annotations: dict) -> pd.DataFrame:
    """{item_id: "aab"-style string, one letter per annotator u0, u1, ... ('t' tie, '-' none)}."""
    names = {"a": "a", "b": "b", "t": "tie", "x": "both_bad"}
    rows = [(item, f"u{j}", names[c]) for item, said in annotations.items() for j, c in enumerate(said) if c != "-"]
    out = pd.DataFrame(rows, columns=["item_id", "annotator", "choice"])
    out["gold_choice"] = None
    return out


# --------------------------------------------------------------------------- the model's opinion


def test_opinion_is_bradley_terry_from_one_batched_call():
    items = items_frame([
        (10, "p", "good w1", "bad w2"),    # r_A - r_B = 6
        (11, "p", "w1 w2", "good w3"),     # -3
        (12, "p", "good", "good"),         # 0: undecided
        (13, [{"role": "user", "content": "chat"}], "bad", "w1"),  # -3
    ])
    scorer = WordScorer(3.0)
    opinion = rso.score_items(scorer, items)
    assert scorer.calls == 1  # every item in one call, never one per item
    assert list(opinion.index) == [10, 11, 12, 13] and list(opinion.columns) == so.OPINION_COLUMNS
    assert opinion["p_a"].tolist() == pytest.approx([sigmoid(6), sigmoid(-3), 0.5, sigmoid(-3)], abs=1e-12)
    assert opinion["label"].tolist() == ["a", "b", "undecided", "b"]
    assert opinion["confidence"].tolist() == pytest.approx([sigmoid(6), sigmoid(3), 0.5, sigmoid(3)], abs=1e-12)
    assert (opinion["spread"] == 0).all()
    # undecided within the margin of 0.5: P(A) = sigmoid(0.1) = 0.525
    near = rso.opinion_from_rewards([1, 2], [0.1, 0.3], [0.0, 0.0], margin=0.05)
    assert near["label"].tolist() == ["undecided", "a"]
    with pytest.raises(RewardError, match="margin"):
        rso.opinion_from_rewards([1], [0.0], [0.0], margin=0.5)


def test_ensemble_gives_mean_rewards_and_the_spread_of_the_difference():
    items = items_frame([(1, "p", "good", "bad"), (2, "p", "w1", "good")])
    ens = EnsembleStandIn(WordScorer(1.0), WordScorer(3.0))
    opinion = rso.score_items(ens, items)
    assert ens.calls == 1
    # members: item 1 diffs 2 and 6, item 2 diffs -1 and -3
    assert opinion["reward_a"].tolist() == pytest.approx([2.0, 0.0])
    assert opinion["reward_b"].tolist() == pytest.approx([-2.0, 2.0])
    assert opinion["spread"].tolist() == pytest.approx([2.0, 1.0])
    assert opinion["p_a"].tolist() == pytest.approx([sigmoid(4), sigmoid(-2)])


# --------------------------------------------------------------------------- agreement against scikit-learn


@pytest.fixture
def random_project():
    rng = np.random.default_rng(3)
    rows = []
    truth = rng.choice(["a", "b"], size=80)
    for item in range(80):
        for j in range(5):
            if rng.random() < 0.65:
                said = truth[item] if rng.random() < 0.75 else rng.choice(["a", "b", "tie", "both_bad"])
                rows.append((item, f"ann{j}", said))
    annotations = pd.DataFrame(rows, columns=["item_id", "annotator", "choice"])
    annotations["gold_choice"] = [("a" if i % 2 else "b") if i < 10 else None for i in annotations["item_id"]]
    p_a = np.clip(np.where(truth == "a", 0.8, 0.2) + rng.normal(0, 0.25, size=80), 0.01, 0.99)
    p_a[:6] = 0.51  # a few undecided
    opinion = opinion_for({i: float(p) for i, p in enumerate(p_a) if i != 79})  # item 79 not scored
    return annotations, opinion


def test_model_vs_aggregate_matches_scikit_learn(random_project):
    annotations, opinion = random_project
    out = so.model_vs_aggregate(annotations, opinion, bootstrap=2000, seed=1)
    human = majority(annotations)["label"].dropna()
    both = human.index.intersection(opinion.index)
    model = opinion.loc[both, "label"].replace("undecided", "tie")
    assert out["n_items"] == len(both) and out["left_out"]["not_scored"] == int(79 in human.index)
    assert out["left_out"]["no_aggregated_label"] == int(majority(annotations)["label"].isna().sum())
    assert out["agreement"] == pytest.approx(accuracy_score(human.loc[both], model), abs=1e-12)
    assert out["kappa"] == pytest.approx(cohen_kappa_score(human.loc[both], model), abs=1e-12)
    decisive = human.loc[both].isin(["a", "b"])
    assert out["decisive"]["accuracy"] == pytest.approx(accuracy_score(human.loc[both][decisive], model[decisive]))
    assert sum(sum(row.values()) for row in out["confusion"].values()) == len(both)
    # the bootstrap over cells is the bootstrap over items: compare with resampling items for sklearn
    rng = np.random.default_rng(0)
    h, m = human.loc[both].to_numpy(), model.to_numpy()
    naive = []
    for _ in range(2000):
        pick = rng.integers(0, len(h), len(h))
        naive.append(cohen_kappa_score(h[pick], m[pick]))
    lo, hi = np.percentile(naive, [2.5, 97.5])
    assert out["interval"][0] == pytest.approx(lo, abs=0.03) and out["interval"][1] == pytest.approx(hi, abs=0.03)
    assert out["interval"][0] < out["kappa"] < out["interval"][1]
    assert out["agreement_interval"][0] < out["agreement"] < out["agreement_interval"][1]
    assert so.model_vs_aggregate(annotations, opinion, bootstrap=200, seed=1) == so.model_vs_aggregate(annotations, opinion, bootstrap=200, seed=1)
    assert so.model_vs_aggregate(annotations, opinion, bootstrap=0)["interval"] is None


def test_model_vs_each_annotator_matches_scikit_learn(random_project):
    annotations, opinion = random_project
    rows = {r["annotator"]: r for r in so.model_vs_annotators(annotations, opinion, bootstrap=300, min_shared=10)}
    assert set(rows) == set(annotations["annotator"])
    for name, row in rows.items():
        mine = annotations[(annotations["annotator"] == name) & annotations["item_id"].isin(opinion.index)]
        model = opinion.loc[mine["item_id"], "label"].replace("undecided", "tie").to_numpy()
        assert row["n_items"] == len(mine)
        assert row["kappa"] == pytest.approx(cohen_kappa_score(mine["choice"], model), abs=1e-12)
        assert row["agreement"] == pytest.approx(accuracy_score(mine["choice"], model), abs=1e-12)
        assert row["interval"][0] <= row["kappa"] <= row["interval"][1]
    # below min_shared: agreement still given, kappa not
    few = so.model_vs_annotators(annotations, opinion, bootstrap=0, min_shared=1000)
    assert all(r["kappa"] is None and r["agreement"] is not None for r in few)


def test_model_as_one_more_rater(random_project):
    annotations, opinion = random_project
    row = so.model_as_rater(annotations, opinion)
    plural = majority(annotations)["label"]
    both = plural.dropna().index.intersection(opinion.index)
    said = opinion.loc[both, "label"].replace("undecided", "tie")
    assert row["n_compared"] == len(both)
    assert row["loo_agreement"] == pytest.approx((said == plural.loc[both]).mean())
    gold = annotations.drop_duplicates("item_id").set_index("item_id")["gold_choice"].dropna()
    gold = gold[gold.index.isin(opinion.index)]
    assert row["n_gold"] == len(gold)
    assert row["gold_accuracy"] == pytest.approx((opinion.loc[gold.index, "label"] == gold).mean())
    assert row["undecided_rate"] == pytest.approx((opinion.loc[opinion.index.isin(annotations["item_id"]), "label"] == "undecided").mean())
    # a person called "model" keeps their own row apart from the model's
    renamed = annotations.replace({"annotator": {"ann0": "model"}})
    assert so.model_as_rater(renamed, opinion) == row


# --------------------------------------------------------------------------- label-noise candidates


NOISE_VOTES = {1: "aaa", 2: "aab", 3: "aa", 4: "aabb", 5: "bbb", 6: "aaa", 7: "ttt", 8: "bbbb"}
NOISE_P_A = {1: 0.05, 2: 0.10, 3: 0.01, 4: 0.01, 5: 0.01, 6: 0.20, 7: 0.99, 8: 0.93}


def test_label_noise_lists_confident_disagreement_with_a_strong_majority():
    annotations, opinion = annotations_frame(NOISE_VOTES), opinion_for(NOISE_P_A)
    items = items_frame([(i, f"{SCRIPT} prompt {i}", f"A{i}", f"B{i}") for i in NOISE_VOTES])
    noise = so.label_noise(annotations, opinion, items)
    # 1: aaa vs P(B) 0.95; 2: 2/3 of 3 vs P(B) 0.90; 8: bbbb vs P(A) 0.93. Not 3 (two votes), 4 (no
    # majority), 5 (the model agrees), 6 (P(B) 0.80 < 0.85), 7 (ties are no side).
    assert [r["item_id"] for r in noise["items"]] == [1, 8, 2] and noise["n_candidates"] == 3
    first = noise["items"][0]
    assert (first["human_label"], first["model_label"], first["votes"], first["n_annotations"]) == ("a", "b", "a x3", 3)
    assert first["model_confidence"] == pytest.approx(0.95) and first["p_a"] == pytest.approx(0.05)
    assert first["prompt"] == f"{SCRIPT} prompt 1" and first["response_b"] == "B1"
    assert noise["items"][2]["votes"] == "a x2, b x1"
    lower = so.label_noise(annotations, opinion, threshold=0.8)
    assert [r["item_id"] for r in lower["items"]] == [1, 8, 2, 6] and "prompt" not in lower["items"][0]
    top = so.label_noise(annotations, opinion, top=1)
    assert top["n_candidates"] == 3 and len(top["items"]) == 1
    stricter = so.label_noise(annotations, opinion, min_share=0.75, min_annotations=2)
    assert [r["item_id"] for r in stricter["items"]] == [3, 1, 8]
    with pytest.raises(AnnotationError, match="--noise-threshold 0.5"):
        so.label_noise(annotations, opinion, threshold=0.5)


def test_label_noise_with_dawid_skene_posteriors():
    annotations, opinion = annotations_frame(NOISE_VOTES), opinion_for(NOISE_P_A)
    noise = so.label_noise(annotations, opinion, method="dawid-skene", min_posterior=0.9)
    ds = aggregate(annotations, "dawid-skene").join(opinion.add_prefix("m_"))
    other = ds["label"].map({"a": "b", "b": "a"})
    expected = ds[(ds["confidence"] >= 0.9) & (ds["m_label"] == other) & (ds["m_confidence"] >= 0.85)]
    assert [r["item_id"] for r in noise["items"]] == list(expected.sort_values("m_confidence", ascending=False).index)
    assert 3 in expected.index  # two agreeing votes are enough when the posterior is high
    assert noise["aggregation"] == "dawid-skene" and "posterior" in noise["strong_majority"]


def test_model_report_puts_it_together():
    annotations, opinion = annotations_frame(NOISE_VOTES), opinion_for(NOISE_P_A)
    report = so.model_report(annotations, opinion, bootstrap=50, min_shared=2)
    assert report["n_scored"] == 8 and report["n_undecided"] == 0
    assert set(report) >= {"project", "as_rater", "annotators", "label_noise", "notes", "bootstrap"}
    assert report["label_noise"]["n_candidates"] == 3
    json.dumps(report)  # JSON-ready
    with pytest.raises(AnnotationError, match="lacks column"):
        so.model_report(annotations, opinion.drop(columns=["p_a"]))


# --------------------------------------------------------------------------- the store path with a tiny trained model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two tiny BERT reward models trained on the good/bad task (seconds each), and an ensemble of both."""
    from reward.train import TrainParams, train_reward_model

    root = tmp_path_factory.mktemp("rm")
    base = save_tiny_bert(root / "base")
    runs = []
    for seed in (1, 2):
        run = root / f"run{seed}"
        train_reward_model(synthetic_pairs(160, seed=seed), run, TrainParams(
            base=str(base), epochs=2, lr=3e-3, batch_size=8, max_length=32, precision="fp32", seed=seed))
        runs.append(run)
    ens = root / "ensemble"
    ens.mkdir()
    for i, run in enumerate(runs):
        shutil.copytree(run, ens / f"member_{i}")
    (ens / "ensemble.json").write_text(json.dumps({"members": ["member_0", "member_1"]}))
    return {"single": runs[0], "other": runs[1], "ensemble": ens}


N_ITEMS = 24
PLANTED = 0  # the item whose three annotators all chose the response with "bad" in it


def seed_store(engine, models: dict) -> dict:
    """Project 'so' with N_ITEMS good/bad items labelled by u1-u3 (u4 four), two unlabelled items,
    the tiny model registered active for it, a policy row and project 'bare' with no model."""
    from annotation.auth import create_user
    from annotation.projects import create_project
    from annotation.registry import register_model
    from annotation.store import Annotation, Item, transaction

    pairs = synthetic_pairs(N_ITEMS + 2, seed=7)
    with transaction(engine) as s:
        project = create_project(s, "so", overlap=3)
        bare = create_project(s, "bare", overlap=3)
        users = [create_user(s, f"u{i}", None) for i in (1, 2, 3, 4)]
        ids = []
        for i, pair in enumerate(pairs):
            good_side = "a" if i % 2 else "b"
            a, b = (pair.chosen, pair.rejected) if good_side == "a" else (pair.rejected, pair.chosen)
            prompt = f"{SCRIPT} {pair.prompt}" if i == PLANTED else pair.prompt
            item = Item(project_id=project.id, prompt=prompt, response_a=a, response_b=b, content_hash=f"h{i}")
            s.add(item)
            s.flush()
            ids.append(item.id)
            if i >= N_ITEMS:
                continue
            said = ("b" if good_side == "a" else "a") if i == PLANTED else good_side
            for j, user in enumerate(users):
                if j < 3 or 1 <= i <= 4:
                    s.add(Annotation(item_id=item.id, annotator_id=user.id, choice=said, strength=2))
        s.add(Item(project_id=bare.id, prompt="p", response_a="x", response_b="y", content_hash="bare"))
        rm = register_model(s, kind="reward", name="rm-tiny", path=str(models["single"]), project_id=project.id, active=True)
        other = register_model(s, kind="reward", name="rm-other", path=str(models["other"]), project_id=project.id)
        ens = register_model(s, kind="reward", name="rm-ens", path=str(models["ensemble"]), project_id=project.id)
        pol = register_model(s, kind="policy", name="pol", path=str(models["single"]), project_id=project.id)
        return {"items": ids, "rm": rm.id, "other": other.id, "ensemble": ens.id, "policy": pol.id}


def test_second_opinion_from_the_store(engine, tiny_models):
    from annotation.agreement import load_annotations

    ids = seed_store(engine, tiny_models)
    out = rso.second_opinion(engine, "so", bootstrap=200, min_shared=4)
    assert out["model"] == {"id": ids["rm"], "name": "rm-tiny", "path": str(tiny_models["single"]), "ensemble": False}
    assert out["n_scored"] == N_ITEMS  # annotated items only
    scored = rso.score_project(engine, "so")
    opinion = scored["opinion"]
    assert sorted(opinion.index) == sorted(ids["items"][:N_ITEMS])
    good_side = pd.Series(["a" if i % 2 else "b" for i in range(N_ITEMS)], index=ids["items"][:N_ITEMS])
    assert (opinion["label"] == good_side).mean() >= 0.9  # the tiny model learned the task
    # the planted item: three people chose "bad", the model confidently the other side
    planted = ids["items"][PLANTED]
    noise = out["label_noise"]
    listed = [r["item_id"] for r in noise["items"]]
    assert planted in listed and opinion.loc[planted, "confidence"] >= 0.85
    expected = (opinion["label"] != good_side) & (opinion["confidence"] >= 0.85)
    expected[planted] = not expected[planted]  # people and model swap roles on the planted item
    assert noise["n_candidates"] == int(expected.sum())
    row = next(r for r in noise["items"] if r["item_id"] == planted)
    assert row["prompt"].startswith(SCRIPT) and row["votes"] == f"{row['human_label']} x3"
    # agreement numbers, against scikit-learn on the same labels
    annotations = load_annotations(engine, "so")
    human = majority(annotations)["label"]
    model = opinion.loc[human.index, "label"].replace("undecided", "tie")
    assert out["project"]["agreement"] == pytest.approx(accuracy_score(human, model))
    assert out["project"]["kappa"] == pytest.approx(cohen_kappa_score(human, model))
    rows = {r["annotator"]: r for r in out["annotators"]}
    assert rows["u1"]["n_items"] == N_ITEMS and rows["u4"]["n_items"] == 4
    u1 = annotations[annotations.annotator == "u1"]
    u1_model = opinion.loc[u1["item_id"], "label"].replace("undecided", "tie")
    assert rows["u1"]["kappa"] == pytest.approx(cohen_kappa_score(u1["choice"], u1_model))
    assert rows["u4"]["kappa"] is not None
    # the same model named by id, by name and by directory gives the same scores
    for ref in (str(ids["rm"]), "rm-tiny", str(tiny_models["single"])):
        again = rso.score_project(engine, "so", ref)["opinion"]
        assert np.allclose(again["p_a"], opinion["p_a"], atol=1e-5), ref
    # the ensemble: mean rewards of its members and a spread
    ens = rso.score_project(engine, "so", "rm-ens")
    other = rso.score_project(engine, "so", "rm-other")["opinion"]
    assert ens["model"]["ensemble"] is True
    assert np.allclose(ens["opinion"]["reward_a"], (opinion["reward_a"] + other["reward_a"]) / 2, atol=1e-5)
    diffs = np.stack([opinion["reward_a"] - opinion["reward_b"], other["reward_a"] - other["reward_b"]])
    assert np.allclose(ens["opinion"]["spread"], diffs.std(0), atol=1e-5) and (ens["opinion"]["spread"] > 0).any()
    assert rso.second_opinion(engine, "so", method="dawid-skene", bootstrap=0)["project"]["aggregation"] == "dawid-skene"


def test_second_opinion_errors(engine, tiny_models, tmp_path):
    ids = seed_store(engine, tiny_models)
    with pytest.raises(rso.NoActiveModel, match="project 'bare' has no active reward model"):
        rso.second_opinion(engine, "bare")
    assert rso.active_reward_model(engine, "bare") is None and rso.active_reward_model(engine, "so").id == ids["rm"]
    with pytest.raises(RewardError, match="is a policy model, not a reward model"):
        rso.resolve_model(engine, "so", str(ids["policy"]))
    with pytest.raises(AnnotationError, match="no registered model with id or name 'nope'"):
        rso.resolve_model(engine, "so", "nope")
    with pytest.raises(AnnotationError, match="no project named 'nope'"):
        rso.resolve_model(engine, "nope")
    with pytest.raises(RewardError, match="not a reward model run directory"):
        rso.score_project(engine, "so", str(tmp_path))
    with pytest.raises(AnnotationError, match="--noise-threshold 1.5"):
        rso.second_opinion(engine, "so", noise_threshold=1.5)


# --------------------------------------------------------------------------- rlhf agreement --with-model


def rlhf_in_process(capsys, monkeypatch, *args):
    from app.cli import main

    monkeypatch.setattr(sys, "argv", ["rlhf", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_agreement_with_model(settings, tiny_models, tmp_path, capsys, monkeypatch):
    from annotation.store import init_db

    from app import cli_agreement

    assert cli_agreement.NOISE_THRESHOLD == so.DEFAULT_NOISE_THRESHOLD
    ids = seed_store(init_db(settings.db_url), tiny_models)
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "agreement", "--project", "so", "--with-model", "rm-tiny",
                                   "--json", "--bootstrap", "100", "--min-shared", "4")
    assert rc == 0, err
    report = json.loads(out)
    assert report["n_items"] == N_ITEMS and "percent_agreement" in report  # the existing report is all there
    model = report["model"]
    assert model["model"]["id"] == ids["rm"] and model["n_scored"] == N_ITEMS
    assert {"agreement", "kappa", "interval", "n_items"} <= set(model["project"])
    assert {r["annotator"] for r in model["annotators"]} == {"u1", "u2", "u3", "u4"}
    assert model["as_rater"]["annotator"] == "model"
    assert ids["items"][PLANTED] in [r["item_id"] for r in model["label_noise"]["items"]]
    assert model["label_noise"]["threshold"] == 0.85
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "agreement", "--project", "so", "--with-model", str(tiny_models["single"]),
                                   "--bootstrap", "20", "--noise-threshold", "0.9")
    assert rc == 0, err
    assert "reward model as a second opinion: run1" in out and "label-noise candidates:" in out
    assert f"    {ids['items'][PLANTED]}: people" in out
    for args, message in [
        (["--project", "so", "--with-model", "nope"], "no registered model with id or name 'nope'"),
        (["--project", "so", "--with-model", str(ids["policy"])], "is a policy model, not a reward model"),
        (["--project", "so", "--with-model", str(tmp_path)], "not a reward model run directory"),
        (["--project", "nope", "--with-model", "rm-tiny"], "no project named 'nope'"),
        (["--labels", str(tmp_path / "x.csv"), "--with-model", "rm-tiny"], "--with-model applies to --project only"),
        (["--project", "so", "--with-model", "rm-tiny", "--noise-threshold", "0.3"], "--noise-threshold 0.3"),
    ]:
        rc, out, err = rlhf_in_process(capsys, monkeypatch, "agreement", *args, "--bootstrap", "0")
        assert rc == 2 and message in err, (args, err)
        assert err.count("\n") == 1 and err.startswith("error: "), err  # one line


# --------------------------------------------------------------------------- the Quality page


@pytest.fixture
def page_store(tmp_path, monkeypatch, tiny_models):
    from annotation.auth import create_user
    from annotation.store import init_db, transaction
    from app import settings as settings_mod

    db_url = f"sqlite:///{tmp_path / 'rlhf.db'}"
    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RLHF_DB_URL", db_url)
    monkeypatch.delenv("RLHF_CONFIG", raising=False)
    settings_mod.get_settings.cache_clear()
    engine = init_db(db_url)
    ids = seed_store(engine, tiny_models)
    with transaction(engine) as s:
        ids["res"] = create_user(s, "res", "pw-research", "researcher").id
    yield engine, ids
    settings_mod.get_settings.cache_clear()
    engine.dispose()


def open_quality(engine, user_id, project):
    from streamlit.testing.v1 import AppTest

    from browser_helpers import set_login

    at = AppTest.from_file(str(QUALITY_PAGE), default_timeout=120)
    set_login(at, engine, user_id)
    at.session_state["quality_project"] = project
    at.session_state["quality_resamples"] = 100
    return at.run()


def test_quality_page_second_opinion_on_demand(page_store, monkeypatch):
    engine, ids = page_store
    calls = []
    real = rso.score_project
    monkeypatch.setattr(rso, "score_project", lambda *a, **k: calls.append(a) or real(*a, **k))
    at = open_quality(engine, ids["res"], "so")
    assert not at.exception, at.exception
    assert [t.label for t in at.tabs][-1] == "Reward model as a second opinion"
    assert not calls and not any("Kappa with the model" in f.value.columns for f in at.dataframe)  # nothing scored yet
    at.button(key="quality_model_score").click().run()
    assert not at.exception, at.exception
    assert len(calls) == 1 and calls[0][1:] == ("so", ids["rm"])
    raters = next(f.value for f in at.dataframe if "Kappa with the model" in f.value.columns)
    assert set(raters["Annotator"]) == {"u1", "u2", "u3", "u4", "(model vs the majority)"}
    expected = so.model_report(__import__("annotation.agreement", fromlist=["x"]).load_annotations(engine, "so"),
                               real(engine, "so")["opinion"], bootstrap=0, min_shared=10)
    u1 = raters.set_index("Annotator").loc["u1"]
    assert u1["Kappa with the model"] == pytest.approx(next(r["kappa"] for r in expected["annotators"] if r["annotator"] == "u1"))
    noise = next(f.value for f in at.dataframe if "model_confidence" in f.value.columns)
    assert ids["items"][PLANTED] in set(noise["item_id"])
    # the item text of the candidates: plain text, script tags and all, never markdown or HTML
    assert any(t.value.startswith("Prompt:\n" + SCRIPT) for t in at.text)
    assert not any(SCRIPT in (m.value or "") for m in at.markdown)
    # reruns and a new threshold reuse the scores: the model is not run again
    at.slider(key="quality_noise_threshold").set_value(0.99).run()
    at.run()
    assert not at.exception and len(calls) == 1
    at.button(key="quality_model_rescore").click().run()
    assert len(calls) == 2


def test_quality_page_without_an_active_model_has_no_section(page_store):
    from annotation.auth import create_user
    from annotation.store import Annotation, Item, transaction
    from annotation.projects import get_project

    engine, ids = page_store
    with transaction(engine) as s:
        bare = get_project(s, "bare")
        item = s.query(Item).filter_by(project_id=bare.id).one()
        s.add(Annotation(item_id=item.id, annotator_id=create_user(s, "v1", None).id, choice="a", strength=1))
    at = open_quality(engine, ids["res"], "bare")
    assert not at.exception, at.exception
    assert "Reward model as a second opinion" not in [t.label for t in at.tabs]
