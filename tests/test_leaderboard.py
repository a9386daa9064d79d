"""Leaderboard of response sources: the Bradley-Terry fit against choix and scikit-learn on synthetic
battles with known strengths, closed forms for two sources (ties as half wins, the L2 penalty), the
bootstrap, what the data cannot tell (disconnected groups, only wins), the store loader (both
databases), `rlhf leaderboard` and the Quality page's Leaderboard tab."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import choix
import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.special import expit

from annotation import leaderboard as lb
from annotation.errors import AnnotationError

QUALITY_PAGE = Path(__file__).resolve().parent.parent / "app" / "pages" / "4_Quality.py"
KNOWN = np.array([-1.2, -0.5, 0.0, 0.6, 1.3])  # true Bradley-Terry strengths (log-odds) of m0..m4
NAMES = [f"m{i}" for i in range(len(KNOWN))]


def synthetic_battles(strengths=KNOWN, n=600, seed=0, tie_rate=0.0) -> pd.DataFrame:
    """Battles between random pairs of sources, won as the Bradley-Terry model with `strengths` says;
    a share `tie_rate` of them then marked tie."""
    rng = np.random.default_rng(seed)
    k = len(strengths)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    won = rng.random(n) < expit(strengths[a] - strengths[b])
    choice = np.where(won, "a", "b").astype(object)
    choice[rng.random(n) < tie_rate] = "tie"
    names = np.array([f"m{i}" for i in range(k)], dtype=object)
    return pd.DataFrame({"choice": choice, "source_a": names[a], "source_b": names[b]})


def strengths_of(report: dict, names=NAMES) -> np.ndarray:
    """The report's ratings back on the log-odds scale, in the order of `names`, mean 0."""
    by = {r["source"]: r["rating"] for r in report["ratings"]}
    s = (np.array([by[n] for n in names]) - lb.BASE_RATING) / lb.SCALE
    return s - s.mean()


def choix_data(battles: pd.DataFrame, doubled: bool = False) -> list[tuple[int, int]]:
    """(winner, loser) pairs for choix. With `doubled`, each win counts twice and a tie once each way:
    twice our log-likelihood, ties as half wins, which choix has no other way to say."""
    code = {n: i for i, n in enumerate(NAMES)}
    data = []
    for c, x, y in zip(battles["choice"], battles["source_a"].map(code), battles["source_b"].map(code)):
        if c == "tie":
            data += [(x, y), (y, x)]
        else:
            pair = (x, y) if c == "a" else (y, x)
            data += [pair, pair] if doubled else [pair]
    return data


def centred(s: np.ndarray) -> np.ndarray:
    return s - s.mean()


def two_source_gap(wins: float, games: float, l2: float) -> float:
    """Rating gap s_a - s_b (in points) of two sources under the L2 penalty, from the first-order
    condition: with s_a = -s_b = x, games * sigmoid(2x) - wins + l2 * x = 0."""
    x = brentq(lambda x: games * expit(2 * x) - wins + l2 * x, -50, 50, xtol=1e-14)
    return 2 * x * lb.SCALE


