"""Quality: can a project's labels be trusted, and which annotators and items need a look.

Agreement metrics with bootstrap intervals, a heatmap of pairwise Cohen's kappa, the per-annotator
table with outliers marked, position-bias and tie-rate charts, agreement over time, the most
disputed items with their votes and, where items name the sources (models) of their responses, a
leaderboard of those sources with bootstrap intervals. Every figure comes from annotation.agreement
and annotation.leaderboard, the same functions as `rlhf agreement` and `rlhf leaderboard`; this
page only renders them. Where the project has an active reward model, "Reward model as a second
opinion" compares it with the annotators (annotation.second_opinion, as `rlhf agreement
--with-model`); its scores are computed only when asked, with a button, and kept per model and project.
"""

from __future__ import annotations

import streamlit as st

from app.settings import get_settings
from app.ui import get_engine, page_user, user_caption

user = page_user("researcher")

import altair as alt  # noqa: E402  (after the role check)
import pandas as pd  # noqa: E402

from annotation import agreement as ag  # noqa: E402
from annotation import leaderboard as lb  # noqa: E402
from annotation import second_opinion as so  # noqa: E402
from annotation.errors import AnnotationError  # noqa: E402
from annotation.browse import list_projects, prompt_text  # noqa: E402
from annotation.selection import suggestion_effect  # noqa: E402
from reward import second_opinion as rso  # noqa: E402

DISPUTED_SHOWN = 10
CACHE_SECONDS = 60

engine = get_engine()


METRIC_NAMES = {"percent_agreement": "Percent agreement", "fleiss_kappa": "Fleiss' kappa", "cohen_kappa": "Cohen's kappa",
                "krippendorff_alpha": "Krippendorff's alpha", "krippendorff_alpha.nominal": "Krippendorff's alpha (nominal)",
                "krippendorff_alpha.ordinal": "Krippendorff's alpha (ordinal)"}


def notes_by_message(notes: dict) -> dict[str, list[str]]:
    """The report's notes grouped by message, each metric under its readable name: on a k=1 project
    every metric is undefined for the same reason, which is one message, not four raw keys."""
    grouped: dict[str, list[str]] = {}
    for key, note in notes.items():
        grouped.setdefault(note, []).append(METRIC_NAMES.get(key, key))
    return grouped

st.title("Quality")
user_caption(user)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def project_quality(db_url: str, project: str, resamples: int) -> tuple[pd.DataFrame, dict]:
    # Cached for a minute per (store, project, resamples): reruns from widget clicks reuse it.
    annotations = ag.load_annotations(get_engine(), project)
    return annotations, ag.project_report(annotations, bootstrap=resamples)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def project_sources(db_url: str, project: str, resamples: int, ties: str) -> tuple[int, dict | None, str | None]:
    # (items with two sources, leaderboard or None, why there is none), cached like project_quality.
    n_sourced = lb.count_sourced_items(get_engine(), project)
    if not n_sourced:
        return 0, None, None
    try:
        return n_sourced, lb.project_leaderboard(get_engine(), project, bootstrap=resamples, ties=ties), None
    except AnnotationError as exc:
        return n_sourced, None, str(exc)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def active_reward_model(db_url: str, project: str) -> dict | None:
    ref = rso.active_reward_model(get_engine(), project)
    return ref.as_dict() if ref else None


@st.cache_data(show_spinner=False, max_entries=4)
def model_scores(db_url: str, project: str, model_id: int) -> dict:
    # The expensive part (every annotated item through the model): kept per (store, project, model)
    # until "Score again"; reached only after the button was pressed in this session.
    return rso.score_project(get_engine(), project, model_id)


projects = list_projects(engine)
if not projects:
    st.info("No projects yet: create one on the Projects page.")
    st.stop()
c1, c2 = st.columns([3, 1])
name = c1.selectbox("Project", [p.name for p in projects], key="quality_project")
resamples = c2.number_input("Bootstrap resamples", min_value=0, max_value=5000, value=1000, step=500, key="quality_resamples")
with st.spinner("Computing agreement…"):
    annotations, report = project_quality(get_settings().db_url, name, int(resamples))

if report["n_labels"] == 0:
    st.info("No annotations in this project yet.")
    st.stop()


