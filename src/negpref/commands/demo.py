"""``negpref demo``: the whole unlearning study on fictitious authors, on CPU, with a report."""

from __future__ import annotations

import argparse

from negpref.commands import print_json
from negpref.config import add_config_arguments, build_config
from negpref.studies.demo import DEFAULT_METHODS, DEFAULT_SEEDS, DemoConfig, run_demo
from negpref.studies.demo.report import format_spread

EPILOG = f"""Builds a TOFU-like corpus of fictitious authors and, for each seed
({" ".join(map(str, DEFAULT_SEEDS))} by default), trains a small Llama on all of it (the target) and
one on the retain split (the gold standard), caches both, and unlearns the forget split with
each method ({", ".join(DEFAULT_METHODS)} by default), evaluating every epoch.
Writes OUT/report.html and OUT/summary.json: every figure as mean ± std over the seeds, each
paper claim judged over the seeds, the environment (versions, threads, CPU).

examples:
  negpref demo                                   # under 10 minutes on 2 idle CPU cores
  negpref demo --quick --out runs/demo-quick     # about 1.5 minutes
  negpref demo --seeds 0 1 2 3 4 --methods NPO NPO+RT GA --split forget05 --out runs/f05
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
        print_json(summary)
        return 0
    print(format_summary(summary, config.out))
    return 0


def format_summary(summary: dict, out: str) -> str:
    """The results table (mean ± std over the seeds), the verdicts, then where the report is."""
    seeds = summary["seeds"]
    lines = [
        f"{len(seeds)} seeds ({' '.join(str(s) for s in seeds)}); mean ± std over the seeds",
        f"{'model':<18}{'forget quality':>22}{'model utility':>20}{'peak epoch':>16}",
    ]
    for key, label in (("target", "target (before)"), ("retain", "retain (gold)")):
        ref = summary[key]
        lines.append(
            f"{label:<18}{format_spread(ref['forget_quality']):>22}"
            f"{format_spread(ref['model_utility']):>20}"
        )
    for name, m in summary["methods"].items():
        lines.append(
            f"{name:<18}{format_spread(m['forget_quality']):>22}"
            f"{format_spread(m['model_utility']):>20}{format_spread(m['peak_epoch']):>16}"
        )
    for f in summary["findings"]:
        outcomes = " ".join(f"{o['seed']}:{'yes' if o['holds'] else 'no'}" for o in f["per_seed"])
        lines.append(
            f"{f['verdict']} ({f['holds_in']} of {f['seeds']} seeds; {outcomes}): {f['claim']}"
        )
    lines.append(f"report: {out}/report.html ({summary['timing']['total_s']:.0f} s)")
    return "\n".join(lines)
