"""Importing preference data into a project: streamed, validated, all-or-nothing, idempotent.

The input is a JSONL file, a Parquet file or a `datasets` save_to_disk directory (see
annotation.io.formats). It is read and checked row by row (Arrow data one record batch at a time)
outside any transaction, the parsed batches spooled to a temporary file, then written inside ONE
database transaction: memory stays bounded however long the input is, a bad row writes nothing,
and SQLite's write lock is held only while writing. Items are keyed by a content hash
(unique per project): rows whose hash exists are looked up per batch and skipped, so importing
the same data again adds nothing on SQLite and PostgreSQL alike, whatever container it came in.
Labelled rows also get one annotation by a source annotator account that cannot log in.
Rows of 3 to 6 `responses` become ranking items (`items.responses`, with "" as response_a/b).
"""

from __future__ import annotations

import dataclasses
import pickle
import tempfile
from pathlib import Path

from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from annotation.errors import AnnotationError, InputError
from annotation.io.formats import (
    LineParser,
    PromptRecord,
    Record,
    Rows,
    Skip,
    canonical_json,
    chosen_goes_first,
    item_hash,
    prompt_hash,
    read_rows,
    responses_hash,
)
from annotation.names import can_be_looked_up, check_username
from annotation.store import Annotation, Item, Project, Prompt, User, utcnow

BATCH_LINES = 2_000

_items = Item.__table__
_prompts = Prompt.__table__
_annotations = Annotation.__table__
_users = User.__table__
_projects = Project.__table__
# Column order of the row tuples the importer builds (unlisted columns are NULL).
_ITEM_COLUMNS = ("project_id", "external_id", "prompt", "response_a", "response_b", "source_a", "source_b",
                 "metadata", "content_hash", "gold_choice", "created_at", "responses")
_ANNOTATION_COLUMNS = ("item_id", "annotator_id", "choice", "criteria", "shown_swapped", "created_at")
_PROMPT_COLUMNS = ("project_id", "external_id", "prompt", "metadata", "content_hash", "created_at")


@dataclasses.dataclass
class ImportReport:
    path: str
    format: str | None
    lines: int = 0
    """Non-blank lines (JSONL) or rows (Parquet, datasets) read."""
    items_added: int = 0
    ranking_items_added: int = 0
    """Of items_added, those with 3 to 6 responses to rank."""
    prompts_added: int = 0
    annotations_added: int = 0
    duplicates: int = 0
    """Rows whose item or prompt was already in the project (or earlier in the input)."""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    """Rows the converter declined, per reason (e.g. HH sides that differ before the last turn)."""
    project: str = ""
    source_annotator: str | None = None
    container: str = "jsonl"
    """jsonl, parquet or datasets (annotation.io.formats.CONTAINERS)."""
    splits: list[str] = dataclasses.field(default_factory=list)
    """The DatasetDict splits imported, in order; empty for files and single Datasets."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def source_username(source: str) -> str:
    """The account that imported labels are recorded under: `source` itself when it starts with
    "import", else "import:<source>", so imported labels never mix with a person's own."""
    source = source.strip()
    if not source:
        raise AnnotationError("--source: the source annotator name must not be empty")
    return check_username(source if source.startswith("import") else f"import:{source}", "--source: the import account name")


def import_file(
    engine: Engine,
    path: str | Path,
    project: str,
    *,
    format: str = "auto",
    source_annotator: str = "import",
    max_field_chars: int | None = None,
    created_by: int | None = None,
    split: str | None = None,
) -> ImportReport:
    """Import a JSONL or Parquet file or a datasets directory into `project` (created with default
    settings when missing); `split` picks one split of a DatasetDict directory (default: all).

    Nothing is written unless every row is valid. See annotation.io.formats for the formats.
    """
    # None: annotation.io.formats.DEFAULT_MAX_FIELD_CHARS. The app passes its max_field_chars setting.
    parser = LineParser(path, format, max_field_chars)
    source_username(source_annotator)  # checked before anything is read or written
    rows = read_rows(path, split=split)  # the container is opened and its columns checked before the transaction
    report = ImportReport(path=str(path), format=parser.format, project=project, container=rows.container, splits=rows.splits)
    try:
        _import(engine, rows, parser, report, project, source_annotator, created_by)
    except IntegrityError:
        # Two imports into one project at the same moment (PostgreSQL; SQLite queues writers): both
        # saw a hash or project name as new. This one rolled back whole, so running it again is safe.
        raise AnnotationError(
            f"importing {path} into '{project}' collided with another import running at the same time; "
            "nothing was written, run it again"
        ) from None
    return report


