"""Moving preference data in and out of the store: import (pairs, TRL, HH, prompts) and export
(TRL standard / conversational, HH, raw annotations; JSONL or Parquet).

    from annotation.io import import_file, read_pairs, project_pairs, export, pair_text

`formats` validates and converts lines, `importer` writes them to a project, `exporter` aggregates
and writes pairs out.
"""

from annotation.io.exporter import EXPORT_FORMATS, ExportReport, export, project_pairs, split_of
from annotation.io.formats import FORMATS, LABELLED_FORMATS, Pair, pair_text, read_pairs, scan_pairs
from annotation.io.importer import ImportReport, import_file

__all__ = [
    "EXPORT_FORMATS", "FORMATS", "LABELLED_FORMATS", "ExportReport", "ImportReport", "Pair",
    "export", "import_file", "pair_text", "project_pairs", "read_pairs", "scan_pairs", "split_of",
]
