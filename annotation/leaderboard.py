"""A leaderboard of response sources (model names) from human votes, by Chatbot Arena's method.

    rlhf leaderboard --project demo [--json] [--bootstrap 1000] [--seed 0] [--ties half|ignore]

Every annotation on an item whose two responses have different, non-empty sources is a battle
between `source_a` and `source_b`, read in the item's stored A/B order (`choice` is stored in A/B
terms whatever order the annotator saw, so `shown_swapped` plays no part). A ranking of k
responses with sources is every pair of them, k(k-1)/2 battles, ties where they share a rank (the
bootstrap then resamples those battles one by one, which treats a ranking's pairs as independent). The sources' strengths
s follow a Bradley-Terry model, P(i beats j) = 1 / (1 + exp(-(s_i - s_j))), fitted by maximum
likelihood: a logistic regression without intercept on +1/-1 indicator columns, as Chatbot Arena's
notebook fits it, solved here by Newton's method on the per-pair counts.

- Ties count as half a win for each side (Arena's rule), or are left out with `ties="ignore"`.
  `both_bad` is left out by default; `both_bad="tie"` counts it as a tie (Arena's "tie (bothbad)").
- A small L2 penalty (`l2`/2 * sum s^2, a Gaussian prior with variance 1/l2) makes the fit
  identifiable: it centres the strengths on 0 and keeps a source with only wins or only losses
  finite, where the plain likelihood has no maximum. At the default 0.01 it moves a rating the
  data pin down by well under a point.
- Ratings are Elo-style: 1000 + 400/ln(10) * (s - mean s), or 1000 at a chosen anchor source.
- 95% intervals are percentile bootstrap intervals over annotations (resampled with replacement,
  fixed seed). A resample only changes how often each kind of battle (pair of sources, outcome)
  occurs, so it is one multinomial draw, and all resamples are fitted together by batched Newton
  steps: 1,000 resamples of 10k battles take seconds.
- Sources that never met, directly or through others, form separate groups whose ratings cannot be
  compared; the report says so in its notes, as it does for sources with only wins or only losses.

tests/test_leaderboard.py checks the fit against choix (ilsr_pairwise, opt_pairwise) and
scikit-learn's logistic regression on synthetic battles with known strengths, and against the
closed form ln(wins / losses) for two sources.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from annotation.errors import AnnotationError

TIES = ("half", "ignore")
BOTH_BAD = ("ignore", "tie")
BATTLE_COLUMNS = ["item_id", "annotator", "choice", "source_a", "source_b"]
SCALE = 400.0 / math.log(10.0)
"""Rating points per unit of strength (log-odds): 400 points is a factor of 10 in the odds."""
BASE_RATING = 1000.0
DEFAULT_L2 = 0.01
DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
MAX_NEWTON_STEPS = 100
# Entries of the batched Hessians held at once (replicates x sources x sources): bounds memory.
MAX_HESSIAN_CELLS = 4_000_000


# --------------------------------------------------------------------------- loading


def ranking_battles(ranks, responses) -> list[tuple[str, str | None, str | None]]:
    """The battles of one ranking: every pair of responses (i < j, stored order) as (choice,
    source_i, source_j), choice "a" when response i is ranked better, "b" when j is, "tie" when
    they share a rank. Pairs whose sources are missing or equal are kept (the report counts them)."""
    out = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            choice = "a" if ranks[i] < ranks[j] else "b" if ranks[i] > ranks[j] else "tie"
            out.append((choice, (responses[i] or {}).get("source"), (responses[j] or {}).get("source")))
    return out


def load_battles(engine: Engine, project: str) -> pd.DataFrame:
    """Every annotation of `project` with its item's sources (None where missing), columns BATTLE_COLUMNS.

    A ranking of k responses is k(k-1)/2 battles (ranking_battles), each a row; annotations on
    items without two different sources are kept, so the report can count them.
    """
    from annotation.projects import get_project
    from annotation.store import Annotation, Item, User, reading

    with reading(engine) as session:
        proj = get_project(session, project)
        rows = session.execute(
            select(Annotation.item_id, User.username, Annotation.choice, Item.source_a, Item.source_b,
                   Annotation.ranking, Item.responses)
            .join(Item, Item.id == Annotation.item_id)
            .join(User, User.id == Annotation.annotator_id)
            .where(Item.project_id == proj.id)
            .order_by(Annotation.id)
        ).all()
    expanded = []
    for r in rows:
        if r.ranking is not None and r.responses is not None:
            expanded += [(r.item_id, r.username, c, sa, sb) for c, sa, sb in ranking_battles(r.ranking, r.responses)]
        else:
            expanded.append((r.item_id, r.username, r.choice, r.source_a, r.source_b))
    battles = pd.DataFrame(expanded, columns=BATTLE_COLUMNS, dtype=object)
    battles["item_id"] = battles["item_id"].astype("int64")
    return battles


def count_sourced_items(engine: Engine, project: str) -> int:
    """How many items of `project` have two different, non-empty sources (annotated or not): a
    pair with source_a != source_b, or a ranking item with two different sources among its responses."""
    from annotation.projects import get_project
    from annotation.store import Item, reading

    a, b = func.trim(Item.source_a), func.trim(Item.source_b)
    with reading(engine) as session:
        proj = get_project(session, project)
        pairs = int(session.scalar(
            select(func.count()).select_from(Item)
            .where(Item.project_id == proj.id, a != "", b != "", a != b)  # NULLs fail every comparison
        ) or 0)
        rankings = session.scalars(select(Item.responses).where(Item.project_id == proj.id, Item.responses.is_not(None)))
        ranked = sum(1 for responses in rankings
                     if len({str(r.get("source") or "").strip() for r in responses} - {""}) >= 2)
    return pairs + ranked


def project_leaderboard(engine: Engine, project: str, **options) -> dict:
    """`leaderboard` of a project's annotations, with the project's name; options as `leaderboard`'s.

    A project with no item naming two different sources raises AnnotationError saying so.
    """
    if count_sourced_items(engine, project) == 0:
        raise AnnotationError(
            f"project '{project}' has no items whose two responses name different sources; "
            "import items with source_a and source_b (the model behind each response) to rank them"
        )
    return {"project": project, **leaderboard(load_battles(engine, project), **options)}


# --------------------------------------------------------------------------- the fit


def fit_strengths(
    i: np.ndarray, j: np.ndarray, wins: np.ndarray, games: np.ndarray, n_sources: int, l2: float = DEFAULT_L2
) -> np.ndarray:
    """Bradley-Terry strengths maximising the L2-penalised likelihood, for many data sets at once.

    Pair p is sources i[p] and j[p] (each pair once); `games` (R x P, or P) is how many battles
    each pair played in each of R data sets and `wins` how many of them i won (ties as halves).
    Minimises sum_p [wins_p * log(1 + e^-d_p) + (games_p - wins_p) * log(1 + e^d_p)] + l2/2 * |s|^2,
    d_p = s_i - s_j: the logistic regression without intercept of the outcomes on +1/-1 indicator
    columns, with each pair's battles grouped. Returns strengths (R x n_sources, or n_sources).
    """
    if not l2 > 0:
        raise AnnotationError(f"the L2 penalty must be above 0 (it makes the strengths identifiable), got {l2}")
    single = np.ndim(games) == 1
    wins, games = np.atleast_2d(np.asarray(wins, float)), np.atleast_2d(np.asarray(games, float))
    chunk = max(1, MAX_HESSIAN_CELLS // max(n_sources * n_sources, 1))
    out = np.concatenate(
        [_newton(i, j, wins[r:r + chunk], games[r:r + chunk], n_sources, l2) for r in range(0, len(games), chunk)]
    ) if len(games) else np.zeros((0, n_sources))
    return out[0] if single else out


def _newton(i, j, wins, games, k, l2) -> np.ndarray:
    """Newton's method with step halving, each replicate (row) on its own: the objective is convex
    and smooth, so this converges from 0 in a handful of steps."""
    from scipy import sparse
    from scipy.special import expit

    n_rep, n_pairs = games.shape
    incidence = sparse.csr_matrix(
        (np.r_[np.ones(n_pairs), -np.ones(n_pairs)], (np.r_[np.arange(n_pairs), np.arange(n_pairs)], np.r_[i, j])),
        shape=(n_pairs, k),
    )
    touches = abs(incidence)
    off_ij, off_ji, diag = i * k + j, j * k + i, np.arange(k) * (k + 1)
    losses = games - wins

    def objective(s):
        d = s[:, i] - s[:, j]
        return (wins * np.logaddexp(0.0, -d) + losses * np.logaddexp(0.0, d)).sum(1) + 0.5 * l2 * (s * s).sum(1)

    s = np.zeros((n_rep, k))
    f = objective(s)
    for _ in range(MAX_NEWTON_STEPS):
        p = expit(s[:, i] - s[:, j])
        grad = (incidence.T @ (games * p - wins).T).T + l2 * s
        h = games * p * (1.0 - p)
        hess = np.zeros((n_rep, k * k))
        hess[:, off_ij] = -h
        hess[:, off_ji] = -h
        hess[:, diag] = (touches.T @ h.T).T + l2
        step = -np.linalg.solve(hess.reshape(n_rep, k, k), grad[:, :, None])[:, :, 0]
        t = np.ones(n_rep)
        for _ in range(40):
            s_new = s + t[:, None] * step
            f_new = objective(s_new)
            worse = f_new > f + 1e-12 * (1.0 + np.abs(f))
            if not worse.any():
                break
            t = np.where(worse, t / 2, t)
        s, f = s_new, f_new
        if np.abs(t[:, None] * step).max() < 1e-10:
            break
    return s


def ratings_from_strengths(strengths: np.ndarray, anchor: int | None = None) -> np.ndarray:
    """Elo-style ratings (last axis = sources): 1000 at the mean strength, or at source `anchor`.

    NaN strengths (a source absent from a bootstrap resample) stay NaN and do not move the mean.
    """
    centre = strengths[..., [anchor]] if anchor is not None else np.nanmean(strengths, axis=-1, keepdims=True)
    return BASE_RATING + SCALE * (strengths - centre)


# --------------------------------------------------------------------------- the report


def check_options(ties: str, both_bad: str, bootstrap: int, min_battles: int, l2: float) -> None:
    if ties not in TIES:
        raise AnnotationError(f"--ties must be one of {', '.join(TIES)}, got '{ties}'")
    if both_bad not in BOTH_BAD:
        raise AnnotationError(f"--both-bad must be one of {', '.join(BOTH_BAD)}, got '{both_bad}'")
    if bootstrap < 0:
        raise AnnotationError(f"--bootstrap must be 0 or more, got {bootstrap}")
    if min_battles < 0:
        raise AnnotationError(f"--min-battles must be 0 or more, got {min_battles}")
    if not (l2 > 0 and math.isfinite(l2)):
        raise AnnotationError(f"the L2 penalty must be a number above 0, got {l2}")


def _clean_source(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def leaderboard(
    battles: pd.DataFrame,
    *,
    ties: str = "half",
    both_bad: str = "ignore",
    bootstrap: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    min_battles: int = 0,
    anchor: str | None = None,
    l2: float = DEFAULT_L2,
) -> dict:
    """Ratings of the sources in `battles` (columns choice, source_a, source_b), JSON-ready.

    Keys: n_battles, n_sources, ratings (best first: source, rating, low, high, wins, losses, ties,
    battles; low/high None without bootstrap), notes ({key: sentence}), left_out (annotations not
    used, by reason), method and bootstrap (what was done). Sources with fewer than `min_battles`
    battles are left out with their battles. Raises AnnotationError when no battle is left to rank.
    """
    check_options(ties, both_bad, bootstrap, min_battles, l2)
    src_a = battles["source_a"].map(_clean_source) if len(battles) else pd.Series([], dtype=object)
    src_b = battles["source_b"].map(_clean_source) if len(battles) else pd.Series([], dtype=object)
    choice = battles["choice"].astype(object) if len(battles) else pd.Series([], dtype=object)
    sourced = (src_a.notna() & src_b.notna()).to_numpy(bool, copy=True)
    same = sourced & (src_a == src_b).to_numpy(bool)
    sourced = sourced & ~same
    outcome = choice.map({"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5 if both_bad == "tie" else np.nan})
    is_tie = choice.isin(["tie", "both_bad"] if both_bad == "tie" else ["tie"]).to_numpy(bool)
    if ties == "ignore":
        outcome[is_tie] = np.nan
    y = outcome.to_numpy(float)
    left_out = {
        "no_sources": int((~sourced & ~same).sum()),
        "same_source": int(same.sum()),
        "both_bad": int((sourced & choice.eq("both_bad").to_numpy(bool)).sum()) if both_bad == "ignore" else 0,
        "ties": int((sourced & is_tie).sum()) if ties == "ignore" else 0,
        "other_choice": int((sourced & np.isnan(y) & ~choice.isin(["tie", "both_bad"]).to_numpy(bool)).sum()),
    }
    keep = sourced & ~np.isnan(y)
    a_all, b_all, y = src_a.to_numpy(object)[keep], src_b.to_numpy(object)[keep], y[keep]

    notes: dict[str, str] = {}
    dropped: list[str] = []
    if min_battles > 0 and len(y):
        per_source = pd.Series(np.r_[a_all, b_all]).value_counts()
        dropped = sorted(per_source.index[per_source < min_battles])
        if dropped:
            use = ~(pd.Series(a_all).isin(dropped) | pd.Series(b_all).isin(dropped)).to_numpy(bool)
            left_out["below_min_battles"] = int((~use).sum())
            a_all, b_all, y = a_all[use], b_all[use], y[use]
            notes["min_battles"] = (
                f"{len(dropped)} sources with fewer than {min_battles} battles left out with their battles: {', '.join(dropped)}"
            )
    if not len(y):
        raise AnnotationError(_nothing_to_rank(len(battles), int(sourced.sum()), left_out, min_battles))

    codes, sources = pd.factorize(np.r_[a_all, b_all], sort=True)
    ca, cb = codes[: len(y)], codes[len(y):]
    k = len(sources)
    if anchor is not None and anchor not in set(sources):
        raise AnnotationError(f"--anchor '{anchor}' is not among the ranked sources: {', '.join(map(str, sources))}")
    anchor_code = None if anchor is None else int(np.flatnonzero(sources == anchor)[0])

    # Each battle as (lower code, higher code, outcome for the lower): the kinds of battle there are.
    lo, hi = np.minimum(ca, cb), np.maximum(ca, cb)
    y_lo = np.where(ca < cb, y, 1.0 - y)
    kind_key = (lo * k + hi) * 3 + np.rint(y_lo * 2).astype(int)  # outcome 0, 0.5, 1 -> 0, 1, 2
    kinds, kind_of = np.unique(kind_key, return_inverse=True)
    kind_count = np.bincount(kind_of).astype(float)
    kind_pair_key, kind_y = kinds // 3, (kinds % 3) / 2.0
    pair_keys, kind_pair = np.unique(kind_pair_key, return_inverse=True)
    pi, pj = pair_keys // k, pair_keys % k

    # kinds -> pairs: a resample's per-pair games and wins are two matrix products of its kind counts
    to_pair = np.zeros((len(kinds), len(pair_keys)))
    to_pair[np.arange(len(kinds)), kind_pair] = 1.0
    to_pair_won = to_pair * kind_y[:, None]

    def pair_sums(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(R, kinds) counts -> wins of the lower-coded source and games, per pair (R, pairs)."""
        return counts @ to_pair_won, counts @ to_pair

    wins_p, games_p = pair_sums(kind_count[None, :])
    strength = fit_strengths(pi, pj, wins_p[0], games_p[0], k, l2)
    rating = ratings_from_strengths(strength, anchor_code)

    low, high = np.full(k, np.nan), np.full(k, np.nan)
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(len(y), kind_count / kind_count.sum(), size=bootstrap).astype(float)
        wins_b, games_b = pair_sums(draws)
        s_b = fit_strengths(pi, pj, wins_b, games_b, k, l2)
        pair_sources = np.zeros((len(pair_keys), k))
        pair_sources[np.arange(len(pair_keys)), pi] = pair_sources[np.arange(len(pair_keys)), pj] = 1.0
        played = games_b @ pair_sources > 0
        s_b = np.where(played, s_b, np.nan)
        if anchor_code is not None:
            s_b[~played[:, anchor_code]] = np.nan  # no anchor in the resample: nothing to measure from
        from annotation.agreement import percentile_interval

        low, high = percentile_interval(ratings_from_strengths(s_b, anchor_code), CONFIDENCE)

    a_won, b_won, drew = (y == 1.0).astype(float), (y == 0.0).astype(float), (y == 0.5).astype(float)
    won = np.bincount(ca, weights=a_won, minlength=k) + np.bincount(cb, weights=b_won, minlength=k)
    lost = np.bincount(ca, weights=b_won, minlength=k) + np.bincount(cb, weights=a_won, minlength=k)
    tied = np.bincount(ca, weights=drew, minlength=k) + np.bincount(cb, weights=drew, minlength=k)
    played_n = won + lost + tied

    notes.update(_graph_notes(sources, pi, pj, wins_p[0], games_p[0], won, lost, tied, l2))
    if left_out["no_sources"] or left_out["same_source"]:
        notes["left_out"] = (
            f"{left_out['no_sources']} annotations on items without two sources and {left_out['same_source']} on items "
            "whose two responses come from the same source are not battles"
        )
    if both_bad == "ignore" and left_out["both_bad"]:
        notes["both_bad"] = f"{left_out['both_bad']} both_bad annotations left out (both_bad='tie' counts them as ties)"
    if ties == "ignore" and left_out["ties"]:
        notes["ties"] = f"{left_out['ties']} ties left out (ties='half' counts each as half a win for both sides)"

    def num(x) -> float | None:
        return None if not np.isfinite(x) else float(x)

    order = np.lexsort((np.asarray(sources, dtype=str), -rating))
    rows = [
        {
            "source": str(sources[c]), "rating": float(rating[c]), "low": num(low[c]), "high": num(high[c]),
            "wins": int(won[c]), "losses": int(lost[c]), "ties": int(tied[c]), "battles": int(played_n[c]),
        }
        for c in order
    ]
    return {
        "n_battles": int(len(y)),
        "n_sources": int(k),
        "ratings": rows,
        "notes": notes,
        "left_out": left_out,
        "method": {
            "model": "Bradley-Terry (logistic regression on +1/-1 source indicators, no intercept)",
            "ties": ties, "both_bad": both_bad, "l2": l2, "scale": SCALE,
            "centre": f"{anchor} = {BASE_RATING:g}" if anchor is not None else f"mean = {BASE_RATING:g}",
            "min_battles": min_battles,
        },
        "bootstrap": {"resamples": int(bootstrap), "confidence": CONFIDENCE, "seed": seed, "unit": "annotation"},
    }


