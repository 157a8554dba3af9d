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


def format_spread(figure: dict | None) -> str:
    """``mean ± std`` of a figure over the seeds (``findings.spread``); n/a when unknown."""
    if not figure or figure.get("mean") is None:
        return "n/a"
    return f"{figure['mean']:.3g} ± {figure['std']:.2g}"


def _mean(figure: dict | None) -> float | None:
    return None if not figure else figure.get("mean")


def tradeoff_figure(summary: dict) -> bytes:
    """Figure 5: forget quality (log) vs model utility, each method at its peak-quality epoch:
    every seed's point (small) and the mean over the seeds (large, labelled)."""
    methods = summary["methods"]
    style = _style(list(methods))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, m in methods.items():
        s = style[name]
        seeds = zip(m["forget_quality"]["values"], m["model_utility"]["values"], strict=True)
        for fq, mu in seeds:
            if fq is not None and _finite(mu):
                ax.scatter(mu, _fq(fq), s=18, color=s["color"], marker=s["marker"], alpha=0.4)
        fq, mu = _fq(_mean(m["forget_quality"])), _mean(m["model_utility"])
        if fq is None or not _finite(mu):
            continue
        # a legend entry, not a label at the point: methods at similar points (GA, GA+RT,
        # GA+KL) printed their labels on top of each other
        label = f"{name} (ep. {_mean(m['peak_epoch']) or 0:.1f})"
        ax.scatter(mu, fq, s=70, color=s["color"], marker=s["marker"], label=label, zorder=3)
    for key, marker, label in (("target", "X", "target (before)"), ("retain", "*", "retain model")):
        ref = summary.get(key, {})
        fq, mu = _fq(_mean(ref.get("forget_quality"))), _mean(ref.get("model_utility"))
        if fq is not None and _finite(mu):
            ax.scatter(mu, fq, s=150, color="black", marker=marker, label=label, zorder=4)
    ax.axhline(MEANINGFUL_FQ, color="gray", linestyle=":", label="p = 0.05")
    ax.set_yscale("log")
    ax.set_xlabel("Model utility")
    ax.set_ylabel("Forget quality (KS p-value, log)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title(
        f"Forget quality vs model utility ({summary.get('split', 'forget')}, "
        f"{len(summary.get('seeds', []))} seeds)"
    )
    return _png(fig)


def _curve(m: dict, key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Epochs, and the mean, min and max over the seeds of ``key`` at each."""
    points = [(e["epoch"], e[key]) for e in m.get("epochs", []) if _finite(e[key]["mean"])]
    return (
        [p[0] for p in points],
        [p[1]["mean"] for p in points],
        [p[1]["min"] for p in points],
        [p[1]["max"] for p in points],
    )


def _plot_curve(ax, m: dict, key: str, style: dict, label: str, floor: float | None = None):
    x, mean, low, high = _curve(m, key)
    if floor is not None:
        mean, low, high = ([max(v, floor) for v in values] for values in (mean, low, high))
    ax.plot(x, mean, label=label, **style)
    ax.fill_between(x, low, high, color=style["color"], alpha=0.12, linewidth=0)


def curves_figure(summary: dict) -> bytes:
    """Figure 6: forget quality (top) and model utility (bottom) after every epoch (mean over
    the seeds, shaded from the lowest to the highest seed)."""
    methods = summary["methods"]
    style = _style(list(methods))
    fig, (ax_fq, ax_mu) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
    for name, m in methods.items():
        _plot_curve(ax_fq, m, "forget_quality", style[name], name, floor=_FQ_FLOOR)
        _plot_curve(ax_mu, m, "model_utility", style[name], name)
    ax_fq.axhline(MEANINGFUL_FQ, color="gray", linestyle=":")
    retain_mu = _mean(summary.get("retain", {}).get("model_utility"))
    if _finite(retain_mu):
        ax_mu.axhline(retain_mu, color="black", linestyle=":", label="retain model")
    ax_fq.set_yscale("log")
    ax_fq.set_ylabel("Forget quality (log)")
    ax_mu.set_ylabel("Model utility")
    ax_mu.set_xlabel("Epoch (0 = target model)")
    ax_fq.set_title("Evolution during unlearning (mean; band: min to max over seeds)")
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
        _plot_curve(ax, m, "forget_kl", style[name], name)
    # symlog: GA's KL explodes while NPO's stays moderate; both stay readable
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Forget KL (symlog)")
    ax.set_title("Forget KL during unlearning (mean; band: min to max over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def truth_ratio_figure(summary: dict) -> bytes:
    """What forget quality compares: forget-set truth ratios of each model against the retain
    model's (the KS test's two samples), at each method's peak epoch, for the first seed."""
    first = summary["per_seed"][0]
    ratios = first.get("forget_truth_ratios", {})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = [n for n in ("retain", "target", *first["methods"]) if ratios.get(n)]
    data = [[v for v in ratios[n] if _finite(v)] for n in names]
    ax.boxplot(data, vert=False, tick_labels=names, showfliers=True)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap
    ax.axvline(1.0, color="gray", linestyle=":")
    ax.set_xlabel("Forget-set truth ratio P(perturbed) / P(paraphrased) (log)")
    ax.set_title(f"Truth-ratio distributions, seed {first['seed']} (KS test vs the retain model)")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def _kept(kept: dict) -> str:
    """Forget quality at the best epoch keeping 90% utility, over the seeds that have one."""
    missing = sum(v is None for v in kept["forget_quality"]["values"])
    text = f"{format_spread(kept['forget_quality'])} (epoch {format_spread(kept['epoch'])})"
    if missing == len(kept["forget_quality"]["values"]):
        return "none"
    return text + (f"; none in {missing} seeds" if missing else "")


