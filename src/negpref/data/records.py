"""Record files and objects -> validated dict records whose errors name file and place.

Sources: JSON arrays, JSON Lines and CSV (parsed here, so every error names the line; CSV
cells stay strings, so an answer "42" is text, not a number), Parquet files and ``datasets``
``save_to_disk`` folders (read with ``datasets``), hub dataset names ``OWNER/NAME`` or
``OWNER/NAME:CONFIG`` (online only; the ``train`` or only split), and
``datasets.Dataset`` / ``DatasetDict`` objects or lists of dicts in Python (``as_records``).

Places are numbered one way in every verb: ``FILE:LINE`` (1-based line) for JSON Lines and
CSV, ``FILE:LINE record N`` (1-based record, with the line it starts on) for a JSON array, and
``SOURCE record N`` (1-based row) for Parquet, dataset folders, hub datasets and objects.

A record too long to be trained on whole is refused before anything tokenizes it: no string
may hold more than ``max_length * CHARS_PER_TOKEN_BOUND`` characters.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from negpref.errors import NegprefError

# Tokens are short: SmolLM2-135M's 49,152 tokens average 6.7 characters and the longest is 81
# (a newline and 80 spaces). A string of more than 64 x max_length characters is ~10x more
# than max_length tokens of ordinary text, of which all but a small prefix would be cut: it is
# refused before it costs a tokenizer pass over megabytes (a 50 MB record cost 176 s, 8.66 GB).
CHARS_PER_TOKEN_BOUND = 64
SUFFIX_KINDS = {".parquet": "parquet", ".csv": "csv"}
# Files ``save_to_disk`` writes: a folder holding one of them is a dataset, not a mistake.
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Field kinds checked by ``check_kinds``: a text is a non-empty string; a prompt is that or a
# chat message list ({"role", "content"} dicts).
TEXT, PROMPT = "text", "prompt"


class Records(list):
    """A list of dict records that remembers where each came from (``places[i]``)."""

    def __init__(self, rows: Iterable[dict] = (), places: list[str] | None = None, source=""):
        super().__init__(rows)
        self.source = str(source)
        self.places = places if places is not None else row_places(self.source, len(self))

    def where(self, i: int) -> str:
        return self.places[i]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return Records(list.__getitem__(self, key), self.places[key], self.source)
        return list.__getitem__(self, key)


def row_places(source: str, n: int) -> list[str]:
    return [f"{source} record {i}" for i in range(1, n + 1)]


def place(records, i: int, source: str) -> str:
    """Where record ``i`` came from, for any sequence of records."""
    return records.where(i) if isinstance(records, Records) else f"{source} record {i + 1}"


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    record = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _decode_utf8(raw: bytes, path: Path, first_line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise NegprefError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file "
            "as UTF-8"
        ) from None


def _parse(text: str, where: str, start: int = 0) -> tuple[object, int]:
    try:
        return _DECODER.raw_decode(text, start)
    except _DuplicateKey as e:
        raise NegprefError(
            f"{where}: duplicate key `{e.args[0]}` in one object; keep only one of them"
        ) from None
    except RecursionError:
        raise NegprefError(f"{where}: JSON nested too deeply to be a record") from None


def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            # Parsed in place (no stripped copies): a huge line is held once as bytes, once
            # as text, until its length check refuses it.
            line = _decode_utf8(raw, path, lineno)
            del raw
            start = _skip_space(line, 1 if lineno == 1 and line.startswith("\ufeff") else 0)
            if start == len(line):
                continue
            where = f"{path}:{lineno}"
            try:
                value, end = _parse(line, where, start)
            except json.JSONDecodeError as e:
                raise NegprefError(
                    f"{where}:{e.colno}: malformed JSON line ({e.msg}); give JSON Lines (one "
                    "object per line) or a JSON array of records"
                ) from None
            if line[end:].strip():
                raise NegprefError(
                    f"{where}:{end + 1}: more than one JSON value on the line; each line must "
                    "be one JSON object"
                )
            yield where, value


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _json_array(path: Path) -> Iterator[tuple[str, object]]:
    """The elements of a JSON array one by one, each with the line it starts on."""
    text = _decode_utf8(path.read_bytes(), path, 1).removeprefix("\ufeff")
    i = _skip_space(text, text.index("[") + 1)
    line, counted_to, n = 1, 0, 0

    def at(i: int) -> str:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return f"{path}:{line}"

    if i < len(text) and text[i] == "]":
        i += 1
    else:
        while True:
            n += 1
            where = f"{at(i)} record {n}"
            try:
                value, i = _parse(text, where, i)
            except json.JSONDecodeError as e:
                raise NegprefError(
                    f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})"
                ) from None
            yield where, value
            i = _skip_space(text, i)
            if i < len(text) and text[i] == ",":
                i = _skip_space(text, i + 1)
                continue
            if i < len(text) and text[i] == "]":
                i += 1
                break
            at(i)
            raise NegprefError(
                f"{path}:{line}: malformed JSON (expected ',' or ']' after record {n}); the file "
                "must be one JSON array"
            )
    if _skip_space(text, i) < len(text):
        at(i)
        raise NegprefError(f"{path}:{line}: extra data after the JSON array")


def load_json(path: str | os.PathLike, what: str) -> object:
    """One JSON document (e.g. eval logs), UTF-8, without duplicate keys; errors name
    ``what`` (the flag), the file and the line."""
    path = Path(path)
    if path.is_dir():
        raise NegprefError(f"{what} {path}: is a directory, not a JSON file")
    if not path.is_file():
        raise NegprefError(f"{what} {path}: file not found")
    text = _decode_utf8(path.read_bytes(), path, 1).removeprefix("\ufeff")
    start = _skip_space(text, 0)
    if start == len(text):
        raise NegprefError(f"{what} {path}: file is empty")
    try:
        value, end = _parse(text, f"{what} {path}", start)
    except json.JSONDecodeError as e:
        raise NegprefError(
            f"{what} {path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})"
        ) from None
    if _skip_space(text, end) < len(text):
        line = text.count("\n", 0, end) + 1
        raise NegprefError(f"{what} {path}:{line}: extra data after the JSON document")
    return value


def _csv_records(path: Path) -> Iterator[tuple[str, object]]:
    """Rows of a CSV file with a header line, as dicts of strings, each with its first line."""
    text = _decode_utf8(path.read_bytes(), path, 1).removeprefix("\ufeff")
    row_start = [0]  # the line the row being read starts on (blank lines are skipped)

    def lines() -> Iterator[str]:
        for n, line in enumerate(io.StringIO(text, newline=""), start=1):
            if not row_start[0] and line.strip():
                row_start[0] = n
            yield line

    reader = csv.DictReader(lines(), strict=True)
    try:
        header = reader.fieldnames or []  # reading it consumes the header line
        while True:
            row_start[0] = 0
            row = next(reader, None)
            if row is None:
                return
            where = f"{path}:{row_start[0]}"
            if None in row:  # csv puts cells beyond the header under the key None
                raise NegprefError(
                    f"{where}: more cells than the header has columns "
                    f"({', '.join(header)}); quote cells that hold commas"
                )
            yield where, {k: v for k, v in row.items() if v is not None}
    except csv.Error as e:
        line = row_start[0] or reader.line_num
        raise NegprefError(f"{path}:{line}: malformed CSV ({e}); check the quotes") from None


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1]


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    return _json_array(path) if _first_byte(path) == b"[" else _jsonl(path)


def _one_split(loaded, source: str):
    """A ``DatasetDict``'s ``train`` split, or its only split."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    if "train" in loaded:
        return loaded["train"]
    raise NegprefError(
        f"{source}: dataset has splits {', '.join(loaded)} and no `train`; pass the split to use "
        "(e.g. dataset_dict['test'])"
    )