def show(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def interval(ci) -> str | None:
    return None if not ci else f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]"


st.caption(
    f"{report['n_items']} items ({report['n_items_multi']} with two or more labels), "
    f"{report['n_annotators']} annotators, {report['n_labels']} labels"
)
ci = report["intervals"]
m = st.columns(5)
m[0].metric("Percent agreement", show(report["percent_agreement"]), help=interval(ci["percent_agreement"]))
m[1].metric("Cohen's kappa (mean)", show(report["cohen_kappa"]["mean"]), help=interval(ci["cohen_kappa"]))
m[2].metric("Fleiss' kappa", show(report["fleiss_kappa"]), help=interval(ci["fleiss_kappa"]))
m[3].metric("Krippendorff α nominal", show(report["krippendorff_alpha"]["nominal"]), help=interval(ci["krippendorff_alpha"]["nominal"]))
m[4].metric("Krippendorff α ordinal", show(report["krippendorff_alpha"]["ordinal"]), help=interval(ci["krippendorff_alpha"]["ordinal"]))
intervals = {
    "percent agreement": ci["percent_agreement"], "Cohen's kappa": ci["cohen_kappa"], "Fleiss' kappa": ci["fleiss_kappa"],
    "alpha nominal": ci["krippendorff_alpha"]["nominal"], "alpha ordinal": ci["krippendorff_alpha"]["ordinal"],
}
shown = [f"{k} [{v[0]:.3f}, {v[1]:.3f}]" for k, v in intervals.items() if v]
if shown:
    st.caption(f"95% bootstrap intervals ({report['bootstrap']['resamples']} resamples of items): " + "; ".join(shown))
for note, metrics in notes_by_message(report["notes"]).items():
    st.info(f"{', '.join(metrics)}: {note}")
st.caption(
    f"Ordinal scale: {report['ordinal_scale']['values']}; {report['ordinal_scale']['excluded']} labels left out "
    f"({report['ordinal_scale']['excluded_why']})."
)

effect = suggestion_effect(engine, name)
if effect is not None:
    shown, unshown = effect["shown"], effect["not_shown"]
    text = (f"Reward-model suggestions were shown with {shown['n']} answers: {shown['chose_model_side']:.0%} of them chose "
            "the model's side")
    if unshown["n"]:
        text += (f", against {unshown['chose_model_side']:.0%} of {unshown['n']} answers given without one (difference "
                 f"{effect['difference']:+.2f}, 95% CI [{effect['interval'][0]:+.2f}, {effect['interval'][1]:+.2f}]). "
                 "A large difference means the suggestions sway people.")
    st.info(text, icon=":material/smart_toy:")

ties = st.session_state.get("quality_ties", "half")
n_sourced, board, no_board = project_sources(get_settings().db_url, name, int(resamples), ties)
reward_model = active_reward_model(get_settings().db_url, name)
tabs = st.tabs(["Annotators", "Over time", "Disputed items"] + (["Leaderboard"] if n_sourced else [])
               + (["Reward model as a second opinion"] if reward_model else []))
annotators_tab, time_tab, disputed_tab = tabs[:3]

# ----------------------------------------------------------------------------- annotators

