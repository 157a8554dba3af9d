"""Findings, figures (PNG) and the HTML report of the real-model TOFU study."""

from __future__ import annotations

import io
from pathlib import Path

from negpref.io import atomic_write_bytes
from negpref.report import Section, write_html_report

# open-unlearning's TOFU forget10 table on Llama-3.2-1B (their NPO, SimNPO and IdkDPO carry a
# retain term, like our +RT presets): name, our preset, forget quality, model utility.
OPEN_UNLEARNING = [
    ("GradAscent", "GA", 1e-239, 0.0),
    ("GradDiff", "GA+RT", 1e-239, 0.49),
    ("NPO", "NPO+RT", 0.02, 0.46),
    ("SimNPO", "SimNPO", 2e-203, 0.54),
    ("IdkDPO", "DPO+RT", 5e-12, 0.23),
]
OPEN_UNLEARNING_RETAIN = (1.0, 0.59)
_MARKERS = "osD^vP*Xh"
_LINES = ["-", "--", "-.", ":"]


def _value(summary: dict, method: str, when: str, key: str):
    m = summary["methods"].get(method)
    return None if m is None else m[when].get(key)


def _finding(claim: str, source: str, methods: tuple[str, ...], summary: dict, test) -> dict:
    """One claim: holds / does not hold, or not checked when a method it needs did not run."""
    missing = [m for m in methods if m not in summary["methods"]]
    if missing:
        return {"claim": claim, "source": source, "verdict": "not run", "evidence": ""}
    holds, evidence = test()
    return {
        "claim": claim,
        "source": source,
        "verdict": "holds" if holds else "does not hold",
        "evidence": evidence,
    }


def findings(summary: dict) -> list[dict]:
    """The NPO paper's and open-unlearning's findings, checked on this run (whatever the
    outcome). Peak = each method's epoch of highest forget quality; final = its last epoch."""
    v = lambda m, when, key: _value(summary, m, when, key)  # noqa: E731
    target_mu = summary["reference"]["target"]["model_utility"]
    out = []

    def best_tradeoff():
        keep = {
            m: r["peak"]["forget_quality"]
            for m, r in summary["methods"].items()
            if (r["peak"]["model_utility"] or 0) >= 0.5 * target_mu
        }
        best = max(keep, key=keep.get) if keep else None
        return best in ("NPO", "NPO+RT"), (
            f"highest peak forget quality keeping >= 50% of the target's utility "
            f"({target_mu:.3f}): {best} ({keep.get(best, float('nan')):.3g})"
        )

    out.append(
        _finding(
            "NPO-based methods give the best forget quality at a useful model utility",
            "NPO paper, Figure 5",
            ("NPO", "NPO+RT", "GA", "GA+RT"),
            summary,
            best_tradeoff,
        )
    )

    def slower_collapse():
        npo, ga = v("NPO", "final", "model_utility"), v("GA", "final", "model_utility")
        return npo > ga, f"final model utility NPO {npo:.3f} vs GA {ga:.3f}"

    out.append(
        _finding(
            "NPO's utility falls more slowly than GA's",
            "NPO paper, Figure 6",
            ("NPO", "GA"),
            summary,
            slower_collapse,
        )
    )

    def retain_term():
        pairs = [(b, f"{b}+RT") for b in ("NPO", "GA") if f"{b}+RT" in summary["methods"]]
        kept = [
            (v(rt, "final", "model_utility"), v(b, "final", "model_utility")) for b, rt in pairs
        ]
        return all(a >= b for a, b in kept), "; ".join(
            f"{rt} {a:.3f} vs {b} {c:.3f}" for (b, rt), (a, c) in zip(pairs, kept, strict=True)
        )

    out.append(
        _finding(
            "The retain term preserves model utility",
            "NPO paper, Figure 6",
            ("NPO", "NPO+RT", "GA", "GA+RT"),
            summary,
            retain_term,
        )
    )

    def weak_baselines():
        npo = v("NPO+RT", "peak", "forget_quality")
        others = {m: v(m, "peak", "forget_quality") for m in ("IDK+RT", "DPO+RT")}
        return all(q < npo for q in others.values()), ", ".join(
            f"{m} {q:.3g}" for m, q in others.items()
        ) + f" vs NPO+RT {npo:.3g} (peak forget quality)"

    out.append(
        _finding(
            "IDK+RT and DPO+RT reach lower forget quality than NPO+RT",
            "NPO paper, Figure 5",
            ("IDK+RT", "DPO+RT", "NPO+RT"),
            summary,
            weak_baselines,
        )
    )

    def kl_growth():
        ga, npo = v("GA", "final", "forget_kl"), v("NPO", "final", "forget_kl")
        return ga > npo, f"final forget KL GA {ga:.3g} vs NPO {npo:.3g}"

    out.append(
        _finding(
            "GA drifts further from the target than NPO (forget KL)",
            "NPO paper, Figure 8",
            ("GA", "NPO"),
            summary,
            kl_growth,
        )
    )

    def ou_quality_order():
        ours = {p: v(p, "final", "forget_quality") for _, p, _, _ in OPEN_UNLEARNING}
        best = max(ours, key=lambda m: ours[m] or 0)
        return best == "NPO+RT", f"highest final forget quality: {best} ({ours[best]:.3g})"

    out.append(
        _finding(
            "NPO has the highest forget quality of its table",
            "open-unlearning, TOFU forget10, Llama-3.2-1B",
            tuple(p for _, p, _, _ in OPEN_UNLEARNING),
            summary,
            ou_quality_order,
        )
    )

    def ou_ga_utility():
        ours = {p: v(p, "final", "model_utility") for _, p, _, _ in OPEN_UNLEARNING}
        worst = min(ours, key=lambda m: ours[m] if ours[m] is not None else -1)
        return worst == "GA", f"lowest final model utility: {worst} ({ours[worst]:.3g})"

    out.append(
        _finding(
            "Gradient ascent ends with the lowest model utility",
            "open-unlearning, TOFU forget10, Llama-3.2-1B",
            tuple(p for _, p, _, _ in OPEN_UNLEARNING),
            summary,
            ou_ga_utility,
        )
    )
    return out


