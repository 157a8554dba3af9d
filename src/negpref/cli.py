"""The ``negpref`` command: parses, validates, calls library functions. Nothing else.

Each verb lives in ``negpref.commands.<verb>`` as ``register(subparsers)``, which adds its
parser and sets ``func(args) -> int``. Errors the user can fix (``NegprefError``) print one
line and exit with status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
    commands.results = sys.stdout
    # --json: stdout carries the result alone; whatever else reaches it goes to stderr
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else None
    try:
        with quiet_stdout or contextlib.nullcontext():
            return int(args.func(args) or 0)
    except NegprefError as e:
        print(f"negpref {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"negpref {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