RESULT_COLUMNS = [
    "model", "peak epoch", "forget quality", "model utility", "forget truth ratio",
    "forget KL", "forget quality, 90% utility kept (epoch)", "final forget quality",
    "final model utility", "unlearn s",
]  # fmt: skip


def results_table(summary: dict) -> tuple[list[str], list[list]]:
    """Every figure as mean ± std over the seeds."""
    rows = []
    for key, label in (("target", "target (before unlearning)"), ("retain", "retain (gold)")):
        ref = summary.get(key, {})
        rows.append(
            [label, "", format_spread(ref.get("forget_quality")),
             format_spread(ref.get("model_utility")), format_spread(ref.get("forget_truth_ratio")),
             "", "", "", "", ""]
        )  # fmt: skip
    for name, m in summary["methods"].items():
        final = m["final"]
        rows.append(
            [
                name,
                format_spread(m["peak_epoch"]),
                format_spread(m["forget_quality"]),
                format_spread(m["model_utility"]),
                format_spread(m["forget_truth_ratio"]),
                format_spread(m["forget_kl"]),
                _kept(m["utility_kept"]),
                format_spread(final["forget_quality"]),
                format_spread(final["model_utility"]),
                format_spread(m["seconds"]),
            ]
        )
    return RESULT_COLUMNS, rows


def _pair(record: dict | None) -> str:
    if not record:
        return "n/a"
    fq, mu = record.get("forget_quality"), record.get("model_utility")
    return f"{'n/a' if fq is None else f'{fq:.3g}'} / {'n/a' if mu is None else f'{mu:.3g}'}"


def per_seed_table(summary: dict) -> tuple[list[str], list[list]]:
    """Forget quality / model utility of every model in every seed (methods at their peak)."""
    runs = summary["per_seed"]
    rows = [
        [label, *(_pair(run[key]) for run in runs)]
        for key, label in (("target", "target (before)"), ("retain", "retain (gold)"))
    ]
    rows += [[name, *(_pair(run["methods"][name]) for run in runs)] for name in summary["methods"]]
    return ["model", *(f"seed {run['seed']}" for run in runs)], rows


def findings_table(findings: list[dict]) -> tuple[list[str], list[list]]:
    rows = [
        [
            f["claim"],
            f"{f['verdict']} ({f['holds_in']} of {f['seeds']} seeds)",
            "; ".join(
                f"seed {o['seed']}: {'holds' if o['holds'] else 'does not hold'} ({o['evidence']})"
                for o in f["per_seed"]
            ),
        ]
        for f in findings
    ]
    return ["claim (NPO paper)", "over the seeds", "each seed"], rows


def environment_section(summary: dict) -> Section:
    """What the numbers were computed with: the command, versions, threads, CPU, seeds."""
    env = summary.get("environment", {})
    rows = [["command", summary.get("command", "")]]
    rows += [["seeds", " ".join(str(s) for s in summary.get("seeds", []))]]
    rows += [["corpus seed", str(summary.get("corpus", {}).get("seed", ""))]]
    rows += [[name, version] for name, version in env.get("packages", {}).items()]
    rows += [
        [label, str(env.get(key, ""))]
        for key, label in (
            ("negpref", "negpref"),
            ("python", "python"),
            ("torch_threads", "torch threads per process"),
            ("jobs", "worker processes"),
            ("cpu_capability", "CPU capability (torch kernels)"),
            ("cpu", "CPU"),
            ("machine", "machine"),
            ("system", "system"),
        )
    ]
    return Section(
        "Environment",
        paragraphs=[
            "The same command with the same package versions, threads and CPU gives the same "
            "numbers, bit for bit (the number of worker processes does not matter)."
        ],
        tables=[(["", "value"], rows)],
    )


def samples_section(samples: dict) -> Section:
    """Greedy answers of each model to the same questions, per set (NPO paper Figure 7)."""
    tables = []
    paragraphs = [
        "Greedy answers after the last unlearning epoch (first seed). The retain model never "
        "saw the forget "
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
        f"{timing.get('unlearn_s', float('nan')):.0f} s; "
        f"{summary.get('environment', {}).get('jobs', 1)} worker processes).",
    ]
    seeds = summary.get("seeds", [])
    results = Section(
        "Results",
        paragraphs=[
            f"Over {len(seeds)} seeds ({', '.join(str(s) for s in seeds)}: each trains its own "
            "target and retain models and unlearns with its own data order), every figure as "
            f"{summary.get('spread', 'mean ± std over the seeds')}. Each method is reported at "
            "the epoch of its peak forget quality (as the NPO paper's Figure 5), at its best "
            "epoch that keeps 90% of the target's model utility (a practical stopping point), "
            "and after its last epoch. Below: forget quality / model utility in each seed.",
        ],
        tables=[results_table(summary), per_seed_table(summary)],
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
            if summary.get("per_seed")
            else []
        ),
    )
    findings = Section(
        "The NPO paper's findings at this scale",
        paragraphs=[
            "Each claim of the paper's Section 5.2, checked against each seed's numbers, and "
            f"judged over the seeds: {summary.get('verdict_rule', '')}."
        ],
        tables=[findings_table(summary.get("findings", []))],
    )
    return [
        Section("Overview", paragraphs=overview),
        results,
        figures,
        findings,
        samples_section(samples),
        environment_section(summary),
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
