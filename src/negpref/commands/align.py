"""``negpref align``: preference optimization (DPO family, MC-PO, OnMC-PO) and its studies.

negpref align --model DIR --data prefs.jsonl --method mcpo --out runs/mcpo
negpref align constraint-study --out runs/constraints
negpref align compare --out runs/compare          # MC-PO vs DPO over seeds, on CPU
negpref align make-task --out data/pref_task      # the offline preference task files
"""

from __future__ import annotations

from negpref.commands import print_json
from negpref.config import add_config_arguments, build_config
from negpref.io import staged_out_dir


def _common(parser, what: str) -> None:
    parser.add_argument("--out", required=True, help=f"directory for the {what}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub) -> None:
    from negpref.align.config import AlignConfig
    from negpref.studies.dpo_constraints import StudySettings
    from negpref.studies.mcpo_compare import CompareSettings

    parser = sub.add_parser(
        "align",
        help="DPO-family / MC-PO / OnMC-PO preference optimization",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,  # else the sub-commands' options read as abbreviations of ours
    )
    add_config_arguments(parser, AlignConfig)
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.set_defaults(func=train)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    study = actions.add_parser(
        "constraint-study",
        help="constrained DPO vs RLHF optima on a small discrete problem (plot + JSON)",
    )
    add_config_arguments(study, StudySettings)
    _common(study, "study (JSON, plots, report)")
    study.set_defaults(func=constraint_study)

    compare = actions.add_parser(
        "compare", help="MC-PO vs DPO on the offline preference task over seeds (CPU)"
    )
    add_config_arguments(compare, CompareSettings)
    _common(compare, "comparison (JSON, plot, report)")
    compare.set_defaults(func=compare_methods)

    task = actions.add_parser("make-task", help="write the offline preference task files")
    task.add_argument("--records", type=int, default=96, help="training records (default: 96)")
    task.add_argument("--k", type=int, default=4, help="rejected candidates per record")
    task.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    _common(task, "task files")
    task.set_defaults(func=make_task)


def _emit(args, result: dict, lines: list[str]) -> None:
    if args.json:
        print_json(result)
    else:
        print("\n".join(lines))


def train(args) -> int:
    from accelerate import PartialState

    from negpref.align.config import AlignConfig
    from negpref.align.run import run

    config = build_config(AlignConfig, args)
    summary = run(config)
    if not PartialState().is_main_process:  # under `accelerate launch`: report once
        return 0
    last_eval = summary["evals"][-1] if summary["evals"] else {}
    lines = [
        f"wrote {config.output_dir}: {summary['steps']} steps, "
        f"{summary['tokens_per_second'] or 0:.0f} tokens/s",
        "final: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["final"].items()
                              if isinstance(v, float)),
    ]  # fmt: skip
    if last_eval:
        lines.append(f"eval reward {last_eval.get('reward', float('nan')):.4f}")
    _emit(args, summary, lines)
    return 0


def constraint_study(args) -> int:
    from negpref.studies import dpo_constraints

    settings = build_config(dpo_constraints.StudySettings, args)
    result = dpo_constraints.run_constraint_study(settings, args.out, args.overwrite)
    _emit(args, result, [f"wrote {args.out}", *dpo_constraints.summary_lines(result)])
    return 0


def compare_methods(args) -> int:
    from negpref.studies import mcpo_compare

    settings = build_config(mcpo_compare.CompareSettings, args)
    result = mcpo_compare.write_compare(settings, args.out, args.overwrite)
    _emit(args, result, [f"wrote {args.out}", *mcpo_compare.summary_lines(result)])
    return 0


def make_task(args) -> int:
    from negpref.data.pref_task import write_task

    with staged_out_dir(args.out, args.overwrite) as stage:
        counts = write_task(stage, args.records, args.k, args.seed)
    _emit(args, counts, [f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())])
    return 0