with annotators_tab:
    table = pd.DataFrame(report["annotators"])
    st.subheader("Per annotator")
    flagged = table[table["outlier"]]
    if len(flagged):
        st.warning("Marked: " + "; ".join(f"{r.annotator} ({r.outlier_reasons})" for r in flagged.itertuples()))
    columns = {
        "annotator": "Annotator", "outlier_reasons": "Marked", "count": "Labels", "loo_agreement": "Agrees with others",
        "gold_accuracy": "Gold accuracy", "n_gold": "Gold items", "left_rate": "Chose left", "position_p": "Left bias p",
        "tie_rate": "Ties", "median_duration_ms": "Median ms",
    }
    rate = st.column_config.NumberColumn(format="%.3f")
    st.dataframe(
        table.sort_values(["outlier", "loo_agreement"], ascending=[False, True])[list(columns)].rename(columns=columns),
        hide_index=True, width="stretch", key="quality_annotators",
        column_config={
            "Agrees with others": rate, "Gold accuracy": rate, "Chose left": rate, "Ties": rate,
            "Left bias p": st.column_config.NumberColumn(format="%.1e"),
            "Median ms": st.column_config.NumberColumn(format="%d"),
        },
    )
    st.caption(
        "Agrees with others: share of labels equal to the majority of the item's other annotators (items where "
        "they tie left out). Chose left: share of A/B choices for the response shown on the left; "
        "Left bias p: binomial test against 0.5."
    )

    pairs = pd.DataFrame(report["cohen_kappa"]["pairs"])
    st.subheader("Cohen's kappa between annotators")
    if pairs.empty or pairs["kappa"].isna().all():
        # The reason was given once above when every metric is undefined; here only if it is this table's own.
        if report["n_items_multi"]:
            st.info(report["notes"].get("cohen_kappa", "No pair of annotators shares enough items."))
        else:
            st.caption("No pair of annotators shares an item.")
    else:
        both = pd.concat([pairs, pairs.rename(columns={"annotator_1": "annotator_2", "annotator_2": "annotator_1"})])
        base = alt.Chart(both).encode(
            x=alt.X("annotator_1:N", title=None), y=alt.Y("annotator_2:N", title=None),
            tooltip=["annotator_1", "annotator_2", alt.Tooltip("kappa:Q", format=".3f"), "n_items"],
        )
        heat = base.mark_rect().encode(color=alt.Color("kappa:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue")))
        labels = base.mark_text(fontSize=11).encode(text=alt.Text("kappa:Q", format=".2f"))
        st.altair_chart((heat + labels).properties(height=36 * report["n_annotators"] + 40), width="stretch")
        st.caption(f"Pairs sharing at least {report['cohen_kappa']['min_shared']} items.")

    left, right = st.columns(2)
    table["biased"] = table["outlier_reasons"].str.contains("position bias")
    table["many_ties"] = table["outlier_reasons"].str.contains("many ties")

    def marked(flag: str) -> alt.Color:
        return alt.condition(f"datum.{flag}", alt.value("#d62728"), alt.value("#4c78a8"))

    bars = alt.Chart(table).encode(y=alt.Y("annotator:N", title=None))
    with left:
        st.subheader("Position bias")
        half = alt.Chart(pd.DataFrame({"x": [0.5]})).mark_rule(strokeDash=[4, 4]).encode(x="x:Q")
        chart = bars.mark_bar().encode(
            x=alt.X("left_rate:Q", title="share of A/B choices for the left response", scale=alt.Scale(domain=[0, 1])),
            color=marked("biased"),
            tooltip=["annotator", alt.Tooltip("left_rate:Q", format=".3f"), "n_sided", alt.Tooltip("position_p:Q", format=".2g")],
        )
        st.altair_chart(chart + half, width="stretch")
    with right:
        st.subheader("Tie rate")
        chart = bars.mark_bar().encode(
            x=alt.X("tie_rate:Q", title="share of labels that are ties", scale=alt.Scale(domain=[0, 1])),
            color=marked("many_ties"),
            tooltip=["annotator", alt.Tooltip("tie_rate:Q", format=".3f"), "count"],
        )
        st.altair_chart(chart, width="stretch")
    st.caption("Red: marked for this reason.")

# ----------------------------------------------------------------------------- over time

with time_tab:
    t1, t2 = st.columns(2)
    freq = t1.radio("Period", ["day", "week"], horizontal=True, key="quality_freq")
    per_annotator = t2.checkbox("One line per annotator", key="quality_per_annotator")
    series = ag.agreement_over_time(annotations, {"day": "D", "week": "W"}[freq], by_annotator=per_annotator)
    if series.empty:
        st.info("No item has two or more labels yet.")
    else:
        line = alt.Chart(series).mark_line(point=True).encode(
            x=alt.X("period:T", title=None),
            y=alt.Y("agreement:Q", title="agreement with the others on the item", scale=alt.Scale(domain=[0, 1])),
            tooltip=[alt.Tooltip("period:T"), *(["annotator"] if per_annotator else []),
                     alt.Tooltip("agreement:Q", format=".3f"), "n_labels"],
        )
        if per_annotator:
            line = line.encode(color="annotator:N")
        st.altair_chart(line, width="stretch")
        st.caption("Each label counts by when it was given: the share of the other annotators of that item who chose the same.")

