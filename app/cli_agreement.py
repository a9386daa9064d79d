"""`rlhf agreement`: inter-annotator agreement of a project, or of any labels in a CSV.

    rlhf agreement --project demo
    rlhf agreement --project demo --json --bootstrap 2000
    rlhf agreement --labels labels.csv --level ordinal --json    # CSV columns: item_id,annotator,label
    rlhf agreement --project demo --with-model rm-3 --noise-threshold 0.9 --json

Prints percent agreement, Fleiss' kappa, Krippendorff's alpha, Cohen's kappa (mean and per pair),
each with a bootstrap 95% interval over items, the per-annotator table (outliers marked) and the
most disputed items. Everything comes from annotation.agreement; this module only prints it.
With --with-model, a `model` section: the reward model as a second opinion (reward.second_opinion
scores the items, annotation.second_opinion compares): its agreement and kappa with the aggregated
label, with each annotator, and the label-noise candidates.
"""

from __future__ import annotations

from typing import Optional

import typer

from annotation.errors import AnnotationError

from app.cli import JsonOpt, cli, emit, engine

# annotation.second_opinion's defaults, repeated so that `rlhf --help` loads no pandas;
# tests/test_second_opinion.py checks that they agree.
NOISE_THRESHOLD = 0.85


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "" if not ci else f"  [{ci[0]:.3f}, {ci[1]:.3f}]"


def render_rankings(rankings: dict) -> list[str]:
    """The rankings section (items with 3 to 6 responses): Kendall's W and ordinal alpha, with intervals and notes."""
    ci = rankings["intervals"]
    lines = [
        f"rankings: {rankings['n_items']} ranking items ({rankings['n_items_multi']} with two or more rankings), "
        f"{rankings['n_rankings']} rankings by {rankings['n_annotators']} annotators",
        f"Kendall's W (mean)    {_fmt(rankings['kendall_w'])}{_fmt_ci(ci['kendall_w'])}  "
        f"(tie-corrected, over {rankings['kendall_w_items']} items)",
        f"Krippendorff's alpha  {_fmt(rankings['krippendorff_alpha']['ordinal'])}"
        f"{_fmt_ci(ci['krippendorff_alpha']['ordinal'])}  (ordinal, on the ranks)",
    ]
    for key, note in rankings["notes"].items():
        lines.append(f"note: rankings: {key}: {note}")
    return lines


def render_suggestions(effect: dict) -> list[str]:
    """The suggestions line: how often people chose the model's side with and without seeing it."""
    shown, unshown = effect["shown"], effect["not_shown"]
    line = (f"suggestions: chose the model's side in {shown['chose_model_side']:.1%} of {shown['n']} answers given with "
            f"its suggestion shown")
    if unshown["n"]:
        line += (f", {unshown['chose_model_side']:.1%} of {unshown['n']} without; difference "
                 f"{effect['difference']:+.3f}{_fmt_ci(effect['interval'])} (a large one means the suggestions sway people)")
    return [line]


