"""`rlhf import` and `rlhf export`: moving preference data in and out of a project.

    rlhf import ../shared/data/hh-rlhf-harmless/dev.jsonl --project hh
    rlhf import data/samples/prompts.jsonl --project demo --format prompts
    rlhf import pairs.parquet --project hh --json
    rlhf import ultrafeedback_dir/ --project uf --split train_prefs
    rlhf export --project hh --format trl -o out.jsonl --split train
    rlhf export --project hh --format annotations -o audit.parquet --json
    rlhf export --project ranked --format trl -o pairs.jsonl --ranking-pairs adjacent --margin-from rank-gap

Thin shells over annotation.io; bad input comes back as an AnnotationError that app.cli.main
prints as "error: FILE:LINE: field ...: problem; expected ..." with exit code 2 (FILE:row N for
Parquet, DIR:SPLIT/row N for a datasets directory).
"""

from __future__ import annotations

from typing import Optional

import typer

from annotation.io.formats import FORMATS
from annotation.usecases import ExportSpec
from app.cli import JsonOpt, cli, emit, engine
from app.options import spec_options


@cli.command("import")
def import_cmd(
    path: str = typer.Argument(..., help="JSONL file, Parquet file, or datasets directory (Dataset/DatasetDict.save_to_disk)."),
    project: str = typer.Option(..., "--project", help="Project to import into; created with default settings if missing."),
    format: str = typer.Option("auto", "--format", help="auto (detect from the first row) or one of: " + ", ".join(FORMATS) + "."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split of a datasets DatasetDict directory (default: every split)."),
    source: str = typer.Option("import", "--source", help="Name of the annotator account labelled lines are recorded under (prefixed 'import:')."),
    max_field_chars: Optional[int] = typer.Option(None, "--max-field-chars", help="Longest prompt or response accepted (default: the max_field_chars setting)."),
    as_json: bool = JsonOpt,
) -> None:
    """Import a JSONL or Parquet file or a datasets directory into a project; nothing is written unless every row is valid."""
    from annotation.io import import_file
    from annotation.io.formats import check_max_field_chars
    from app.jobs import queue_rescore
    from app.settings import get_settings

    check_max_field_chars(max_field_chars)  # before the store is opened
    if max_field_chars is None:
        max_field_chars = get_settings().max_field_chars
    eng = engine()
    report = import_file(eng, path, project, format=format, source_annotator=source, max_field_chars=max_field_chars,
                         split=split)
    skipped = sum(report.skipped.values())
    rows = "lines" if report.container == "jsonl" else "rows"
    splits = f", splits {', '.join(report.splits)}" if report.splits else ""
    lines = [
        f"imported {path} ({report.format}, {report.container}{splits}) into project '{project}': {report.lines} {rows}",
        f"  items added: {report.items_added}" + (f" ({report.ranking_items_added} to rank)" if report.ranking_items_added else "")
        + f", prompts added: {report.prompts_added}, annotations added: {report.annotations_added}",
        f"  already present: {report.duplicates}, skipped: {skipped}",
    ]
    lines += [f"    {reason}: {n}" for reason, n in sorted(report.skipped.items())]
    payload = report.as_dict()
    payload["score_job"] = queue_rescore(eng, project) if report.items_added else None
    if payload["score_job"]:
        lines.append(f"  queued job {payload['score_job']} to score the new items (uncertainty selection)")
    emit(payload, as_json, "\n".join(lines))


@cli.command("export")
@spec_options(ExportSpec, "project", "format", "aggregation", "min_agreement", "min_confidence", "split", "test_fraction",
              "margin_from", "ranking_pairs", required=("project", "format"))
def export_cmd(
    output: str = typer.Option(..., "-o", "--output", help="File to write; .parquet writes Parquet, anything else JSONL."),
    parquet: bool = typer.Option(False, "--parquet", help="Write Parquet whatever the file name."),
    as_json: bool = JsonOpt,
    **options,
) -> None:
    """Export a project's pairs (aggregated labels) or its raw annotations, atomically."""
    from pathlib import Path

    from annotation.io.exporter import check_output
    from annotation.runs import RunContext
    from annotation.usecases import export

    # Every option is checked before the store is opened, so a typo costs no connection and no file.
    spec = ExportSpec(**options, filename=Path(output).name, parquet=True if parquet else None).validate()
    out = check_output(output)
    report = export(spec, RunContext(output_dir=out.parent, engine=engine())).metrics
    what = "annotations" if spec.format == "annotations" else "pairs"
    lines = [f"exported {report['exported']} {what} from project '{spec.project}' to {output} ({spec.format})"]
    if spec.format != "annotations":
        lines.append(
            f"  skipped: no majority {report['no_majority']}, ties excluded {report['ties_excluded']}, "
            f"both-bad excluded {report['both_bad_excluded']}, unannotated {report['unannotated']}, "
            f"below threshold {report['below_threshold']}"
        )
        if report["ranking_items"]:
            lines.append(
                f"  ranking items: {report['ranking_items']}, pairs from them ({report['ranking_pairs']}): "
                f"{report['ranking_pairs_exported']}; pairs left out: tied {report['ranking_pairs_tied']}, "
                f"no majority {report['ranking_pairs_no_majority']}, below threshold {report['ranking_pairs_below_threshold']}"
            )
    if spec.split:
        lines.append(f"  split {spec.split}: {report['other_split']} left out as the other split")
    emit(report, as_json, "\n".join(lines))