def _read_with_datasets(path: Path | str, kind: str) -> list[dict]:
    """Rows of a Parquet file, a ``save_to_disk`` folder or a hub dataset, as dicts."""
    import datasets

    # Local files get a throwaway cache: rows stay in memory, nothing lands in the HF cache.
    with tempfile.TemporaryDirectory(prefix="negpref-ds-") as cache:
        try:
            if kind == "disk":
                loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
            elif kind == "hub":  # downloads go to the user's HF cache, as datasets does
                repo, _, config = str(path).partition(":")
                loaded = datasets.load_dataset(repo, config or None, keep_in_memory=True)
            else:
                loaded = datasets.Dataset.from_parquet(
                    str(path), cache_dir=cache, keep_in_memory=True
                )
        except NegprefError:
            raise
        except Exception as e:  # pyarrow and datasets raise many types for a bad file
            raise NegprefError(f"{path}: could not read as {kind} ({one_line(e)})") from None
        return _one_split(loaded, str(path)).to_list()


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (all of it, not just its first line), shortened."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_kind(path: Path, what: str) -> str:
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASET_MARKERS):
            return "disk"
        raise NegprefError(
            f"{path}: is a directory, not a {what} file; give a JSON, JSONL, Parquet or CSV "
            "file, or a folder written by datasets' save_to_disk"
        )
    if path.is_file():
        return SUFFIX_KINDS.get(path.suffix.lower(), "json")
    if path.exists():
        raise NegprefError(f"{path}: not a regular file; give a {what} file")
    return "hub"


def _long_string(value, max_chars: int, name: str = "") -> tuple[str, int] | None:
    """The first string inside ``value`` longer than ``max_chars``: (its field path, length)."""
    if isinstance(value, str):
        return (name, len(value)) if len(value) > max_chars else None
    if isinstance(value, dict):
        children = ((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        children = ((f"{name}[{k}]", v) for k, v in enumerate(value))
    else:
        return None
    for child_name, child in children:
        if found := _long_string(child, max_chars, child_name):
            return found
    return None


def _too_long(where: str, what: str, n: int, max_length: int) -> NegprefError:
    return NegprefError(
        f"{where}: {what} holds {n:,} characters, far more than --max-length {max_length} "
        f"tokens hold (the limit is {max_length * CHARS_PER_TOKEN_BOUND:,} characters, "
        f"{CHARS_PER_TOKEN_BOUND} per token); split or shorten it, or raise --max-length"
    )


def check_lengths(records, max_length: int | None, source: str) -> None:
    """Refuse a record holding a string far longer than ``max_length`` tokens can hold."""
    if not max_length:
        return
    for i, record in enumerate(records):
        found = _long_string(record, max_length * CHARS_PER_TOKEN_BOUND)
        if found:
            name, n = found
            raise _too_long(place(records, i, source), f"field `{name}`", n, max_length)


def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value
        )
    )