def render_text(report: dict) -> str:
    """The report for people: headline metrics with intervals, notes, annotators, disputed items."""
    ci = report["intervals"]
    lines = [
        f"items: {report['n_items']} ({report['n_items_multi']} with two or more labels)  "
        f"annotators: {report['n_annotators']}  labels: {report['n_labels']}",
        f"percent agreement     {_fmt(report['percent_agreement'])}{_fmt_ci(ci['percent_agreement'])}",
        f"Fleiss' kappa         {_fmt(report['fleiss_kappa'])}{_fmt_ci(ci['fleiss_kappa'])}",
    ]
    for level, value in report["krippendorff_alpha"].items():
        lines.append(f"Krippendorff's alpha  {_fmt(value)}{_fmt_ci(ci['krippendorff_alpha'][level])}  ({level})")
    cohen = report["cohen_kappa"]
    lines.append(
        f"Cohen's kappa (mean)  {_fmt(cohen['mean'])}{_fmt_ci(ci['cohen_kappa'])}  "
        f"({len(cohen['pairs'])} pairs sharing {cohen['min_shared']}+ items)"
    )
    if report["bootstrap"]["resamples"]:
        b = report["bootstrap"]
        lines.append(f"intervals: {b['confidence']:.0%} percentile bootstrap, {b['resamples']} resamples of items")
    for key, note in report["notes"].items():
        lines.append(f"note: {key}: {note}")
    scale = report.get("ordinal_scale")
    if scale and scale["excluded"]:
        lines.append(f"note: ordinal alpha leaves out {scale['excluded']} labels ({scale['excluded_why']})")
    lines.append("")
    lines.append("annotators:")
    for row in report["annotators"]:
        parts = [f"  {row['annotator']}: {row['count']} labels", f"agreement {_fmt(row.get('loo_agreement'))}"]
        if row.get("gold_accuracy") is not None:
            parts.append(f"gold {_fmt(row['gold_accuracy'])} ({row['n_gold']})")
        if row.get("left_rate") is not None:
            parts.append(f"left {_fmt(row['left_rate'])}")
        if row.get("tie_rate") is not None:
            parts.append(f"ties {_fmt(row['tie_rate'])}")
        if row.get("median_duration_ms") is not None:
            parts.append(f"median {row['median_duration_ms'] / 1000:.1f}s")
        if row.get("outlier"):
            parts.append(f"OUTLIER: {row['outlier_reasons']}")
        lines.append(", ".join(parts))
    if "rankings" in report:
        lines += ["", *render_rankings(report["rankings"])]
    if "suggestions" in report:
        lines += ["", *render_suggestions(report["suggestions"])]
    if report.get("disputed"):
        lines.append("")
        lines.append("most disputed items:")
        for row in report["disputed"]:
            lines.append(f"  {row['item_id']}: agreement {_fmt(row['agreement'], 2)}  votes {row['votes']}")
    if report.get("model"):
        lines += ["", *render_model(report["model"])]
    return "\n".join(lines)


