"""``negpref study``: paper reproductions at CPU scale (``tofu``: the NPO study on a real model)."""

from __future__ import annotations

import argparse

from negpref.commands import print_json
from negpref.config import add_config_arguments, build_config
from negpref.studies.tofu import TofuStudyConfig, run_tofu_study

EPILOG = """examples:
  negpref study tofu --out runs/tofu                       # SmolLM2-135M-Instruct, 10 authors
  negpref study tofu --authors 4 --methods NPO GA --epochs 2 --out runs/tofu-small
  negpref study tofu --model LLAMA_DIR --authors 200 --forget-split forget10 \\
      --mixed-precision bf16 --eval-limit 0 --max-new-tokens 200 --out runs/tofu-full   # a GPU
"""


def register(sub) -> None:
    parser = sub.add_parser("study", help="paper reproductions at CPU scale (tofu)")
    studies = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    tofu = studies.add_parser(
        "tofu",
        help="the NPO paper's TOFU protocol on a real pretrained model and the real TOFU data",
        description=run_tofu_study.__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(tofu, TofuStudyConfig)
    tofu.add_argument("--json", action="store_true", help="print the summary as JSON")
    tofu.set_defaults(func=_tofu)


def _tofu(args) -> int:
    summary = run_tofu_study(build_config(TofuStudyConfig, args))
    if args.json:
        print_json(summary)
        return 0
    for method, r in summary["methods"].items():
        peak, final = r["peak"], r["final"]
        print(
            f"{method:>10}: peak FQ {peak['forget_quality']:.3g} / MU {peak['model_utility']:.3f}"
            f" (epoch {peak['epoch']:g}); final {final['forget_quality']:.3g} / "
            f"{final['model_utility']:.3f}"
        )
    for f in summary["findings"]:
        print(f"[{f['verdict']}] {f['claim']}: {f['evidence']}")
    print(f"wrote {summary['config']['out']} in {summary['wall_s'] / 60:.1f} min")
    return 0
