"""The data side's use cases, each written once for the CLI, the worker and the pages: export.

    result = export(ExportSpec(project="demo", format="trl", split="train"), RunContext(output_dir=Path("runs/job-3")))

`rlhf export -o FILE` runs it with the file's directory as the output directory and its name as
`filename`; the `export` job runs it into the job's run dir. The spec imports neither the store nor
pandas (the CLI reads its options from it); annotation.io.exporter does the work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from annotation.errors import AnnotationError
from annotation.runs import RunContext, RunResult


@dataclasses.dataclass
class ExportSpec:
    """Export a project's pairs (aggregated labels) or its raw annotations, atomically (annotation.io.exporter)."""

    project: str = ""
    """Project to export."""
    format: str = ""
    """trl, trl-conversational, hh (pairs) or annotations (one row per annotation)."""
    filename: str | None = None
    """File to write in the output directory (default PROJECT-FORMAT.jsonl); .parquet writes Parquet, anything else JSONL."""
    aggregation: str = "majority"
    """How annotations become one label: majority or dawid-skene."""
    min_agreement: float | None = None
    """Leave out items whose annotator agreement is below this (0..1)."""
    min_confidence: float | None = None
    """Leave out items whose aggregated label's confidence is below this (0..1)."""
    split: str | None = None
    """Only the train or the test split (by item hash)."""
    test_fraction: float = 0.1
    """Share of items in the test split."""
    margin_from: str = "none"
    """Add TRL's 'margin' column: none; confidence (2*confidence-1); or rank-gap (the voters' mean signed rank gap /
    (n-1), n the item's responses; a two-response item gets (votes for chosen - votes for rejected) / votes)."""
    ranking_pairs: str = "all"
    """Pairs from ranking items (3-6 responses): all (every pair of responses) or adjacent (neighbouring places in
    each annotator's ranking); each pair is aggregated over annotators like a two-response item."""
    parquet: bool | None = None
    """True: write Parquet whatever the file name; None: Parquet when the name ends .parquet."""

    def validate(self) -> "ExportSpec":
        from annotation.io.exporter import check_options

        if not self.project:
            raise AnnotationError("--project is required: the project to export")
        if not self.format:
            raise AnnotationError("--format is required: trl, trl-conversational, hh or annotations")
        check_options(self.format, aggregation=self.aggregation, split=self.split, test_fraction=self.test_fraction,
                      min_agreement=self.min_agreement, min_confidence=self.min_confidence, margin_from=self.margin_from,
                      ranking_pairs=self.ranking_pairs)
        if self.filename is not None and (not self.filename or Path(self.filename).name != self.filename):
            raise AnnotationError(f"filename {self.filename!r}: expected a plain file name, written inside the output directory")
        return self

    def file_name(self) -> str:
        return self.filename or f"{self.project}-{self.format}.jsonl"


def export(spec: ExportSpec, ctx: RunContext) -> RunResult:
    """Write the export into ctx.output_dir (an existing directory); the result's path is the file and
    its metrics the ExportReport (counts of what was written and left out, the file's sha256)."""
    from annotation.io.exporter import export as write_export

    spec.validate()
    out_path = Path(ctx.output_dir) / spec.file_name()
    ctx.progress(0.0, f"exporting project '{spec.project}' as {spec.format}")
    report = write_export(ctx.engine, spec.project, spec.format, out_path, aggregation=spec.aggregation,
                          min_agreement=spec.min_agreement, min_confidence=spec.min_confidence, split=spec.split,
                          test_fraction=spec.test_fraction, margin_from=spec.margin_from, parquet=spec.parquet,
                          ranking_pairs=spec.ranking_pairs)
    summary = report.as_dict()
    ctx.log.info("export written to %s: %s", out_path, summary)
    return RunResult(register=[], path=str(out_path), metrics=summary, extra={"report": summary})