def _one_line(text, width: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_model(section: dict) -> list[str]:
    """The `model` section for people: the model against the aggregated label, per annotator, label noise."""
    from annotation.browse import prompt_text

    model, proj, margin = section["model"], section["project"], section["undecided_margin"]
    lines = [
        f"reward model as a second opinion: {'#' + str(model['id']) + ' ' if model['id'] is not None else ''}{model['name']}"
        f"{' (ensemble)' if model['ensemble'] else ''}  {model['path']}",
        f"  scored {section['n_scored']} items; undecided when P(A) is within {margin:g} of 0.5 "
        f"({section['n_undecided']} items; compared as a tie)",
        f"  vs the {proj['aggregation']} label: agreement {_fmt(proj['agreement'])}{_fmt_ci(proj['agreement_interval'])}  "
        f"kappa {_fmt(proj['kappa'])}{_fmt_ci(proj['interval'])}  n {proj['n_items']}  "
        f"(accuracy on a/b items {_fmt(proj['decisive']['accuracy'])}, n {proj['decisive']['n_items']})",
    ]
    rater = section.get("as_rater")
    if rater:
        gold = f", gold {_fmt(rater['gold_accuracy'])} ({rater['n_gold']})" if rater["gold_accuracy"] is not None else ""
        lines.append(f"  model as a rater: agreement with the others {_fmt(rater['loo_agreement'])} "
                     f"({rater['n_compared']} items){gold}, undecided {_fmt(rater['undecided_rate'])}")
    lines.append("  model vs each annotator:")
    for row in section["annotators"]:
        lines.append(f"    {row['annotator']}: kappa {_fmt(row['kappa'])}{_fmt_ci(row['interval'])}, "
                     f"agreement {_fmt(row['agreement'])} on {row['n_items']} items")
    for key, note in section["notes"].items():
        lines.append(f"  note: {key}: {note}")
    noise = section["label_noise"]
    lines.append(f"  label-noise candidates: {noise['n_candidates']} (model P >= {noise['threshold']:g} for the other side "
                 f"of a strong human label: {noise['strong_majority']})")
    for row in noise["items"]:
        lines.append(f"    {row['item_id']}: people {row['human_label']} ({row['votes']}), model {row['model_label']} "
                     f"P(A)={row['p_a']:.3f}  prompt: {_one_line(prompt_text(row.get('prompt', '')))}")
    return lines


@cli.command()
def agreement(
    project: Optional[str] = typer.Option(None, "--project", help="Project whose annotations to measure."),
    labels: Optional[str] = typer.Option(None, "--labels", help="CSV file with columns item_id,annotator,label instead of a project."),
    level: Optional[str] = typer.Option(
        None, "--level", help="With --labels: nominal (labels are categories; default) or ordinal/interval (labels are numbers)."
    ),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of items for the 95% intervals; 0 for none."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the bootstrap."),
    min_shared: int = typer.Option(10, "--min-shared", help="Items two annotators must share for their Cohen's kappa."),
    top: int = typer.Option(10, "--top", help="How many of the most disputed items (and label-noise candidates) to list."),
    with_model: Optional[str] = typer.Option(
        None, "--with-model", metavar="ID|NAME|DIR",
        help="With --project: a reward model (registered id or name, or a model directory) as a second opinion; adds a `model` section.",
    ),
    noise_threshold: float = typer.Option(
        NOISE_THRESHOLD, "--noise-threshold",
        help="With --with-model: list an item as a label-noise candidate when the model gives the other side at least this P "
             "against a strong human majority (2/3 of 3+ annotations).",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Agreement between annotators: percent agreement, Cohen's, Fleiss' kappa, Krippendorff's alpha, per annotator;
    for a project with ranking items also Kendall's W and ordinal alpha on the rankings ("rankings" in --json)."""
    from annotation import agreement as ag

    if (project is None) == (labels is None):
        raise AnnotationError("give exactly one of --project NAME or --labels FILE.csv")
    if top < 0:
        raise AnnotationError(f"--top must be 0 or more, got {top}")
    if with_model is not None:
        from annotation.second_opinion import check_options
        from reward.second_opinion import resolve_model

        if project is None:
            raise AnnotationError("--with-model applies to --project only; it scores the project's items")
        check_options(noise_threshold)
        resolve_model(engine(), project, with_model)  # a wrong name fails now, not after the annotators' report
    options = {"bootstrap": bootstrap, "seed": seed, "min_shared": min_shared}
    if project is not None:
        if level is not None:
            raise AnnotationError("--level applies to --labels only; a project's report has nominal and ordinal alpha both")
        annotations = ag.load_annotations(engine(), project)
        report = ag.project_report(annotations, **options)
        rankings = ag.project_ranking_report(engine(), project, bootstrap=bootstrap, seed=seed)
        if rankings is not None:
            report["rankings"] = rankings
        from annotation.selection import suggestion_effect

        effect = suggestion_effect(engine(), project)
        if effect is not None:
            report["suggestions"] = effect
        label = "choice"
    else:
        level = level or "nominal"
        ag.check_level(level)
        annotations = ag.read_labels_csv(labels, level)
        report = ag.labels_report(annotations, level, **options)
        label = "label"
    report["source"] = {"project": project} if project is not None else {"labels": labels, "level": level}
    report["disputed"] = ag.disputed_items(annotations, label, top)
    if with_model is not None:
        from reward.second_opinion import second_opinion

        # the loaded annotations are passed on: the model is compared with the very labels reported above
        report["model"] = second_opinion(engine(), project, with_model, annotations=annotations, noise_threshold=noise_threshold,
                                         top=top, **options)
    emit(report, as_json, render_text(report))
