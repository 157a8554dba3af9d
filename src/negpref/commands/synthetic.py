"""``negpref synthetic STUDY``: the NPO paper's synthetic experiments.

``figure4`` (Figures 4 and 10: unlearning methods on the Gaussian-logistic task),
``beta-sweep`` (Figure 3: NPO -> GA as beta -> 0) and ``divergence`` (Theorem 2: GA's
linear vs NPO's logarithmic divergence). Each writes ``results.json``, PNG figures and
``report.html`` into ``--out``, all at once.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from negpref.commands import print_json
from negpref.config import add_config_arguments, build_config
from negpref.studies.synthetic.run import STUDIES, headline, run_study, summary_text


def register(sub) -> None:
    parser = sub.add_parser(
        "synthetic",
        help="the NPO paper's synthetic experiments",
        description="The NPO paper's synthetic experiments. Each study writes results.json, "
        "PNG figures and report.html into --out, all at once.",
    )
    studies = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    for name, study in STUDIES.items():
        p = studies.add_parser(name, help=study.help, description=study.help)
        add_config_arguments(p, study.config)
        p.add_argument(
            "--out", type=Path, required=True, help="output directory (must be new or empty)"
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument("--json", action="store_true", help="print the summary as JSON only")
        p.set_defaults(func=partial(_run, name))


def _run(name: str, args) -> int:
    config = build_config(STUDIES[name].config, args)
    results, written = run_study(name, config, args.out, overwrite=args.overwrite)
    if args.json:
        print_json({"out": str(args.out), **headline(name, results)})
        return 0
    print(summary_text(name, results))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
