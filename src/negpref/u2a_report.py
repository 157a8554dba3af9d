"""Figures (PNG bytes) and report sections for U2A runs, the synthetic check and the ablation."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from negpref.report import Section


def _png(fig) -> bytes:
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
    return _png(fig)


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
    return _png(fig)


def weights_figure(labels: list[str], weights: list[float]) -> bytes:
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    fig, ax = plt.subplots(figsize=(max(5, 0.18 * len(weights)), 3.5))
    ax.bar(range(len(order)), [weights[i] for i in order])
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), [labels[i] for i in order], rotation=90, fontsize=7)
    ax.set_ylabel("weight on the simplex")
    ax.set_xlabel("selected sample")
    return _png(fig)


def ablation_figure(result: dict) -> bytes:
    """Figure 4: reward after unlearning top-K by gain vs random K (mean +- std over seeds)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ks = [r["k"] for r in result["rows"]]
    for key, label in (("top_k", "top-K by marginal gain"), ("random_k", "random K")):
        means = [r[key]["mean"] for r in result["rows"]]
        stds = [r[key]["std"] for r in result["rows"]]
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.axhline(result["base_reward"]["mean"], color="gray", ls="--", label="before unlearning")
    ax.axhline(result["all_negatives"]["mean"], color="red", ls=":", label="all negatives")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (samples unlearned)")
    ax.set_ylabel("mean keyword reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


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
        _settings_section(settings),
    ]


def _settings_section(settings: dict) -> Section:
    return Section(
        "Settings", tables=[(["setting", "value"], [[k, str(v)] for k, v in settings.items()])]
    )


SYNTHETIC_KEYS = (
    "seed", "selected", "precision", "recall", "weight_on_helpful", "gain_auc", "J_base",
    "J_u2a", "J_all", "J_random_mean", "J_random_max", "J_helpful_only", "inner_steps_budget",
)  # fmt: skip


def synthetic_report(results: list[dict], settings: dict) -> tuple[list[Section], dict[str, bytes]]:
    """Sections and PNGs of ``negpref u2a synthetic`` (figures of the first seed)."""
    first = results[0]
    helpful = set(first["helpful"])
    groups = {
        "helpful (a bad token the policy likes)": sorted(helpful),
        "harmful (a good token reported)": [
            i for i in range(first["n_candidates"]) if i not in helpful
        ],
    }
    figures = {
        "gains.png": gains_figure(first["initial_gains"], groups),
        "rounds.png": rounds_figure(first["log"]),
    }
    section = Section(
        "U2A on a softmax policy with an exact objective",
        [
            f"{first['n_candidates']} candidates: {first['n_helpful']} helpful negatives (a bad "
            "token the policy likes) and the rest harmful (a good token reported by mistake). "
            "J = exact expected reward. Baselines unlearn all candidates, random subsets of "
            "U2A's size, or exactly the helpful ones, with uniform weights and U2A's total number "
            "of inner steps.",
        ],
        tables=[(list(SYNTHETIC_KEYS), [[r[k] for k in SYNTHETIC_KEYS] for r in results])],
        figures=[
            (figures["gains.png"], f"initial marginal gains (seed {first['seed']})"),
            (figures["rounds.png"], f"objective per round (seed {first['seed']})"),
        ],
    )
    return [section, _settings_section(settings)], figures


def ablation_report(result: dict, settings: dict) -> tuple[list[Section], dict[str, bytes]]:
    """Sections and PNGs of ``negpref u2a ablation``."""
    groups = {
        kind: [i for i, k in enumerate(result["kinds"]) if k == kind]
        for kind in ("mostly_bad", "mostly_good")
    }
    figures = {
        "ablation.png": ablation_figure(result),
        "gains.png": gains_figure(result["gains"], groups),
    }
    rows = [
        [
            r["k"],
            r["top_k"]["mean"],
            r["top_k"]["std"],
            r["top_k"]["well_formed"],
            r["random_k"]["mean"],
            r["random_k"]["std"],
            r["random_k"]["well_formed"],
            result["mostly_bad_in_top"][r["k"]],
        ]
        for r in result["rows"]
    ]
    u2a_rows = [
        [
            r["seed"],
            r["set_size"],
            r["mostly_bad_selected"],
            r["reward"],
            r["well_formed"],
            r["all_negatives_same_budget"],
            r["inner_steps"],
            r["stop_reason"],
        ]
        for r in result["u2a"]
    ]
    base, everything = result["base_reward"], result["all_negatives"]
    section = Section(
        "Figure 4 at CPU scale: top-K by marginal gain vs random K",
        [
            f"Tiny Llama on the keyword task; {result['n_candidates']} candidate negatives "
            f"(mostly-bad, or mostly-good flagged negative); objective {result['objective']}; "
            f"{result['loss']} for {result['inner_steps']} steps per condition; seeds "
            f"{result['seeds']}. Reward before unlearning {base['mean']:.3f} "
            f"(well-formed {base['well_formed']:.2f}); all negatives {everything['mean']:.3f} "
            f"+- {everything['std']:.3f} (well-formed {everything['well_formed']:.2f}).",
        ],
        tables=[
            (
                [
                    "K",
                    "top-K reward",
                    "std",
                    "well-formed",
                    "random-K reward",
                    "std",
                    "well-formed",
                    "mostly-bad in top-K",
                ],
                rows,
            ),
            (
                [
                    "seed",
                    "U2A set size",
                    "mostly-bad selected",
                    "U2A reward",
                    "well-formed",
                    "all negatives (same budget)",
                    "inner steps",
                    "stop",
                ],
                u2a_rows,
            ),
            (
                ["gain concentration", "value"],
                [[k, v] for k, v in result["gain_concentration"].items()],
            ),
        ],
        figures=[
            (figures["ablation.png"], "mean keyword reward (+- std over seeds)"),
            (figures["gains.png"], "marginal gains at theta_0 by candidate kind"),
        ],
    )
    return [section, _settings_section(settings)], figures
