"""Agreement metrics: published examples, the reference libraries on random data (1e-9), the
bootstrap, per-annotator and per-item tables, degenerate input, the CSV reader, the store loader
(both databases) and `rlhf agreement`."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import subprocess
import sys
from pathlib import Path

import krippendorff
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa

from annotation import agreement as ag
from annotation.errors import AnnotationError, InputError

CHOICES = np.array(["a", "b", "tie", "both_bad"])
QUALITY_PAGE = Path(__file__).resolve().parent.parent / "app" / "pages" / "4_Quality.py"

# Fleiss (1971), "Measuring nominal scale agreement among many raters", as tabulated on Wikipedia's
# "Fleiss' kappa" page: 10 subjects, 14 raters each, 5 categories; published kappa = 0.210.
FLEISS_1971 = np.array(
    [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
     [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
)
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", example C: 4 observers x 12
# units with missing values; published alpha: nominal 0.743, ordinal 0.815, interval 0.849.
N = np.nan
KRIPPENDORFF_C = np.array(
    [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
     [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
     [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
     [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]
)


def votes_from_matrix(matrix: np.ndarray, column: str = "label") -> pd.DataFrame:
    """Long labels from a coders x units matrix (NaN: no label)."""
    rows = [(u, f"c{c}", matrix[c, u]) for c in range(matrix.shape[0]) for u in range(matrix.shape[1]) if not np.isnan(matrix[c, u])]
    return pd.DataFrame(rows, columns=["item_id", "annotator", column])


def matrix_from_votes(annotations: pd.DataFrame, column: str) -> np.ndarray:
    return annotations.pivot(index="annotator", columns="item_id", values=column).to_numpy(float)


def random_votes(n_items=300, n_ann=5, p_label=0.7, accuracy=0.6, seed=0) -> pd.DataFrame:
    """Noisy annotators on items with a hidden true choice; each annotator labels an item with p_label."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, n_items)
    rows = []
    for i in range(n_items):
        for a in range(n_ann):
            if rng.random() < p_label:
                k = truth[i] if rng.random() < accuracy else rng.integers(0, 4)
                rows.append((i, f"u{a}", CHOICES[k], int(rng.integers(1, 4)), bool(rng.random() < 0.5), int(rng.integers(2000, 60000))))
    return pd.DataFrame(rows, columns=["item_id", "annotator", "choice", "strength", "shown_swapped", "duration_ms"])


def no_nan(obj) -> bool:
    json.dumps(obj, allow_nan=False)  # raises on NaN or inf anywhere
    return True


# --------------------------------------------------------------------------- published examples


def test_fleiss_1971_published_example():
    rows = [(i, f"r{r}", cat) for i, counts in enumerate(FLEISS_1971) for cat, c in enumerate(counts) for r in range(c)]
    # rater ids restart per category above, so give each item's 14 ratings distinct raters
    annotations = pd.DataFrame(rows, columns=["item_id", "annotator", "label"])
    annotations["annotator"] = annotations.groupby("item_id").cumcount().map(lambda r: f"r{r}")
    report = ag.agreement_report(annotations, "label", bootstrap=0)
    assert round(report["fleiss_kappa"], 3) == 0.210
    assert report["fleiss_kappa"] == pytest.approx(sm_fleiss_kappa(FLEISS_1971, method="fleiss"), abs=1e-12)
    assert report["fleiss_raters"] == 14


