"""Figures and the HTML report of ``negpref demo`` (the NPO paper's Figures 5, 6 and 8).

Everything is drawn from ``summary.json``'s dict (``build_demo_report(summary, samples)``), so
a report can be redrawn from a finished run without rerunning it.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

from negpref.report.html import Section, write_html_report

MEANINGFUL_FQ = 0.05  # the NPO paper's threshold for meaningful forgetting (a KS p-value)
_FQ_FLOOR = 1e-300  # a p-value that underflowed to 0 is drawn at the floor of the log axis
SAMPLE_SETS = (("forget", "Forget set"), ("retain", "Retain set"), ("general", "General knowledge"))


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _style(names: list[str]) -> dict[str, dict]:
    """One colour per method; NPO-family solid, the baselines dashed (as the paper's legend)."""
    colours = plt.get_cmap("tab10").colors
    return {
        name: {
            "color": colours[i % len(colours)],
            "linestyle": "-" if "NPO" in name.upper() else "--",
            "marker": "o" if "NPO" in name.upper() else "s",
        }
        for i, name in enumerate(names)
    }


def _fq(value) -> float | None:
    return None if value is None else max(float(value), _FQ_FLOOR)


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def tradeoff_figure(summary: dict) -> bytes:
    """Figure 5: forget quality (log) vs model utility, each method at its peak-quality epoch."""
    methods = summary["methods"]
    style = _style(list(methods))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, m in methods.items():
        fq, mu = _fq(m.get("forget_quality")), m.get("model_utility")
        if fq is None or not _finite(mu):
            continue
        s = style[name]
        # a legend entry, not a label at the point: methods at similar points (GA, GA+RT,
        # GA+KL) printed their labels on top of each other
        label = f"{name} (ep. {m.get('peak_epoch', 0):.1f})"
        ax.scatter(mu, fq, s=70, color=s["color"], marker=s["marker"], label=label, zorder=3)
    for key, marker, label in (("target", "X", "target (before)"), ("retain", "*", "retain model")):
        ref = summary.get(key, {})
        fq, mu = _fq(ref.get("forget_quality")), ref.get("model_utility")
        if fq is not None and _finite(mu):
            ax.scatter(mu, fq, s=150, color="black", marker=marker, label=label, zorder=4)
    ax.axhline(MEANINGFUL_FQ, color="gray", linestyle=":", label="p = 0.05")
    ax.set_yscale("log")
    ax.set_xlabel("Model utility")
    ax.set_ylabel("Forget quality (KS p-value, log)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title(f"Forget quality vs model utility ({summary.get('split', 'forget')})")
    return _png(fig)


def _epochs(m: dict, key: str) -> tuple[list[float], list[float]]:
    points = [(e["epoch"], e.get(key)) for e in m.get("epochs", []) if _finite(e.get(key))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def curves_figure(summary: dict) -> bytes:
    """Figure 6: forget quality (top) and model utility (bottom) after every epoch."""
    methods = summary["methods"]
    style = _style(list(methods))
    fig, (ax_fq, ax_mu) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
    for name, m in methods.items():
        s = style[name]
        x, y = _epochs(m, "forget_quality")
        ax_fq.plot(x, [max(v, _FQ_FLOOR) for v in y], label=name, **s)
        x, y = _epochs(m, "model_utility")
        ax_mu.plot(x, y, label=name, **s)
    ax_fq.axhline(MEANINGFUL_FQ, color="gray", linestyle=":")
    retain_mu = summary.get("retain", {}).get("model_utility")
    if _finite(retain_mu):
        ax_mu.axhline(retain_mu, color="black", linestyle=":", label="retain model")
    ax_fq.set_yscale("log")
    ax_fq.set_ylabel("Forget quality (log)")
    ax_mu.set_ylabel("Model utility")
    ax_mu.set_xlabel("Epoch (0 = target model)")
    ax_fq.set_title("Evolution during unlearning")
    for ax in (ax_fq, ax_mu):
        ax.grid(True, alpha=0.3)
    ax_mu.legend(fontsize=7, ncol=2)
    return _png(fig)


def forget_kl_figure(summary: dict) -> bytes:
    """Figure 8: forget KL (target || unlearned, on forget answers) after every epoch."""
    methods = summary["methods"]
    style = _style(list(methods))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, m in methods.items():
        x, y = _epochs(m, "forget_kl")
        ax.plot(x, y, label=name, **style[name])
    # symlog: GA's KL explodes while NPO's stays moderate; both stay readable
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Forget KL (symlog)")
    ax.set_title("Forget KL during unlearning")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def truth_ratio_figure(summary: dict) -> bytes:
    """What forget quality compares: forget-set truth ratios of each model against the retain
    model's (the KS test's two samples), at each method's peak epoch."""
    ratios = summary.get("forget_truth_ratios", {})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = [n for n in ("retain", "target", *summary["methods"]) if ratios.get(n)]
    data = [[v for v in ratios[n] if _finite(v)] for n in names]
    ax.boxplot(data, vert=False, tick_labels=names, showfliers=True)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap
    ax.axvline(1.0, color="gray", linestyle=":")
    ax.set_xlabel("Forget-set truth ratio P(perturbed) / P(paraphrased) (log)")
    ax.set_title("Truth-ratio distributions (KS test vs the retain model)")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def _fmt(value) -> float | str:
    return float(value) if _finite(value) else "n/a"


def results_table(summary: dict) -> tuple[list[str], list[list]]:
    columns = [
        "model", "peak epoch", "forget quality", "model utility", "forget truth ratio",
        "forget KL", "forget quality, 90% utility kept (epoch)", "final forget quality",
        "final model utility", "unlearn s",
    ]  # fmt: skip
    rows = []
    for key, label in (("target", "target (before unlearning)"), ("retain", "retain (gold)")):
        ref = summary.get(key, {})
        rows.append(
            [label, "", _fmt(ref.get("forget_quality")), _fmt(ref.get("model_utility")),
             _fmt(ref.get("forget_truth_ratio")), "", "", "", "", ""]
        )  # fmt: skip
    for name, m in summary["methods"].items():
        final, kept = m.get("final", {}), m.get("utility_kept")
        rows.append(
            [
                name,
                round(m.get("peak_epoch", 0.0), 1),
                _fmt(m.get("forget_quality")),
                _fmt(m.get("model_utility")),
                _fmt(m.get("forget_truth_ratio")),
                _fmt(m.get("forget_kl")),
                "none" if not kept else f"{kept['forget_quality']:.3g} ({kept['epoch']:.1f})",
                _fmt(final.get("forget_quality")),
                _fmt(final.get("model_utility")),
                _fmt(m.get("seconds")),
            ]
        )
    return columns, rows


def findings_table(findings: list[dict]) -> tuple[list[str], list[list]]:
    rows = [
        [f["claim"], "holds" if f["holds"] else "does not hold", f["evidence"]] for f in findings
    ]
    return ["claim (NPO paper)", "here", "evidence"], rows


def samples_section(samples: dict) -> Section:
    """Greedy answers of each model to the same questions, per set (NPO paper Figure 7)."""
    tables = []
    paragraphs = [
        "Greedy answers after the last unlearning epoch. The retain model never saw the forget "
        "authors: a good unlearning method answers forget questions like it does (fluent, wrong "
        "or unsure) and keeps the retain and general answers right."
    ]
    for kind, title in SAMPLE_SETS:
        rows = []
        for item in samples.get(kind, []):
            rows.append([title, item["question"], "(true answer)", item["answer"]])
            rows += [["", "", name, text] for name, text in item["generations"].items()]
        if rows:
            tables.append((["set", "question", "model", "answer"], rows))
    return Section("Sample generations", paragraphs=paragraphs, tables=tables)


def _schedule(profile: dict | None) -> str:
    if not profile:
        return ""
    return (
        f" Training: {profile['train_epochs']} epochs, AdamW lr {profile['train_lr']:g}, batch "
        f"{profile['train_batch']}. Unlearning: {profile['unlearn_epochs']} epochs, lr "
        f"{profile['unlearn_lr']:g}, batch {profile['unlearn_batch']}, beta {profile['beta']:g} "
        "(NPO, DPO); linear warm-up over the first epoch, then linear decay."
    )


def build_sections(summary: dict, samples: dict) -> list[Section]:
    corpus = summary.get("corpus", {})
    timing = summary.get("timing", {})
    overview = [
        f"Fictitious-authors corpus: {corpus.get('n_authors')} authors x "
        f"{corpus.get('facts_per_author')} facts, {corpus.get('train_phrasings')} phrasings per "
        f"fact for training ({corpus.get('n_train_records')} training records, plus "
        f"{corpus.get('n_general_records')} general-knowledge facts). Forget split "
        f"{summary.get('split')}: {corpus.get('n_forget_authors')} authors, "
        f"{corpus.get('n_forget_records')} records, {corpus.get('n_forget_eval')} evaluation items.",
        f"Model: {summary.get('model', {}).get('description', '')}. The target model is trained "
        "on every record, the retain model (the gold standard of unlearning) on the retain split "
        "only; both learn the general-knowledge facts." + _schedule(summary.get("profile")),
        "Forget quality is the p-value of a two-sample KS test between the forget-set truth "
        "ratios of a model and those of the retain model (TOFU; > 0.05 counts as meaningful "
        "forgetting). Model utility is the harmonic mean of answer probability, ROUGE-L recall "
        "and truth ratio on the retain, real-author and world-fact sets.",
        f"Wall time: {timing.get('total_s', float('nan')):.0f} s "
        f"(target and retain models {'from the cache' if timing.get('cached') else 'trained'}: "
        f"{timing.get('models_s', float('nan')):.0f} s; unlearning and evaluation: "
        f"{timing.get('unlearn_s', float('nan')):.0f} s).",
    ]
    results = Section(
        "Results",
        paragraphs=[
            "Each method is reported at the epoch of its peak forget quality (as the NPO "
            "paper's Figure 5), at its best epoch that keeps 90% of the target's model utility "
            "(a practical stopping point), and after its last epoch."
        ],
        tables=[results_table(summary)],
    )
    figures = Section(
        "Figures",
        figures=[
            (tradeoff_figure(summary), "Forget quality vs model utility (paper Figure 5)"),
            (curves_figure(summary), "Forget quality and model utility per epoch (Figure 6)"),
            (forget_kl_figure(summary), "Forget KL per epoch (Figure 8)"),
        ]
        + (
            [(truth_ratio_figure(summary), "Forget truth ratios at the peak epoch")]
            if summary.get("forget_truth_ratios")
            else []
        ),
    )
    findings = Section(
        "The NPO paper's findings at this scale",
        paragraphs=["Each claim of the paper's Section 5.2, checked against this run's numbers."],
        tables=[findings_table(summary.get("findings", []))],
    )
    return [
        Section("Overview", paragraphs=overview),
        results,
        figures,
        findings,
        samples_section(samples),
    ]


def build_demo_report(summary: dict, samples: dict, path: str | os.PathLike) -> Path:
    """Write the self-contained ``report.html`` of a demo run."""
    quick = summary.get("config", {}).get("quick")
    notice = (
        "--quick run: a small corpus and model, few epochs; a smoke test, not the results "
        "of the default settings"
        if quick
        else None
    )
    return write_html_report(
        path,
        "negpref demo: unlearning fictitious authors" + (" (--quick)" if quick else ""),
        build_sections(summary, samples),
        notice=notice,
    )
