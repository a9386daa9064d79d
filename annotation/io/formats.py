"""Preference data formats: reading and validating rows, format detection, pairs, prompt text.

Rows come from one of three containers, all read streaming and checked the same way:
- a JSONL file: one JSON object a line, UTF-8; errors name the line (`FILE:LINE`);
- a Parquet file (`.parquet`, or any file starting with Parquet's magic bytes), read one record
  batch at a time (pyarrow holds at most one row group's Arrow data); errors name the row
  (`FILE:row N`);
- a Hugging Face `datasets` directory written by `Dataset.save_to_disk` or
  `DatasetDict.save_to_disk`, memory-mapped by `datasets.load_from_disk` and read one Arrow batch
  at a time, every split in order or the one asked for; errors name `DIR:row N` (a Dataset) or
  `DIR:SPLIT/row N` (a DatasetDict).
Rows count from 0, as `table.slice(N)` and `dataset[N]` do. In Arrow data a null (or a float NaN,
as pandas writes a missing value) at the top level of a row counts as a field that is absent, so
a table whose columns hold two formats' fields is "mixed formats" just as such a JSONL file is.

The formats (names used by `--format` and in reports), the same in every container:

- `items` (formerly `pairs`, still accepted): items to annotate, `{"prompt", "response_a", "response_b"[, "id", "metadata",
  "source_a", "source_b", "gold_choice"]}`; no label.
- `responses`: items to annotate with 2 to 6 responses, `{"prompt", "responses"[, "id",
  "metadata", "gold_choice"]}`, each response a string or `{"text"[, "source"]}`. Three or more
  make a ranking item (annotators rank them); two make an ordinary pair, responses[0] as
  response_a (so `gold_choice` is allowed with two only). Responses must differ from each other.
- `trl`: TRL's standard preference format, `{"prompt", "chosen", "rejected"}` strings, or the
  implicit-prompt form `{"chosen", "rejected"}` whose prompt is the shared prefix (split as
  `trl.extract_prompt` does); optional `"margin"`, `"id"`, `"metadata"`.
- `trl-conversational`: the same with lists of `{"role", "content"}` messages; with an implicit
  prompt the shared leading messages are the prompt and each side must end in one assistant message.
- `hh`: raw HH-RLHF transcripts `{"chosen", "rejected"}`; the prompt is everything up to and
  including the last "\\n\\nAssistant:", the rest of each side is its response. Lines whose
  sides differ before that point, or whose response is empty, are skipped and counted.
- `ultrafeedback`: the UltraFeedback-binarized layout, `{"prompt"` (text), `"chosen", "rejected"`
  (message lists, each ending in the assistant's response)`[, "score_chosen", "score_rejected",
  "messages", "prompt_id", "id", "metadata", "margin"]}`. The prompt stored is the messages before
  the last turn (the same on both sides, else the row is skipped and counted), or `prompt` as one
  user turn when there are none. The scores go to the item's metadata and, with both present and
  no explicit `margin`, margin = score_chosen - score_rejected. `messages` (the chosen
  conversation again) and `prompt_id` (a hash of the prompt) are not kept.
- `prompts`: `{"prompt"[, "id", "metadata"]}`, for generation and PPO.

Unknown fields are kept under `metadata["extra"]` rather than dropped. Anything malformed raises
InputError naming the file, line, field and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

from annotation.errors import AnnotationError, InputError

FORMATS = ("items", "responses", "trl", "trl-conversational", "hh", "ultrafeedback", "prompts")
"""Every import format, in the order help texts and the app list them; `auto` detects one per input."""
FORMAT_ALIASES = {"pairs": "items"}
"""Old names still accepted: `pairs` was the unlabelled two-response format, a name that clashed
with Pair (a labelled chosen/rejected pair)."""
LABELLED_FORMATS = ("trl", "trl-conversational", "hh", "ultrafeedback")
CHAT_ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
DEFAULT_MAX_FIELD_CHARS = 100_000
MAX_ID_CHARS = 200
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects kept in metadata. Deeper values would overflow the stack
when written (json.dumps) or read back; json.loads itself gives up near 1,000 levels."""

