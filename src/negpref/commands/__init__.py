"""The CLI's verbs, one module each (``register(subparsers)``); see ``negpref.cli``.

Under ``--json`` standard output carries the JSON result alone: ``negpref.cli.main`` sends
everything else written there, by this process or its workers (a library's warnings, e.g.
DeepSpeed's accelerator notice, which its logger prints to stdout), to standard error, and a
verb prints its result with :func:`print_json`.
"""

from __future__ import annotations

import json
import sys

# where print_json writes: the standard output the process was given (set by cli.main)
results = sys.stdout


def print_json(value) -> None:
    """The verb's result as one JSON line on standard output."""
    print(json.dumps(value), file=results, flush=True)
