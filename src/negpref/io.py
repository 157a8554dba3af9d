"""Files on disk: atomic writes, output directories that never clobber another run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
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


def read_jsonl_through(path: Path, last_step: int) -> list[dict]:
    """Keep the lines of a run log up to ``last_step``: a resumed run redoes the later ones.

    A torn last line (the run died mid-write) is dropped; a bad line before it is an error.
    """
    if not path.is_file():
        path.touch()
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            kept.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"negpref: {path}:{number}: dropping a torn last line", file=sys.stderr)
                continue
            raise NegprefError(
                f"--resume: {path}:{number}: not a JSON line; repair or delete the line"
            ) from None
    kept = [r for r in kept if r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


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


def stage_path(out: Path) -> Path:
    """Where a run that replaces ``out`` at the end builds it: a hidden sibling, one per ``out``."""
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def run_dir_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on run directory ``out`` for the block, or refuse at once.

    The lock is ``flock`` on a hidden file beside ``out`` (``.NAME.lock``), removed when the
    block ends; the kernel drops the lock when the process ends, however it ends, so a killed
    run never leaves a stale lock (only the file, which the next run reuses).
    """
    import fcntl

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise NegprefError(
                f"--out {out}: another negpref run (pid {holder}) is using it; wait for that "
                "run to end or choose another --out"
            ) from None
        try:  # the holder we waited on may have removed the file: lock the one on disk
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # while still held: no other run can be using this file
        os.close(fd)


def _old_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def replace_dir(stage: Path, out: Path) -> None:
    """Move ``stage`` to ``out``, replacing what is there; the old run survives until then."""
    old = _old_path(out)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def recover_replaced(out: Path) -> None:
    """Undo a ``replace_dir`` killed between its two renames: the old run goes back."""
    old = _old_path(out)
    if old.is_dir() and not out.exists():
        os.replace(old, out)


def _has_checkpoints(stage: Path) -> bool:
    """A Trainer's ``checkpoint-N`` folders, or a job's own ``checkpoints/`` (U2A rounds)."""
    saved = stage / "checkpoints"
    return any(stage.glob("checkpoint-*")) or (saved.is_dir() and any(saved.iterdir()))


@contextlib.contextmanager
def staged_out_dir(
    out: str | os.PathLike, overwrite: bool = False, resume: bool = False, processes=None
) -> Iterator[Path]:
    """``_staged_out_dir`` for one process; with ``processes`` (accelerate's ``PartialState``
    of several) the main process locks, stages and renames, every process writes into the
    stage and learns of a refusal, and the rename waits for all of them."""
    if processes is None or processes.num_processes == 1:
        with _staged_out_dir(out, overwrite, resume) as stage:
            yield stage
        return
    from accelerate.utils import broadcast_object_list

    with contextlib.ExitStack() as stack:
        error = None
        if processes.is_main_process:
            try:
                stack.enter_context(_staged_out_dir(out, overwrite, resume))
            except NegprefError as e:
                error = str(e)
        error = broadcast_object_list([error])[0]
        if error:
            raise NegprefError(error)
        processes.wait_for_everyone()
        yield stage_path(Path(out))
        processes.wait_for_everyone()


@contextlib.contextmanager
def _staged_out_dir(
    out: str | os.PathLike, overwrite: bool = False, resume: bool = False
) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` only if the block succeeds.

    For jobs that produce their files at the end: a failure or a kill leaves ``out`` untouched
    (an old run stays, or nothing appears), never half-written. ``out`` is locked for the
    block. A stage that holds checkpoints is kept on failure and continued by ``resume``; a new
    run refuses to discard it unless ``overwrite``.
    """
    out = check_out_dir(out, overwrite=overwrite, resume=resume)
    with run_dir_lock(out):
        recover_replaced(out)
        stage = stage_path(out)
        if stage.exists() and not resume:
            if _has_checkpoints(stage) and not overwrite:
                raise NegprefError(
                    f"--out {out}: an unfinished run is in {stage}; pass --resume to continue "
                    "it or --overwrite to discard it"
                )
            shutil.rmtree(stage)
        stage.mkdir(parents=True, exist_ok=True)
        os.chmod(stage, 0o777 & ~_umask())
        try:
            yield stage
        except BaseException:
            if not _has_checkpoints(stage):
                shutil.rmtree(stage, ignore_errors=True)
            raise
        replace_dir(stage, out)


CACHE_ENV = "NEGPREF_CACHE_DIR"
CACHE_MARKER = "negpref_cache.json"


def default_cache_dir() -> Path:
    """Where built models are cached: ``$NEGPREF_CACHE_DIR`` or ``~/.cache/negpref``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "negpref"


def build_cached(entry: Path, build) -> tuple[Path, bool]:
    """``entry`` if complete, else ``build(stage) -> info`` into a stage renamed to ``entry``.

    ``info`` (JSON) is written last as ``negpref_cache.json``: an entry without it was never
    finished and is rebuilt. While one process builds an entry, another is refused (locked).
    """
    with run_dir_lock(entry):
        if (entry / CACHE_MARKER).is_file():
            return entry, True
        stage = stage_path(entry)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        try:
            info = build(stage)
            atomic_write_json(stage / CACHE_MARKER, info)
            replace_dir(stage, entry)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return entry, False