# --------------------------------------------------------------------------------- figures


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(i: int) -> dict:
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": _LINES[i % len(_LINES)]}


def _log_fq(value) -> float:
    return max(value if value is not None else 1e-300, 1e-300)


def tradeoff_figure(summary: dict) -> bytes:
    """Figure 5: model utility vs forget quality (log), at each method's peak and final epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, when in zip(axes, ("peak", "final"), strict=True):
        for i, (method, r) in enumerate(summary["methods"].items()):
            ax.scatter(
                _log_fq(r[when]["forget_quality"]), r[when]["model_utility"] or 0,
                marker=_MARKERS[i % len(_MARKERS)], s=70, label=method,
            )  # fmt: skip
        for name, marker in (("target", "k*"), ("retain", "g*")):
            ref = summary["reference"][name]
            ax.plot(_log_fq(ref["forget_quality"]), ref["model_utility"], marker, ms=12, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("forget quality (log)")
        ax.set_title(f"{when} epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("model utility")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _png(fig)


def _curves(summary: dict, keys: list[tuple[str, str, bool]]) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.4), squeeze=False)
    for ax, (key, label, log) in zip(axes[0], keys, strict=True):
        for i, (method, r) in enumerate(summary["methods"].items()):
            points = [(e["epoch"], e[key]) for e in r["evals"] if e.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, [_log_fq(y) if log else y for y in ys], label=method, **_style(i))
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _png(fig)


def curves_figure(summary: dict) -> bytes:
    """Figure 6: forget quality and model utility after every epoch."""
    return _curves(
        summary,
        [
            ("forget_quality", "forget quality (log)", True),
            ("model_utility", "model utility", False),
        ],
    )


def forget_kl_figure(summary: dict) -> bytes:
    """Figure 8: KL(target || unlearned) on the forget answers after every epoch."""
    return _curves(summary, [("forget_kl", "forget KL to the target", False)])


# ---------------------------------------------------------------------------------- report

_COLUMNS = [
    "model", "epoch", "forget quality", "model utility", "forget truth ratio", "forget ROUGE-L",
    "forget KL", "MIA min-k AUC", "PrivLeak min-k",
]  # fmt: skip


def _row(name: str, r: dict) -> list:
    keys = (
        "forget_quality", "model_utility", "forget_truth_ratio", "forget/rougeL", "forget_kl",
        "mia/min_k", "privleak/min_k",
    )  # fmt: skip
    epoch = r.get("epoch")
    return [name, "" if epoch is None else epoch] + [
        "n/a" if r.get(k) is None else float(r[k]) for k in keys
    ]


def build_sections(summary: dict, figures: dict[str, bytes]) -> list[Section]:
    cfg, sizes, env = summary["config"], summary["sizes"], summary["environment"]
    phases = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in summary["phases_s"].items())
    setup = Section(
        "Setup",
        [
            f"Base model {summary['base_model']}; {cfg['authors']} TOFU authors "
            f"({sizes['train']} QA pairs): retain authors {summary['authors']['retain'][:1]}.."
            f"{summary['authors']['retain'][-1:]}, forget authors {summary['authors']['forget']} "
            f"({sizes['forget']} items, TOFU's last authors), holdout authors "
            f"{summary['authors']['holdout']} (never trained on).",
            f"Fine-tuning: {cfg['finetune_epochs']} epochs at lr {cfg['finetune_lr']}; "
            f"unlearning: {cfg['epochs']} epochs at lr {cfg['lr']}, beta {cfg['beta']}, batch "
            f"{cfg['batch_size']}x{cfg['grad_accum']}, {'LoRA' if cfg['lora'] else 'all weights'}, "
            f"{cfg['mixed_precision']} autocast; evaluation sets: "
            + ", ".join(
                f"{k} {sizes[k]}"
                for k in ("forget", "retain", "real_authors", "world_facts", "holdout")
                if k in sizes
            )
            + f" items, {cfg['max_new_tokens']} greedy tokens.",
            f"Wall time {summary['wall_s'] / 60:.1f} min: {phases}.",
            "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        ],
    )
    rows = [_row(n, summary["reference"][n]) for n in ("base", "target", "retain")]
    for method, r in summary["methods"].items():
        rows += [_row(f"{method} (peak)", r["peak"]), _row(f"{method} (final)", r["final"])]
    results = Section(
        "Results",
        [
            "Forget quality is the KS-test p-value of the forget truth ratios against this "
            "study's own retain model; peak = the epoch of highest forget quality (Figure 5's "
            "protocol), final = the last epoch."
        ],
        tables=[(_COLUMNS, rows)],
        figures=[
            (figures["figure5"], "Model utility vs forget quality (NPO paper Figure 5)"),
            (figures["figure6"], "Forget quality and model utility per epoch (Figure 6)"),
            (figures["figure8"], "Forget KL to the target per epoch (Figure 8)"),
        ],
    )
    checked = Section(
        "Findings checked",
        tables=[
            (
                ["claim", "source", "verdict", "evidence"],
                [
                    [f["claim"], f["source"], f["verdict"], f["evidence"]]
                    for f in summary["findings"]
                ],
            )
        ],
    )
    anchor_rows = []
    for name, preset, fq, mu in OPEN_UNLEARNING:
        ours = summary["methods"].get(preset)
        final = ours["final"] if ours else {}
        anchor_rows.append(
            [f"{name} / {preset}", fq, mu]
            + [
                "n/a" if final.get(k) is None else float(final[k])
                for k in ("forget_quality", "model_utility")
            ]
        )
    retain = summary["reference"]["retain"]
    anchor_rows.append(
        ["retain model", *OPEN_UNLEARNING_RETAIN, retain["forget_quality"], retain["model_utility"]]
    )
    anchors = Section(
        "Next to open-unlearning (TOFU forget10, Llama-3.2-1B)",
        ["Their numbers are a 1B model on all 200 authors; ours the study above: compare the "
         "orderings, not the values."],
        tables=[(["open-unlearning / ours", "their FQ", "their MU", "our FQ (final)", "our MU (final)"], anchor_rows)],
    )  # fmt: skip
    samples = Section("Sample answers (NPO paper Figure 7)")
    for method, r in summary["methods"].items():
        samples.tables.append(
            (
                [f"{method}: set", "question", "TOFU answer", "generated"],
                [[s["set"], s["question"], s["answer"], s["generated"]] for s in r["samples"]],
            )
        )
    return [setup, results, checked, anchors, samples]


def write_report(summary: dict, out: Path) -> Path:
    """``OUT/figures/*.png`` and ``OUT/report.html`` (self-contained)."""
    figures = {
        "figure5": tradeoff_figure(summary),
        "figure6": curves_figure(summary),
        "figure8": forget_kl_figure(summary),
    }
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        atomic_write_bytes(out / "figures" / f"{name}.png", png)
    return write_html_report(
        out / "report.html", "negpref study tofu", build_sections(summary, figures)
    )


def markdown_tables(summary: dict) -> str:
    """The results and findings as Markdown, for the README and docs (pasted from a real run)."""

    def fmt(value) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"

    lines = [
        "| model | peak epoch | forget quality | model utility | final FQ / MU | forget KL (final) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("base", "target", "retain"):
        ref = summary["reference"][name]
        lines.append(
            f"| {name} | | {fmt(ref['forget_quality'])} | {fmt(ref['model_utility'])} | | |"
        )
    for method, r in summary["methods"].items():
        peak, final = r["peak"], r["final"]
        lines.append(
            f"| {method} | {peak['epoch']:g} | {fmt(peak['forget_quality'])} | "
            f"{fmt(peak['model_utility'])} | {fmt(final['forget_quality'])} / "
            f"{fmt(final['model_utility'])} | {fmt(final['forget_kl'])} |"
        )
    lines += ["", "| finding | source | verdict | evidence |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {f['claim']} | {f['source']} | **{f['verdict']}** | {f['evidence']} |"
        for f in summary["findings"]
    ]
    return "\n".join(lines) + "\n"
