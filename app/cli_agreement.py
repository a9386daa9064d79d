"""`rlhf agreement`: inter-annotator agreement of a project, or of any labels in a CSV.

    rlhf agreement --project demo
    rlhf agreement --project demo --json --bootstrap 2000
    rlhf agreement --labels labels.csv --level ordinal --json    # CSV columns: item_id,annotator,label

Prints percent agreement, Fleiss' kappa, Krippendorff's alpha, Cohen's kappa (mean and per pair),
each with a bootstrap 95% interval over items, the per-annotator table (outliers marked) and the
most disputed items. Everything comes from annotation.agreement; this module only prints it.
"""

from __future__ import annotations

from typing import Optional

import typer

from annotation.errors import AnnotationError

from app.cli import JsonOpt, cli, emit, engine


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "" if not ci else f"  [{ci[0]:.3f}, {ci[1]:.3f}]"


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
    if report.get("disputed"):
        lines.append("")
        lines.append("most disputed items:")
        for row in report["disputed"]:
            lines.append(f"  {row['item_id']}: agreement {_fmt(row['agreement'], 2)}  votes {row['votes']}")
    return "\n".join(lines)


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
    top: int = typer.Option(10, "--top", help="How many of the most disputed items to list."),
    as_json: bool = JsonOpt,
) -> None:
    """Agreement between annotators: percent agreement, Cohen's, Fleiss' kappa, Krippendorff's alpha, per annotator."""
    from annotation import agreement as ag

    if (project is None) == (labels is None):
        raise AnnotationError("give exactly one of --project NAME or --labels FILE.csv")
    if top < 0:
        raise AnnotationError(f"--top must be 0 or more, got {top}")
    options = {"bootstrap": bootstrap, "seed": seed, "min_shared": min_shared}
    if project is not None:
        if level is not None:
            raise AnnotationError("--level applies to --labels only; a project's report has nominal and ordinal alpha both")
        votes = ag.load_votes(engine(), project)
        report = ag.project_report(votes, **options)
        label = "choice"
    else:
        level = level or "nominal"
        ag.check_level(level)
        votes = ag.read_labels_csv(labels, level)
        report = ag.labels_report(votes, level, **options)
        label = "label"
    report["source"] = {"project": project} if project is not None else {"labels": labels, "level": level}
    report["disputed"] = ag.disputed_items(votes, label, top)
    emit(report, as_json, render_text(report))
