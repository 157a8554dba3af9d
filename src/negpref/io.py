"""Files on disk: atomic writes, output directories that never clobber another run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from negpref.errors import NegprefError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file owner-only; give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it, so a killed run keeps every line it logged."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def check_out_dir(out: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> Path:
    """Validate an output directory before any work starts; return it as a Path.

    A non-empty directory is refused unless ``overwrite`` (it will be replaced) or ``resume``
    (it will be continued). The parent must be writable.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NegprefError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise NegprefError(
            f"--out {out}: directory exists and is not empty; pass --overwrite to replace it "
            "or choose another directory"
        )
    parent = out.parent if not out.exists() else out
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise NegprefError(f"--out {out}: {probe} is not writable")
    return out


@contextlib.contextmanager
def staged_out_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` only if the block succeeds.

    For jobs that produce all their files at the end: a failure or a kill leaves ``out``
    untouched (an old run stays, or nothing appears), never half-written.
    """
    out = check_out_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    os.chmod(stage, 0o777 & ~_umask())
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
