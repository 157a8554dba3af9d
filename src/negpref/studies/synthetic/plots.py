"""PNG figures in the layout of the NPO paper's Figures 3, 4 and 10, and the Theorem 2 plot.

Each function takes a ``results.json`` dict (as written by the study) and a path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from negpref.report.style import curve_style

COLORS = {
    "GA": "tab:red",
    "GA+RT": "tab:orange",
    "NPO": "tab:cyan",
    "NPO+RT": "tab:blue",
    "DPO": "tab:pink",
    "DPO+RT": "tab:purple",
    "IDK": "tab:olive",
    "IDK+RT": "tab:green",
}


def _steps_plot(ax, results: dict, metric: str, title: str, first: int = 0) -> None:
    """Mean curve per method with a +-1 standard deviation band, log y-axis, from the
    ``first`` recorded step on."""
    steps = np.asarray(results["steps"][first:])
    for i, (label, curves) in enumerate(results["methods"].items()):
        mean = np.asarray(curves[metric][first:])
        std = np.asarray(curves[f"{metric}_std"][first:])
        style = curve_style(i, len(steps), dashes=False)  # dashes mark the metric (alpha = 0)
        (line,) = ax.plot(steps, mean, color=COLORS.get(label), label=label, lw=1.4, **style)
        floor = mean.min() / 10  # keep the band drawable on a log axis
        ax.fill_between(
            steps, np.maximum(mean - std, floor), mean + std, color=line.get_color(), alpha=0.15
        )
    ax.set_yscale("log")
    ax.set_xlabel("unlearning step")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")


def _pareto_plot(ax, results: dict, title: str) -> None:
    """Retain distance against forget distance along each trajectory (mean over instances)."""
    for i, (label, curves) in enumerate(results["methods"].items()):
        ax.plot(
            curves["forget_distance"],
            curves["retain_distance"],
            color=COLORS.get(label),
            label=label,
            lw=1.4,
            **curve_style(i, len(curves["forget_distance"])),
        )
    start = results["initial"]
    ax.plot(start["forget_distance"], start["retain_distance"], "ko", ms=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("forget distance")
    ax.set_ylabel("retain distance")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")


def _save(fig, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_figure4(results: dict, path: str | Path) -> None:
    """Figure 4: (a1) forget and (a2) retain distance vs steps, (a3) Pareto curves; for
    alpha = 0 the paper shows one panel (b) since both distances coincide, drawn here as
    forget (solid) and retain (dashed) distance, next to the Pareto curves."""
    alpha = results["alpha"]
    if alpha == 0:
        fig, (b, pareto) = plt.subplots(1, 2, figsize=(11, 4.2))
        _steps_plot(b, results, "forget_distance", "(b) alpha=0: forget (solid), retain (dashed)")
        b.set_prop_cycle(None)
        for i, (label, curves) in enumerate(results["methods"].items()):
            style = curve_style(i, len(results["steps"]), dashes=False)
            b.plot(
                results["steps"],
                curves["retain_distance"],
                "--",
                color=COLORS.get(label),
                lw=1,
                **style,
            )
        b.set_ylabel("KL(retrained || unlearned)")
        _pareto_plot(pareto, results, "Pareto curves, alpha=0")
        b.legend(fontsize=8)
    else:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
        _steps_plot(a1, results, "forget_distance", f"(a1) forget distance, alpha={alpha:g}")
        _steps_plot(a2, results, "retain_distance", f"(a2) retain distance, alpha={alpha:g}")
        _pareto_plot(a3, results, f"(a3) Pareto curves, alpha={alpha:g}")
        a1.set_ylabel("KL(retrained || unlearned)")
        a1.legend(fontsize=8)
    _save(fig, path)


def plot_forget_kl(results: dict, path: str | Path) -> None:
    """Figure 10: forget KL, KL(initial || unlearned) on the forget set, vs steps."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    # from the first recorded step after 0: at step 0 the model is the initial one, KL = 0
    _steps_plot(ax, results, "forget_kl", f"forget KL, alpha={results['alpha']:g}", first=1)
    ax.set_ylabel("KL(initial || unlearned)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_beta_sweep(results: dict, path: str | Path) -> None:
    """Figure 3: Pareto curves of NPO at each beta and of GA, one learning rate for all."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    labels = list(results["methods"])
    shades = plt.cm.viridis(np.linspace(0.0, 0.85, max(len(labels) - 1, 1)))
    for i, (label, shade) in enumerate(
        zip([lb for lb in labels if lb != "GA"], shades, strict=False)
    ):
        curves = results["methods"][label]
        style = curve_style(i, len(curves["forget_distance"]), dashes=False)  # GA is dashed
        ax.plot(
            curves["forget_distance"], curves["retain_distance"], color=shade, label=label, **style
        )
    ga = results["methods"]["GA"]
    ax.plot(ga["forget_distance"], ga["retain_distance"], "--", color="tab:red", lw=2, label="GA")
    start = results["initial"]
    ax.plot(start["forget_distance"], start["retain_distance"], "ko", ms=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("forget distance")
    ax.set_ylabel("retain distance")
    lr = results["hyperparameters"]["GA"]["lr"]
    ax.set_title(f"NPO -> GA as beta -> 0 (alpha={results['alpha']:g}, lr={lr:g})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_divergence(results: dict, path: str | Path) -> None:
    """Theorem 2: ||theta_t - theta_init||_{X^T X} for GA and NPO with their fitted curves."""
    t = np.asarray(results["t"], dtype=np.float64)
    ga, npo = np.asarray(results["GA"]), np.asarray(results["NPO"])
    ga_fit = results["fits"]["GA"]["linear"]
    npo_fit = results["fits"]["NPO"]["log"]
    affine = results["fits"]["NPO"]["linear"]
    fig, (both, npo_only) = plt.subplots(1, 2, figsize=(11, 4.2))
    both.plot(t, ga, color=COLORS["GA"], lw=2, label="GA")
    both.plot(t, npo, color=COLORS["NPO+RT"], lw=2, label="NPO")
    both.plot(
        t, ga_fit["slope"] * t, "k:", lw=1, label=f"{ga_fit['slope']:.3g} t (R2={ga_fit['r2']:.4f})"
    )
    npo_curve = npo_fit["c"] * np.log1p(npo_fit["k"] * t)
    log_label = f"{npo_fit['c']:.3g} log(1+{npo_fit['k']:.3g} t) (R2={npo_fit['r2']:.4f})"
    both.plot(t, npo_curve, "k--", lw=1, label=log_label)
    npo_only.plot(t[1:], npo[1:], color=COLORS["NPO+RT"], lw=2, label="NPO")
    npo_only.plot(t[1:], npo_curve[1:], "k--", lw=1, label=log_label)
    npo_only.plot(
        t[1:],
        affine["affine_slope"] * t[1:] + affine["affine_intercept"],
        "k:",
        lw=1,
        label=f"best line a t + b (R2={affine['affine_r2']:.4f})",
    )
    npo_only.set_xscale("log")
    for ax in (both, npo_only):
        ax.set_xlabel("gradient-descent step t")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    cfg = results["config"]
    both.set_ylabel("||theta_t - theta_init||_{X^T X}")
    both.set_title(
        f"Theorem 2: d={cfg['dim']}, n_f={cfg['n_forget']}, eta={cfg['lr']:g}, beta={cfg['beta']:g}"
    )
    npo_only.set_title("NPO alone, log t axis: straight = logarithmic growth")
    _save(fig, path)