def _import(engine, rows: Rows, parser, report, project, source_annotator, created_by) -> None:
    # Pass 1, outside any transaction: read and check every row, spooling the parsed batches to a
    # temporary file (memory stays bounded). A bad row raises here, before anything is locked.
    with tempfile.TemporaryFile() as spool:
        batches, batch = 0, []
        for line, obj in rows:
            report.lines += 1
            batch.append(parser.parse(line, obj))
            if len(batch) >= BATCH_LINES:
                pickle.dump(batch, spool, protocol=pickle.HIGHEST_PROTOCOL)
                batches, batch = batches + 1, []
        if report.lines == 0:
            if rows.container == "jsonl":
                raise InputError(rows.path, None, None, "no JSON lines in the file", "one JSON object per line")
            where = f"split {', '.join(rows.splits)}" if rows.splits else rows.container
            raise InputError(rows.path, None, None, f"no rows in the {where} data", "at least one row")
        pickle.dump(batch, spool, protocol=pickle.HIGHEST_PROTOCOL)
        batches += 1
        spool.seek(0)
        # Pass 2: ONE transaction that only writes. On SQLite it holds the single write lock, so
        # annotators' submits wait for the writing alone, not for reading and checking the file.
        with engine.begin() as conn:
            job = _Importer(conn, parser, report, project, source_annotator, created_by)
            for _ in range(batches):
                job.write(pickle.load(spool))  # our own spool, written above: nothing foreign is unpickled
    report.format = parser.format


