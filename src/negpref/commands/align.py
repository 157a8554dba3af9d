"""``negpref align``: preference optimization (DPO family, MC-PO, OnMC-PO) and its studies.

negpref align --model DIR --data prefs.jsonl --method mcpo --out runs/mcpo
negpref align constraint-study --out runs/constraints
negpref align compare --out runs/compare          # MC-PO vs DPO over seeds, on CPU
negpref align make-task --out data/pref_task      # the offline preference task files
"""

from __future__ import annotations

import json

from negpref.config import add_config_arguments, build_config, config_to_dict
from negpref.io import atomic_write_bytes, atomic_write_json, staged_out_dir


def _common(parser, what: str) -> None:
    parser.add_argument("--out", required=True, help=f"directory for the {what}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub) -> None:
    from negpref.align.compare import CompareSettings
    from negpref.align.config import AlignConfig
    from negpref.align.constraints import StudySettings

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
    print(json.dumps(result) if args.json else "\n".join(lines))


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
    from negpref.align import constraints
    from negpref.report import Section, write_html_report

    settings = build_config(constraints.StudySettings, args)
    problem = constraints.make_problem(
        settings.prompts,
        settings.responses,
        settings.beta,
        settings.reward_scale,
        settings.ref_concentration,
        settings.seed,
    )
    with staged_out_dir(args.out, args.overwrite) as stage:
        result = {"settings": config_to_dict(settings), **constraints.study(problem, settings.seed)}
        gap_png, penalty_png = constraints.gap_png(result), constraints.penalty_png()
        atomic_write_json(stage / "constraint_study.json", result)
        atomic_write_bytes(stage / "constraint_gap.png", gap_png)
        atomic_write_bytes(stage / "penalty.png", penalty_png)
        columns = ["constraint", "level", "KL(RLHF||DPO)", "reward gap", "RLHF subopt. of DPO"]
        rows = [
            [kind, r["level"], r["kl_rlhf_dpo"], r["reward_gap"], r["rlhf_suboptimality_of_dpo"]]
            for kind, sweep in result["sweeps"].items()
            for r in sweep
        ]
        write_html_report(
            stage / "report.html",
            "Constrained DPO vs constrained RLHF",
            [
                Section(
                    "Proposition 3.1",
                    ["Gap between the constrained RLHF and DPO optima; the last level of each "
                     "sweep is unconstrained."],
                    tables=[(columns, rows)],
                    figures=[(gap_png, "gap vs constraint level")],
                ),
                Section("Section 5: noise-adaptive penalty",
                        figures=[(penalty_png, "log(gamma + u)")]),
            ],
        )  # fmt: skip
    lines = [f"wrote {args.out}"]
    for kind, sweep in result["sweeps"].items():
        tight, loose = sweep[0], sweep[-1]
        lines.append(
            f"{kind}: KL(RLHF||DPO) {tight['kl_rlhf_dpo']:.3g} at {tight['level']:g} -> "
            f"{loose['kl_rlhf_dpo']:.3g} at {loose['level']:g}"
        )
    _emit(args, result, lines)
    return 0


def compare_methods(args) -> int:
    from negpref.align.compare import CompareSettings, run_compare
    from negpref.report import Section, write_html_report

    settings = build_config(CompareSettings, args)
    with staged_out_dir(args.out, args.overwrite) as stage:
        result, png = run_compare(settings)
        atomic_write_json(stage / "compare.json", result)
        atomic_write_bytes(stage / "compare.png", png)
        columns = ["variant", "final reward", "std", "steps to DPO final", "std", "reached",
                   "reward AUC", "p (paired t vs DPO)"]  # fmt: skip
        rows = [
            [name, r["final_reward"]["mean"], r["final_reward"]["std"],
             r["steps_to_baseline_final"]["mean"], r["steps_to_baseline_final"]["std"],
             f"{r['reached_baseline']}/{len(settings.seeds)}", r["reward_auc"]["mean"],
             r.get("paired_t_pvalue", "")]
            for name, r in result["summary"].items()
        ]  # fmt: skip
        write_html_report(
            stage / "report.html",
            "MC-PO vs DPO on the offline preference task",
            [Section("Summary", tables=[(columns, rows)], figures=[(png, "reward curves")])],
        )
    lines = [f"wrote {args.out}"] + [
        f"{name}: final reward {r['final_reward']['mean']:.3f} ± {r['final_reward']['std']:.3f}, "
        f"steps to DPO final {r['steps_to_baseline_final']['mean']:.1f} "
        f"± {r['steps_to_baseline_final']['std']:.1f} "
        f"({r['reached_baseline']}/{len(settings.seeds)} seeds)"
        for name, r in result["summary"].items()
    ]
    _emit(args, result, lines)
    return 0


def make_task(args) -> int:
    from negpref.data.pref_task import write_task

    with staged_out_dir(args.out, args.overwrite) as stage:
        counts = write_task(stage, args.records, args.k, args.seed)
    _emit(args, counts, [f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())])
    return 0
