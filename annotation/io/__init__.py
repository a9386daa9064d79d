"""Moving preference data in and out of the store: import (pairs, TRL, HH, UltraFeedback, prompts;
from JSONL, Parquet or a datasets directory) and export (TRL standard / conversational, HH, raw
annotations; JSONL or Parquet).

    from annotation.io import import_file, read_pairs, project_pairs, export, pair_text

`formats` reads, validates and converts rows, `importer` writes them to a project, `exporter`
aggregates and writes pairs out. The names below are loaded on first use, so that importing
`annotation.io.formats` alone (the CLI does, for its help texts) does not load the store or pandas.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "EXPORT_FORMATS": "exporter", "ExportReport": "exporter", "export": "exporter", "project_pairs": "exporter",
    "split_of": "exporter",
    "FORMATS": "formats", "LABELLED_FORMATS": "formats", "Pair": "formats", "pair_text": "formats",
    "read_pairs": "formats", "scan_pairs": "formats",
    "ImportReport": "importer", "import_file": "importer",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'annotation.io' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"annotation.io.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