# ----------------------------------------------------------------------------- disputed items

with disputed_tab:
    disputed = ag.disputed_items(annotations, "choice", DISPUTED_SHOWN)
    if not disputed:
        st.info("No item has two or more labels yet.")
    else:
        st.dataframe(pd.DataFrame(disputed), hide_index=True, width="stretch", key="quality_disputed")
        details = ag.load_items(engine, [d["item_id"] for d in disputed])
        vote_columns = ["annotator", "choice", "strength", "shown_swapped", "duration_ms", "created_at"]
        for row in disputed:
            item_id = row["item_id"]
            with st.expander(f"Item {item_id}: agreement {row['agreement']:.2f}, votes {row['votes']}"):
                if item_id in details.index:
                    item = details.loc[item_id]
                    # item text is untrusted: plain text only, never HTML or markdown
                    st.text("Prompt:\n" + prompt_text(item["prompt"]))
                    a, b = st.columns(2)
                    a.text("Response A:\n" + str(item["response_a"]))
                    b.text("Response B:\n" + str(item["response_b"]))
                    if item["gold_choice"]:
                        st.caption(f"Gold: {item['gold_choice']}")
                st.dataframe(annotations.loc[annotations["item_id"] == item_id, vote_columns], hide_index=True, width="stretch")

# ----------------------------------------------------------------------------- leaderboard of sources

if n_sourced:
    with tabs[3]:
        st.subheader("Leaderboard")
        st.radio(
            "Ties", ["half", "ignore"], horizontal=True, key="quality_ties",
            help="half: a tie is half a win for each side (Chatbot Arena's rule); ignore: ties are left out.",
        )
        if board is None:
            st.info(no_board)
        else:
            ranked = pd.DataFrame(board["ratings"])
            ranked.insert(0, "rank", range(1, len(ranked) + 1))
            columns = {
                "rank": "Rank", "source": "Source", "rating": "Rating", "low": "Low", "high": "High",
                "battles": "Battles", "wins": "Wins", "losses": "Losses", "ties": "Ties",
            }
            points = st.column_config.NumberColumn(format="%.1f")
            st.dataframe(
                ranked[list(columns)].rename(columns=columns), hide_index=True, width="stretch", key="quality_leaderboard",
                column_config={"Rating": points, "Low": points, "High": points},
            )
            order = list(ranked["source"])
            y = alt.Y("source:N", sort=order, title=None)
            tooltip = ["source", alt.Tooltip("rating:Q", format=".1f"), alt.Tooltip("low:Q", format=".1f"),
                       alt.Tooltip("high:Q", format=".1f"), "battles"]
            dots = alt.Chart(ranked).mark_point(filled=True, size=70).encode(
                x=alt.X("rating:Q", title="rating (Elo scale)", scale=alt.Scale(zero=False)), y=y, tooltip=tooltip,
            )
            chart = dots
            if ranked["low"].notna().any():
                bars = alt.Chart(ranked.dropna(subset=["low", "high"])).mark_rule(strokeWidth=2).encode(
                    x="low:Q", x2="high:Q", y=y, tooltip=tooltip,
                )
                chart = bars + dots
            st.altair_chart(chart.properties(height=32 * len(ranked) + 40), width="stretch")
            boot = board["bootstrap"]
            st.caption(
                f"{board['n_battles']} battles among {board['n_sources']} sources, from {n_sourced} items whose responses "
                f"name two sources. Bradley-Terry ratings, rating {board['method']['centre']}; 400 points is a factor "
                f"of 10 in the odds of winning."
                + (f" Bars: {boot['confidence']:.0%} bootstrap intervals ({boot['resamples']} resamples of annotations)."
                   if boot["resamples"] else "")
            )
            for key, note in board["notes"].items():
                st.info(f"{key}: {note}")

# ----------------------------------------------------------------------------- reward model as a second opinion

