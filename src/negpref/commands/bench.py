"""``negpref bench NAME``: performance figures as one JSON line (not timed tests).

Each benchmark is a module ``negpref.bench.<name>`` with ``add_arguments(parser)``, an optional
``check(args)`` (settings that depend on each other) and ``run(args) -> dict``; the figures it
returns are printed as JSON. Every numeric option is checked first: finite, >= 0, and > 0
unless its default is 0 (which then means "as is", e.g. ``--threads 0``).
"""

from __future__ import annotations

import argparse
import importlib
import math

from negpref.commands import print_json
from negpref.errors import NegprefError

BENCHMARKS = {
    "step-cost": "negpref.bench.step_cost",
    "dpo-vs-trl": "negpref.bench.dpo_vs_trl",
    "u2a": "negpref.bench.u2a",
    "tofu-eval": "negpref.bench.tofu_eval",
    "shared-prompts": "negpref.bench.shared_prompts",
}


def register(sub) -> None:
    parser = sub.add_parser("bench", help="performance figures as JSON")
    names = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--json", action="store_true", help="print only the JSON line")
        module.add_arguments(p)
        p.set_defaults(func=lambda args, module=module, p=p: _run(module, p, args))


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The rule of the module docstring, naming the flag."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type not in (int, float) or value is None:
            continue
        flag = action.option_strings[-1]
        if not math.isfinite(value) or value < 0:
            raise NegprefError(f"{flag}: must be a finite number >= 0, got {value!r}")
        if value == 0 and action.default != 0:
            raise NegprefError(f"{flag}: must be > 0, got {value!r}")


def _run(module, parser, args) -> int:
    check_numbers(parser, args)
    if hasattr(module, "check"):
        module.check(args)
    figures = module.run(args)
    print_json(figures)
    return 0
