"""Record files: JSON arrays or JSON Lines, validated with errors that name file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from negpref.errors import NegprefError


def load_records(
    path: str | os.PathLike, required: tuple[str, ...] = (), what: str = "records"
) -> list[dict]:
    """Load a list of dict records from a JSON array or a JSON Lines file.

    Every record must hold the ``required`` fields as non-empty values. Errors name the file,
    the line (JSON Lines) or the record index (JSON array), and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise NegprefError(f"{path}: {what} file not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise NegprefError(f"{path}: {what} file is empty")
    stripped = text.lstrip()
    records: list[tuple[str, object]] = []
    if stripped.startswith("["):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise NegprefError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        records = [(f"record {i}", r) for i, r in enumerate(loaded)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise NegprefError(
                    f"{path}:{lineno}: malformed JSON line ({e.msg}); each line must be one "
                    "JSON object"
                ) from None
    if not records:
        raise NegprefError(f"{path}: no {what} in file")
    out = []
    for where, record in records:
        if not isinstance(record, dict):
            raise NegprefError(
                f"{path} {where}: expected a JSON object, got {type(record).__name__}"
            )
        missing = [k for k in required if record.get(k) in (None, "", [])]
        if missing:
            raise NegprefError(
                f"{path} {where}: missing field(s) {', '.join(missing)}; each record needs "
                f"{', '.join(required)}"
            )
        out.append(record)
    return out


def load_lines(path: str | os.PathLike, what: str = "lines") -> list[str]:
    """Non-empty lines of a text file, e.g. refusal answers (``idontknow.jsonl`` is plain text)."""
    path = Path(path)
    if not path.is_file():
        raise NegprefError(f"{path}: {what} file not found")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise NegprefError(f"{path}: {what} file is empty")
    return lines