_KNOWN = {
    "items": {"prompt", "response_a", "response_b", "id", "metadata", "source_a", "source_b", "gold_choice"},
    "responses": {"prompt", "responses", "id", "metadata", "gold_choice"},
    "trl": {"prompt", "chosen", "rejected", "id", "metadata", "margin"},
    "trl-conversational": {"prompt", "chosen", "rejected", "id", "metadata", "margin"},
    "hh": {"chosen", "rejected", "id", "metadata", "margin"},
    "ultrafeedback": {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "messages", "prompt_id",
                      "id", "metadata", "margin"},
    "prompts": {"prompt", "id", "metadata"},
}
_GOLD_CHOICES = ("a", "b", "tie", "both_bad")
MIN_RESPONSES, MAX_RESPONSES = 2, 6
"""How many responses a `responses` row may hold; 3 and more make a ranking item (annotation.store)."""
MAX_SOURCE_CHARS = 200


@dataclasses.dataclass
class Pair:
    """An exported or read preference pair: the prompt and the preferred and dispreferred responses."""

    prompt: str | list[dict]
    """Text, or a list of {"role", "content"} chat messages."""
    chosen: str
    rejected: str
    margin: float | None = None
    """How strongly chosen is preferred (TRL's optional `margin`), when known."""
    metadata: dict = dataclasses.field(default_factory=dict)
    line: int | str = 0
    """Where in the input the pair came from: the JSONL line, or "row N" / "SPLIT/row N" of Arrow
    data; 0 for pairs built from the store."""


@dataclasses.dataclass
class Record:
    """One validated row of a pairs or labelled input, before it becomes an item."""

    line: int | str
    """The JSONL line number, or "row N" / "SPLIT/row N" of Arrow data (as in error messages)."""
    prompt: str | list[dict]
    first: str
    """response_a for `items`, the chosen response for labelled formats."""
    second: str
    labelled: bool
    external_id: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    margin: float | None = None
    source_a: str | None = None
    source_b: str | None = None
    gold_choice: str | None = None
    responses: list[dict] | None = None
    """A ranking item's responses, [{"text", "source"}, ...] (3 to 6); first and second are then ""."""


@dataclasses.dataclass
class PromptRecord:
    line: int | str
    prompt: str | list[dict]
    external_id: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Skip:
    """A row a converter declines (it is counted, not an error), e.g. HH sides that differ early."""

    line: int | str
    reason: str


# --------------------------------------------------------------------------- prompt text


def pair_text(prompt: str | list[dict], response: str | None = None) -> str:
    """A prompt (text or chat messages) flattened to text for models, optionally with its response.

    Chat messages become an HH-style transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") ending in
    "\\n\\nAssistant:", so that stored HH prompts and chat prompts read the same to a model. With
    `response`, the response follows after one space unless it already starts with whitespace
    (HH responses keep the space they were published with).
    """
    if isinstance(prompt, str):
        text = prompt
    else:
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        text = "".join(f"\n\n{names.get(m['role'], m['role'].title())}: {m['content']}" for m in prompt)
        if not prompt or prompt[-1]["role"] != "assistant":
            text += HH_ASSISTANT
    if response is None:
        return text
    if response[:1].isspace() or not text or text[-1:].isspace():
        return text + response
    return text + " " + response


def text_to_messages(prompt: str) -> list[dict]:
    """Messages for a text prompt: HH transcripts are split into turns, any other text is one user turn."""
    body = prompt
    if body.endswith(HH_ASSISTANT):
        body = body[: -len(HH_ASSISTANT)]
    if not body.startswith(HH_HUMAN):
        return [{"role": "user", "content": prompt.strip()}]
    messages: list[dict] = []
    rest = body
    markers = ((HH_HUMAN, "user"), (HH_ASSISTANT, "assistant"))
    while rest:
        marker, role = next((m, r) for m, r in markers if rest.startswith(m))
        rest = rest[len(marker):]
        ends = [i for i in (rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)) if i >= 0]
        end = min(ends) if ends else len(rest)
        messages.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
    return messages


def prompt_as_hh(prompt: str | list[dict]) -> str:
    """The prompt as an HH transcript ending in "\\n\\nAssistant:" (plain text becomes one Human turn)."""
    if isinstance(prompt, str):
        if prompt.startswith(HH_HUMAN) and prompt.endswith(HH_ASSISTANT):
            return prompt
        prompt = text_to_messages(prompt)
    return pair_text(prompt)


# --------------------------------------------------------------------------- hashing


