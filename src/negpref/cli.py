"""The ``negpref`` command: parses, validates, calls library functions. Nothing else.

Each verb lives in ``negpref.commands.<verb>`` as ``register(subparsers)``, which adds its
parser and sets ``func(args) -> int``. Errors the user can fix (``NegprefError``) print one
line and exit with status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from negpref import commands
from negpref.errors import NegprefError

VERBS = ("demo", "unlearn", "eval", "align", "u2a", "synthetic", "bench", "study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="negpref",
        description="Unlearning and preference optimization with negative examples.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        importlib.import_module(f"negpref.commands.{verb}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = getattr(args, "json", False)
    try:
        with _result_only_stdout() if as_json else contextlib.nullcontext():
            return int(args.func(args) or 0)
    except NegprefError as e:
        print(f"negpref {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"negpref {args.verb}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _result_only_stdout():
    """Under ``--json``, standard output carries the result alone: while the verb runs,
    ``sys.stdout`` and file descriptor 1 (so worker processes and native code too) point at
    standard error, and ``print_json`` writes to the standard output the process was given."""
    sys.stdout.flush()
    try:
        on_fd1 = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # a replaced stream (e.g. pytest's capsys)
        on_fd1 = False
    saved = os.dup(1)
    commands.results = os.fdopen(os.dup(saved), "w") if on_fd1 else sys.stdout
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        if on_fd1:
            commands.results.close()
        commands.results = sys.stdout


if __name__ == "__main__":
    sys.exit(main())