@pytest.mark.parametrize("level,published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_2011_example_c(level, published):
    annotations = votes_from_matrix(KRIPPENDORFF_C)
    report = ag.agreement_report(annotations, "label", {level: "label"}, bootstrap=0)
    alpha = report["krippendorff_alpha"][level]
    assert round(alpha, 3) == published
    assert alpha == pytest.approx(krippendorff.alpha(reliability_data=KRIPPENDORFF_C, level_of_measurement=level), abs=1e-12)
    # unit 12 has a single value: pairable data are the other 11 units
    assert report["n_items"] == 12 and report["n_items_multi"] == 11


# --------------------------------------------------------------------------- reference libraries on random data


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_reference_libraries(seed):
    annotations = random_votes(n_items=250, n_ann=5, p_label=0.65, seed=seed)
    report = ag.project_report(annotations, bootstrap=0, min_shared=5)

    codes = {c: i for i, c in enumerate(CHOICES)}
    nominal = matrix_from_votes(annotations.assign(code=annotations["choice"].map(codes)), "code")
    assert report["krippendorff_alpha"]["nominal"] == pytest.approx(
        krippendorff.alpha(reliability_data=nominal, level_of_measurement="nominal"), abs=1e-9
    )
    scale = matrix_from_votes(annotations.assign(scale=ag.signed_scale(annotations)), "scale")
    assert report["krippendorff_alpha"]["ordinal"] == pytest.approx(
        krippendorff.alpha(reliability_data=scale, level_of_measurement="ordinal"), abs=1e-9
    )

    for pair in report["cohen_kappa"]["pairs"]:
        both = nominal[[int(pair["annotator_1"][1:]), int(pair["annotator_2"][1:])]]
        both = both[:, ~np.isnan(both).any(0)]
        assert pair["n_items"] == both.shape[1]
        assert pair["kappa"] == pytest.approx(cohen_kappa_score(both[0], both[1]), abs=1e-9)
    assert len(report["cohen_kappa"]["pairs"]) == 10
    assert report["cohen_kappa"]["mean"] == pytest.approx(np.mean([p["kappa"] for p in report["cohen_kappa"]["pairs"]]), abs=1e-12)

    table = np.stack([np.bincount(col[~np.isnan(col)].astype(int), minlength=4) for col in nominal.T])
    n = table.sum(1)
    raters = report["fleiss_raters"]
    assert report["fleiss_kappa"] == pytest.approx(sm_fleiss_kappa(table[n == raters], method="fleiss"), abs=1e-9)

    shares = [
        np.mean([a == b for a, b in itertools.combinations(col[~np.isnan(col)], 2)]) for col in nominal.T if (~np.isnan(col)).sum() >= 2
    ]
    assert report["percent_agreement"] == pytest.approx(np.mean(shares), abs=1e-12)


def test_interval_and_numeric_labels_match_krippendorff():
    rng = np.random.default_rng(5)
    data = rng.integers(1, 8, size=(6, 80)).astype(float)
    data[rng.random(data.shape) < 0.3] = np.nan
    annotations = votes_from_matrix(data)
    for level in ("ordinal", "interval"):
        report = ag.agreement_report(annotations, "label", {level: "label"}, bootstrap=0)
        assert report["krippendorff_alpha"][level] == pytest.approx(
            krippendorff.alpha(reliability_data=data, level_of_measurement=level), abs=1e-9
        )


# --------------------------------------------------------------------------- bootstrap


def test_weighted_evaluation_equals_libraries_on_the_resampled_items():
    """A bootstrap replicate is item weights; check one against the libraries on the duplicated items."""
    annotations = random_votes(n_items=120, seed=3)
    stats = ag.ItemStats(annotations, "choice", {"nominal": "choice"}, min_shared=1)
    rng = np.random.default_rng(0)
    draw = rng.integers(0, len(stats.multi), len(stats.multi))
    weights = np.bincount(draw, minlength=len(stats.multi)).astype(float)
    got = stats.evaluate(weights)
    chosen = stats.items[stats.multi[draw]]
    copies = pd.concat(
        [annotations[annotations["item_id"] == item].assign(item_id=j) for j, item in enumerate(chosen)], ignore_index=True
    )
    codes = {c: i for i, c in enumerate(CHOICES)}
    matrix = matrix_from_votes(copies.assign(code=copies["choice"].map(codes)), "code")
    assert got["alpha:nominal"] == pytest.approx(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal"), abs=1e-9)
    direct = ag.agreement_report(copies, "choice", bootstrap=0, min_shared=1)
    assert got["percent_agreement"] == pytest.approx(direct["percent_agreement"], abs=1e-12)
    assert got["fleiss_kappa"] == pytest.approx(direct["fleiss_kappa"], abs=1e-12)
    assert got["cohen_mean"] == pytest.approx(direct["cohen_kappa"]["mean"], abs=1e-12)


def test_bootstrap_intervals_agree_with_a_naive_item_bootstrap():
    annotations = random_votes(n_items=200, seed=4)
    report = ag.agreement_report(annotations, "choice", bootstrap=400, seed=1)
    codes = {c: i for i, c in enumerate(CHOICES)}
    matrix = matrix_from_votes(annotations.assign(code=annotations["choice"].map(codes)), "code")
    rng = np.random.default_rng(123)
    alphas = []
    for _ in range(300):
        pick = rng.integers(0, matrix.shape[1], matrix.shape[1])
        alphas.append(krippendorff.alpha(reliability_data=matrix[:, pick], level_of_measurement="nominal"))
    naive = np.percentile(alphas, [2.5, 97.5])
    ours = report["intervals"]["krippendorff_alpha"]["nominal"]
    assert ours[0] < report["krippendorff_alpha"]["nominal"] < ours[1]
    # two Monte Carlo estimates of the same interval: equal up to resampling noise
    assert ours == pytest.approx(list(naive), abs=0.02)


def test_bootstrap_without_pattern_compression_gives_the_same_intervals(monkeypatch):
    """Many annotators: items are drawn one by one instead of by label pattern; same distribution."""
    annotations = random_votes(n_items=300, seed=9)
    packed = ag.agreement_report(annotations, "choice", bootstrap=600, seed=2)
    monkeypatch.setattr(ag, "MAX_PATTERN_CELLS", 0)
    plain = ag.agreement_report(annotations, "choice", bootstrap=600, seed=3)
    assert plain["intervals"]["cohen_kappa"] == pytest.approx(packed["intervals"]["cohen_kappa"], abs=0.02)
    for a, b in zip(plain["cohen_kappa"]["pairs"], packed["cohen_kappa"]["pairs"]):
        assert a["interval"] == pytest.approx(b["interval"], abs=0.03)


def test_intervals_contain_the_estimate_and_shrink_with_more_items():
    small = ag.project_report(random_votes(n_items=100, seed=6), bootstrap=300)
    large = ag.project_report(random_votes(n_items=1600, seed=6), bootstrap=300)
    for report in (small, large):
        for key in ("percent_agreement", "fleiss_kappa"):
            lo, hi = report["intervals"][key]
            assert lo <= report[key] <= hi
        lo, hi = report["intervals"]["krippendorff_alpha"]["ordinal"]
        assert lo <= report["krippendorff_alpha"]["ordinal"] <= hi
        for pair in report["cohen_kappa"]["pairs"]:
            assert pair["interval"][0] <= pair["kappa"] <= pair["interval"][1]
    width = lambda r: r["intervals"]["cohen_kappa"][1] - r["intervals"]["cohen_kappa"][0]  # noqa: E731
    assert width(large) < width(small) / 2.5  # ~ 1/sqrt(16) = 1/4
    again = ag.project_report(random_votes(n_items=100, seed=6), bootstrap=300)
    assert again["intervals"] == small["intervals"]  # seeded: the same command gives the same intervals


# --------------------------------------------------------------------------- degenerate input


def test_one_annotator_gives_none_with_reasons():
    annotations = pd.DataFrame({"item_id": [1, 2, 3], "annotator": ["x"] * 3, "choice": ["a", "b", "tie"]})
    report = ag.project_report(annotations)
    assert report["n_annotators"] == 1 and report["n_items_multi"] == 0
    assert report["percent_agreement"] is None and report["fleiss_kappa"] is None
    assert report["krippendorff_alpha"] == {"nominal": None, "ordinal": None}
    assert report["cohen_kappa"]["mean"] is None and report["cohen_kappa"]["pairs"] == []
    assert "only one annotator" in report["notes"]["fleiss_kappa"]
    assert report["intervals"]["percent_agreement"] is None
    assert report["annotators"][0]["count"] == 3 and report["annotators"][0]["loo_agreement"] is None
    assert no_nan(report)


def test_all_labels_equal_gives_perfect_percent_agreement_and_undefined_chance_corrected_metrics():
    annotations = pd.DataFrame(
        {"item_id": np.repeat(np.arange(20), 3), "annotator": ["x", "y", "z"] * 20, "choice": "a", "strength": 2}
    )
    report = ag.project_report(annotations, bootstrap=50)
    assert report["percent_agreement"] == 1.0
    assert report["fleiss_kappa"] is None and "chance agreement is 1" in report["notes"]["fleiss_kappa"]
    assert report["krippendorff_alpha"]["nominal"] is None and "only one value" in report["notes"]["krippendorff_alpha.nominal"]
    assert report["cohen_kappa"]["mean"] is None and all(p["kappa"] is None for p in report["cohen_kappa"]["pairs"])
    assert report["intervals"]["fleiss_kappa"] is None
    assert no_nan(report)
    # the libraries agree that these are undefined
    with pytest.raises(ValueError):
        krippendorff.alpha(reliability_data=np.ones((3, 20)), level_of_measurement="nominal")


def test_items_with_a_single_label_are_left_out_and_counted():
    annotations = random_votes(n_items=60, seed=8)
    extra = pd.DataFrame({"item_id": [1000, 1001], "annotator": ["u0", "u1"], "choice": ["a", "b"], "strength": 1})
    with_single = ag.project_report(pd.concat([annotations, extra], ignore_index=True), bootstrap=0)
    without = ag.project_report(annotations, bootstrap=0)
    assert with_single["n_items"] == without["n_items"] + 2
    assert with_single["n_items_multi"] == without["n_items_multi"]
    for key in ("percent_agreement", "fleiss_kappa"):
        assert with_single[key] == pytest.approx(without[key], abs=1e-12)
    assert with_single["krippendorff_alpha"] == pytest.approx(without["krippendorff_alpha"], abs=1e-12)


def test_empty_votes_and_bad_options():
    empty = pd.DataFrame(columns=["item_id", "annotator", "choice", "strength"])
    report = ag.project_report(empty)
    assert report["n_items"] == 0 and report["percent_agreement"] is None and no_nan(report)
    annotations = random_votes(n_items=10)
    with pytest.raises(AnnotationError, match="--bootstrap"):
        ag.project_report(annotations, bootstrap=-1)
    with pytest.raises(AnnotationError, match="unknown level"):
        ag.agreement_report(annotations, "choice", {"ratio": "choice"})
    with pytest.raises(AnnotationError, match="lack the column 'label'"):
        ag.agreement_report(annotations, "label")


def test_ordinal_scale_and_both_bad_exclusion():
    annotations = pd.DataFrame({
        "item_id": [1] * 7,
        "annotator": list("abcdefg"),
        "choice": ["a", "a", "b", "tie", "both_bad", "b", "a"],
        "strength": pd.array([3, 1, 2, None, 2, 3, None], dtype="Int64"),
    })
    assert ag.signed_scale(annotations).tolist()[:4] == [3.0, 1.0, -2.0, 0.0]
    assert np.isnan(ag.signed_scale(annotations).iloc[4]) and ag.signed_scale(annotations).iloc[5] == -3.0
    assert np.isnan(ag.signed_scale(annotations).iloc[6])  # an A choice without a strength
    assert ag.project_report(annotations, bootstrap=0)["ordinal_scale"]["excluded"] == 2


# --------------------------------------------------------------------------- per annotator and per item


def test_annotator_table_by_hand():
    # x and y agree everywhere; z disagrees on item 2. Item 3 is gold "b".
    annotations = pd.DataFrame({
        "item_id": [1, 1, 1, 2, 2, 2, 3, 3, 3],
        "annotator": ["x", "y", "z"] * 3,
        "choice": ["a", "a", "a", "b", "b", "tie", "b", "b", "a"],
        "shown_swapped": [False, True, False, True, False, False, False, True, True],
        "duration_ms": [1000, 2000, 300, 3000, 4000, 500, 5000, 6000, 700],
        "gold_choice": [None, None, None, None, None, None, "b", "b", "b"],
    })
    table = ag.annotator_table(annotations)
    assert table.loc["x", "loo_agreement"] == 1.0
    assert table.loc["z", "loo_agreement"] == pytest.approx(1 / 3)
    assert table.loc["z", "gold_accuracy"] == 0.0 and table.loc["y", "gold_accuracy"] == 1.0
    assert table.loc["z", "n_gold"] == 1
    # left: a not swapped, or b swapped. x: a(L) b(R) b(L) -> 2/3; z: a(L), [tie], a(R) -> 1/2
    assert table.loc["x", "left_rate"] == pytest.approx(2 / 3)
    assert table.loc["z", "left_rate"] == pytest.approx(1 / 2) and table.loc["z", "n_sided"] == 2
    assert table.loc["z", "tie_rate"] == pytest.approx(1 / 3)
    assert table.loc["y", "median_duration_ms"] == 4000
    assert list(table.index) == ["x", "y", "z"] and (table["count"] == 3).all()


def test_outliers_are_marked():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 400)
    rows = []
    for i in range(400):
        for a in range(6):
            k = truth[i] if rng.random() < 0.9 else 1 - truth[i]
            swapped = bool(rng.random() < 0.5)
            if a == 4:  # random labels
                k = rng.integers(0, 2)
            if a == 5:  # always picks whatever was shown on the left
                k = 1 if swapped else 0
            rows.append((i, f"u{a}", CHOICES[k], swapped, 20000 if a != 3 else 2000))
    annotations = pd.DataFrame(rows, columns=["item_id", "annotator", "choice", "shown_swapped", "duration_ms"])
    table = ag.annotator_table(annotations)
    assert "low agreement" in table.loc["u4", "outlier_reasons"]
    assert "position bias" in table.loc["u5", "outlier_reasons"] and table.loc["u5", "left_rate"] == 1.0
    assert "faster" in table.loc["u3", "outlier_reasons"]
    assert not table.loc[["u0", "u1", "u2"], "outlier"].any()


def test_item_table_sorts_most_disputed_first_and_time_series():
    annotations = pd.DataFrame({
        "item_id": [1, 1, 1, 2, 2, 2, 3, 3, 4],
        "annotator": ["x", "y", "z", "x", "y", "z", "x", "y", "x"],
        "choice": ["a", "a", "a", "a", "b", "tie", "a", "b", "a"],
        "created_at": pd.to_datetime(["2026-01-01"] * 3 + ["2026-01-02"] * 6),
    })
    table = ag.item_table(annotations)
    assert list(table.index) == [2, 3, 1, 4]  # 3-way split (0 agreement, 3 labels) before a 1-1 split
    assert table.loc[2, "majority"] is None and table.loc[1, "majority"] == "a"
    assert table.loc[2, "votes"] == "a x1, b x1, tie x1" and np.isnan(table.loc[4, "agreement"])
    assert [d["item_id"] for d in ag.disputed_items(annotations, top=3)] == [2, 3, 1]
    series = ag.agreement_over_time(annotations, "D")
    assert series["agreement"].tolist() == [1.0, 0.0] and series["n_labels"].tolist() == [3, 5]
    per = ag.agreement_over_time(annotations, "D", by_annotator=True).set_index(["period", "annotator"])
    assert per.loc[(pd.Timestamp("2026-01-02"), "x"), "agreement"] == 0.0 and per.loc[(pd.Timestamp("2026-01-02"), "x"), "n_labels"] == 2
    assert per.loc[(pd.Timestamp("2026-01-01"), "z"), "agreement"] == 1.0


# --------------------------------------------------------------------------- CSV


def write(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_reader_accepts_any_column_order(tmp_path):
    path = write(tmp_path, "label,item_id,annotator,comment\na,1,x,\nb,1,y,hm\n\n")
    labels = ag.read_labels_csv(path)
    assert labels.to_dict(orient="records") == [
        {"item_id": "1", "annotator": "x", "label": "a"}, {"item_id": "1", "annotator": "y", "label": "b"}
    ]


@pytest.mark.parametrize(
    "text,level,line,field,fragment",
    [
        ("item,annotator,label\n1,x,a\n", "nominal", 1, "item_id", "header"),
        ("item_id,annotator,label\n1,x,a\n2,y\n", "nominal", 3, None, "has 2 fields"),
        ("item_id,annotator,label\n1,x,a\n,y,b\n", "nominal", 3, "item_id", "is empty"),
        ("item_id,annotator,label\n1, ,a\n", "nominal", 2, "annotator", "is empty"),
        ("item_id,annotator,label\n1,x,a\n1,x,b\n", "nominal", 3, "annotator", "on line 2"),
        ("item_id,annotator,label\n1,x,2\n1,y,strong\n", "ordinal", 3, "label", "not a number"),
        ("", "nominal", 1, None, "empty"),
    ],
)
def test_csv_errors_name_file_line_and_field(tmp_path, text, level, line, field, fragment):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        ag.read_labels_csv(path, level)
    assert err.value.line == line and err.value.field == field and fragment in str(err.value)
    assert str(path) in str(err.value)


def test_csv_header_only_gives_a_defined_empty_report(tmp_path):
    labels = ag.read_labels_csv(write(tmp_path, "item_id,annotator,label\n"))
    report = ag.labels_report(labels)
    assert report["n_labels"] == 0 and report["fleiss_kappa"] is None and no_nan(report)


def test_csv_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        ag.read_labels_csv(tmp_path / "nope.csv")
    path = tmp_path / "latin1.csv"
    path.write_bytes("item_id,annotator,label\n1,jos\xe9,a\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        ag.read_labels_csv(path)


# --------------------------------------------------------------------------- store loader (both databases)


def seed_project(engine):
    from annotation.auth import create_user
    from annotation.projects import create_project
    from annotation.store import Annotation, Item, transaction

    with transaction(engine) as s:
        project = create_project(s, "agree", overlap=2)
        other = create_project(s, "other", overlap=2)
        users = [create_user(s, name, None) for name in ("ann", "bob")]
        items = [
            Item(project_id=project.id, prompt="p1", response_a="x", response_b="y", content_hash="h1", gold_choice="a"),
            Item(project_id=project.id, prompt=[{"role": "user", "content": "p2"}], response_a="x", response_b="y", content_hash="h2"),
            Item(project_id=other.id, prompt="p3", response_a="x", response_b="y", content_hash="h3"),
        ]
        s.add_all(items)
        s.flush()
        t0 = dt.datetime(2026, 1, 1, 12)
        s.add_all([
            Annotation(item_id=items[0].id, annotator_id=users[0].id, choice="a", strength=3, shown_swapped=True, duration_ms=1500, created_at=t0),
            Annotation(item_id=items[0].id, annotator_id=users[1].id, choice="b", strength=1, shown_swapped=False, duration_ms=2500, created_at=t0),
            Annotation(item_id=items[1].id, annotator_id=users[0].id, choice="tie", strength=None, shown_swapped=False, created_at=t0),
            Annotation(item_id=items[2].id, annotator_id=users[1].id, choice="a", strength=2, created_at=t0),
        ])
        return [i.id for i in items]


def test_load_annotations_on_both_databases(engine):
    ids = seed_project(engine)
    annotations = ag.load_annotations(engine, "agree")
    assert list(annotations.columns) == ag.ANNOTATION_COLUMNS
    assert len(annotations) == 3 and set(annotations["item_id"]) == {ids[0], ids[1]}  # the other project's annotation is not here
    first = annotations.iloc[0]
    assert (first["annotator"], first["choice"], first["strength"], bool(first["shown_swapped"])) == ("ann", "a", 3, True)
    assert first["duration_ms"] == 1500 and first["gold_choice"] == "a"
    assert first["created_at"] == pd.Timestamp("2026-01-01 12:00")
    assert pd.isna(annotations.iloc[2]["strength"]) and pd.isna(annotations.iloc[2]["gold_choice"])
    report = ag.project_report(annotations, bootstrap=0)
    assert report["n_items"] == 2 and report["n_labels"] == 3
    rows = {r["annotator"]: r for r in report["annotators"]}
    assert rows["ann"]["gold_accuracy"] == 1.0 and rows["bob"]["gold_accuracy"] == 0.0
    assert ag.load_items(engine, [ids[1]]).loc[ids[1], "prompt"] == [{"role": "user", "content": "p2"}]
    with pytest.raises(AnnotationError, match="no project named 'nope'"):
        ag.load_annotations(engine, "nope")


# --------------------------------------------------------------------------- CLI


def rlhf(*args):
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=120)


def rlhf_in_process(capsys, monkeypatch, *args):
    """`rlhf` through app.cli.main in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from app.cli import main

    monkeypatch.setattr(sys, "argv", ["rlhf", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


# the CLI is a thin shell over what the tests above check on both databases; SQLite is enough here
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_labels_json(tmp_path, settings):
    rows = ["item_id,annotator,label"] + [f"{u},c{c},{int(KRIPPENDORFF_C[c, u])}" for c in range(4) for u in range(12) if not np.isnan(KRIPPENDORFF_C[c, u])]
    path = write(tmp_path, "\n".join(rows) + "\n")
    proc = rlhf("agreement", "--labels", str(path), "--level", "ordinal", "--json", "--bootstrap", "200", "--min-shared", "5")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("n_items", "n_annotators", "n_labels", "percent_agreement", "fleiss_kappa", "krippendorff_alpha", "cohen_kappa", "annotators", "intervals"):
        assert key in out
    assert round(out["krippendorff_alpha"]["ordinal"], 3) == 0.815 and round(out["krippendorff_alpha"]["nominal"], 3) == 0.743
    assert out["n_items"] == 12 and out["n_annotators"] == 4 and out["n_labels"] == 41
    assert len(out["intervals"]["krippendorff_alpha"]["ordinal"]) == 2
    assert set(out["cohen_kappa"]) >= {"mean", "pairs"} and len(out["annotators"]) == 4


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_project_text_and_errors(tmp_path, settings, capsys, monkeypatch):
    from annotation.store import init_db

    seed_project(init_db(settings.db_url))
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "agreement", "--project", "agree", "--bootstrap", "20")
    assert rc == 0, err
    assert "percent agreement" in out and "most disputed items" in out
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "agreement", "--project", "agree", "--json", "--bootstrap", "0")
    report = json.loads(out)
    # one item with two labels (a vs b): Fleiss' kappa is -1, and the single-label item is left out
    assert report["n_labels"] == 3 and report["fleiss_kappa"] == pytest.approx(-1.0)
    assert report["disputed"][0]["votes"] == "a x1, b x1"
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "agreement", "--project", "nope")
    assert rc == 2 and "no project named 'nope'" in err
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "agreement")
    assert rc == 2 and "exactly one of --project" in err
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "agreement", "--project", "agree", "--level", "ordinal")
    assert rc == 2 and "--level applies to --labels" in err
    bad = write(tmp_path, "item_id,annotator,label\n1,x,a\n1,x,b\n", "bad.csv")
    rc, out, err = rlhf_in_process(capsys, monkeypatch, "agreement", "--labels", str(bad))
    assert rc == 2 and f"{bad}:3" in err and "annotator" in err


# --------------------------------------------------------------------------- Quality page


@pytest.fixture
def quality_store(tmp_path, monkeypatch):
    """A SQLite store with a researcher, an annotator and project 'agree' with 40 items x 3 annotators."""
    from annotation.auth import create_user
    from annotation.store import Annotation, Item, init_db, transaction
    from app import settings as settings_mod

    db_url = f"sqlite:///{tmp_path / 'rlhf.db'}"
    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RLHF_DB_URL", db_url)
    monkeypatch.delenv("RLHF_CONFIG", raising=False)
    settings_mod.get_settings.cache_clear()
    engine = init_db(db_url)
    seed_project(engine)
    rng = np.random.default_rng(0)
    with transaction(engine) as s:
        from annotation.projects import get_project

        project = get_project(s, "agree")
        people = [create_user(s, name, None) for name in ("cat", "dan", "eve")]
        ids = {u.username: u.id for u in people}
        ids["res"] = create_user(s, "res", "pw-research", "researcher").id
        ids["ann1"] = create_user(s, "ann1", "pw-annotate", "annotator").id
        for i in range(40):
            item = Item(project_id=project.id, prompt=f"<script>alert({i})</script> question {i}", response_a="yes",
                        response_b="no", content_hash=f"q{i}")
            s.add(item)
            s.flush()
            truth = "a" if i % 2 else "b"
            for who in ("cat", "dan", "eve"):
                choice = truth if rng.random() < 0.8 else str(rng.choice(["a", "b", "tie"]))
                s.add(Annotation(item_id=item.id, annotator_id=ids[who], choice=choice, strength=int(rng.integers(1, 4)),
                                 shown_swapped=bool(rng.random() < 0.5), duration_ms=int(rng.integers(2000, 9000)),
                                 created_at=dt.datetime(2026, 1, 1 + i % 5, 10)))
    yield engine, ids
    settings_mod.get_settings.cache_clear()
    engine.dispose()


def open_quality(engine, user_id):
    from streamlit.testing.v1 import AppTest

    from browser_helpers import set_login

    at = AppTest.from_file(str(QUALITY_PAGE), default_timeout=60)
    set_login(at, engine, user_id)
    return at.run()


def test_quality_page_for_researchers(quality_store):
    engine, ids = quality_store
    at = open_quality(engine, ids["res"])
    assert not at.exception, at.exception
    report = ag.project_report(ag.load_annotations(engine, "agree"), bootstrap=1000)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Percent agreement"] == f"{report['percent_agreement']:.3f}"
    assert metrics["Krippendorff α ordinal"] == f"{report['krippendorff_alpha']['ordinal']:.3f}"
    frames = [f.value for f in at.dataframe]
    annotators = next(f for f in frames if "Agrees with others" in f.columns)
    assert set(annotators["Annotator"]) == {"ann", "bob", "cat", "dan", "eve"}
    disputed = next(f for f in frames if "votes" in f.columns)
    assert disputed["agreement"].iloc[0] == min(d["agreement"] for d in ag.disputed_items(ag.load_annotations(engine, "agree"), top=50))
    # item text is shown as plain text, script tags and all, never as HTML
    assert any("<script>alert(" in t.value for t in at.text)
    assert not any("<script>" in (m.value or "") for m in at.markdown)


def test_quality_page_refuses_annotators(quality_store):
    engine, ids = quality_store
    at = open_quality(engine, ids["ann1"])
    assert len(at.error) == 1 and "This page is for researchers" in at.error[0].value and not at.metric


def test_quality_page_on_a_one_annotation_per_item_project_says_why_once(tmp_path, monkeypatch):
    """With k=1 every agreement metric is undefined for one reason: one message naming the metrics in
    words, not the same message four times under raw keys."""
    from annotation.auth import create_user
    from annotation.projects import create_project
    from annotation.store import Annotation, Item, init_db, transaction
    from app import settings as settings_mod

    db_url = f"sqlite:///{tmp_path / 'rlhf.db'}"
    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RLHF_DB_URL", db_url)
    settings_mod.get_settings.cache_clear()
    engine = init_db(db_url)
    with transaction(engine) as s:
        project = create_project(s, "solo", overlap=1)
        res = create_user(s, "res", "pw-research", "researcher").id
        people = [create_user(s, f"a{i}", None).id for i in range(3)]
        for i, who in enumerate(people * 2):
            item = Item(project_id=project.id, prompt=f"q{i}", response_a="x", response_b="y", content_hash=f"h{i}")
            s.add(item)
            s.flush()
            s.add(Annotation(item_id=item.id, annotator_id=who, choice="a", shown_swapped=False))
    at = open_quality(engine, res)
    assert not at.exception, at.exception
    infos = [i.value for i in at.info if "undefined" in i.value]
    assert len(infos) == 1 and "Percent agreement" in infos[0] and "Cohen's kappa" in infos[0], infos
    assert not any("fleiss_kappa" in i.value or "percent_agreement" in i.value for i in at.info)
    settings_mod.get_settings.cache_clear()