def canonical_json(value: Any) -> str:
    """Compact JSON text. Keys keep their order (not sorted): the importer rebuilds every chat
    message as {"role", "content"}, so equal prompts give equal text, and stored metadata keeps the
    order its author wrote."""
    if type(value) is str:
        return _encode_str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# json's own (C) string encoder for ensure_ascii=False: the same text as json.dumps gives a str.
_encode_str = json.encoder.encode_basestring


def item_hash(prompt: str | list[dict], response_1: str, response_2: str, prompt_json: str | None = None) -> str:
    """Content hash of an item; the order of the two responses does not matter, so the same
    comparison imported with its sides swapped is the same item. `prompt_json`, when the caller
    has it, is canonical_json(prompt) (the import stores that text, so it is encoded once)."""
    lo, hi = (response_1, response_2) if response_1 <= response_2 else (response_2, response_1)
    if prompt_json is None:
        prompt_json = canonical_json(prompt)
    # Same text as canonical_json([prompt, lo, hi]), built from the parts.
    text = "[" + prompt_json + "," + _encode_str(lo) + "," + _encode_str(hi) + "]"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def responses_hash(prompt: str | list[dict], texts: list[str], prompt_json: str | None = None) -> str:
    """Content hash of a ranking item: like item_hash (which it equals for two texts), over the
    responses in sorted order, so the same responses imported in another order are the same item."""
    if prompt_json is None:
        prompt_json = canonical_json(prompt)
    text = "[" + ",".join([prompt_json, *(_encode_str(t) for t in sorted(texts))]) + "]"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_hash(prompt: str | list[dict]) -> str:
    return hashlib.sha256(canonical_json(["prompt", prompt]).encode("utf-8")).hexdigest()


def chosen_goes_first(content_hash: str) -> bool:
    """Whether the chosen response of a labelled line is stored as response_a. Decided by the
    content hash so that imports are deterministic and about half the items have the chosen
    response on each side (otherwise every imported label would be 'a')."""
    return int(content_hash[:8], 16) % 2 == 0


# --------------------------------------------------------------------------- reading lines


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line, streaming; bad bytes or JSON raise InputError."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(str(path), None, None, f"cannot read the file: {exc.strerror}", "a readable JSONL file") from None
    with fh:
        for number, raw in enumerate(fh, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    str(path), number, None, f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)",
                    "UTF-8 text",
                ) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(
                    str(path), number, None, f"invalid JSON ({exc.msg} at column {exc.colno})",
                    "one complete JSON object per line",
                ) from None
            except RecursionError:
                raise InputError(
                    str(path), number, None, "JSON nested too deeply to read",
                    f"arrays and objects nested at most {MAX_JSON_DEPTH} levels",
                ) from None
            if not isinstance(obj, dict):
                raise InputError(str(path), number, None, f"a JSON {_type_name(obj)}, not an object", "one JSON object per line")
            yield number, obj


# --------------------------------------------------------------------------- reading rows: JSONL, Parquet, datasets

CONTAINERS = ("jsonl", "parquet", "datasets")
DATASETS_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
"""Files that `save_to_disk` writes: a DatasetDict's top level has the first, a Dataset's the others."""
ARROW_BATCH_ROWS = 1_000
"""Rows of Arrow data turned into Python objects at a time; only one batch is held as objects."""
_ARROW_EXPECTED = "columns of strings, numbers, booleans, lists or structs (cast or drop the column)"


@dataclasses.dataclass
class Rows:
    """The rows of one input, to iterate once: (where, object) for each row, where `where` is the
    JSONL line number or "row N" / "SPLIT/row N" of Arrow data, as errors name it."""

    path: str
    container: str
    """One of CONTAINERS."""
    splits: list[str]
    """The DatasetDict splits read, in order; empty for files and single Datasets."""
    rows: Iterator[tuple[int | str, dict]]

    def __iter__(self) -> Iterator[tuple[int | str, dict]]:
        return self.rows


def read_rows(path: str | Path, *, split: str | None = None) -> Rows:
    """The rows of a JSONL file, a Parquet file or a datasets directory, streaming.

    The container is opened and its columns checked here, before any row is read, so a file that
    is not what it claims (or a `split` it does not have) fails before an import opens a transaction.
    """
    p = Path(path)
    if p.is_dir():
        return _dataset_rows(p, split)
    if split is not None:
        raise AnnotationError(f"--split {split}: {path} is a file; --split picks one split of a datasets DatasetDict directory")
    if _is_parquet(p):
        return _parquet_rows(p)
    return Rows(str(path), "jsonl", [], iter_json_lines(path))


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() == ".parquet":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False  # iter_json_lines says why it cannot be read


