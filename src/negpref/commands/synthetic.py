"""``negpref synthetic STUDY``: the NPO paper's synthetic experiments.

``figure4`` (Figures 4 and 10: unlearning methods on the Gaussian-logistic task),
``beta-sweep`` (Figure 3: NPO -> GA as beta -> 0) and ``divergence`` (Theorem 2: GA's
linear vs NPO's logarithmic divergence). Each writes ``results.json``, PNG figures and
``report.html`` into ``--out``, all at once.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from negpref.config import add_config_arguments, build_config
from negpref.io import staged_out_dir
from negpref.synthetic import outputs
from negpref.synthetic.divergence import DivergenceConfig, run_divergence
from negpref.synthetic.study import BetaSweepConfig, Figure4Config, run_beta_sweep, run_figure4

STUDIES = {
    "figure4": (
        Figure4Config,
        run_figure4,
        outputs.write_figure4,
        "Figures 4 and 10: GA, GA+RT, NPO, NPO+RT, DPO+RT, IDK+RT on the synthetic task",
    ),
    "beta-sweep": (
        BetaSweepConfig,
        run_beta_sweep,
        outputs.write_beta_sweep,
        "Figure 3: NPO trajectories for several betas approach GA's as beta -> 0",
    ),
    "divergence": (
        DivergenceConfig,
        run_divergence,
        outputs.write_divergence,
        "Theorem 2: ||theta_t - theta_init||_{X^T X} grows linearly for GA, log for NPO",
    ),
}


def register(sub) -> None:
    parser = sub.add_parser(
        "synthetic",
        help="the NPO paper's synthetic experiments",
        description="The NPO paper's synthetic experiments. Each study writes results.json, "
        "PNG figures and report.html into --out, all at once.",
    )
    studies = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    for name, (config_cls, run, write, help_text) in STUDIES.items():
        p = studies.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(p, config_cls)
        p.add_argument(
            "--out", type=Path, required=True, help="output directory (must be new or empty)"
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument("--json", action="store_true", help="print the summary as JSON only")
        p.set_defaults(func=partial(_run, name, config_cls, run, write))


def _headline(study: str, results: dict) -> dict:
    if study == "divergence":
        return {"fits": results["fits"], "theory": results["theory"]}
    return {
        "alpha": results["alpha"],
        "initial": results["initial"],
        "summary": results["summary"],
        "timing_s": results["timing_s"],
    }


def _run(study: str, config_cls, run, write, args) -> int:
    config = build_config(config_cls, args)
    with staged_out_dir(args.out, overwrite=args.overwrite) as stage:
        results = run(config)
        written = write(results, stage)
    if args.json:
        print(json.dumps({"out": str(args.out), **_headline(study, results)}))
        return 0
    if study == "divergence":
        print(outputs.format_table(outputs.DIVERGENCE_COLUMNS, outputs.divergence_rows(results)))
    else:
        print(outputs.format_table(outputs.SUMMARY_COLUMNS, outputs.summary_rows(results)))
        timing = results["timing_s"]
        print(f"time: {timing['total']:.1f} s wall, {timing['cpu']:.1f} s CPU")
    print("wrote " + ", ".join(str(args.out / path.name) for path in written))
    return 0