def battles_of(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    """(source_a, source_b, choice, count) rows as a battles frame."""
    out = [(c, a, b) for a, b, c, n in rows for _ in range(n)]
    return pd.DataFrame(out, columns=["choice", "source_a", "source_b"])


def no_nan(obj) -> bool:
    json.dumps(obj, allow_nan=False)
    return True


# --------------------------------------------------------------------------- the reference implementations


def test_matches_choix_and_recovers_known_strengths():
    battles = synthetic_battles(n=800, seed=1)
    # tiny penalty: our fit is the plain maximum likelihood that choix's I-LSR computes
    ours_mle = strengths_of(lb.leaderboard(battles, bootstrap=0, l2=1e-10))
    ilsr = centred(choix.ilsr_pairwise(len(NAMES), choix_data(battles), alpha=0.0, tol=1e-12, max_iter=1000))
    assert np.abs(ours_mle - ilsr).max() < 1e-7
    # default penalty: l2/2 * |s|^2 is choix's alpha * |s|^2 with alpha = l2/2
    ours = strengths_of(lb.leaderboard(battles, bootstrap=0))
    opt = centred(choix.opt_pairwise(len(NAMES), choix_data(battles), alpha=lb.DEFAULT_L2 / 2, tol=1e-12))
    assert np.abs(ours - opt).max() < 1e-7
    # both find the known strengths: the same order, each within 0.25 (two standard errors at ~320
    # battles a source; this seed's worst is 0.11)
    for fit in (ours, ilsr):
        assert list(np.argsort(fit)) == list(np.argsort(KNOWN))
        assert np.abs(fit - centred(KNOWN)).max() < 0.25
    # and the default penalty moves no rating by as much as a point
    assert np.abs(ours - ours_mle).max() * lb.SCALE < 1.0


def test_ties_as_half_wins_match_choix_on_doubled_data():
    battles = synthetic_battles(n=600, seed=1, tie_rate=0.2)
    assert (battles["choice"] == "tie").sum() > 80
    ours = strengths_of(lb.leaderboard(battles, bootstrap=0, l2=1e-10))
    ilsr = centred(choix.ilsr_pairwise(len(NAMES), choix_data(battles, doubled=True), alpha=0.0, tol=1e-12, max_iter=1000))
    assert np.abs(ours - ilsr).max() < 1e-7
    # doubling the data doubles the likelihood, so choix's alpha is our l2 (not l2/2) there
    ours = strengths_of(lb.leaderboard(battles, bootstrap=0))
    opt = centred(choix.opt_pairwise(len(NAMES), choix_data(battles, doubled=True), alpha=lb.DEFAULT_L2, tol=1e-12))
    assert np.abs(ours - opt).max() < 1e-7
    # leaving the ties out fits the decisive battles alone
    decisive = battles[battles["choice"] != "tie"]
    report = lb.leaderboard(battles, bootstrap=0, ties="ignore", l2=1e-10)
    ilsr = centred(choix.ilsr_pairwise(len(NAMES), choix_data(decisive), alpha=0.0, tol=1e-12, max_iter=1000))
    assert np.abs(strengths_of(report) - ilsr).max() < 1e-7
    assert report["n_battles"] == len(decisive) and report["left_out"]["ties"] == len(battles) - len(decisive)
    assert all(r["ties"] == 0 for r in report["ratings"]) and "ties" in report["notes"]


def test_matches_arena_logistic_regression():
    """Chatbot Arena's notebook: logistic regression without intercept on +1/-1 source columns, a tie
    as one win for each side at half weight (here), sklearn's C = 1 / l2."""
    from sklearn.linear_model import LogisticRegression

    battles = synthetic_battles(n=500, seed=2, tie_rate=0.1)
    code = {n: i for i, n in enumerate(NAMES)}
    x, y, w = [], [], []
    for c, a, b in zip(battles["choice"], battles["source_a"].map(code), battles["source_b"].map(code)):
        row = np.zeros(len(NAMES))
        row[a], row[b] = 1.0, -1.0
        for outcome, weight in ((1, 0.5), (0, 0.5)) if c == "tie" else ((int(c == "a"), 1.0),):
            x.append(row)
            y.append(outcome)
            w.append(weight)
    model = LogisticRegression(fit_intercept=False, C=1 / lb.DEFAULT_L2, tol=1e-12, max_iter=10_000)
    model.fit(np.array(x), np.array(y), sample_weight=np.array(w))
    ours = strengths_of(lb.leaderboard(battles, bootstrap=0))
    assert np.abs(ours - centred(model.coef_[0])).max() < 1e-5


# --------------------------------------------------------------------------- closed forms for two sources


def test_two_sources_closed_form_with_ties_as_half_wins():
    # alpha beat beta 7 times, lost 3 times, tied 2 and both were bad twice
    battles = battles_of([("alpha", "beta", "a", 5), ("beta", "alpha", "b", 2), ("alpha", "beta", "b", 3),
                          ("alpha", "beta", "tie", 2), ("beta", "alpha", "both_bad", 2)])

    def gap(**options) -> float:
        by = {r["source"]: r for r in lb.leaderboard(battles, bootstrap=0, **options)["ratings"]}
        return by["alpha"]["rating"] - by["beta"]["rating"]

    # without penalty s_a - s_b = ln(wins / losses), ties as half a win each: ln((7 + 1) / (3 + 1))
    assert gap(l2=1e-9) == pytest.approx(400 * math.log10(8 / 4), abs=1e-4)
    assert gap(l2=1e-9, ties="ignore") == pytest.approx(400 * math.log10(7 / 3), abs=1e-4)
    assert gap(l2=1e-9, both_bad="tie") == pytest.approx(400 * math.log10(9 / 5), abs=1e-4)
    # as the penalty goes to 0 the gap rises to the closed form, and matches the penalised one exactly
    gaps = [gap(l2=l2) for l2 in (1.0, 0.1, 0.01, 1e-4)]
    assert gaps == sorted(gaps) and gaps[-1] == pytest.approx(400 * math.log10(2), abs=1e-2)
    for l2 in (1.0, 0.1, lb.DEFAULT_L2):
        assert gap(l2=l2) == pytest.approx(two_source_gap(8, 12, l2), abs=1e-6)
    report = lb.leaderboard(battles, bootstrap=0)
    by = {r["source"]: r for r in report["ratings"]}
    assert (by["alpha"]["wins"], by["alpha"]["losses"], by["alpha"]["ties"], by["alpha"]["battles"]) == (7, 3, 2, 12)
    assert (by["beta"]["wins"], by["beta"]["losses"], by["beta"]["ties"]) == (3, 7, 2)
    # mean-centred: the two ratings straddle 1000
    assert by["alpha"]["rating"] + by["beta"]["rating"] == pytest.approx(2000, abs=1e-9)
    assert report["left_out"]["both_bad"] == 2 and "both_bad" in report["notes"]
    assert report["n_battles"] == 12 and report["n_sources"] == 2


def test_anchor_source_is_1000():
    battles = synthetic_battles(n=300, seed=3)
    mean = {r["source"]: r["rating"] for r in lb.leaderboard(battles, bootstrap=0)["ratings"]}
    report = lb.leaderboard(battles, bootstrap=50, anchor="m2")
    anchored = {r["source"]: r for r in report["ratings"]}
    assert anchored["m2"]["rating"] == 1000.0 and anchored["m2"]["low"] == anchored["m2"]["high"] == 1000.0
    for name in NAMES:  # the same fit, shifted
        assert anchored[name]["rating"] - 1000 == pytest.approx(mean[name] - mean["m2"], abs=1e-9)
    with pytest.raises(AnnotationError, match="--anchor 'gpt' is not among the ranked sources: m0, m1"):
        lb.leaderboard(battles, bootstrap=0, anchor="gpt")


# --------------------------------------------------------------------------- bootstrap


def test_intervals_contain_the_estimate_and_shrink_with_more_data():
    small = lb.leaderboard(synthetic_battles(n=400, seed=4), bootstrap=500, seed=0)
    large = lb.leaderboard(synthetic_battles(n=1600, seed=4), bootstrap=500, seed=0)
    for report in (small, large):
        for r in report["ratings"]:
            assert r["low"] < r["rating"] < r["high"]
    width = {n: {r["source"]: r["high"] - r["low"] for r in rep["ratings"]} for n, rep in (("small", small), ("large", large))}
    ratios = [width["large"][s] / width["small"][s] for s in NAMES]
    assert all(0.35 < q < 0.7 for q in ratios), ratios  # about 1/2 for 4x the battles
    assert large["bootstrap"] == {"resamples": 500, "confidence": 0.95, "seed": 0, "unit": "annotation"}
    assert no_nan(small)


def test_bootstrap_is_seeded_and_matches_a_naive_row_bootstrap():
    battles = synthetic_battles(n=300, seed=5, tie_rate=0.1)
    one = lb.leaderboard(battles, bootstrap=1000, seed=7)
    assert one == lb.leaderboard(battles, bootstrap=1000, seed=7)
    assert one != lb.leaderboard(battles, bootstrap=1000, seed=8)
    # resampling the rows themselves and refitting each resample gives intervals of the same size
    # (within 20%: 400 naive resamples leave about 7% noise on a width; this seed's worst is 4%)
    rng = np.random.default_rng(0)
    naive = np.array([
        strengths_of(lb.leaderboard(battles.iloc[rng.integers(0, len(battles), len(battles))], bootstrap=0)) for _ in range(400)
    ]) * lb.SCALE
    naive_width = np.percentile(naive, 97.5, axis=0) - np.percentile(naive, 2.5, axis=0)
    ours = {r["source"]: r["high"] - r["low"] for r in one["ratings"]}
    for name, w in zip(NAMES, naive_width):
        assert ours[name] == pytest.approx(w, rel=0.2)


def test_thousand_resamples_of_ten_thousand_battles_take_seconds():
    battles = synthetic_battles(np.linspace(-1.5, 1.5, 8), n=10_000, seed=6, tie_rate=0.1)
    start = time.perf_counter()
    report = lb.leaderboard(battles, bootstrap=1000)
    assert time.perf_counter() - start < 10
    assert report["n_battles"] == 10_000 and report["n_sources"] == 8


# --------------------------------------------------------------------------- what the data cannot tell


def test_disconnected_groups_are_noted():
    battles = battles_of([("a1", "a2", "a", 6), ("a1", "a2", "b", 4), ("b1", "b2", "a", 3), ("b1", "b2", "b", 7)])
    report = lb.leaderboard(battles, bootstrap=100)
    assert "disconnected" in report["notes"]
    assert "2 groups" in report["notes"]["disconnected"] and "[a1, a2] | [b1, b2]" in report["notes"]["disconnected"]
    by = {r["source"]: r["rating"] for r in report["ratings"]}
    # each group is centred on its own; within a group the gap is the two-source one
    assert by["a1"] + by["a2"] == pytest.approx(2000, abs=1e-9) and by["b1"] + by["b2"] == pytest.approx(2000, abs=1e-9)
    assert by["a1"] - by["a2"] == pytest.approx(two_source_gap(6, 10, lb.DEFAULT_L2), abs=1e-6)
    assert no_nan(report)


def test_a_source_with_only_wins_stays_finite_and_is_noted():
    battles = pd.concat([synthetic_battles(KNOWN[:3], n=200, seed=7),
                         battles_of([("champ", "m0", "a", 5), ("m1", "champ", "b", 5), ("champ", "m2", "a", 5)])])
    report = lb.leaderboard(battles, bootstrap=200)
    by = {r["source"]: r for r in report["ratings"]}
    assert report["ratings"][0]["source"] == "champ" and by["champ"]["losses"] == 0
    assert all(math.isfinite(by["champ"][k]) for k in ("rating", "low", "high"))
    assert "champ: only wins" in report["notes"]["only_wins"] and "keeps it finite" in report["notes"]["only_wins"]
    # with a weaker penalty it climbs: the penalty, not the data, decides how far
    weaker = {r["source"]: r["rating"] for r in lb.leaderboard(battles, bootstrap=0, l2=1e-4)["ratings"]}
    assert weaker["champ"] > by["champ"]["rating"] + 200
    losers = lb.leaderboard(battles_of([("x", "y", "b", 4), ("y", "z", "tie", 2), ("y", "z", "a", 1), ("z", "y", "a", 1)]), bootstrap=0)
    assert "x: only losses" in losers["notes"]["only_losses"]


def test_min_battles_left_out_items_and_nothing_to_rank():
    battles = pd.concat([
        synthetic_battles(KNOWN[:3], n=120, seed=8),
        battles_of([("m0", "rare", "a", 2), ("m1", "m1", "a", 3)]),
        pd.DataFrame({"choice": ["a", "b", "a"], "source_a": [None, " ", "m0"], "source_b": ["m1", "m2", np.nan]}),
    ])
    report = lb.leaderboard(battles, bootstrap=0, min_battles=5)
    assert {r["source"] for r in report["ratings"]} == {"m0", "m1", "m2"}
    assert report["n_battles"] == 120 and "rare" in report["notes"]["min_battles"]
    assert report["left_out"] == {"no_sources": 3, "same_source": 3, "both_bad": 0, "ties": 0, "other_choice": 0, "below_min_battles": 2}
    assert "left_out" in report["notes"]
    with pytest.raises(AnnotationError, match="every source has fewer than --min-battles 1000"):
        lb.leaderboard(battles, bootstrap=0, min_battles=1000)
    with pytest.raises(AnnotationError, match="all ties or both_bad"):
        lb.leaderboard(battles_of([("p", "q", "tie", 3), ("p", "q", "both_bad", 1)]), ties="ignore")
    with pytest.raises(AnnotationError, match="no annotations yet"):
        lb.leaderboard(pd.DataFrame(columns=lb.BATTLE_COLUMNS))
    for options, message in (({"ties": "third"}, "--ties must be one of half, ignore"), ({"both_bad": "x"}, "--both-bad"),
                             ({"bootstrap": -1}, "--bootstrap must be 0 or more"), ({"min_battles": -2}, "--min-battles"),
                             ({"l2": 0.0}, "L2 penalty must be a number above 0")):
        with pytest.raises(AnnotationError, match=message):
            lb.leaderboard(battles, **options)


# --------------------------------------------------------------------------- store loader (both databases)


def seed_sources(engine) -> dict[str, int]:
    """Project 'arena': alpha and beta in both A/B orders, an item without sources, one with the same
    source twice, one with a blank source; project 'plain' (no sources) and 'other' (not counted)."""
    from annotation.auth import create_user
    from annotation.projects import create_project
    from annotation.store import Annotation, Item, transaction

    with transaction(engine) as s:
        arena, plain, other = (create_project(s, name, overlap=3) for name in ("arena", "plain", "other"))
        users = {name: create_user(s, name, None).id for name in ("ann", "bob", "cat")}
        spec = {  # content hash: (project, source_a, source_b)
            "i1": (arena, "alpha", "beta"), "i2": (arena, "beta", "alpha"), "i3": (arena, "alpha", None),
            "i4": (arena, "gamma", "gamma"), "i5": (arena, " alpha ", ""), "p1": (plain, None, None),
            "o1": (other, "alpha", "beta"),
        }
        items = {}
        for key, (project, sa, sb) in spec.items():
            item = Item(project_id=project.id, prompt=key, response_a="x", response_b="y", source_a=sa, source_b=sb, content_hash=key)
            s.add(item)
            s.flush()
            items[key] = item.id
        votes = [  # item, annotator, choice, shown_swapped (which must change nothing: choices are stored in A/B terms)
            ("i1", "ann", "a", True), ("i1", "bob", "a", False), ("i1", "cat", "tie", False),
            ("i2", "ann", "b", True), ("i2", "bob", "a", False), ("i2", "cat", "both_bad", True),
            ("i3", "ann", "a", False), ("i4", "bob", "a", False), ("i5", "cat", "a", False),
            ("p1", "ann", "a", False), ("o1", "ann", "b", False),
        ]
        s.add_all([Annotation(item_id=items[i], annotator_id=users[u], choice=c, shown_swapped=sw) for i, u, c, sw in votes])
    return items


def test_store_path_on_both_databases(engine):
    seed_sources(engine)
    battles = lb.load_battles(engine, "arena")
    assert list(battles.columns) == lb.BATTLE_COLUMNS and len(battles) == 9
    assert lb.count_sourced_items(engine, "arena") == 2 and lb.count_sourced_items(engine, "plain") == 0
    report = lb.project_leaderboard(engine, "arena", bootstrap=200)
    assert report["project"] == "arena" and report["n_battles"] == 5 and report["n_sources"] == 2
    by = {r["source"]: r for r in report["ratings"]}
    # alpha: won i1 twice (as A) and i2 once (as B), lost i2 once, one tie; both_bad left out
    assert (by["alpha"]["wins"], by["alpha"]["losses"], by["alpha"]["ties"], by["alpha"]["battles"]) == (3, 1, 1, 5)
    assert by["alpha"]["rating"] - by["beta"]["rating"] == pytest.approx(two_source_gap(3.5, 5, lb.DEFAULT_L2), abs=1e-6)
    assert report["left_out"] == {"no_sources": 2, "same_source": 1, "both_bad": 1, "ties": 0, "other_choice": 0}
    assert no_nan(report)
    with pytest.raises(AnnotationError, match="project 'plain' has no items whose two responses name different sources"):
        lb.project_leaderboard(engine, "plain")
    with pytest.raises(AnnotationError, match="no project named 'nope'"):
        lb.project_leaderboard(engine, "nope")


def test_rankings_with_sources_are_every_pair_of_their_responses(engine):
    """A ranking [1, 1, 3] of alpha, beta, gamma: alpha ties beta, both beat gamma; the fit is the
    one of those three battles given as pairs."""
    from annotation.auth import create_user
    from annotation.projects import create_project
    from annotation.store import Annotation, Item, transaction

    with transaction(engine) as s:
        project = create_project(s, "ranked", overlap=2)
        users = [create_user(s, name, None).id for name in ("ann", "bob")]
        responses = [{"text": t, "source": src} for t, src in (("r1", "alpha"), ("r2", "beta"), ("r3", "gamma"))]
        item = Item(project_id=project.id, prompt="p", response_a="", response_b="", responses=responses, content_hash="r")
        unsourced = Item(project_id=project.id, prompt="q", response_a="", response_b="", content_hash="u",
                         responses=[{"text": t, "source": None} for t in ("x", "y", "z")])
        s.add_all([item, unsourced])
        s.flush()
        s.add_all([Annotation(item_id=item.id, annotator_id=users[0], ranking=[1, 1, 3], shown_order=[2, 0, 1]),
                   Annotation(item_id=item.id, annotator_id=users[1], ranking=[3, 1, 2], shown_order=[0, 1, 2]),
                   Annotation(item_id=unsourced.id, annotator_id=users[0], ranking=[1, 2, 3], shown_order=[0, 1, 2])])
    assert lb.ranking_battles([1, 1, 3], responses) == [("tie", "alpha", "beta"), ("a", "alpha", "gamma"), ("a", "beta", "gamma")]
    assert lb.count_sourced_items(engine, "ranked") == 1
    battles = lb.load_battles(engine, "ranked")
    assert len(battles) == 9  # 3 pairs per ranking, the unsourced ranking's kept for the count
    report = lb.project_leaderboard(engine, "ranked", bootstrap=0)
    as_pairs = battles_of([("alpha", "beta", "tie", 1), ("alpha", "gamma", "a", 1), ("beta", "gamma", "a", 1),
                           ("alpha", "beta", "b", 1), ("alpha", "gamma", "b", 1), ("beta", "gamma", "a", 1)])
    expected = lb.leaderboard(as_pairs, bootstrap=0)
    assert {r["source"]: r["rating"] for r in report["ratings"]} == pytest.approx(
        {r["source"]: r["rating"] for r in expected["ratings"]})
    assert report["left_out"]["no_sources"] == 3


# --------------------------------------------------------------------------- CLI


def rlhf_in_process(capsys, monkeypatch, *args):
    """`rlhf` through app.cli.main in this process: (exit code, stdout, stderr)."""
    from app.cli import main

    monkeypatch.setattr(sys, "argv", ["rlhf", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


# the CLI is a thin shell over what the tests above check on both databases; SQLite is enough here
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_json_text_and_errors(settings, capsys, monkeypatch):
    from annotation.store import init_db

    seed_sources(init_db(settings.db_url))
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "leaderboard", "--project", "arena", "--json", "--bootstrap", "100")
    assert rc == 0, err
    report = json.loads(out)
    assert {"project", "n_battles", "n_sources", "ratings", "notes"} <= set(report)
    assert report["project"] == "arena" and report["n_battles"] == 5 and report["n_sources"] == 2
    assert set(report["ratings"][0]) == {"source", "rating", "low", "high", "wins", "losses", "ties", "battles"}
    assert report["ratings"][0]["source"] == "alpha" and report["ratings"][0]["low"] is not None
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "leaderboard", "--project", "arena", "--ties", "ignore", "--both-bad", "tie",
                                   "--bootstrap", "50", "--seed", "3")
    assert rc == 0, err
    assert "4 battles among 2 sources (ties: ignore, both_bad: tie" in out
    assert "rank  source" in out and "alpha" in out and "95% interval" in out
    assert "note: ties: 2 ties left out" in out and "seed 3" in out
    for args, message in (
        (("--project", "nope"), "no project named 'nope'"),
        (("--project", "plain"), "project 'plain' has no items whose two responses name different sources"),
        (("--project", "arena", "--ties", "third"), "--ties must be one of half, ignore"),
        (("--project", "arena", "--anchor", "gpt"), "--anchor 'gpt' is not among the ranked sources"),
        (("--project", "arena", "--min-battles", "99"), "every source has fewer than --min-battles 99"),
    ):
        rc, out, err = rlhf_in_process(capsys, monkeypatch, "leaderboard", *args)
        assert rc == 2 and message in err and err.count("\n") == 1 and not out, (args, err)


# --------------------------------------------------------------------------- Quality page


@pytest.fixture
def quality_store(tmp_path, monkeypatch):
    """A SQLite store with a researcher and seed_sources' projects, 'arena' grown with 60 battles among three models."""
    from annotation.auth import create_user
    from annotation.projects import get_project
    from annotation.store import Annotation, Item, init_db, transaction
    from app import settings as settings_mod

    db_url = f"sqlite:///{tmp_path / 'rlhf.db'}"
    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RLHF_DB_URL", db_url)
    monkeypatch.delenv("RLHF_CONFIG", raising=False)
    settings_mod.get_settings.cache_clear()
    engine = init_db(db_url)
    seed_sources(engine)
    battles = synthetic_battles(np.array([-0.8, 0.0, 0.9]), n=60, seed=9, tie_rate=0.1)
    with transaction(engine) as s:
        arena = get_project(s, "arena")
        who = create_user(s, "dan", None).id
        researcher = create_user(s, "res", "pw-research", "researcher").id
        for n, row in enumerate(battles.itertuples()):
            item = Item(project_id=arena.id, prompt=f"q{n}", response_a="x", response_b="y", source_a=row.source_a,
                        source_b=row.source_b, content_hash=f"q{n}")
            s.add(item)
            s.flush()
            s.add(Annotation(item_id=item.id, annotator_id=who, choice=row.choice))
    yield engine, researcher
    settings_mod.get_settings.cache_clear()
    engine.dispose()


def open_quality(engine, user_id, project: str):
    from streamlit.testing.v1 import AppTest

    from browser_helpers import set_login

    at = AppTest.from_file(str(QUALITY_PAGE), default_timeout=60)
    set_login(at, engine, user_id)
    at.run()
    at.selectbox(key="quality_project").set_value(project)
    return at.run()


def test_quality_page_leaderboard_tab(quality_store):
    engine, researcher = quality_store
    at = open_quality(engine, researcher, "arena")
    assert not at.exception, at.exception
    assert [t.label for t in at.tabs] == ["Annotators", "Over time", "Disputed items", "Leaderboard"]
    table = next(f.value for f in at.dataframe if "Rating" in f.value.columns)
    report = lb.project_leaderboard(engine, "arena", bootstrap=1000)
    assert list(table["Source"]) == [r["source"] for r in report["ratings"]] and list(table["Rank"]) == [1, 2, 3, 4, 5]
    assert np.allclose(table["Rating"], [r["rating"] for r in report["ratings"]])
    assert np.allclose(table["Low"], [r["low"] for r in report["ratings"]])
    assert any("battles among 5 sources" in c.value for c in at.caption)
    at.radio(key="quality_ties").set_value("ignore").run()
    assert not at.exception, at.exception
    table = next(f.value for f in at.dataframe if "Rating" in f.value.columns)
    assert table["Ties"].sum() == 0


def test_quality_page_without_sources_has_no_leaderboard(quality_store):
    engine, researcher = quality_store
    at = open_quality(engine, researcher, "plain")
    assert not at.exception, at.exception
    assert "Leaderboard" not in [t.label for t in at.tabs]
    assert not any("Rating" in f.value.columns for f in at.dataframe)