def _parquet_rows(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError(str(path), None, None, "cannot read the file: no such file", "a readable Parquet file")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(str(path), None, None, f"not a readable Parquet file ({exc})", "a Parquet file") from None
    target = _json_schema(str(path), pf.schema_arrow)

    def rows() -> Iterator[tuple[str, dict]]:
        n = 0
        try:
            for batch in pf.iter_batches(batch_size=ARROW_BATCH_ROWS):
                for obj in _arrow_rows(batch, target):
                    yield f"row {n}", obj
                    n += 1
        except (OSError, pa.ArrowException) as exc:
            raise InputError(str(path), f"row {n}", None, f"cannot read the Parquet data ({exc})", "an intact Parquet file") from None
        finally:
            pf.close()

    return Rows(str(path), "parquet", [], rows())


def _dataset_rows(path: Path, split: str | None) -> Rows:
    if not any((path / name).is_file() for name in DATASETS_MARKERS):
        raise InputError(str(path), None, None, "a directory without " + ", ".join(DATASETS_MARKERS),
                         "a JSONL or Parquet file, or a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=False)  # memory-mapped: nothing is read yet
    except Exception as exc:  # noqa: BLE001 - the loader raises many types for a damaged directory
        raise InputError(str(path), None, None, f"cannot load the datasets directory ({type(exc).__name__}: {exc})",
                         "a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is not None:
            if split not in loaded:
                raise AnnotationError(f"--split {split}: {path} has no split '{split}'; expected one of {', '.join(names)}")
            names = [split]
        parts = [(f"{name}/", loaded[name]) for name in names]
    else:
        if split is not None:
            raise AnnotationError(f"--split {split}: {path} holds one Dataset, not a DatasetDict of splits; leave out --split")
        names, parts = [], [("", loaded)]
    targets = [_json_schema(str(path), ds.data.schema) for _, ds in parts]  # every split checked before any row is read

    def rows() -> Iterator[tuple[str, dict]]:
        for (prefix, ds), target in zip(parts, targets):
            n = 0
            for table in ds.with_format("arrow").iter(batch_size=ARROW_BATCH_ROWS):
                for obj in _arrow_rows(table, target):
                    yield f"{prefix}row {n}", obj
                    n += 1

    return Rows(str(path), "datasets", names, rows())


def _arrow_rows(batch, target) -> Iterator[dict]:
    """The rows of one record batch (or batch-sized table) as dicts, nulls and NaN left out."""
    if target is not None:
        batch = batch.cast(target)
    for row in batch.to_pylist():
        yield {k: v for k, v in row.items() if v is not None and not (type(v) is float and v != v)}


def _json_schema(path: str, schema):
    """The schema to cast Arrow data to so that every value is JSON (dates, times and decimals
    become text, half floats floats), or None when it already is; a column that cannot be is an
    InputError naming it."""
    import pyarrow as pa

    fields, changed = [], False
    for f in schema:
        if _json_like(f.type):
            fields.append(f)
            continue
        if pa.types.is_temporal(f.type) or pa.types.is_decimal(f.type):
            fields.append(f.with_type(pa.string()))
        elif pa.types.is_float16(f.type):
            fields.append(f.with_type(pa.float64()))
        else:
            raise InputError(path, None, f.name, f"a column of Arrow type {f.type}, which has no JSON value", _ARROW_EXPECTED)
        changed = True
    return pa.schema(fields) if changed else None


def _json_like(t) -> bool:
    import pyarrow as pa

    types = pa.types
    if types.is_string(t) or types.is_large_string(t) or types.is_string_view(t) or types.is_boolean(t) \
            or types.is_integer(t) or types.is_null(t):
        return True
    if types.is_floating(t):
        return not types.is_float16(t)
    if types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t) or types.is_list_view(t) \
            or types.is_large_list_view(t) or types.is_dictionary(t):
        return _json_like(t.value_type)
    if types.is_struct(t):
        return all(_json_like(t.field(i).type) for i in range(t.num_fields))
    return False


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of arrays and objects in `value` (a scalar is 0), counted without recursion
    and only until it passes `limit` (then limit + 1)."""
    depth, level = 0, [value]
    while level:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            break
        depth += 1
        if depth > limit:
            break
        level = [x for v in containers for x in (v.values() if isinstance(v, dict) else v)]
    return depth


def check_max_field_chars(value: int | None, what: str = "--max-field-chars") -> int | None:
    """`value` when it is None (the default) or at least 1; otherwise an AnnotationError naming `what`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise AnnotationError(f"{what} {value!r}: expected an integer >= 1 (the longest prompt or response accepted, in characters)")
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- detection


def detect_format(obj: dict) -> str | None:
    """The format a single line's fields say it is in, or None when they fit none."""
    if "response_a" in obj or "response_b" in obj:
        return "items"
    if "responses" in obj:
        return "responses"
    if "chosen" in obj or "rejected" in obj:
        get = obj.get
        if type(get("chosen")) is list or type(get("rejected")) is list or type(get("prompt")) is list:
            # A text prompt beside message lists is UltraFeedback's layout, not TRL's.
            return "ultrafeedback" if type(get("prompt")) is str else "trl-conversational"
        if "prompt" in obj:
            return "trl"
        chosen = obj.get("chosen")
        if isinstance(chosen, str) and chosen.lstrip("\n").startswith("Human:") and HH_ASSISTANT in chosen:
            return "hh"
        return "trl"
    if "prompt" in obj:
        return "prompts"
    return None


def _compatible(line_format: str | None, file_format: str, obj: dict) -> bool:
    if line_format == file_format:
        return True
    # An implicit-prompt TRL file may well hold lines that look like HH transcripts; an HH file may
    # hold a transcript the detector could not recognise (its own checks then explain what is wrong).
    if file_format == "trl" and line_format == "hh":
        return True
    if file_format == "hh" and line_format == "trl" and "prompt" not in obj:
        return True
    # An UltraFeedback row without its prompt looks like implicit-prompt TRL; its own check says "missing".
    if file_format == "ultrafeedback" and line_format == "trl-conversational" and "prompt" not in obj:
        return True
    return False


# --------------------------------------------------------------------------- validation


class LineParser:
    """Validates the rows of one input (JSONL lines, Parquet or datasets rows) in one format and
    turns them into records. `line` is the JSONL line number, or "row N" / "SPLIT/row N"."""

    def __init__(self, path: str | Path, format: str = "auto", max_field_chars: int | None = None):
        format = FORMAT_ALIASES.get(format, format)
        if format != "auto" and format not in FORMATS:
            raise InputError(str(path), None, None, f"unknown format '{format}'", "auto or one of " + ", ".join(FORMATS))
        self.path = str(path)
        self.requested = format
        self.format: str | None = None if format == "auto" else format
        self.format_line: int | None = None
        check_max_field_chars(max_field_chars, "max_field_chars")
        self.max_chars = DEFAULT_MAX_FIELD_CHARS if max_field_chars is None else max_field_chars

    def parse(self, line: int | str, obj: dict) -> Record | PromptRecord | Skip:
        line_format = detect_format(obj)
        if self.format is None:
            if line_format is None:
                self._unknown(line, obj)
            self.format, self.format_line = line_format, line
        elif not _compatible(line_format, self.format, obj):
            if line_format is None:
                self._unknown(line, obj)
            if isinstance(line, str):  # a row of Arrow data
                this, where = "row", f"{self.format_line} is {self.format}" if self.format_line is not None else f"--format is {self.format}"
            else:
                this, where = "line", f"line {self.format_line} made the file {self.format}" if self.format_line else f"--format is {self.format}"
            raise InputError(self.path, line, None, f"mixed formats: this {this} is {line_format} but {where}", "one format per file")
        return getattr(self, "_" + self.format.replace("-", "_"))(line, obj)

    # ---- field checks

    def _error(self, line: int, field: str | None, problem: str, expected: str | None = None):
        raise InputError(self.path, line, field, problem, expected)

    def _unknown(self, line: int, obj: dict):
        fields = ", ".join(sorted(obj)) or "none"
        self._error(line, None, f"not a known format (fields: {fields})",
                    'items {"prompt","response_a","response_b"}, responses {"prompt","responses":[2 to 6]}, '
                    'trl {"prompt"?,"chosen","rejected"}, '
                    'hh {"chosen","rejected"}, ultrafeedback {"prompt","chosen":[messages],"rejected":[messages]} '
                    'or prompts {"prompt"}')

    def _require(self, line: int, obj: dict, field: str) -> Any:
        if field not in obj:
            self._error(line, field, "missing", f"the field '{field}' in {self.format} format")
        return obj[field]

    def _text(self, line: int, value: Any, field: str) -> str:
        if not isinstance(value, str):
            self._error(line, field, f"wrong type: {_type_name(value)}", "a non-empty string")
        if not value.strip():
            self._error(line, field, "empty string", "a non-empty string")
        if len(value) > self.max_chars:
            self._error(line, field, f"too long: {len(value):,} characters",
                        f"at most {self.max_chars:,} (max_field_chars; raise it with --max-field-chars)")
        return value

    def _messages(self, line: int, value: Any, field: str, allow_empty: bool = False) -> list[dict]:
        if not isinstance(value, list):
            self._error(line, field, f"wrong type: {_type_name(value)}", 'a list of {"role", "content"} messages')
        if not value and not allow_empty:
            self._error(line, field, "empty list", 'at least one {"role", "content"} message')
        out = []
        for i, msg in enumerate(value):
            where = f"{field}[{i}]"
            if not isinstance(msg, dict):
                self._error(line, where, f"wrong type: {_type_name(msg)}", 'a {"role", "content"} object')
            role = msg.get("role")
            if role not in CHAT_ROLES:
                self._error(line, where + ".role", f"{role!r} is not a chat role", " or ".join(CHAT_ROLES))
            out.append({"role": role, "content": self._text(line, msg.get("content"), where + ".content")})
        return out

    def _prompt(self, line: int, value: Any, field: str = "prompt") -> str | list[dict]:
        if isinstance(value, list):
            return self._messages(line, value, field)
        return self._text(line, value, field)

    def _common(self, line: int, obj: dict) -> tuple[str | None, dict, float | None]:
        external_id = obj.get("id")
        if external_id is not None:
            if isinstance(external_id, bool) or not isinstance(external_id, (str, int)):
                self._error(line, "id", f"wrong type: {_type_name(external_id)}", "a string or an integer")
            external_id = str(external_id)
            if not external_id.strip() or len(external_id) > MAX_ID_CHARS:
                self._error(line, "id", f"{len(external_id)} characters", f"1 to {MAX_ID_CHARS} characters")
        meta = obj.get("metadata", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            self._error(line, "metadata", f"wrong type: {_type_name(meta)}", "a JSON object")
        extra = {k: v for k, v in obj.items() if k not in _KNOWN[self.format]}
        if extra:
            meta = {**meta, "extra": extra}
        if meta and json_depth(meta, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
            self._error(line, "metadata", f"nested more than {MAX_JSON_DEPTH} levels deep (unknown fields count as metadata)",
                        f"arrays and objects nested at most {MAX_JSON_DEPTH} levels")
        margin = obj.get("margin")
        if margin is not None and "margin" in _KNOWN[self.format]:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                self._error(line, "margin", f"{margin!r} is not a finite number", "a number")
            margin = float(margin)
        return external_id, meta, margin

    def _optional_text(self, line: int, obj: dict, field: str, limit: int = 200, name: str | None = None) -> str | None:
        value = obj.get(field)
        if value is None:
            return None
        name = name or field
        value = self._text(line, value, name)
        if len(value) > limit:
            self._error(line, name, f"{len(value)} characters", f"at most {limit}")
        return value

    # ---- formats

    def _items(self, line: int, obj: dict) -> Record:
        prompt = self._prompt(line, self._require(line, obj, "prompt"))
        a = self._text(line, self._require(line, obj, "response_a"), "response_a")
        b = self._text(line, self._require(line, obj, "response_b"), "response_b")
        external_id, meta, _ = self._common(line, obj)
        gold = obj.get("gold_choice")
        if gold is not None and gold not in _GOLD_CHOICES:
            self._error(line, "gold_choice", f"{gold!r}", " or ".join(_GOLD_CHOICES))
        return Record(line, prompt, a, b, False, external_id, meta, None,
                      self._optional_text(line, obj, "source_a"), self._optional_text(line, obj, "source_b"), gold)

    def _responses(self, line: int | str, obj: dict) -> Record:
        prompt = self._prompt(line, self._require(line, obj, "prompt"))
        value = self._require(line, obj, "responses")
        if not isinstance(value, list):
            self._error(line, "responses", f"wrong type: {_type_name(value)}",
                        f'a list of {MIN_RESPONSES} to {MAX_RESPONSES} responses (strings or {{"text", "source"}} objects)')
        if not MIN_RESPONSES <= len(value) <= MAX_RESPONSES:
            self._error(line, "responses", f"{len(value)} response(s)", f"{MIN_RESPONSES} to {MAX_RESPONSES} responses")
        responses, first_seen = [], {}
        for i, entry in enumerate(value):
            where = f"responses[{i}]"
            source = None
            if isinstance(entry, dict):
                unknown = sorted(set(entry) - {"text", "source"})
                if unknown:
                    self._error(line, where, f"unknown key(s) {', '.join(unknown)}", '{"text"} or {"text", "source"}')
                if "text" not in entry:
                    self._error(line, where + ".text", "missing", '{"text"} or {"text", "source"}')
                text = self._text(line, entry["text"], where + ".text")
                source = self._optional_text(line, entry, "source", MAX_SOURCE_CHARS, where + ".source")
            elif isinstance(entry, str):
                text = self._text(line, entry, where)
            else:
                self._error(line, where, f"wrong type: {_type_name(entry)}", 'a string or a {"text", "source"} object')
            if text in first_seen:
                self._error(line, where, f"the same text as responses[{first_seen[text]}]", "responses that differ from each other")
            first_seen[text] = i
            responses.append({"text": text, "source": source})
        external_id, meta, _ = self._common(line, obj)
        gold = obj.get("gold_choice")
        if gold is not None:
            if len(responses) != 2:
                self._error(line, "gold_choice", f"given for {len(responses)} responses",
                            "gold_choice only with exactly two responses (a ranking item has no gold choice)")
            if gold not in _GOLD_CHOICES:
                self._error(line, "gold_choice", f"{gold!r}", " or ".join(_GOLD_CHOICES))
        if len(responses) == 2:
            a, b = responses
            return Record(line, prompt, a["text"], b["text"], False, external_id, meta, None, a["source"], b["source"], gold)
        return Record(line, prompt, "", "", False, external_id, meta, responses=responses)

    def _trl(self, line: int, obj: dict) -> Record | Skip:
        chosen = self._text(line, self._require(line, obj, "chosen"), "chosen")
        rejected = self._text(line, self._require(line, obj, "rejected"), "rejected")
        external_id, meta, margin = self._common(line, obj)
        if "prompt" in obj:
            prompt = self._text(line, obj["prompt"], "prompt")
        else:
            prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
            if not prompt.strip():
                return Skip(line, "no shared prompt")
        return self._labelled(line, prompt, chosen, rejected, external_id, meta, margin)

    def _trl_conversational(self, line: int, obj: dict) -> Record | Skip:
        chosen = self._messages(line, self._require(line, obj, "chosen"), "chosen")
        rejected = self._messages(line, self._require(line, obj, "rejected"), "rejected")
        external_id, meta, margin = self._common(line, obj)
        if "prompt" in obj:
            prompt = self._messages(line, obj["prompt"], "prompt")
        else:
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            if not prompt:
                return Skip(line, "no shared prompt")
            if len(chosen) != 1 or len(rejected) != 1:
                return Skip(line, "sides differ before the last assistant turn")
        for field, side in (("chosen", chosen), ("rejected", rejected)):
            if len(side) != 1 or side[0]["role"] != "assistant":
                self._error(line, field, f"{len(side)} message(s) ending in role {side[-1]['role']!r}",
                            "exactly one assistant message after the prompt")
        return self._labelled(line, prompt, chosen[0]["content"], rejected[0]["content"], external_id, meta, margin)

    def _hh(self, line: int, obj: dict) -> Record | Skip:
        chosen = self._text(line, self._require(line, obj, "chosen"), "chosen")
        rejected = self._text(line, self._require(line, obj, "rejected"), "rejected")
        external_id, meta, margin = self._common(line, obj)
        cut = {}
        for field, side in (("chosen", chosen), ("rejected", rejected)):
            at = side.rfind(HH_ASSISTANT)
            if at < 0:
                self._error(line, field, "no '\\n\\nAssistant:' turn",
                            'an HH transcript "\\n\\nHuman: ...\\n\\nAssistant: ..."')
            cut[field] = at + len(HH_ASSISTANT)
        prompt = chosen[: cut["chosen"]]
        if rejected[: cut["rejected"]] != prompt:
            return Skip(line, "sides differ before the last Assistant turn")
        return self._labelled(line, prompt, chosen[cut["chosen"]:], rejected[cut["rejected"]:], external_id, meta, margin)

    def _ultrafeedback(self, line: int | str, obj: dict) -> Record | Skip:
        prompt_text = self._text(line, self._require(line, obj, "prompt"), "prompt")
        chosen = self._messages(line, self._require(line, obj, "chosen"), "chosen")
        rejected = self._messages(line, self._require(line, obj, "rejected"), "rejected")
        external_id, meta, margin = self._common(line, obj)
        scores = {}
        for field in ("score_chosen", "score_rejected"):
            value = obj.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self._error(line, field, f"{value!r} is not a finite number", "a number")
            scores[field] = value
        for field, side in (("chosen", chosen), ("rejected", rejected)):
            if side[-1]["role"] != "assistant":
                self._error(line, field, f"ends in role {side[-1]['role']!r}", "a message list ending in the assistant's response")
        if chosen[:-1] != rejected[:-1]:
            return Skip(line, "sides differ before the last assistant turn")
        prompt = chosen[:-1] or [{"role": "user", "content": prompt_text}]
        if margin is None and len(scores) == 2:
            margin = float(scores["score_chosen"] - scores["score_rejected"])
        if scores:
            meta = {**meta, **scores}
        return self._labelled(line, prompt, chosen[-1]["content"], rejected[-1]["content"], external_id, meta, margin)

    def _labelled(self, line, prompt, chosen, rejected, external_id, meta, margin) -> Record | Skip:
        if not chosen.strip() or not rejected.strip():
            return Skip(line, "empty response")
        if chosen == rejected:
            return Skip(line, "identical responses")
        return Record(line, prompt, chosen, rejected, True, external_id, meta, margin)

    def _prompts(self, line: int, obj: dict) -> PromptRecord:
        prompt = self._prompt(line, self._require(line, obj, "prompt"))
        external_id, meta, _ = self._common(line, obj)
        return PromptRecord(line, prompt, external_id, meta)


def _split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Prompt, chosen and rejected from two texts sharing a prefix, split where trl.extract_prompt
    splits: at the first differing character, moved back one when it follows a space (so the
    responses keep their leading space)."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if 0 < idx < n and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def iter_records(path: str | Path, *, format: str = "auto", max_field_chars: int | None = None,
                 split: str | None = None) -> Iterator[Record | PromptRecord | Skip]:
    """Validated records of a JSONL or Parquet file or a datasets directory, streaming. The
    parser's detected format is on `.format` once the first row is read; use `LineParser` directly
    to see it."""
    parser = LineParser(path, format, max_field_chars)
    for line, obj in read_rows(path, split=split):
        yield parser.parse(line, obj)


def scan_pairs(path: str | Path, *, format: str = "auto", max_field_chars: int | None = None) -> tuple[list[Pair], dict[str, int]]:
    """The labelled pairs of a JSONL or Parquet file or a datasets directory, and the count of
    skipped rows per reason."""
    parser = LineParser(path, format, max_field_chars)
    pairs: list[Pair] = []
    skipped: dict[str, int] = {}
    for line, obj in read_rows(path):
        rec = parser.parse(line, obj)
        if isinstance(rec, Skip):
            skipped[rec.reason] = skipped.get(rec.reason, 0) + 1
            continue
        if not isinstance(rec, Record) or not rec.labelled:
            raise InputError(str(path), line, None, f"{parser.format} lines carry no preference label",
                             "a labelled file: " + ", ".join(LABELLED_FORMATS))
        meta = dict(rec.meta)
        if rec.external_id is not None:
            meta.setdefault("id", rec.external_id)
        pairs.append(Pair(rec.prompt, rec.first, rec.second, rec.margin, meta, line))
    return pairs, skipped


def read_pairs(path: str | Path, *, format: str = "auto") -> list[Pair]:
    """The labelled pairs of a trl, trl-conversational, hh or ultrafeedback input (skipped rows are left out;
    `scan_pairs` also returns their count). Bad input raises InputError."""
    return scan_pairs(path, format=format)[0]
