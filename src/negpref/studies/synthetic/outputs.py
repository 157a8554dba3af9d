"""What a synthetic run leaves in its output directory, and its one-screen summary.

``results.json`` (the curves and summaries), the PNG figures and a self-contained
``report.html``; ``run.run_study`` writes them into a staging directory that becomes ``--out``
only when everything is written.
"""

from __future__ import annotations

from pathlib import Path

from negpref.io import atomic_write_json
from negpref.report import Section, write_html_report
from negpref.studies.synthetic.plots import (
    plot_beta_sweep,
    plot_divergence,
    plot_figure4,
    plot_forget_kl,
)

SUMMARY_COLUMNS = [
    "method",
    "lr",
    "beta",
    "steps to threshold (mean curve)",
    "instances reaching it (steps)",
    "retain dist. there",
    "min forget dist. (step)",
    "min forget+retain",
    "final retain dist.",
    "max retain dist.",
    "final forget KL",
]


def _fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _instances_reaching(steps: list[int | None]) -> str:
    hits = [s for s in steps if s is not None]
    return f"{len(hits)}/{len(steps)}" + (f" ({min(hits)}-{max(hits)})" if hits else "")


def summary_rows(results: dict) -> list[list[str]]:
    rows = []
    for label, s in results["summary"].items():
        hyper = results["hyperparameters"][label]
        rows.append(
            [
                label,
                _fmt(hyper["lr"], "g"),
                _fmt(hyper["beta"], "g"),
                _fmt(s["steps_to_threshold"], "d"),
                _instances_reaching(s["steps_to_threshold_per_instance"]),
                _fmt(s["retain_distance_at_threshold"]),
                f"{s['min_forget_distance']:.4g} ({s['min_forget_distance_step']})",
                _fmt(s["min_forget_plus_retain"]),
                _fmt(s["final_retain_distance"]),
                _fmt(s["max_retain_distance"]),
                _fmt(s["final_forget_kl"]),
            ]
        )
    return rows


def format_table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(columns, *rows, strict=True)]
    lines = [columns, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def _study_paragraphs(results: dict) -> list[str]:
    config = results["config"]
    start = results["initial"]
    timing = results["timing_s"]
    return [
        f"alpha={results['alpha']:g}, {results['instances']} instances, {config['steps']} "
        f"unlearning steps, initial/retrained models fit by {config['fit_steps']} GD steps at "
        f"lr {config['fit_lr']:g}. Curves are means over instances (bands: +-1 std); "
        f"results.json keeps every {results['record_every']}-th step, summaries use every step.",
        f"Start (initial model): forget distance {start['forget_distance']:.4g}, retain "
        f"distance {start['retain_distance']:.4g}. Threshold for 'steps to threshold': "
        f"forget distance <= {config['threshold']:g}.",
        f"Time: fit {timing['fit']:.1f} s, unlearning {timing['unlearn']:.1f} s "
        f"(CPU {timing['cpu']:.1f} s).",
    ]


def write_figure4(results: dict, out: Path) -> list[Path]:
    atomic_write_json(out / "results.json", results)
    plot_figure4(results, out / "figure4.png")
    plot_forget_kl(results, out / "figure10.png")
    section = Section(
        f"NPO paper, Figure 4 / Figure 10 (alpha={results['alpha']:g})",
        paragraphs=_study_paragraphs(results),
        tables=[(SUMMARY_COLUMNS, summary_rows(results))],
        figures=[
            (out / "figure4.png", "Figure 4: forget / retain distance and Pareto curves"),
            (out / "figure10.png", "Figure 10: forget KL"),
        ],
    )
    write_html_report(out / "report.html", "negpref synthetic figure4", [section])
    return [out / name for name in ("results.json", "figure4.png", "figure10.png", "report.html")]


def write_beta_sweep(results: dict, out: Path) -> list[Path]:
    atomic_write_json(out / "results.json", results)
    plot_beta_sweep(results, out / "figure3.png")
    plot_figure4(results, out / "figure4.png")
    gaps = [
        [label, f"{s['gap_to_GA']:.4g}"] for label, s in results["summary"].items() if label != "GA"
    ]
    section = Section(
        f"NPO paper, Figure 3: NPO approaches GA as beta -> 0 (alpha={results['alpha']:g})",
        paragraphs=[
            *_study_paragraphs(results),
            "gap to GA: mean over recorded steps of the Euclidean distance between the two "
            "trajectories' points (log forget distance, log retain distance) at the same step.",
        ],
        tables=[(["trajectory", "gap to GA"], gaps), (SUMMARY_COLUMNS, summary_rows(results))],
        figures=[
            (out / "figure3.png", "Figure 3: Pareto curves of NPO at each beta and GA"),
            (out / "figure4.png", "the same runs against steps"),
        ],
    )
    write_html_report(out / "report.html", "negpref synthetic beta-sweep", [section])
    return [out / name for name in ("results.json", "figure3.png", "figure4.png", "report.html")]


def divergence_rows(results: dict) -> list[list[str]]:
    ga, npo = results["fits"]["GA"], results["fits"]["NPO"]
    theory = results["theory"]
    return [
        [
            "GA",
            "a t",
            f"a={ga['linear']['slope']:.4g} (theory {theory['ga_slope']:.4g})",
            f"{ga['linear']['r2']:.5f}",
            f"{ga['growth_ratio']:.3f}",
        ],
        [
            "NPO",
            "c log(1+k t)",
            f"c={npo['log']['c']:.4g} (theory ~{theory['npo_c']:.3g}), k={npo['log']['k']:.3g}",
            f"{npo['log']['r2']:.5f}",
            f"{npo['growth_ratio']:.3f}",
        ],
        ["NPO", "a t", f"a={npo['linear']['slope']:.4g}", f"{npo['linear']['r2']:.5f}", ""],
        [
            "NPO",
            "a t + b",
            f"a={npo['linear']['affine_slope']:.4g}, b={npo['linear']['affine_intercept']:.4g}",
            f"{npo['linear']['affine_r2']:.5f}",
            "",
        ],
    ]


DIVERGENCE_COLUMNS = ["loss", "fit", "parameters", "R^2", "growth 2nd half / 1st half"]


def write_divergence(results: dict, out: Path) -> list[Path]:
    atomic_write_json(out / "results.json", results)
    plot_divergence(results, out / "divergence.png")
    section = Section(
        "NPO paper, Theorem 2: GA diverges linearly, NPO logarithmically",
        paragraphs=[
            "||theta_t - theta_init||_{X^T X} under gradient descent on the GA and NPO losses "
            f"(max |<x_i, x_j>|, i != j: {results['max_offdiag_inner_product']:.3g})."
        ],
        tables=[(DIVERGENCE_COLUMNS, divergence_rows(results))],
        figures=[(out / "divergence.png", "GA and NPO divergence with fitted curves")],
    )
    write_html_report(out / "report.html", "negpref synthetic divergence", [section])
    return [out / name for name in ("results.json", "divergence.png", "report.html")]