if reward_model is not None:
    with tabs[-1]:
        # model names are typed by people: plain text
        st.text(f"Active reward model #{reward_model['id']} {reward_model['name']}"
                f"{' (an ensemble: the mean of its members)' if reward_model['ensemble'] else ''}")
        st.caption("P(A preferred) = sigmoid(r_A − r_B), Bradley-Terry. The model's labels are never shown to annotators.")
        scored_key = (get_settings().db_url, name, reward_model["id"])
        scored_here = st.session_state.setdefault("quality_model_scored", set())
        b1, b2 = st.columns([1, 3])
        if scored_key not in scored_here:
            if b1.button("Score with the model", key="quality_model_score"):
                scored_here.add(scored_key)
            else:
                st.info("Scoring runs every annotated item through the model; press the button to start.")
        elif b1.button("Score again", key="quality_model_rescore", help="After new annotations or a retrained model file."):
            model_scores.clear()
        if scored_key in scored_here:
            with st.spinner("Scoring items with the reward model…"):
                scored = model_scores(*scored_key)
            threshold = b2.slider("Label-noise threshold: the model's P for the other side", 0.55, 1.0,
                                  so.DEFAULT_NOISE_THRESHOLD, 0.01, key="quality_noise_threshold")
            opinion = so.model_report(annotations, scored["opinion"], scored["items"], bootstrap=int(resamples),
                                      noise_threshold=threshold, min_shared=report["cohen_kappa"]["min_shared"])
            proj = opinion["project"]
            mm = st.columns(4)
            mm[0].metric("Agreement with the majority", show(proj["agreement"]), help=interval(proj["agreement_interval"]))
            mm[1].metric("Cohen's kappa with the majority", show(proj["kappa"]), help=interval(proj["interval"]))
            mm[2].metric("Accuracy on a/b items", show(proj["decisive"]["accuracy"]))
            mm[3].metric("Items compared", proj["n_items"])
            for key, note in opinion["notes"].items():
                st.info(f"{key}: {note}")
            st.subheader("The model as one more rater")
            rows = pd.DataFrame(opinion["annotators"])
            rater = opinion["as_rater"]
            if rater:
                rows = pd.concat([rows, pd.DataFrame([{
                    "annotator": "(model vs the majority)", "n_items": proj["n_items"], "kappa": proj["kappa"],
                    "interval": proj["interval"], "agreement": proj["agreement"]}])], ignore_index=True)
            rows["kappa 95% CI"] = rows["interval"].map(lambda ci: "" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]")
            columns = {"annotator": "Annotator", "n_items": "Shared items", "kappa": "Kappa with the model",
                       "kappa 95% CI": "Kappa 95% CI", "agreement": "Agreement with the model"}
            rate = st.column_config.NumberColumn(format="%.3f")
            st.dataframe(rows[list(columns)].rename(columns=columns), hide_index=True, width="stretch", key="quality_model_raters",
                         column_config={"Kappa with the model": rate, "Agreement with the model": rate})
            st.caption(
                f"{opinion['n_undecided']} items undecided (P(A) within {rso.DEFAULT_MARGIN:g} of 0.5), compared as a tie. "
                f"Kappa for annotators sharing {opinion['min_shared']}+ items with the model."
                + (f" Gold accuracy of the model: {show(rater['gold_accuracy'])} ({rater['n_gold']} items)."
                   if rater and rater["gold_accuracy"] is not None else "")
            )
            noise = opinion["label_noise"]
            st.subheader(f"Label-noise candidates ({noise['n_candidates']})")
            st.caption(f"The model gives the other side P ≥ {threshold:.2f} against a strong human label "
                       f"({noise['strong_majority']}); most confident first. Either the label or the model may be wrong.")
            if noise["items"]:
                listed = pd.DataFrame(noise["items"])[["item_id", "human_label", "votes", "model_label", "p_a", "model_confidence"]]
                st.dataframe(listed, hide_index=True, width="stretch", key="quality_noise")
                for row in noise["items"]:
                    with st.expander(f"Item {row['item_id']}: people {row['human_label']} ({row['votes']}), "
                                     f"model {row['model_label']} with P {row['model_confidence']:.2f}"):
                        # item text is untrusted: plain text only, never HTML or markdown
                        st.text("Prompt:\n" + prompt_text(row.get("prompt", "")))
                        a, b = st.columns(2)
                        a.text(f"Response A (reward {row['reward_a']:.3f}):\n" + str(row.get("response_a", "")))
                        b.text(f"Response B (reward {row['reward_b']:.3f}):\n" + str(row.get("response_b", "")))