def check_kinds(records, kinds: dict[str, str], source: str) -> None:
    """Each present field of ``kinds`` holds its kind: ``TEXT`` or ``PROMPT`` (see above)."""
    for i, record in enumerate(records):
        for name, kind in kinds.items():
            if name not in record or record[name] is None:
                continue
            value = record[name]
            if isinstance(value, str) and value.strip():
                continue
            if kind == PROMPT and _is_messages(value):
                continue
            want = "a non-empty string" + (
                " or a chat message list ({role, content})" if kind == PROMPT else ""
            )
            got = (
                "an empty string" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
            )
            if len(got) > 80:
                got = got[:77] + "..."
            raise NegprefError(
                f"{place(records, i, source)}: field `{name}` must be {want}, got {got}; fix "
                "the record"
            )


def _validate(records: Records, required: tuple[str, ...], kinds: dict[str, str] | None) -> Records:
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise NegprefError(
                f"{records.where(i)}: expected a JSON object (one record), got "
                f"{type(record).__name__}"
            )
        missing = [k for k in required if record.get(k) in (None, "", [])]
        if missing:
            raise NegprefError(
                f"{records.where(i)}: missing field(s) {', '.join(missing)}; each record needs "
                f"{', '.join(required)}"
            )
    if kinds:
        check_kinds(records, kinds, records.source)
    return records


def load_records(
    source,
    required: tuple[str, ...] = (),
    what: str = "records",
    kinds: dict[str, str] | None = None,
    max_length: int | None = None,
) -> Records:
    """Load dict records from a file, folder, hub name or object (see the module docstring).

    Every record must hold the ``required`` fields as non-empty values, the fields of
    ``kinds`` as their kind, and no string beyond what ``max_length`` tokens can hold.
    """
    if not isinstance(source, (str, os.PathLike)):
        records = as_records(source, what)
        check_lengths(records, max_length, what)
        return _validate(records, required, kinds)
    path = Path(source)
    kind = _source_kind(path, what)
    if kind == "hub":  # OWNER/NAME or OWNER/NAME:CONFIG (e.g. locuslab/TOFU:forget01)
        from negpref.hub import local_or_hub

        local_or_hub(str(source).partition(":")[0], "", f"{what} file or folder")
    if kind in ("json", "csv"):
        places, rows = [], []
        for where, value in _json_records(path) if kind == "json" else _csv_records(path):
            # checked as it is read: a huge record stops the read, it is not kept
            check_lengths(Records([value], [where]), max_length, str(path))
            places.append(where)
            rows.append(value)
        records = Records(rows, places, str(path))
    else:
        records = Records(
            _read_with_datasets(source if kind == "hub" else path, kind), source=str(source)
        )
        check_lengths(records, max_length, str(source))
    if not records:
        raise NegprefError(f"{source}: {what} file is empty (no records)")
    return _validate(records, required, kinds)


def as_records(obj, what: str = "records") -> Records:
    """Records handed over in Python: a ``datasets.Dataset``/``DatasetDict`` or dicts."""
    if isinstance(obj, Records):
        return obj
    if type(obj).__module__.startswith("datasets"):
        obj = _one_split(obj, what)
        if hasattr(obj, "to_list"):
            obj = obj.to_list()
    if isinstance(obj, dict) or not isinstance(obj, Iterable) or isinstance(obj, (str, bytes)):
        raise NegprefError(
            f"{what}: expected a file path, a datasets.Dataset or a list of dict records, got "
            f"{type(obj).__name__}"
        )
    records = Records(list(obj), source=what)
    if not records:
        raise NegprefError(f"{what}: no records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise NegprefError(f"{records.where(i)}: expected a dict, got {type(record).__name__}")
    return records


def load_lines(
    path: str | os.PathLike, what: str = "lines", max_length: int | None = None
) -> list[str]:
    """Non-empty lines of a text file, e.g. refusal answers (``idontknow.jsonl`` is plain text);
    none longer than ``max_length`` tokens can hold (``check_lengths``)."""
    path = Path(path)
    if path.is_dir():
        raise NegprefError(f"{path}: is a directory, not a {what} file (one answer per line)")
    if not path.is_file():
        raise NegprefError(f"{path}: {what} file not found")
    text = _decode_utf8(path.read_bytes(), path, 1).removeprefix("\ufeff")
    numbered = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if not numbered:
        raise NegprefError(f"{path}: {what} file is empty")
    for n, line in numbered:
        if max_length and len(line) > max_length * CHARS_PER_TOKEN_BOUND:
            raise _too_long(f"{path}:{n}", "the line", len(line), max_length)
    return [line for _, line in numbered]