def _nothing_to_rank(n_annotations: int, n_sourced: int, left_out: dict, min_battles: int) -> str:
    if n_annotations == 0:
        return "no battles to rank: no annotations yet"
    if n_sourced == 0:
        return (f"no battles to rank: none of the {n_annotations} annotations is on an item whose two responses "
                "name different sources (source_a, source_b)")
    if left_out.get("below_min_battles"):
        return f"no battles to rank: every source has fewer than --min-battles {min_battles} battles"
    return (f"no battles to rank: the {n_sourced} annotations on sourced items are all ties or both_bad, which the "
            "options leave out (try --ties half or --both-bad tie)")


def _graph_notes(sources, pi, pj, wins, games, won, lost, tied, l2) -> dict[str, str]:
    """Notes on what the data cannot tell: groups that never met, and sources or groups only winning or losing."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    k = len(sources)
    notes: dict[str, str] = {}
    met = sparse.coo_matrix((np.ones(len(pi)), (pi, pj)), shape=(k, k))
    n_groups, group = connected_components(met, directed=False)
    if n_groups > 1:
        groups = [", ".join(str(sources[c]) for c in np.flatnonzero(group == g)) for g in range(n_groups)]
        notes["disconnected"] = (
            f"the sources fall into {n_groups} groups that never met, directly or through others: "
            + " | ".join(f"[{g}]" for g in groups)
            + "; ratings compare only within a group (the L2 prior centres each group on its own), not across groups"
        )
    only_wins = [str(sources[c]) for c in range(k) if won[c] > 0 and lost[c] == 0 and tied[c] == 0]
    only_losses = [str(sources[c]) for c in range(k) if lost[c] > 0 and won[c] == 0 and tied[c] == 0]
    finite = f"the L2 prior (l2={l2:g}) keeps it finite, so read it as a bound more than a measurement"
    if only_wins:
        notes["only_wins"] = f"{', '.join(only_wins)}: only wins, so the plain maximum likelihood puts it at +infinity; {finite}"
    if only_losses:
        notes["only_losses"] = f"{', '.join(only_losses)}: only losses, so the plain maximum likelihood puts it at -infinity; {finite}"
    # The likelihood has a finite maximum only where "earned part of a win against" links every
    # source of a group to every other both ways (Zermelo's condition): strongly connected.
    scored = np.r_[wins > 0, games - wins > 0]
    beat = sparse.coo_matrix((np.ones(int(scored.sum())), (np.r_[pi, pj][scored], np.r_[pj, pi][scored])), shape=(k, k))
    n_strong, strong = connected_components(beat, directed=True, connection="strong")
    if n_strong > n_groups and not (only_wins or only_losses):
        notes["one_sided"] = (
            "within a group, some sources never lost to (or never beat) the rest; the plain maximum likelihood "
            f"spreads them infinitely apart; the L2 prior (l2={l2:g}) keeps them finite, so read the gaps as bounds"
        )
    return notes
