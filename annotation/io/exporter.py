"""Exporting a project: aggregated preference pairs (TRL standard or conversational, HH) and a raw
dump of every annotation, streamed to JSONL or Parquet.

A pair's label is `annotation.aggregate.aggregate(votes, method)`; items whose aggregate has no
winner are left out and counted, as are ties and both-bad verdicts (they say neither side is
preferred, so they make no chosen/rejected pair). The train/test split is a hash of the item's
content hash, so an item lands in the same split in every database and every export. Files are
written to a temporary name beside the target and renamed, so a crash never leaves a torn file.

A ranking item (3 to 6 responses) expands into pairs of its responses: each annotator's ranking
votes on pairs (`ranking_pairs` "all": every pair, "adjacent": neighbouring places only; see
annotation.aggregate), each pair of responses is aggregated across annotators like a
two-response item, and every pair whose aggregate prefers one response is written, in stored
order of the responses (ties and pairs without a winner are left out and counted). Its metadata
adds chosen_response and rejected_response (stored indices) and n_responses; n_annotations is
the number of annotators who voted on that pair. All pairs of an item share its split.

`margin_from`: "confidence" gives 2 * confidence - 1 of the aggregate; "rank-gap" gives the mean
over the pair's voters of the signed rank gap (rank of rejected - rank of chosen) / (n - 1),
in [-1, 1] (negative only where Dawid-Skene overrules the voters), so adjacent places of a
4-response ranking that everyone agrees on get 1/3 and first vs last gets 1; a two-response item
is a ranking of two, so its margin is (votes for chosen - votes for rejected) / votes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from annotation.aggregate import METHODS, check_ranking_pairs, pair_key
from annotation.errors import AnnotationError
from annotation.io.formats import Pair, canonical_json, pair_text, prompt_as_hh, text_to_messages
from annotation.store import Annotation, Item, User, read_connection

EXPORT_FORMATS = ("trl", "trl-conversational", "hh", "annotations")
MARGIN_FROM = ("none", "confidence", "rank-gap")
DEFAULT_TEST_FRACTION = 0.1
STREAM_ROWS = 5_000
_scanstring = json.decoder.scanstring

_items = Item.__table__
_annotations = Annotation.__table__
_users = User.__table__


@dataclasses.dataclass
class ExportReport:
    path: str
    format: str
    project: str
    aggregation: str = "majority"
    split: str | None = None
    items: int = 0
    """Items in the project."""
    exported: int = 0
    """Rows written: pairs, or annotations for the `annotations` format."""
    unannotated: int = 0
    no_majority: int = 0
    ties_excluded: int = 0
    both_bad_excluded: int = 0
    below_threshold: int = 0
    """Left out by --min-agreement / --min-confidence."""
    other_split: int = 0
    """Items with a label that belong to the other split."""
    ranking_pairs: str = "all"
    """How rankings became pairs: all or adjacent."""
    ranking_items: int = 0
    """Items with 3 to 6 responses (counted in `items`; unannotated and other_split count them too)."""
    ranking_pairs_exported: int = 0
    """Pairs written from ranking items (counted in `exported`)."""
    ranking_pairs_tied: int = 0
    ranking_pairs_no_majority: int = 0
    ranking_pairs_below_threshold: int = 0
    """Pairs of responses of ranking items left out: tied, no winner, or below --min-agreement / --min-confidence."""
    sha256: str = ""
    """Of the file written: the data snapshot a trained model records."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- split and labels


