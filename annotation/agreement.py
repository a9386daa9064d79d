"""Inter-annotator agreement: how far a project's labels can be trusted, and who and what needs a look.

Metrics over items (each with a bootstrap 95% interval, items resampled with replacement):
- percent agreement: over items with two or more labels, the mean share of annotator pairs on the
  item that gave the same label (the `agreement` column of `aggregate.majority`);
- Cohen's kappa for every pair of annotators sharing at least `min_shared` items, and their mean;
- Fleiss' kappa over the items that have the most common number of labels (Fleiss' formula needs
  the same number of ratings per item; the others are left out and counted);
- Krippendorff's alpha, nominal on the choice and ordinal on the signed preference scale, with
  missing data (any item with two or more labels counts).

The signed preference scale puts an annotation on one line: A strong +3, A clear +2, A slight +1,
tie 0, B slight -1, B clear -2, B strong -3. Choices are stored in A/B terms whatever order the
annotator saw, so no un-swapping is needed here. `both_bad` has no place on that line and is left
out of the ordinal alpha (so is an A/B choice without a strength); the report counts them.

Everything is computed from per-item count matrices with numpy, so a bootstrap replicate is one
weighted sum: 1,000 resamples of 100k items x 5 annotators take seconds, where calling the
libraries 1,000 times would take hours. tests/test_agreement.py checks each metric against
scikit-learn, statsmodels and krippendorff on random data (1e-9) and against published examples.

Rankings of items with 3 to 6 responses have their own metrics (Kendall's W, ordinal alpha on
the ranks): see "rankings" at the end of this module.

Per annotator: agreement with the leave-one-out majority, gold accuracy, rate of choosing the
response shown on the left (position bias), tie rate, median time per item, count, outlier flags.
Per item: agreement, for finding the most disputed items.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine

from annotation.errors import AnnotationError, InputError

LEVELS = ("nominal", "ordinal", "interval")
ANNOTATION_COLUMNS = ["item_id", "annotator", "choice", "strength", "shown_swapped", "duration_ms", "created_at", "gold_choice"]
CSV_COLUMNS = ("item_id", "annotator", "label")
DEFAULT_MIN_SHARED = 10
DEFAULT_RESAMPLES = 1000
# An annotator is marked when a rate is this far on the wrong side of the other annotators' median
# (agreement or gold accuracy below, tie rate above), when their median time is under this share of
# the others', or when their left-choice rate is off 0.5 by OUTLIER_GAP with a binomial p below
# POSITION_BIAS_P. Fixed gaps rather than z-scores: teams are small (3-10), where a robust z of 3.5
# flags nothing and tiny spreads would make a z-score flag noise.
OUTLIER_GAP = 0.15
OUTLIER_FAST = 0.5
POSITION_BIAS_P = 0.001
# Above this many items x annotators the bootstrap stops looking for repeated rows of labels.
MAX_PATTERN_CELLS = 20_000_000


# --------------------------------------------------------------------------- loading


def load_annotations(engine: Engine, project: str) -> pd.DataFrame:
    """All annotations of `project` that make a choice (rankings are left out: `load_rankings`),
    one row each, with the columns of ANNOTATION_COLUMNS.

    The one loader the CLI, the Quality page and export share. `annotator` is the username.
    """
    from annotation.projects import get_project
    from annotation.store import Annotation, Item, User, reading

    with reading(engine) as session:
        proj = get_project(session, project)
        stmt = (
            select(
                Annotation.item_id,
                User.username.label("annotator"),
                Annotation.choice,
                Annotation.strength,
                Annotation.shown_swapped,
                Annotation.duration_ms,
                Annotation.created_at,
                Item.gold_choice,
            )
            .join(Item, Item.id == Annotation.item_id)
            .join(User, User.id == Annotation.annotator_id)
            # rankings (choice NULL) have their own metrics: see "rankings" below
            .where(Item.project_id == proj.id, Annotation.choice.is_not(None))
            .order_by(Annotation.id)
        )
        rows = session.execute(stmt).all()
    annotations = pd.DataFrame(rows, columns=ANNOTATION_COLUMNS)
    annotations["item_id"] = annotations["item_id"].astype("int64")
    annotations["strength"] = annotations["strength"].astype("Int64")
    annotations["duration_ms"] = annotations["duration_ms"].astype("Int64")
    annotations["shown_swapped"] = annotations["shown_swapped"].astype(bool)
    annotations["created_at"] = pd.to_datetime(annotations["created_at"])
    for col in ("annotator", "choice", "gold_choice"):
        annotations[col] = annotations[col].astype(object)
    return annotations


def load_items(engine: Engine, item_ids: Iterable[int]) -> pd.DataFrame:
    """Prompt and responses of the given items (for showing disputed items), indexed by item_id."""
    from annotation.store import Item, reading

    ids = [int(i) for i in item_ids]
    with reading(engine) as session:
        rows = session.execute(
            select(Item.id, Item.prompt, Item.response_a, Item.response_b, Item.gold_choice).where(Item.id.in_(ids))
        ).all() if ids else []
    return pd.DataFrame(rows, columns=["item_id", "prompt", "response_a", "response_b", "gold_choice"]).set_index("item_id")


def read_labels_csv(path: str | Path, level: str = "nominal") -> pd.DataFrame:
    """Labels from a CSV with the columns item_id, annotator, label (any order, others ignored).

    One row per (item, annotator). For the ordinal and interval levels the label must be a number.
    Bad input raises InputError naming the file, line and field.
    """
    check_level(level)
    path = Path(path)
    try:
        fh = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InputError(str(path), None, None, f"cannot read: {exc.strerror}") from None
    rows: list[tuple[str, str, object]] = []
    first_line: dict[tuple[str, str], int] = {}
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise InputError(str(path), 1, None, "the file is empty", "a header line item_id,annotator,label")
            names = [h.strip().lower() for h in header]
            missing = [c for c in CSV_COLUMNS if c not in names]
            if missing or len(set(names)) != len(names):
                problem = f"header has {', '.join(header) or 'nothing'}"
                raise InputError(str(path), 1, missing[0] if missing else None, problem, "the columns item_id,annotator,label (once each)")
            pos = [names.index(c) for c in CSV_COLUMNS]
            for row in reader:
                line = reader.line_num
                if not row or all(not f.strip() for f in row):
                    continue
                if len(row) != len(names):
                    raise InputError(str(path), line, None, f"has {len(row)} fields", f"{len(names)} as in the header")
                item, annotator, label = (row[p].strip() for p in pos)
                for field, value in (("item_id", item), ("annotator", annotator), ("label", label)):
                    if not value:
                        hint = "a value (leave the row out where there is no label)" if field == "label" else "a value"
                        raise InputError(str(path), line, field, "is empty", hint)
                value: object = label
                if level != "nominal":
                    try:
                        value = float(label)
                    except ValueError:
                        raise InputError(str(path), line, "label", f"'{label}' is not a number", f"a number for --level {level}") from None
                    if not math.isfinite(value):
                        raise InputError(str(path), line, "label", f"'{label}' is not finite", "a finite number")
                key = (item, annotator)
                if key in first_line:
                    raise InputError(
                        str(path), line, "annotator",
                        f"'{annotator}' already labelled item '{item}' on line {first_line[key]}", "one label per item and annotator",
                    )
                first_line[key] = line
                rows.append((item, annotator, value))
        except csv.Error as exc:
            raise InputError(str(path), reader.line_num, None, f"not valid CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise InputError(str(path), None, None, f"not UTF-8 text ({exc.reason})") from None
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS), dtype=object)


def check_level(level: str) -> None:
    if level not in LEVELS:
        raise AnnotationError(f"unknown level '{level}'; expected one of {', '.join(LEVELS)}")


def signed_scale(annotations: pd.DataFrame) -> pd.Series:
    """Each annotation on the signed preference scale (A strong +3 ... tie 0 ... B strong -3).

    NaN where it has no place on it: both_bad, or an A/B choice without a strength.
    """
    if "strength" in annotations.columns:
        strength = pd.to_numeric(annotations["strength"], errors="coerce").astype(float).to_numpy()
    else:
        strength = np.full(len(annotations), np.nan)
    is_ = {c: annotations["choice"].eq(c).fillna(False).to_numpy(bool) for c in ("a", "b", "tie")}
    scale = np.select([is_["a"], is_["b"], is_["tie"]], [strength, -strength, 0.0], default=np.nan)
    return pd.Series(scale, index=annotations.index, name="scale")


# --------------------------------------------------------------------------- encoding


@dataclass
class Codes:
    """Labels as integer codes. t: item code per label (into `items`), k: value code (into `values`)."""

    t: np.ndarray
    w: np.ndarray
    k: np.ndarray
    items: pd.Index
    annotators: pd.Index
    values: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """items x values: how many annotators gave each value to each item."""
        n_items, n_val = len(self.items), len(self.values)
        return np.bincount(self.t * n_val + self.k, minlength=n_items * n_val).reshape(n_items, n_val).astype(float)


def axes(annotations: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.Index, pd.Index]:
    """Item and annotator codes of every row, and the items (in order of appearance) and annotators (sorted)."""
    t, items = pd.factorize(annotations["item_id"])
    w, annotators = pd.factorize(annotations["annotator"], sort=True)
    return t, w, pd.Index(items, name="item_id"), pd.Index(annotators, name="annotator")


def encode(annotations: pd.DataFrame, column: str, axes_: tuple | None = None) -> Codes:
    """Codes for the non-missing labels in `column`, on the axes of `axes(votes)` (computed when not given)."""
    t, w, items, annotators = axes_ if axes_ is not None else axes(annotations)
    col = annotations[column]
    mask = col.notna().to_numpy()
    k, values = pd.factorize(col[mask], sort=True)
    return Codes(t[mask], w[mask], k, items, annotators, np.asarray(values, dtype=object))


# --------------------------------------------------------------------------- metrics from weighted sums
#
# Every metric below is a function of sums over items of per-item features. A bootstrap replicate
# weighs item i by how often it was drawn (m_i), so a replicate's sums are one matrix product, and
# the point estimate is the same code with every weight 1.


def percent_agreement_features(counts: np.ndarray) -> np.ndarray:
    n = counts.sum(1)
    multi = n >= 2
    share = np.where(multi, (counts * (counts - 1)).sum(1) / np.maximum(n * (n - 1), 1), 0.0)
    return np.stack([share, multi.astype(float)], axis=1)


def percent_agreement_from_sums(s: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s[..., 1] > 0, s[..., 0] / s[..., 1], np.nan)


def fleiss_raters(counts: np.ndarray) -> int:
    """The number of ratings per item Fleiss' kappa uses: the most common one among items with two or more."""
    n = counts.sum(1).astype(int)
    n = n[n >= 2]
    if not len(n):
        return 0
    vals, freq = np.unique(n, return_counts=True)
    return int(vals[freq == freq.max()].max())


