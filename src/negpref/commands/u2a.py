"""``negpref u2a``: select and weight the negative samples worth unlearning, then unlearn them.

``negpref u2a --model DIR --forget NEG.jsonl ...`` runs Algorithm 1 of the U2A paper on a
causal LM; ``negpref u2a synthetic`` and ``negpref u2a ablation`` reproduce its checks at CPU
scale (a softmax policy with an exact objective; the Figure 4 ablation on a tiny LM).
"""

from __future__ import annotations

import argparse

from negpref.commands import print_json
from negpref.config import add_config_arguments, build_config
from negpref.studies.u2a_synthetic import U2ASyntheticConfig, run_synthetic_study
from negpref.studies.u2a_toy import U2AAblationConfig, run_ablation_study
from negpref.u2a import U2A_METHODS, U2ARunConfig, run

EPILOG = f"""examples:
  negpref u2a --model MODEL_DIR --forget negatives.jsonl --objective dpo \\
      --preference heldout_prefs.jsonl --loss NPO --out runs/u2a
  negpref u2a --gguf model.gguf --forget negatives.jsonl --objective reward \\
      --prompts prompts.jsonl --reward refusal_keywords --lora --out runs/u2a
  negpref u2a synthetic --out runs/u2a-synthetic
  negpref u2a ablation --out runs/u2a-ablation

methods (--loss, the unlearning registry's names): {", ".join(U2A_METHODS)}
negatives: JSON/JSONL records with prompt+response, question+answer or prompt+rejected.
rewards: refusal_keywords (U2A Table 5) or module:function (prompt, response)->float.
"""


def register(sub) -> None:
    parser = sub.add_parser(
        "u2a",
        help="select and weight negative samples, then unlearn them to align",
        description=__doc__.split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, U2ARunConfig)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=_main)
    modes = parser.add_subparsers(dest="u2a_mode", metavar="{synthetic,ablation}")
    for name, cls, func, help_text in (
        ("synthetic", U2ASyntheticConfig, _synthetic, "known-answer check on a softmax policy"),
        ("ablation", U2AAblationConfig, _ablation, "Figure 4: top-K by gain vs random K"),
    ):
        mode = modes.add_parser(name, help=help_text)
        add_config_arguments(mode, cls)
        mode.add_argument("--json", action="store_true", help="print the summary as JSON")
        mode.set_defaults(func=func)


def _print(args, summary: dict, line: str) -> None:
    if args.json:
        print_json(summary)
    else:
        print(line)


def _main(args) -> int:
    done = run(build_config(U2ARunConfig, args))
    s = done.summary
    _print(args, s, f"selected {s['selected']} of {s['candidates']} negatives; "
           f"J {s['objective_initial']:.4g} -> {s['objective_final']:.4g} "
           f"({s['stop_reason']}); wrote {done.out}")  # fmt: skip
    return 0


def _synthetic(args) -> int:
    config = build_config(U2ASyntheticConfig, args)
    summary = run_synthetic_study(config)
    lines = [f"seed {r['seed']}: selected {r['selected']}, precision {r['precision']:.2f}, "
             f"recall {r['recall']:.2f}; J u2a {r['J_u2a']:.4f}, all {r['J_all']:.4f}, "
             f"random {r['J_random_mean']:.4f}" for r in summary["runs"]]  # fmt: skip
    _print(args, summary, "\n".join([*lines, f"wrote {config.out}"]))
    return 0


def _ablation(args) -> int:
    config = build_config(U2AAblationConfig, args)
    summary = run_ablation_study(config)
    lines = [f"K={r['k']}: top-K {r['top_k']['mean']:.3f}+-{r['top_k']['std']:.3f}  "
             f"random {r['random_k']['mean']:.3f}+-{r['random_k']['std']:.3f}"
             for r in summary["rows"]]  # fmt: skip
    _print(args, summary, "\n".join([*lines, f"wrote {config.out}"]))
    return 0