def split_of(content_hash: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> str:
    """'test' or 'train' for an item, from its content hash (salted, so the split does not line up
    with the A/B position, which is also derived from the content hash)."""
    digest = hashlib.sha256(("split:" + content_hash).encode("ascii")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def check_options(fmt: str | None = None, *, aggregation: str = "majority", split: str | None = None,
                  test_fraction: float = DEFAULT_TEST_FRACTION, min_agreement: float | None = None,
                  min_confidence: float | None = None, margin_from: str = "none", ranking_pairs: str = "all") -> None:
    """Refuse an export option with a value it does not take, naming the option and what it takes
    (`rlhf export` calls this before it opens the store). `fmt` None: pairs, as project_pairs."""
    if fmt is not None and fmt not in EXPORT_FORMATS:
        raise AnnotationError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    _check_filters(aggregation, split, test_fraction, min_agreement, min_confidence, margin_from)
    check_ranking_pairs(ranking_pairs)


def _check_filters(aggregation, split, test_fraction, min_agreement, min_confidence, margin_from) -> None:
    # Checked here, not only by aggregate(): a project without annotations never calls it.
    if aggregation not in METHODS:
        raise AnnotationError(f"--aggregation {aggregation!r}: unknown aggregation; expected one of {', '.join(METHODS)}")
    if split not in (None, "train", "test"):
        raise AnnotationError(f"--split {split!r}: expected one of train, test")
    if not 0.0 < test_fraction < 1.0:
        raise AnnotationError(f"--test-fraction {test_fraction}: expected a number strictly between 0 and 1")
    for name, value in (("--min-agreement", min_agreement), ("--min-confidence", min_confidence)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise AnnotationError(f"{name} {value}: expected a number between 0 and 1")
    if margin_from not in MARGIN_FROM:
        raise AnnotationError(f"--margin-from {margin_from!r}: expected one of {', '.join(MARGIN_FROM)}")


def _project_id(conn: Connection, project: str) -> int:
    from annotation.projects import get_project

    with Session(bind=conn) as session:
        return get_project(session, project).id


def _labels(conn: Connection, project_id: int, aggregation: str, ranking_pairs: str, with_gap: bool = True) -> dict[int, tuple]:
    """pair_key -> (label, confidence, n_annotations, agreement, mean signed rank gap toward "a") for
    every annotated two-response item (key pair_key(item_id)) and every pair of responses of a
    ranking item that some annotator voted on (key pair_key(item_id, first, second)). Without
    `with_gap` the gap is left at 0 (it costs a group-by that only --margin-from rank-gap needs)."""
    from annotation.aggregate import aggregate, choice_signed_gap, ranking_votes

    query = (
        select(_annotations.c.item_id, _annotations.c.annotator_id, _annotations.c.choice, _items.c.gold_choice,
               _annotations.c.ranking)
        .join(_items, _items.c.id == _annotations.c.item_id)
        .where(_items.c.project_id == project_id)
    )
    if conn.dialect.name == "sqlite":
        # The values are plain ints and strings: the driver's tuples skip SQLAlchemy's per-row processing.
        compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
        rows = conn.exec_driver_sql(str(compiled)).fetchall()
        rows = [r if r[4] is None else (*r[:4], json.loads(r[4])) for r in rows]
    else:
        rows = conn.execute(query).all()
    if not rows:
        return {}
    # gold_choice rides along so that Dawid-Skene can anchor annotators' confusion on gold items.
    # Built column-wise: pandas inspects each Row object when given a list of rows (slow).
    names = ("item_id", "annotator", "choice", "gold_choice", "ranking")
    table = pd.DataFrame(dict(zip(names, map(list, zip(*rows)))))
    is_ranking = table["ranking"].notna()
    votes = table.loc[~is_ranking, ["item_id", "annotator", "choice", "gold_choice"]]
    votes = votes.assign(key=[pair_key(i) for i in votes["item_id"]], signed_gap=choice_signed_gap(votes["choice"]))
    if is_ranking.any():
        ranked = ranking_votes(table.loc[is_ranking], ranking_pairs)
        ranked = ranked.assign(
            key=[pair_key(i, f, s) for i, f, s in zip(ranked["item_id"], ranked["first"], ranked["second"])], gold_choice=None,
        )
        votes = pd.concat([votes, ranked[votes.columns]], ignore_index=True)
    if votes.empty:
        return {}
    votes = votes.drop(columns="item_id").rename(columns={"key": "item_id"})
    agg = aggregate(votes, aggregation)
    if with_gap:
        gap = votes.groupby("item_id")["signed_gap"].mean().reindex(agg.index)
    else:
        gap = pd.Series(0.0, index=agg.index)
    labels = [lab if isinstance(lab, str) else None for lab in agg["label"].tolist()]
    columns = (agg.index.tolist(), labels, agg["confidence"].astype(float).tolist(),
               agg["n_annotations"].astype(int).tolist(), agg["agreement"].astype(float).tolist(), gap.astype(float).tolist())
    return {k: (lab, conf, n, agr, g) for k, lab, conf, n, agr, g in zip(*columns)}


def _margin_of(margin_from: str):
    """The margin of a pair from its aggregate's confidence and its mean signed gap toward the chosen side."""
    if margin_from == "confidence":
        return lambda confidence, gap: 2.0 * confidence - 1.0
    if margin_from == "rank-gap":
        return lambda confidence, gap: gap
    return lambda confidence, gap: None


def _iter_pairs(conn: Connection, project_id: int, report: ExportReport, *, aggregation: str, min_agreement, min_confidence,
                split, test_fraction, margin_from, ranking_pairs: str = "all") -> Iterator[Pair]:
    labels = _labels(conn, project_id, aggregation, ranking_pairs, with_gap=margin_from == "rank-gap")
    margin_of = _margin_of(margin_from)
    report.ranking_pairs = ranking_pairs

    def passes(agreement: float, confidence: float) -> bool:
        return not ((min_agreement is not None and agreement < min_agreement) or (min_confidence is not None and confidence < min_confidence))

    # SQLite hands JSON back as text and SQLAlchemy decodes it with json.loads, a third of the
    # export time; most prompts are one JSON string, which json's C scanner decodes directly. The
    # plain driver query there also skips SQLAlchemy's per-row processing (the rest is tuples).
    raw_json = conn.dialect.name == "sqlite"
    if raw_json:
        rows = conn.execution_options(yield_per=STREAM_ROWS).exec_driver_sql(
            "SELECT id, external_id, prompt, response_a, response_b, content_hash, responses FROM items WHERE project_id = ? ORDER BY id",
            (project_id,),
        )
    else:
        rows = conn.execution_options(yield_per=STREAM_ROWS).execute(
            select(_items.c.id, _items.c.external_id, _items.c.prompt, _items.c.response_a, _items.c.response_b, _items.c.content_hash,
                   _items.c.responses)
            .where(_items.c.project_id == project_id)
            .order_by(_items.c.id)
        )
    for item_id, external_id, prompt, response_a, response_b, content_hash, responses in rows:
        report.items += 1
        if responses is not None:
            report.ranking_items += 1
            if raw_json:
                responses = json.loads(responses)
            yield from _ranking_pairs(item_id, external_id, prompt, responses, content_hash, labels, report, passes, margin_of,
                                      raw_json, split, test_fraction)
            continue
        verdict = labels.get(pair_key(item_id))
        if verdict is None:
            report.unannotated += 1
            continue
        label, confidence, n, agreement, gap = verdict
        if label is None:
            report.no_majority += 1
            continue
        if label == "tie":
            report.ties_excluded += 1
            continue
        if label == "both_bad":
            report.both_bad_excluded += 1
            continue
        if not passes(agreement, confidence):
            report.below_threshold += 1
            continue
        if split is not None and split_of(content_hash, test_fraction) != split:
            report.other_split += 1
            continue
        if raw_json:
            prompt = _scanstring(prompt, 1)[0] if prompt[:1] == '"' else json.loads(prompt)
        chosen, rejected = (response_a, response_b) if label == "a" else (response_b, response_a)
        meta = {"item_id": item_id, "external_id": external_id, "n_annotations": n, "agreement": agreement, "confidence": confidence}
        yield Pair(prompt, chosen, rejected, margin_of(confidence, gap if label == "a" else -gap), meta, 0)


def _ranking_pairs(item_id, external_id, prompt, responses, content_hash, labels, report, passes, margin_of, raw_json,
                   split, test_fraction) -> Iterator[Pair]:
    """The pairs of one ranking item, in stored order of its responses."""
    n = len(responses)
    verdicts = [(first, second, labels.get(pair_key(item_id, first, second))) for first in range(n) for second in range(first + 1, n)]
    verdicts = [(f, s, v) for f, s, v in verdicts if v is not None]
    if not verdicts:
        report.unannotated += 1
        return
    if split is not None and split_of(content_hash, test_fraction) != split:
        report.other_split += 1
        return
    if raw_json:
        prompt = _scanstring(prompt, 1)[0] if prompt[:1] == '"' else json.loads(prompt)
    for first, second, (label, confidence, n_votes, agreement, gap) in verdicts:
        if label is None:
            report.ranking_pairs_no_majority += 1
            continue
        if label not in ("a", "b"):
            report.ranking_pairs_tied += 1
            continue
        if not passes(agreement, confidence):
            report.ranking_pairs_below_threshold += 1
            continue
        chosen, rejected = (first, second) if label == "a" else (second, first)
        meta = {"item_id": item_id, "external_id": external_id, "n_annotations": n_votes, "agreement": agreement,
                "confidence": confidence, "chosen_response": chosen, "rejected_response": rejected, "n_responses": n}
        report.ranking_pairs_exported += 1
        yield Pair(prompt, responses[chosen]["text"], responses[rejected]["text"],
                   margin_of(confidence, gap if label == "a" else -gap), meta, 0)


def project_pairs(
    engine: Engine,
    project: str,
    *,
    aggregation: str = "majority",
    min_agreement: float | None = None,
    min_confidence: float | None = None,
    split: str | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    margin_from: str = "none",
    ranking_pairs: str = "all",
) -> list[Pair]:
    """The project's pairs as export would write them: aggregated labels, ties/both-bad and items
    without a winner left out, filters and the deterministic split applied, ranking items expanded
    into pairs (`ranking_pairs`). Prompts are as stored (text, or chat messages); metadata has
    item_id, external_id, n_annotations, agreement, confidence (and, for pairs from a ranking,
    chosen_response, rejected_response, n_responses)."""
    check_options(None, aggregation=aggregation, split=split, test_fraction=test_fraction, min_agreement=min_agreement,
                  min_confidence=min_confidence, margin_from=margin_from, ranking_pairs=ranking_pairs)
    report = ExportReport(path="", format="pairs", project=project, aggregation=aggregation, split=split)
    with read_connection(engine) as conn:
        pid = _project_id(conn, project)
        return list(_iter_pairs(conn, pid, report, aggregation=aggregation, min_agreement=min_agreement,
                                min_confidence=min_confidence, split=split, test_fraction=test_fraction, margin_from=margin_from,
                                ranking_pairs=ranking_pairs))


# --------------------------------------------------------------------------- rows per format


def _standard_response(prompt: Any, response: str) -> str:
    # TRL concatenates prompt and response as they are; a chat prompt flattened to text ends in
    # "Assistant:", so its response needs the separating space HH responses already carry.
    if isinstance(prompt, str) or response[:1].isspace():
        return response
    return " " + response


def _pair_row(fmt: str, pair: Pair, with_margin: bool) -> dict:
    if fmt == "trl":
        prompt = pair.prompt if isinstance(pair.prompt, str) else pair_text(pair.prompt)
        row = {"prompt": prompt, "chosen": _standard_response(pair.prompt, pair.chosen),
               "rejected": _standard_response(pair.prompt, pair.rejected)}
    elif fmt == "trl-conversational":
        prompt = pair.prompt if isinstance(pair.prompt, list) else text_to_messages(pair.prompt)
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": pair.chosen.strip()}],
               "rejected": [{"role": "assistant", "content": pair.rejected.strip()}]}
    else:  # hh
        prompt = prompt_as_hh(pair.prompt)
        row = {"chosen": pair_text(prompt, pair.chosen), "rejected": pair_text(prompt, pair.rejected)}
    if with_margin:
        row["margin"] = pair.margin
    row["metadata"] = pair.metadata
    return row


def _has_rankings(conn: Connection, project_id: int) -> bool:
    return conn.scalar(select(_items.c.id).where(_items.c.project_id == project_id, _items.c.responses.is_not(None)).limit(1)) is not None


def _iter_annotation_rows(conn: Connection, project_id: int, report: ExportReport, split, test_fraction, flat: bool) -> Iterator[dict]:
    report.items = conn.scalar(select(func.count()).select_from(_items).where(_items.c.project_id == project_id))
    query = (
        select(
            _annotations.c.id, _annotations.c.item_id, _items.c.external_id, _items.c.content_hash, _users.c.username,
            _annotations.c.choice, _annotations.c.strength, _annotations.c.criteria, _annotations.c.rationale,
            _annotations.c.shown_swapped, _annotations.c.duration_ms, _annotations.c.created_at,
            _items.c.prompt, _items.c.response_a, _items.c.response_b, _items.c.gold_choice,
            _annotations.c.ranking, _annotations.c.shown_order, _items.c.responses, _annotations.c.suggestion,
        )
        .join(_items, _items.c.id == _annotations.c.item_id)
        .join(_users, _users.c.id == _annotations.c.annotator_id)
        .where(_items.c.project_id == project_id)
        .order_by(_annotations.c.item_id, _annotations.c.id)
    )
    for r in conn.execution_options(yield_per=STREAM_ROWS).execute(query):
        if split is not None and split_of(r.content_hash, test_fraction) != split:
            report.other_split += 1
            continue
        yield {
            "annotation_id": r.id, "item_id": r.item_id, "external_id": r.external_id, "annotator": r.username,
            "choice": r.choice, "strength": r.strength,
            "criteria": canonical_json(r.criteria or {}) if flat else (r.criteria or {}),
            "rationale": r.rationale, "shown_swapped": bool(r.shown_swapped), "duration_ms": r.duration_ms,
            "created_at": r.created_at.isoformat(),
            "prompt": canonical_json(r.prompt) if flat and not isinstance(r.prompt, str) else r.prompt,
            "response_a": r.response_a, "response_b": r.response_b, "gold_choice": r.gold_choice,
            # a ranking: ranks in stored order of `responses`, and the order shown (stored indices)
            "ranking": r.ranking, "shown_order": r.shown_order, "responses": r.responses,
            # the reward model's suggestion shown with the item ("a"/"b", a ranking's stored index), or None
            "suggestion": r.suggestion,
        }


# --------------------------------------------------------------------------- writing


def check_output(out_path: str | Path) -> Path:
    """`out_path` as a Path when a file can be written there; else an AnnotationError naming -o."""
    text = str(out_path)
    if isinstance(out_path, str) and text.endswith(("/", os.sep)):
        raise AnnotationError(f"-o {text}: names a directory; expected a file name, e.g. {text.rstrip('/' + os.sep) or '.'}/pairs.jsonl")
    path = Path(out_path)
    if path.is_dir():
        raise AnnotationError(f"-o {text}: is a directory; expected a file name, e.g. {path / 'pairs.jsonl'}")
    parent = path.parent
    if not parent.exists():
        raise AnnotationError(f"-o {text}: the directory {parent} does not exist; create it first or choose another path")
    if not parent.is_dir():
        raise AnnotationError(f"-o {text}: {parent} is not a directory; expected a file path inside a directory")
    return path


@contextlib.contextmanager
def _atomic_path(out_path: Path) -> Iterator[Path]:
    """A temporary path beside `out_path` that replaces it only when the block finishes cleanly."""
    out_path = check_output(out_path)
    try:
        fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".part")
    except OSError as exc:
        raise AnnotationError(f"-o {out_path}: cannot write in {out_path.parent}: {exc.strerror}") from None
    os.close(fd)
    # mkstemp makes the file private (0600); give the export the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        # Durable before it is visible: the file's bytes, then (after the rename) the directory entry,
        # so a crash never leaves a complete-looking export with missing data (Parquet included).
        _fsync(tmp, os.O_RDONLY)
        try:
            os.replace(tmp, out_path)
        except OSError as exc:  # e.g. a directory made at out_path while the export ran
            raise AnnotationError(f"-o {out_path}: cannot replace it: {exc.strerror}") from None
        _fsync(out_path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode
_str = json.encoder.encode_basestring  # json's C string encoder (ensure_ascii=False)


def _pair_line(fmt: str, pair: Pair, with_margin: bool) -> str:
    """The JSONL line of _pair_row(fmt, pair, with_margin), without building the dict: the same
    text json would write, in about half the time (export speed is mostly this line)."""
    if fmt == "trl-conversational":
        return _dumps(_pair_row(fmt, pair, with_margin))
    m = pair.metadata
    meta = '{"item_id": %d, "external_id": %s, "n_annotations": %d, "agreement": %r, "confidence": %r' % (
        m["item_id"], "null" if m["external_id"] is None else _str(m["external_id"]), m["n_annotations"], m["agreement"], m["confidence"],
    )
    if "chosen_response" in m:
        meta += ', "chosen_response": %d, "rejected_response": %d, "n_responses": %d' % (
            m["chosen_response"], m["rejected_response"], m["n_responses"])
    meta += "}"
    margin = (', "margin": ' + ("null" if pair.margin is None else repr(pair.margin))) if with_margin else ""
    if fmt == "trl":
        if isinstance(pair.prompt, str):
            head = '{"prompt": ' + _str(pair.prompt) + ', "chosen": ' + _str(pair.chosen) + ', "rejected": ' + _str(pair.rejected)
        else:
            head = ('{"prompt": ' + _str(pair_text(pair.prompt)) + ', "chosen": ' + _str(_standard_response(pair.prompt, pair.chosen))
                    + ', "rejected": ' + _str(_standard_response(pair.prompt, pair.rejected)))
    else:  # hh
        prompt = prompt_as_hh(pair.prompt)
        head = '{"chosen": ' + _str(pair_text(prompt, pair.chosen)) + ', "rejected": ' + _str(pair_text(prompt, pair.rejected))
    return head + margin + ', "metadata": ' + meta + "}"


def _write_jsonl(path: Path, lines: Iterator[str]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        buf: list[str] = []
        for line in lines:
            buf.append(line)
            n += 1
            if len(buf) >= STREAM_ROWS:
                fh.write("\n".join(buf) + "\n")
                buf = []
        if buf:
            fh.write("\n".join(buf) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return n


def _parquet_schema(fmt: str, with_margin: bool, with_rankings: bool = False):
    import pyarrow as pa

    if fmt == "annotations":
        return pa.schema([
            ("annotation_id", pa.int64()), ("item_id", pa.int64()), ("external_id", pa.string()), ("annotator", pa.string()),
            ("choice", pa.string()), ("strength", pa.int64()), ("criteria", pa.string()), ("rationale", pa.string()),
            ("shown_swapped", pa.bool_()), ("duration_ms", pa.int64()), ("created_at", pa.string()), ("prompt", pa.string()),
            ("response_a", pa.string()), ("response_b", pa.string()), ("gold_choice", pa.string()),
            ("ranking", pa.list_(pa.int64())), ("shown_order", pa.list_(pa.int64())),
            ("responses", pa.list_(pa.struct([("text", pa.string()), ("source", pa.string())]))),
            ("suggestion", pa.string()),
        ])
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    text = messages if fmt == "trl-conversational" else pa.string()
    fields = [] if fmt == "hh" else [("prompt", text)]
    fields += [("chosen", text), ("rejected", text)]
    if with_margin:
        fields.append(("margin", pa.float64()))
    meta = [("item_id", pa.int64()), ("external_id", pa.string()), ("n_annotations", pa.int64()),
            ("agreement", pa.float64()), ("confidence", pa.float64())]
    if with_rankings:  # null on the pairs of two-response items
        meta += [("chosen_response", pa.int64()), ("rejected_response", pa.int64()), ("n_responses", pa.int64())]
    fields.append(("metadata", pa.struct(meta)))
    return pa.schema(fields)


def _write_parquet(path: Path, rows: Iterator[dict], schema) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        buf: list[dict] = []
        for row in rows:
            buf.append(row)
            if len(buf) >= STREAM_ROWS:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                n += len(buf)
                buf = []
        if buf or n == 0:
            writer.write_table(pa.Table.from_pylist(buf, schema=schema))
            n += len(buf)
    return n


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(
    engine: Engine,
    project: str,
    fmt: str,
    out_path: str | Path,
    *,
    aggregation: str = "majority",
    min_agreement: float | None = None,
    min_confidence: float | None = None,
    split: str | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    margin_from: str = "none",
    parquet: bool | None = None,
    ranking_pairs: str = "all",
) -> ExportReport:
    """Write the project's pairs (fmt trl, trl-conversational, hh) or annotations to `out_path`,
    as Parquet when `parquet` is true or, when it is None, when the path ends in .parquet.
    Ranking items become pairs as `ranking_pairs` says (all or adjacent; see the module docstring)."""
    check_options(fmt, aggregation=aggregation, split=split, test_fraction=test_fraction, min_agreement=min_agreement,
                  min_confidence=min_confidence, margin_from=margin_from, ranking_pairs=ranking_pairs)
    out_path = check_output(out_path)
    if parquet is None:
        parquet = out_path.suffix.lower() == ".parquet"
    with_margin = margin_from != "none"
    report = ExportReport(path=str(out_path), format=fmt, project=project, aggregation=aggregation, split=split)
    # One read transaction, so the votes and the items come from the same snapshot.
    with read_connection(engine) as conn, _atomic_path(out_path) as tmp:
        pid = _project_id(conn, project)
        if fmt == "annotations":
            rows = _iter_annotation_rows(conn, pid, report, split, test_fraction, flat=parquet)
            if parquet:
                report.exported = _write_parquet(tmp, rows, _parquet_schema(fmt, with_margin))
            else:
                report.exported = _write_jsonl(tmp, map(_dumps, rows))
        else:
            pairs = _iter_pairs(conn, pid, report, aggregation=aggregation, min_agreement=min_agreement,
                                min_confidence=min_confidence, split=split, test_fraction=test_fraction, margin_from=margin_from,
                                ranking_pairs=ranking_pairs)
            if parquet:
                rows = (_pair_row(fmt, p, with_margin) for p in pairs)
                report.exported = _write_parquet(tmp, rows, _parquet_schema(fmt, with_margin, _has_rankings(conn, pid)))
            else:
                report.exported = _write_jsonl(tmp, (_pair_line(fmt, p, with_margin) for p in pairs))
        report.sha256 = _file_sha256(tmp)
    return report