class _Importer:
    """Writes batches of records for one import inside the caller's transaction."""

    def __init__(self, conn: Connection, parser: LineParser, report: ImportReport, project: str,
                 source: str, created_by: int | None):
        self.conn, self.parser, self.report = conn, parser, report
        self.project_id = _project_id(conn, project, created_by)
        self.source = source
        self.annotator_id: int | None = None
        self.now = utcnow()
        # On SQLite the rows go straight to the driver's executemany, with the JSON columns as the
        # canonical JSON text already made for the content hash: SQLAlchemy's per-row parameter
        # processing and JSON encoding were over half the import time. Other databases get the
        # same rows through SQLAlchemy Core.
        self.raw = conn.dialect.name == "sqlite"
        self.now_param = self.now.strftime("%Y-%m-%d %H:%M:%S.%f") if self.raw else self.now  # SQLAlchemy's SQLite DATETIME text
        self.empty_json = "{}" if self.raw else {}

    def json(self, value, encoded: str | None = None):
        """A JSON column's value as the insert wants it: text on SQLite, else the object."""
        if not self.raw:
            return value
        return encoded if encoded is not None else canonical_json(value)

    def insert(self, table: Table, names: tuple[str, ...], rows: list[tuple]) -> None:
        """executemany of `rows` (tuples in the order of `names`) into `table`."""
        if self.raw:
            sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            self.conn.exec_driver_sql(sql, rows)
        else:
            self.conn.execute(insert(table), [dict(zip(names, row)) for row in rows])

    def write(self, batch: list) -> None:
        items, prompts = [], []
        for rec in batch:
            if isinstance(rec, Skip):
                self.report.skipped[rec.reason] = self.report.skipped.get(rec.reason, 0) + 1
            elif isinstance(rec, PromptRecord):
                prompts.append(rec)
            else:
                items.append(rec)
        if items:
            self._write_items(items)
        if prompts:
            self._write_prompts(prompts)

    def _annotator(self) -> int:
        if self.annotator_id is None:
            username = source_username(self.source)
            row = self.conn.execute(select(_users.c.id, _users.c.password_hash).where(_users.c.username == username)).first()
            if row is not None and row.password_hash is not None:
                raise AnnotationError(f"user '{username}' is a person's login, not an import source; choose another --source")
            if row is None:
                self.annotator_id = self.conn.execute(
                    insert(_users).values(username=username, password_hash=None, role="annotator", active=True, created_at=self.now)
                ).inserted_primary_key[0]
            else:
                self.annotator_id = row.id
            self.report.source_annotator = username
        return self.annotator_id

    def _write_items(self, records: list[Record]) -> None:
        # Deduplicate within the batch first; earlier batches are already in the table and the
        # lookup below sees them because it runs in the same transaction.
        by_hash: dict[str, tuple[Record, str, str, str | None, str]] = {}
        for rec in records:
            prompt_json = canonical_json(rec.prompt)
            if rec.responses is not None:
                h = responses_hash(rec.prompt, [r["text"] for r in rec.responses], prompt_json)
            else:
                h = item_hash(rec.prompt, rec.first, rec.second, prompt_json)
            if h in by_hash:
                self.report.duplicates += 1
                continue
            if rec.labelled:
                a, b = (rec.first, rec.second) if chosen_goes_first(h) else (rec.second, rec.first)
                choice = "a" if a == rec.first else "b"
            else:
                a, b, choice = rec.first, rec.second, None
            by_hash[h] = (rec, a, b, choice, prompt_json)
        existing = {
            row.content_hash: (row.id, row.response_a)
            for row in self.conn.execute(
                select(_items.c.content_hash, _items.c.id, _items.c.response_a).where(
                    _items.c.project_id == self.project_id, _items.c.content_hash.in_(list(by_hash))
                )
            )
        }
        new_rows = []
        for h, (rec, a, b, _choice, prompt_json) in by_hash.items():
            if h in existing:
                self.report.duplicates += 1
                continue
            meta = rec.meta if rec.margin is None else {**rec.meta, "margin": rec.margin}
            new_rows.append((
                self.project_id, rec.external_id, self.json(rec.prompt, prompt_json), a, b, rec.source_a, rec.source_b,
                self.json(meta) if meta else self.empty_json, h, rec.gold_choice, self.now_param,
                None if rec.responses is None else self.json(rec.responses),  # SQL NULL for a pair
            ))
        ids = {h: v[0] for h, v in existing.items()}
        if new_rows:
            self.insert(_items, _ITEM_COLUMNS, new_rows)
            ids.update(self.conn.execute(
                select(_items.c.content_hash, _items.c.id).where(
                    _items.c.project_id == self.project_id, _items.c.content_hash.in_([r[8] for r in new_rows])
                )
            ).all())
            self.report.items_added += len(new_rows)
            self.report.ranking_items_added += sum(row[-1] is not None for row in new_rows)
        labelled = {h: v for h, v in by_hash.items() if v[3] is not None}
        if not labelled:
            return
        annotator = self._annotator()
        # An item that was already there (say, imported unlabelled) still gets this source's label,
        # expressed in the stored item's own A/B order; one the source has labelled is left alone.
        already = set()
        old_ids = [ids[h] for h in labelled if h in existing]
        if old_ids:
            already = set(self.conn.scalars(
                select(_annotations.c.item_id).where(_annotations.c.annotator_id == annotator, _annotations.c.item_id.in_(old_ids))
            ))
        rows = []
        for h, (rec, _a, _b, choice, _json) in labelled.items():
            if h in existing:
                if ids[h] in already:
                    continue
                choice = "a" if existing[h][1] == rec.first else "b"
            rows.append((ids[h], annotator, choice, self.empty_json, False, self.now_param))
        if rows:
            self.insert(_annotations, _ANNOTATION_COLUMNS, rows)
            self.report.annotations_added += len(rows)

    def _write_prompts(self, records: list[PromptRecord]) -> None:
        by_hash: dict[str, PromptRecord] = {}
        for rec in records:
            h = prompt_hash(rec.prompt)
            if h in by_hash:
                self.report.duplicates += 1
            else:
                by_hash[h] = rec
        existing = set(self.conn.scalars(
            select(_prompts.c.content_hash).where(_prompts.c.project_id == self.project_id, _prompts.c.content_hash.in_(list(by_hash)))
        ))
        self.report.duplicates += len(existing)
        rows = [
            (self.project_id, rec.external_id, self.json(rec.prompt), self.json(rec.meta), h, self.now_param)
            for h, rec in by_hash.items() if h not in existing
        ]
        if rows:
            self.insert(_prompts, _PROMPT_COLUMNS, rows)
            self.report.prompts_added += len(rows)


def _project_id(conn: Connection, name: str, created_by: int | None) -> int:
    from annotation.projects import create_project
    from sqlalchemy.orm import Session

    pid = conn.scalar(select(_projects.c.id).where(_projects.c.name == name.strip())) if can_be_looked_up(name) else None
    if pid is not None:
        return pid
    # create_project holds the default settings and their validation; run it on this connection
    # so the new project belongs to the import's transaction and vanishes with it on error.
    with Session(bind=conn) as session:
        pid = create_project(session, name, created_by=created_by).id
        session.commit()  # joined to the caller's transaction: this flushes, the caller commits
    return pid
