"""``negpref demo``: the whole unlearning study on fictitious authors, on CPU, with a report."""

from __future__ import annotations

import argparse
import json

from negpref.config import add_config_arguments, build_config
from negpref.demo import DEFAULT_METHODS, DemoConfig, run_demo

EPILOG = f"""Builds a TOFU-like corpus of fictitious authors, trains a small Llama on all of it
(the target) and one on the retain split (the gold standard), caches both, unlearns the forget
split with each method ({", ".join(DEFAULT_METHODS)} by default) evaluating every
epoch, and writes OUT/report.html and OUT/summary.json.

examples:
  negpref demo                                   # 5-10 minutes on 2 CPU cores (first run)
  negpref demo --quick --out runs/demo-quick     # about a minute
  negpref demo --methods NPO NPO+RT GA --split forget05 --out runs/f05
"""


def register(sub) -> None:
    parser = sub.add_parser(
        "demo",
        help="the whole unlearning study end to end on CPU, with a report",
        description=__doc__.split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, DemoConfig)
    parser.add_argument("--json", action="store_true", help="print summary.json on stdout")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    config = build_config(DemoConfig, args)
    summary = run_demo(config)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(format_summary(summary, config.out))
    return 0


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def format_summary(summary: dict, out: str) -> str:
    """The results table as plain text, then where the report is."""
    lines = [f"{'model':<28}{'forget quality':>16}{'model utility':>15}{'peak epoch':>12}"]
    for key, label in (("target", "target (before)"), ("retain", "retain (gold)")):
        ref = summary[key]
        lines.append(
            f"{label:<28}{_num(ref['forget_quality']):>16}{_num(ref['model_utility']):>15}"
        )
    for name, m in summary["methods"].items():
        lines.append(
            f"{name:<28}{_num(m['forget_quality']):>16}{_num(m['model_utility']):>15}"
            f"{m['peak_epoch']:>12g}"
        )
    for f in summary["findings"]:
        lines.append(f"{'holds' if f['holds'] else 'does not hold'}: {f['claim']}")
    lines.append(f"report: {out}/report.html ({summary['timing']['total_s']:.0f} s)")
    return "\n".join(lines)
