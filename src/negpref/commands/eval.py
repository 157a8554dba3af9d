"""``negpref eval``: evaluate a model on TOFU, or re-aggregate saved per-item logs.

negpref eval --benchmark tofu --split forget10 --model DIR --out DIR [--limit 300]
negpref eval ... --retain-logs TOFU_EVAL.json --log-format open-unlearning
negpref eval aggregate --logs RUN.json --retain-logs RETAIN.json --json
negpref eval --benchmark muse --forget-text F --holdout-text H --qa Q --model DIR --out DIR

Logs are read in TOFU's format or open-unlearning's (TOFU_EVAL.json), detected automatically.
negpref eval --alignment ...   (alignment metrics, ``negpref.eval.alignment``)
"""

from __future__ import annotations

import argparse

from negpref.commands import print_json
from negpref.config import add_config_arguments, build_config
from negpref.eval import AggregateConfig, EvalConfig, alignment, run, run_aggregate


def register(sub) -> None:
    parser = sub.add_parser(
        "eval",
        help="evaluate a model (TOFU, alignment) or re-aggregate saved logs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",
    )
    add_config_arguments(parser, EvalConfig)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--alignment",
        action="store_true",
        help="alignment metrics instead of a benchmark (negpref.eval.alignment)",
    )
    alignment.add_arguments(parser)
    parser.set_defaults(func=_eval)

    commands = parser.add_subparsers(dest="eval_command", metavar="COMMAND")
    agg = commands.add_parser(
        "aggregate",
        help="recompute model utility / forget quality from saved per-item logs",
        description="Recompute TOFU's aggregates from per-item logs (ours or TOFU's published).",
    )
    add_config_arguments(agg, AggregateConfig)
    agg.add_argument("--json", action="store_true", help="print the results as JSON")
    agg.set_defaults(func=_aggregate)


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    for key, value in result.items():
        if not isinstance(value, dict):
            print(f"{key:>28}: {value if not isinstance(value, float) else f'{value:.6g}'}")


def _eval(args) -> int:
    if args.alignment:
        return int(alignment.main(args) or 0)
    from accelerate import PartialState

    result = run(build_config(EvalConfig, args), progress=not args.json)
    if PartialState().is_main_process:  # under `accelerate launch`: report once
        _print(result, args.json)
    return 0


def _aggregate(args) -> int:
    _print(run_aggregate(build_config(AggregateConfig, args)), args.json)
    return 0