def fleiss_features(counts: np.ndarray, n_raters: int) -> np.ndarray:
    use = (counts.sum(1) == n_raters) & (n_raters >= 2)
    p_i = (counts * (counts - 1)).sum(1) / max(n_raters * (n_raters - 1), 1)
    return np.column_stack([np.where(use, p_i, 0.0), use.astype(float), counts * use[:, None]])


def fleiss_from_sums(s: np.ndarray, n_raters: int) -> np.ndarray:
    n_items = s[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        p_bar = s[..., 0] / n_items
        p_j = s[..., 2:] / (n_items[..., None] * n_raters)
        p_e = (p_j**2).sum(-1)
        kappa = (p_bar - p_e) / (1.0 - p_e)
    return np.where((n_items > 0) & (1.0 - p_e > 1e-12), kappa, np.nan)


def coincidence_features(counts: np.ndarray) -> np.ndarray:
    """Per item, its contribution to Krippendorff's coincidence matrix, flattened (items x K*K)."""
    m = counts.sum(1)
    pair = counts[:, :, None] * counts[:, None, :]
    idx = np.arange(counts.shape[1])
    pair[:, idx, idx] -= counts
    scale = np.where(m >= 2, 1.0 / np.maximum(m - 1, 1), 0.0)
    return (pair * scale[:, None, None]).reshape(len(counts), counts.shape[1] ** 2)


def distance(level: str, values: np.ndarray, n_c: np.ndarray) -> np.ndarray:
    """Krippendorff's squared difference between values c and k, for marginals n_c (leading dims broadcast)."""
    k = len(values)
    if level == "nominal":
        return np.broadcast_to(1.0 - np.eye(k), n_c.shape[:-1] + (k, k))
    if level == "interval":
        v = values.astype(float)
        return np.broadcast_to((v[:, None] - v[None, :]) ** 2, n_c.shape[:-1] + (k, k))
    if level == "ordinal":
        cum = np.cumsum(n_c, axis=-1)
        # sum_{g=c..k} n_g - (n_c + n_k)/2 = cum_k - cum_c + (n_c - n_k)/2, and it changes sign with c, k swapped
        d = cum[..., None, :] - cum[..., :, None] + (n_c[..., :, None] - n_c[..., None, :]) / 2.0
        return d**2
    raise AnnotationError(f"unknown level '{level}'; expected one of {', '.join(LEVELS)}")


def alpha_from_sums(s: np.ndarray, level: str, values: np.ndarray) -> np.ndarray:
    """Krippendorff's alpha from coincidence sums s (..., K*K); NaN where undefined."""
    k = len(values)
    o = s.reshape(s.shape[:-1] + (k, k))
    n_c = o.sum(-1)
    n = n_c.sum(-1)
    d = distance(level, values, n_c)
    observed = (o * d).sum((-2, -1))
    expected = (n_c[..., :, None] * n_c[..., None, :] * d).sum((-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = 1.0 - (n - 1.0) * observed / expected
    return np.where(expected > 1e-12, alpha, np.nan)


@dataclass
class PairTable:
    """Every pair of labels two annotators gave the same item: item code, annotator codes (w1 < w2), values."""

    t: np.ndarray
    w1: np.ndarray
    w2: np.ndarray
    k1: np.ndarray
    k2: np.ndarray


def label_pairs(codes: Codes) -> PairTable:
    order = np.argsort(codes.t.astype(np.int64) * max(len(codes.annotators), 1) + codes.w, kind="stable")
    t, w, k = codes.t[order], codes.w[order], codes.k[order]
    parts = []
    # labels of one item are adjacent after sorting, so offset d pairs each label with the d-th next one
    for d in range(1, len(t)):
        same = t[:-d] == t[d:]
        if not same.any():
            break
        parts.append((t[:-d][same], w[:-d][same], w[d:][same], k[:-d][same], k[d:][same]))
    if not parts:
        e = np.zeros(0, dtype=np.intp)
        return PairTable(e, e, e, e, e)
    return PairTable(*(np.concatenate(c) for c in zip(*parts)))


def cohen_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Cohen's kappa from confusion matrices (..., K, K); NaN where chance agreement is 1."""
    n = conf.sum((-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_o = np.trace(conf, axis1=-2, axis2=-1) / n
        p_e = (conf.sum(-1) * conf.sum(-2)).sum(-1) / n**2
        kappa = (p_o - p_e) / (1.0 - p_e)
    return np.where((n > 0) & (1.0 - p_e > 1e-12), kappa, np.nan)


# --------------------------------------------------------------------------- item statistics and bootstrap


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """Percentile interval (2 x ...) over the first axis, ignoring undefined (NaN) resamples."""
    lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: never defined, handled by callers
        return np.nanpercentile(samples, [lo, hi], axis=0)


class ItemStats:
    """The per-item sufficient statistics of every metric, for the items with two or more labels.

    `dense_features(rows)` (rows x features) holds percent agreement, Fleiss and one coincidence
    block per alpha level; `pairs` (sparse, items x (annotator pair, value, value)) holds each item's
    contribution to the Cohen confusion matrices of the pairs that share at least `min_shared`
    items. `evaluate` turns item weights (how often each item is drawn) into every metric.
    """

    def __init__(self, annotations: pd.DataFrame, label: str, alpha_levels: Mapping[str, str], min_shared: int):
        from scipy import sparse

        self.axes = axes(annotations)
        self.nominal = encode(annotations, label, self.axes)
        self.items, self.annotators = self.axes[2], self.axes[3]
        counts = self.nominal.counts
        self.n_per_item = counts.sum(1)
        self.multi = np.flatnonzero(self.n_per_item >= 2)
        self.n_raters = fleiss_raters(counts)
        self.alpha_codes = {
            level: self.nominal if (column == label and level == "nominal") else encode(annotations, column, self.axes)
            for level, column in alpha_levels.items()
        }
        # label counts per item (items with two or more labels only): everything dense derives from them
        self.counts = [counts[self.multi]] + [
            (counts if codes is self.nominal else codes.counts)[self.multi] for codes in self.alpha_codes.values()
        ]
        widths = [2, 2 + counts.shape[1]] + [c.shape[1] ** 2 for c in self.counts[1:]]
        ends = np.cumsum(widths)
        names = ["pa", "fleiss", *[f"alpha:{lv}" for lv in self.alpha_codes]]
        self.slices = dict(zip(names, zip(ends - widths, ends)))

        n_ann, n_val = len(self.annotators), len(self.nominal.values)
        pairs = label_pairs(self.nominal)
        pair_id = pairs.w1 * n_ann + pairs.w2
        self.shared = np.bincount(pair_id, minlength=n_ann * n_ann)
        self.kept = np.flatnonzero(self.shared >= min_shared)
        compact = np.full(n_ann * n_ann, -1)
        compact[self.kept] = np.arange(len(self.kept))
        sel = compact[pair_id] >= 0
        self.pair_width = len(self.kept) * n_val * n_val
        cols = compact[pair_id[sel]] * n_val * n_val + pairs.k1[sel] * n_val + pairs.k2[sel]
        row_of_item = np.full(len(self.items), -1)
        row_of_item[self.multi] = np.arange(len(self.multi))
        self.pairs = sparse.csr_matrix(
            (np.ones(len(cols)), (row_of_item[pairs.t[sel]], cols)), shape=(len(self.multi), max(self.pair_width, 1))
        )

    def pair_patterns(self) -> np.ndarray:
        """Items x annotators label codes (-1: none): an item's Cohen contribution is fixed by this row."""
        rows = np.full((len(self.items), len(self.annotators)), -1, dtype=np.int64)
        rows[self.nominal.t, self.nominal.w] = self.nominal.k
        return rows[self.multi]

    def dense_features(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Per-item features of the given rows (of the items with two or more labels)."""
        nominal = self.counts[0][rows]
        blocks = [percent_agreement_features(nominal), fleiss_features(nominal, self.n_raters)]
        blocks += [coincidence_features(c[rows]) for c in self.counts[1:]]
        return np.concatenate(blocks, axis=1)

    def dense_sums(self) -> np.ndarray:
        """The column sums of `dense_features()` without building it: coincidences as a matrix product."""
        nominal = self.counts[0]
        parts = [percent_agreement_features(nominal).sum(0), fleiss_features(nominal, self.n_raters).sum(0)]
        for c in self.counts[1:]:
            m = c.sum(1)
            scaled = c * (np.where(m >= 2, 1.0 / np.maximum(m - 1, 1), 0.0))[:, None]
            parts.append((c.T @ scaled - np.diag(scaled.sum(0))).ravel())
        return np.concatenate(parts)

    def metrics(self, sums: np.ndarray, conf: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric from summed dense features (..., F) and Cohen confusion counts (..., pairs*K*K)."""
        def block(name):
            lo, hi = self.slices[name]
            return sums[..., lo:hi]

        out = {
            "percent_agreement": percent_agreement_from_sums(block("pa")),
            "fleiss_kappa": fleiss_from_sums(block("fleiss"), self.n_raters),
        }
        for level, codes in self.alpha_codes.items():
            empty = np.full(sums.shape[:-1], np.nan)
            out[f"alpha:{level}"] = alpha_from_sums(block(f"alpha:{level}"), level, codes.values) if len(codes.values) else empty
        n_val = len(self.nominal.values)
        conf = conf[..., : self.pair_width]
        pair_kappa = cohen_from_confusion(conf.reshape(conf.shape[:-1] + (len(self.kept), n_val, n_val)))
        out["cohen_pairs"] = pair_kappa
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no pair is defined: NaN, as wanted
            out["cohen_mean"] = np.nanmean(pair_kappa, axis=-1) if len(self.kept) else np.full(pair_kappa.shape[:-1], np.nan)
        return out

    def evaluate(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics with item i (of the items with two or more labels) counted weights[..., i] times."""
        w2 = np.atleast_2d(weights).astype(float)
        # (F.T @ W.T).T: OpenBLAS is an order of magnitude slower on W @ F for these shapes
        sums = (self.dense_features().T @ w2.T).T
        conf = np.asarray((self.pairs.T @ w2.T).T)
        out = self.metrics(sums, conf)
        return out if np.ndim(weights) == 2 else {k: v[0] for k, v in out.items()}

    def point(self) -> dict[str, np.ndarray]:
        return self.metrics(self.dense_sums(), np.asarray(self.pairs.sum(0)).ravel())

    def bootstrap(self, n_resamples: int, seed: int = 0, chunk: int = 250) -> dict[str, np.ndarray]:
        """Every metric on `n_resamples` resamples of the items (with replacement), stacked on axis 0.

        Resampling n items and counting how often each label pattern was drawn is the same as one
        multinomial draw over patterns weighted by their frequency; so each replicate costs the
        number of distinct patterns, not the number of items. The dense metrics and Cohen's kappa
        draw their resamples independently (each interval is a marginal one, so this changes nothing).
        """
        from scipy import sparse

        n = len(self.multi)
        if not n or n_resamples <= 0:
            return {}
        rng = np.random.default_rng(seed)

        def patterns(key: np.ndarray):
            _, first, freq = np.unique(key, axis=0, return_index=True, return_counts=True)
            return first, freq / n

        # items with the same label counts have the same features: the bootstrap draws patterns, not items
        dense_first, dense_p = patterns(np.concatenate(self.counts, axis=1).astype(np.int64))
        dense_u = self.dense_features(dense_first)
        if len(self.annotators) * n <= MAX_PATTERN_CELLS:
            pair_first, pair_p = patterns(self.pair_patterns())
        else:  # many annotators: items rarely share a row of labels, so draw items themselves
            pair_first, pair_p = np.arange(n), np.full(n, 1.0 / n)
        pair_u = sparse.csr_matrix(self.pairs[pair_first]).T.tocsr()
        # replicates per batch: keep the batch's pattern counts near 5M numbers (40 MB)
        chunk = max(1, min(chunk, 5_000_000 // max(len(dense_p), len(pair_p))))
        out: dict[str, list] = {}
        for start in range(0, n_resamples, chunk):
            b = min(chunk, n_resamples - start)
            dense_counts = rng.multinomial(n, dense_p, size=b).astype(float)
            pair_counts = rng.multinomial(n, pair_p, size=b).astype(float)
            sums = (dense_u.T @ dense_counts.T).T
            conf = np.asarray((pair_u @ pair_counts.T).T)
            for key, val in self.metrics(sums, conf).items():
                out.setdefault(key, []).append(val)
        return {k: np.concatenate(v, axis=0) for k, v in out.items()}


# --------------------------------------------------------------------------- the report


def _num(x) -> float | None:
    """A float, or None for NaN/undefined: the report never carries a silent NaN."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def agreement_report(
    annotations: pd.DataFrame,
    label: str = "choice",
    alpha_levels: Mapping[str, str] | None = None,
    *,
    bootstrap: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    min_shared: int = DEFAULT_MIN_SHARED,
    confidence: float = 0.95,
) -> dict:
    """All item-level metrics, per-annotator table and bootstrap intervals as one JSON-ready dict.

    `label` is the nominal label column (percent agreement, Cohen's and Fleiss' kappa, per-annotator
    and per-item figures); `alpha_levels` maps each Krippendorff level to its column (default
    {"nominal": label}). `bootstrap` resamples (0: no intervals). Undefined metrics are None, with
    the reason under "notes".
    """
    for col in ("item_id", "annotator", label):
        if col not in annotations.columns:
            raise AnnotationError(f"votes lack the column '{col}'")
    alpha_levels = dict(alpha_levels or {"nominal": label})
    for level in alpha_levels:
        check_level(level)
    if bootstrap < 0:
        raise AnnotationError(f"--bootstrap must be 0 or more, got {bootstrap}")
    if min_shared < 1:
        raise AnnotationError(f"min_shared must be at least 1, got {min_shared}")
    if not 0 < confidence < 1:
        raise AnnotationError(f"confidence must be between 0 and 1, got {confidence}")

    annotations = annotations[annotations[label].notna()]
    stats = ItemStats(annotations, label, alpha_levels, min_shared)
    point = stats.point()
    samples = stats.bootstrap(bootstrap, seed)

    def interval(key, value):
        if key not in samples or _num(value) is None:
            return None
        lo, hi = percentile_interval(samples[key], confidence)
        return [float(lo), float(hi)] if math.isfinite(lo) and math.isfinite(hi) else None

    notes: dict[str, str] = {}
    n_multi = len(stats.multi)
    if n_multi == 0:
        why = "only one annotator" if len(stats.annotators) == 1 else "no item has two or more labels"
        for key in ("percent_agreement", "fleiss_kappa", "krippendorff_alpha", "cohen_kappa"):
            notes[key] = f"undefined: {why}"
    else:
        if _num(point["fleiss_kappa"]) is None:
            notes["fleiss_kappa"] = "undefined: every label is the same, so chance agreement is 1"
        else:
            n_used = int((stats.n_per_item == stats.n_raters).sum())
            left_out = n_multi - n_used
            if left_out:
                notes["fleiss_kappa"] = f"over the {n_used} items with {stats.n_raters} labels; {left_out} items with another number left out"
        for level, codes in stats.alpha_codes.items():
            if _num(point[f"alpha:{level}"]) is None:
                pairable = (codes.counts.sum(1) >= 2).any()
                notes[f"krippendorff_alpha.{level}"] = (
                    "undefined: only one value occurs, so no disagreement is expected by chance"
                    if pairable else "undefined: no item has two or more labels on this scale"
                )
        if not len(stats.kept):
            notes["cohen_kappa"] = f"undefined: no pair of annotators shares {min_shared} or more items"
        elif _num(point["cohen_mean"]) is None:
            notes["cohen_kappa"] = "undefined: in every pair both annotators gave one and the same label throughout"

    n_ann = len(stats.annotators)
    pair_ci = percentile_interval(samples["cohen_pairs"], confidence) if samples and len(stats.kept) else None
    pair_rows = []
    for j, pid in enumerate(stats.kept):
        kappa = _num(point["cohen_pairs"][j])
        ci = None
        if pair_ci is not None and kappa is not None and np.isfinite(pair_ci[:, j]).all():
            ci = [float(pair_ci[0, j]), float(pair_ci[1, j])]
        pair_rows.append({
            "annotator_1": stats.annotators[pid // n_ann], "annotator_2": stats.annotators[pid % n_ann],
            "n_items": int(stats.shared[pid]), "kappa": kappa, "interval": ci,
        })

    table = annotator_table(annotations, label, stats.nominal).reset_index()
    return {
        "n_items": int(len(stats.items)),
        "n_annotators": int(n_ann),
        "n_labels": int(len(annotations)),
        "n_items_multi": int(n_multi),
        "percent_agreement": _num(point["percent_agreement"]),
        "fleiss_kappa": _num(point["fleiss_kappa"]),
        "fleiss_raters": stats.n_raters or None,
        "krippendorff_alpha": {level: _num(point[f"alpha:{level}"]) for level in stats.alpha_codes},
        "cohen_kappa": {"mean": _num(point["cohen_mean"]), "min_shared": min_shared, "pairs": pair_rows},
        "intervals": {
            "percent_agreement": interval("percent_agreement", point["percent_agreement"]),
            "fleiss_kappa": interval("fleiss_kappa", point["fleiss_kappa"]),
            "krippendorff_alpha": {level: interval(f"alpha:{level}", point[f"alpha:{level}"]) for level in stats.alpha_codes},
            "cohen_kappa": interval("cohen_mean", point["cohen_mean"]),
        },
        "bootstrap": {"resamples": int(bootstrap), "confidence": confidence, "seed": seed, "unit": "item"},
        "notes": notes,
        "annotators": [{k: _clean(v) for k, v in row.items()} for row in table.to_dict(orient="records")],
    }


def _clean(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _num(v)
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def project_report(annotations: pd.DataFrame, **kwargs) -> dict:
    """`agreement_report` for a project's annotations: nominal on the choice, ordinal on the signed scale."""
    annotations = annotations.assign(scale=signed_scale(annotations))
    report = agreement_report(annotations, "choice", {"nominal": "choice", "ordinal": "scale"}, **kwargs)
    excluded = int(annotations["scale"].isna().sum())
    report["ordinal_scale"] = {
        "values": "A strong +3, A clear +2, A slight +1, tie 0, B slight -1, B clear -2, B strong -3",
        "excluded": excluded,
        "excluded_why": "both_bad, and A/B choices without a strength, have no place on the scale",
    }
    return report


def labels_report(labels: pd.DataFrame, level: str = "nominal", **kwargs) -> dict:
    """`agreement_report` for labels read by `read_labels_csv`: nominal always, and `level` when numeric."""
    check_level(level)
    levels = {"nominal": "label"} if level == "nominal" else {"nominal": "label", level: "label"}
    return agreement_report(labels, "label", levels, **kwargs)


# --------------------------------------------------------------------------- per annotator, per item


def _others_median(x: pd.Series) -> pd.Series:
    """For each annotator, the median of the other annotators' values (NaN with fewer than two others:
    with one other there is no telling which of the two is off)."""
    vals = x.to_numpy(float)
    out = np.full(len(vals), np.nan)
    for i in range(len(vals)):
        rest = np.delete(vals, i)
        rest = rest[np.isfinite(rest)]
        if len(rest) >= 2:
            out[i] = np.median(rest)
    return pd.Series(out, index=x.index)


def annotator_table(annotations: pd.DataFrame, label: str = "choice", codes: Codes | None = None) -> pd.DataFrame:
    """One row per annotator: count, agreement with the leave-one-out majority, gold accuracy,
    left-choice rate (with a binomial p-value against 0.5), tie rate, median duration, outlier flags.

    Columns the votes lack (gold, order shown, duration: a CSV has only labels) come out as NaN.
    Leave-one-out majority: the plurality of the other annotators on the item; items where the
    others tie, or where nobody else labelled, do not count. Left-choice rate is over A/B choices.
    `codes` (from `encode(votes, label)`) saves encoding again when the caller has them.
    """
    from scipy.stats import binomtest

    annotations = annotations[annotations[label].notna()]
    if annotations.empty:
        return pd.DataFrame(columns=["count", "outlier", "outlier_reasons"]).rename_axis("annotator")
    if codes is None:
        codes = encode(annotations, label)
    annotators = codes.annotators
    n_ann = len(annotators)
    table = pd.DataFrame(index=annotators)
    counts = codes.counts
    others = counts[codes.t] - np.eye(len(codes.values))[codes.k]
    top = others.max(1)
    unique_top = (others == top[:, None]).sum(1) == 1
    compared = (others.sum(1) >= 1) & unique_top
    agree = compared & (others[np.arange(len(codes.k)), codes.k] == top)
    w = codes.w
    table["count"] = np.bincount(w, minlength=n_ann)
    n_cmp = np.bincount(w, weights=compared, minlength=n_ann)
    table["n_compared"] = n_cmp.astype(int)
    table["loo_agreement"] = np.where(n_cmp > 0, np.bincount(w, weights=agree, minlength=n_ann) / np.maximum(n_cmp, 1), np.nan)
    # compare codes, not strings: 500k Python strings cost more than the whole table
    value_index = pd.Index(codes.values)

    def said(value) -> np.ndarray:
        code = value_index.get_indexer([value])[0]
        return codes.k == code if code >= 0 else np.zeros(len(codes.k), dtype=bool)


    def rate(mask: np.ndarray, among: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        num = np.bincount(w, weights=mask & among, minlength=n_ann)
        den = np.bincount(w, weights=among, minlength=n_ann)
        return np.where(den > 0, num / np.maximum(den, 1), np.nan), den

    if "gold_choice" in annotations.columns:
        gold = annotations["gold_choice"]
        has_gold = gold.notna().to_numpy(bool)
        gold_code = value_index.get_indexer(gold.where(gold.notna(), None).astype(object))
        acc, n_gold = rate(has_gold & (gold_code == codes.k), has_gold)
        table["gold_accuracy"], table["n_gold"] = acc, n_gold.astype(int)
    else:
        table["gold_accuracy"], table["n_gold"] = np.nan, 0
    is_choice = label == "choice"
    if "shown_swapped" in annotations.columns and is_choice:
        swapped = annotations["shown_swapped"].fillna(False).to_numpy(bool)
        left = (said("a") & ~swapped) | (said("b") & swapped)
        sided = said("a") | said("b")
        left_rate, n_sided = rate(left, sided)
        n_left = np.bincount(w, weights=left & sided, minlength=n_ann)
        table["left_rate"] = left_rate
        table["n_sided"] = n_sided.astype(int)
        table["position_p"] = [binomtest(int(k), int(n), 0.5).pvalue if n > 0 else np.nan for k, n in zip(n_left, n_sided)]
    else:
        table["left_rate"], table["n_sided"], table["position_p"] = np.nan, 0, np.nan
    table["tie_rate"] = rate(said("tie"), np.ones(len(codes.k), dtype=bool))[0] if is_choice else np.nan
    if "duration_ms" in annotations.columns:
        dur = pd.to_numeric(annotations["duration_ms"], errors="coerce").astype(float).to_numpy()
        table["median_duration_ms"] = pd.Series(dur).groupby(w).median().reindex(range(n_ann)).to_numpy(float)
    else:
        table["median_duration_ms"] = np.nan

    reasons: list[list[str]] = [[] for _ in annotators]
    checks = (
        ("loo_agreement", -1, "low agreement with the others"),
        ("gold_accuracy", -1, "low gold accuracy"),
        ("tie_rate", +1, "many ties"),
    )
    for col, sign, why in checks:
        gap = (table[col] - _others_median(table[col])) * sign
        for i in np.flatnonzero((gap >= OUTLIER_GAP).to_numpy()):
            reasons[i].append(why)
    others = _others_median(table["median_duration_ms"])
    for i in np.flatnonzero((table["median_duration_ms"] < OUTLIER_FAST * others).to_numpy()):
        reasons[i].append("much faster than the others")
    biased = (table["position_p"] < POSITION_BIAS_P) & ((table["left_rate"] - 0.5).abs() >= OUTLIER_GAP)
    for i in np.flatnonzero(biased.to_numpy()):
        reasons[i].append("position bias")
    table["outlier"] = [bool(r) for r in reasons]
    table["outlier_reasons"] = ["; ".join(r) for r in reasons]
    return table


def item_table(annotations: pd.DataFrame, label: str = "choice", top: int | None = None) -> pd.DataFrame:
    """One row per item: n_annotations, agreement (share of agreeing annotator pairs; NaN for a single
    label), the majority label (None on a tie) and the votes as text, most disputed first (lowest
    agreement, then most labels). `top` keeps only the first rows."""
    annotations = annotations[annotations[label].notna()]
    if annotations.empty:
        return pd.DataFrame(columns=["n_annotations", "agreement", "majority", "votes"]).rename_axis("item_id")
    codes = encode(annotations, label)
    counts = codes.counts
    n = counts.sum(1)
    agreement = np.where(n >= 2, (counts * (counts - 1)).sum(1) / np.maximum(n * (n - 1), 1), np.nan)
    order = np.lexsort((-n, np.where(np.isnan(agreement), np.inf, agreement)))
    if top is not None:
        order = order[:top]
    counts, n, agreement = counts[order], n[order], agreement[order]
    top_count = counts.max(1)
    unique_top = (counts == top_count[:, None]).sum(1) == 1
    majority = np.where(unique_top, codes.values[counts.argmax(1)], None)
    text = [", ".join(f"{codes.values[j]} x{int(c)}" for j, c in enumerate(row) if c) for row in counts]
    index = pd.Index(codes.items[order], name="item_id")
    return pd.DataFrame(
        {
            "n_annotations": n.astype(int),
            "agreement": agreement,
            # object dtype keeps None for "no majority" (a str column would turn it into NaN)
            "majority": pd.Series(list(majority), index=index, dtype=object),
            "votes": text,
        },
        index=index,
    )


def disputed_items(annotations: pd.DataFrame, label: str = "choice", top: int = 10) -> list[dict]:
    """The `top` most disputed items with two or more labels, JSON-ready."""
    table = item_table(annotations, label, top)
    table = table[table["n_annotations"] >= 2].reset_index()
    return [{k: _clean(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def agreement_over_time(annotations: pd.DataFrame, freq: str = "D", label: str = "choice", by_annotator: bool = False) -> pd.DataFrame:
    """Per period of created_at (and annotator, with `by_annotator`): labels given and their mean
    agreement with the other labels on the same item (the share of the item's other annotators who
    chose the same), over items with two or more labels."""
    columns = ["period", *(["annotator"] if by_annotator else []), "n_labels", "agreement"]
    annotations = annotations[annotations[label].notna()]
    if annotations.empty or "created_at" not in annotations.columns:
        return pd.DataFrame(columns=columns)
    codes = encode(annotations, label)
    counts = codes.counts
    n = counts.sum(1)[codes.t]
    same = counts[codes.t, codes.k] - 1
    multi = n >= 2
    frame = pd.DataFrame({
        "period": pd.to_datetime(annotations["created_at"]).dt.to_period(freq).dt.start_time.to_numpy()[multi],
        "annotator": annotations["annotator"].to_numpy(dtype=object)[multi],
        "agreement": (same / np.maximum(n - 1, 1))[multi],
    })
    keys = ["period", "annotator"] if by_annotator else ["period"]
    out = frame.groupby(keys).agg(n_labels=("agreement", "size"), agreement=("agreement", "mean")).reset_index()
    return out[columns]


# --------------------------------------------------------------------------- rankings
#
# Items with 3 to 6 responses are ranked, not compared: each annotation holds every response's rank
# (stored order, 1 = best, ties equal). The pairwise metrics above never see them (load_annotations leaves
# them out); these do. Ties are scored as mid-ranks (the mean of the places the tied responses
# share: [1, 1, 3, 4] becomes [1.5, 1.5, 3, 4]), as Kendall's tie correction assumes.
#
# - Kendall's W, per item with two or more rankings, with the tie correction:
#       W = 12 S / (m^2 (n^3 - n) - m sum_j T_j),  S = sum_i (R_i - m (n + 1) / 2)^2,
#   R_i the sum of response i's mid-ranks over the m rankings, T_j = sum over the tie groups of
#   ranking j of (t^3 - t). The project figure is the mean of the items' W (undefined, and left
#   out, where every ranking ties every response). W is not chance-corrected: random rankings give
#   about 1/m on average.
# - Krippendorff's alpha, ordinal, on the mid-ranks: each response of each item is a unit, each
#   annotator a coder (the `krippendorff` package's reliability data with one column per response).
# Both come with a percentile bootstrap interval over items (all of an item's responses are drawn
# together), the same resamples for both.

RANKING_COLUMNS = ["item_id", "annotator", "ranking", "duration_ms", "created_at"]


def load_rankings(engine: Engine, project: str) -> tuple[pd.DataFrame, int]:
    """The rankings of `project` (one row per ranking annotation, columns RANKING_COLUMNS; ranking a
    list of ranks in stored order) and how many ranking items the project has."""
    from sqlalchemy import func

    from annotation.projects import get_project
    from annotation.store import Annotation, Item, User, reading

    with reading(engine) as session:
        proj = get_project(session, project)
        n_items = session.scalar(
            select(func.count()).select_from(Item).where(Item.project_id == proj.id, Item.responses.is_not(None))
        ) or 0
        rows = session.execute(
            select(Annotation.item_id, User.username, Annotation.ranking, Annotation.duration_ms, Annotation.created_at)
            .join(Item, Item.id == Annotation.item_id)
            .join(User, User.id == Annotation.annotator_id)
            .where(Item.project_id == proj.id, Annotation.ranking.is_not(None))
            .order_by(Annotation.id)
        ).all()
    rankings = pd.DataFrame(rows, columns=RANKING_COLUMNS)
    rankings["item_id"] = rankings["item_id"].astype("int64")
    rankings["annotator"] = rankings["annotator"].astype(object)
    return rankings, int(n_items)


def mid_ranks(ranks) -> np.ndarray:
    """Ranks (rows: rankings) with ties as the mean of the places they share."""
    from scipy.stats import rankdata

    return rankdata(np.atleast_2d(np.asarray(ranks, dtype=float)), method="average", axis=1)


def kendall_w(ranks) -> float:
    """Kendall's coefficient of concordance W with the tie correction, for m rankings (rows) of the
    same n objects (columns); each row is re-ranked with mid-ranks first, so any scores in which a
    smaller value is better will do. NaN with fewer than two rankings or objects, or when every
    ranking ties every object."""
    r = mid_ranks(ranks)
    m, n = r.shape
    if m < 2 or n < 2:
        return float("nan")
    s = float(((r.sum(0) - m * (n + 1) / 2.0) ** 2).sum())
    ties = 0.0
    for row in r:
        _, t = np.unique(row, return_counts=True)
        ties += float((t**3 - t).sum())
    denominator = m * m * (n**3 - n) - m * ties
    return 12.0 * s / denominator if denominator > 1e-12 else float("nan")


class RankingStats:
    """Per item (of those with two or more rankings): Kendall's W, and the item's contribution to
    Krippendorff's ordinal coincidence matrix over the mid-rank values; `evaluate` turns item
    weights (how often each item is drawn) into both metrics."""

    def __init__(self, rankings: pd.DataFrame):
        per_item = rankings.groupby("item_id", sort=True)["ranking"].agg(list)
        self.n_rankings = per_item.map(len)
        multi = per_item[self.n_rankings >= 2]
        self.items = multi.index
        mids = [mid_ranks([list(r) for r in rows]) for rows in multi]
        self.w = np.array([kendall_w(m) for m in mids], dtype=float)
        # Units are (item, response); values the distinct mid-ranks of the whole project.
        values = np.unique(np.concatenate([m.ravel() for m in mids])) if mids else np.zeros(0)
        self.values = values
        k = len(values)
        self.coincidence = np.zeros((len(mids), k * k))
        for i, m in enumerate(mids):
            codes = np.searchsorted(values, m)  # rankings x responses
            counts = np.zeros((m.shape[1], k))
            for column in range(m.shape[1]):
                np.add.at(counts[column], codes[:, column], 1.0)
            self.coincidence[i] = coincidence_features(counts).sum(0)

    def evaluate(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Mean W and ordinal alpha with item i counted weights[..., i] times."""
        w2 = np.atleast_2d(weights).astype(float)
        defined = np.isfinite(self.w)
        used = w2[:, defined]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_w = (used @ self.w[defined]) / used.sum(1)
        sums = w2 @ self.coincidence
        alpha = alpha_from_sums(sums, "ordinal", self.values) if len(self.values) else np.full(len(w2), np.nan)
        out = {"kendall_w": mean_w, "alpha:ordinal": alpha}
        return out if np.ndim(weights) == 2 else {key: v[0] for key, v in out.items()}

    def bootstrap(self, n_resamples: int, seed: int = 0) -> dict[str, np.ndarray]:
        n = len(self.items)
        if not n or n_resamples <= 0:
            return {}
        rng = np.random.default_rng(seed)
        chunk = max(1, min(n_resamples, 5_000_000 // n))
        out: dict[str, list] = {}
        for start in range(0, n_resamples, chunk):
            counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_resamples - start))
            for key, val in self.evaluate(counts).items():
                out.setdefault(key, []).append(val)
        return {key: np.concatenate(v) for key, v in out.items()}


def ranking_report(rankings: pd.DataFrame, n_ranking_items: int | None = None, *, bootstrap: int = DEFAULT_RESAMPLES,
                   seed: int = 0, confidence: float = 0.95) -> dict:
    """Agreement on rankings (columns item_id, annotator, ranking) as one JSON-ready dict: mean
    Kendall's W over items and Krippendorff's ordinal alpha, each with a bootstrap interval over
    items; undefined figures are None with the reason under "notes"."""
    for col in ("item_id", "annotator", "ranking"):
        if col not in rankings.columns:
            raise AnnotationError(f"rankings lack the column '{col}'")
    if bootstrap < 0:
        raise AnnotationError(f"--bootstrap must be 0 or more, got {bootstrap}")
    if not 0 < confidence < 1:
        raise AnnotationError(f"confidence must be between 0 and 1, got {confidence}")
    stats = RankingStats(rankings)
    point = stats.evaluate(np.ones(len(stats.items)))
    samples = stats.bootstrap(bootstrap, seed)

    def interval(key):
        if key not in samples or _num(point[key]) is None:
            return None
        lo, hi = percentile_interval(samples[key], confidence)
        return [float(lo), float(hi)] if math.isfinite(lo) and math.isfinite(hi) else None

    notes: dict[str, str] = {}
    n_multi = len(stats.items)
    if n_multi == 0:
        why = "no ranking item has two or more rankings"
        notes["kendall_w"] = notes["krippendorff_alpha.ordinal"] = f"undefined: {why}"
    else:
        undefined_w = int((~np.isfinite(stats.w)).sum())
        if undefined_w == n_multi:
            notes["kendall_w"] = "undefined: on every item every ranking ties all responses"
        elif undefined_w:
            notes["kendall_w"] = f"mean over {n_multi - undefined_w} items; {undefined_w} where every ranking ties all responses left out"
        if _num(point["alpha:ordinal"]) is None:
            notes["krippendorff_alpha.ordinal"] = "undefined: only one rank value occurs, so no disagreement is expected by chance"
    return {
        "n_items": int(n_ranking_items if n_ranking_items is not None else len(stats.n_rankings)),
        "n_items_ranked": int(len(stats.n_rankings)),
        "n_items_multi": int(n_multi),
        "n_rankings": int(len(rankings)),
        "n_annotators": int(rankings["annotator"].nunique()),
        "kendall_w": _num(point["kendall_w"]),
        "kendall_w_items": int(np.isfinite(stats.w).sum()),
        "krippendorff_alpha": {"ordinal": _num(point["alpha:ordinal"])},
        "intervals": {"kendall_w": interval("kendall_w"), "krippendorff_alpha": {"ordinal": interval("alpha:ordinal")}},
        "bootstrap": {"resamples": int(bootstrap), "confidence": confidence, "seed": seed, "unit": "item"},
        "ties": "scored as mid-ranks; Kendall's W with the tie correction",
        "notes": notes,
    }


def project_ranking_report(engine: Engine, project: str, **kwargs) -> dict | None:
    """`ranking_report` of a project's rankings, or None when the project has no ranking items."""
    rankings, n_items = load_rankings(engine, project)
    if n_items == 0:
        return None
    return ranking_report(rankings, n_items, **kwargs)
