"""``negpref unlearn``: unlearn a forget set from a causal LM (any method), save model + metrics."""

from __future__ import annotations

import argparse

from negpref.commands import print_json
from negpref.config import add_config_arguments, build_config
from negpref.unlearn import PRESETS, UnlearnConfig, run

EPILOG = """methods: {methods}

examples:
  negpref unlearn --model MODEL_DIR --forget tofu/forget01.json --method NPO --out runs/npo
  negpref unlearn --model MODEL_DIR --forget tofu/forget01.json --retain tofu/retain90.json \\
      --method NPO+RT --lora --merge --out runs/npo-rt
  negpref unlearn --config configs/npo_rt.yaml --out runs/npo-rt --resume
  accelerate launch --config_file configs/accelerate_ddp.yaml -m negpref.cli unlearn ...
""".format(methods=", ".join(PRESETS))


def register(sub) -> None:
    parser = sub.add_parser(
        "unlearn",
        help="unlearn a forget set from a model (any method), save model + metrics",
        description=__doc__.split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, UnlearnConfig)
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    from accelerate import PartialState

    config = build_config(UnlearnConfig, args)
    result = run(config)
    if not PartialState().is_main_process:  # under `accelerate launch`: report once
        return 0
    if args.json:
        print_json(result.summary)
        return 0
    final = result.summary["final_metrics"]
    shown = ", ".join(
        f"{k} {final[k]:.4g}" for k in ("loss", "logps/forget", "nll/retain") if k in final
    )
    where = result.summary.get("model_dir") or result.summary.get("adapter_dir") or result.out_dir
    print(
        f"{result.summary['method']}: {result.summary['steps']} steps in "
        f"{result.summary['train_s']:.1f}s ({shown}); saved {where}"
    )
    return 0
