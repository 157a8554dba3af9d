"""``negpref bench NAME``: performance figures as one JSON line (not timed tests).

Each benchmark is a module ``negpref.bench.<name>`` with ``add_arguments(parser)`` and
``run(args) -> dict``; the figures it returns are printed as JSON.
"""

from __future__ import annotations

import importlib
import json

BENCHMARKS = {
    "step-cost": "negpref.bench.step_cost",
    "dpo-vs-trl": "negpref.bench.dpo_vs_trl",
    "u2a": "negpref.bench.u2a",
}


def register(sub) -> None:
    parser = sub.add_parser("bench", help="performance figures as JSON")
    names = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--json", action="store_true", help="print only the JSON line")
        module.add_arguments(p)
        p.set_defaults(func=lambda args, module=module: _run(module, args))


def _run(module, args) -> int:
    figures = module.run(args)
    print(json.dumps(figures))
    return 0
