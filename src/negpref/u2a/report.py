"""Figures (PNG bytes) and report sections of a U2A run (the studies build theirs from these)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from negpref.report import Section


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def gains_figure(gains: list[float], groups: dict[str, list[int]] | None = None) -> bytes:
    """Histogram of marginal gains (by group when given) and the cumulative share of the
    positive gain carried by the highest-gain candidates."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    groups = groups or {"candidates": list(range(len(gains)))}
    bins = min(40, max(10, len(gains) // 3))
    left.hist(
        [[gains[i] for i in idx] for idx in groups.values()],
        bins=bins,
        stacked=True,
        label=list(groups),
    )
    left.axvline(0, color="k", lw=0.8)
    left.set_xlabel("marginal gain (implicit term of eq. 9)")
    left.set_ylabel("candidates")
    left.legend(fontsize=8)
    ranked = sorted((max(g, 0.0) for g in gains), reverse=True)
    total = sum(ranked) or 1.0
    share, running = [], 0.0
    for g in ranked:
        running += g
        share.append(running / total)
    right.plot([(i + 1) / len(ranked) for i in range(len(ranked))], share, marker=".")
    right.set_xlabel("fraction of candidates, highest gain first")
    right.set_ylabel("share of total positive gain")
    right.grid(alpha=0.3)
    return png(fig)


def rounds_figure(log: list[dict]) -> bytes:
    """``J`` and ``g`` per round (round 0 = before unlearning); rejected rounds hollow."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    rounds = [r["round"] for r in log]
    ax.plot(
        rounds, [r["objective"] for r in log], marker="o", label="J (alignment, higher is better)"
    )
    ax.plot(rounds, [r["g"] for r in log], marker="s", label="g = -J + beta*sum sqrt(w)")
    for r in log:
        if r.get("accepted") is False:
            ax.plot(r["round"], r["objective"], "o", mfc="white", mec="red", ms=10)
    ax.set_xlabel("round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png(fig)


def weights_figure(labels: list[str], weights: list[float]) -> bytes:
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    fig, ax = plt.subplots(figsize=(max(5, 0.18 * len(weights)), 3.5))
    ax.bar(range(len(order)), [weights[i] for i in order])
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), [labels[i] for i in order], rotation=90, fontsize=7)
    ax.set_ylabel("weight on the simplex")
    ax.set_xlabel("selected sample")
    return png(fig)


def run_sections(result, labels: list[str], settings: dict) -> list[Section]:
    """Report of one ``negpref u2a`` run: selection, rounds, gains."""
    rows = [
        [labels[i], w, result.initial_gains[i]]
        for i, w in sorted(zip(result.selected, result.weights), key=lambda t: -t[1])
    ]
    log_rows = [
        [
            r["round"],
            r["set_size"],
            r["objective"],
            r["g"],
            r.get("weights_entropy", 0.0),
            str(r.get("accepted", "")),
            ", ".join(f"{g:.3g}" for g in r.get("top_gains", [])),
        ]
        for r in result.log
    ]
    return [
        Section(
            "Result",
            [
                f"Selected {len(result.selected)} of {len(result.initial_gains)} candidates; "
                f"J {result.objective_initial:.4g} -> {result.objective_final:.4g}; "
                f"stopped: {result.stop_reason}."
            ],
            tables=[(["sample", "weight", "initial marginal gain"], rows)],
            figures=[
                (
                    weights_figure([labels[i] for i in result.selected], result.weights),
                    "final weights of the selected samples",
                )
            ],
        ),
        Section(
            "Rounds",
            tables=[
                (
                    ["round", "set size", "J", "g", "weights entropy", "accepted", "top gains"],
                    log_rows,
                )
            ],
            figures=[(rounds_figure(result.log), "objective per round (red ring: rejected round)")],
        ),
        Section(
            "Marginal gains at the start",
            figures=[
                (
                    gains_figure(result.initial_gains),
                    "distribution of marginal gains; cumulative share of the positive gain",
                )
            ],
        ),
        settings_section(settings),
    ]


def settings_section(settings: dict) -> Section:
    return Section(
        "Settings", tables=[(["setting", "value"], [[k, str(v)] for k, v in settings.items()])]
    )
