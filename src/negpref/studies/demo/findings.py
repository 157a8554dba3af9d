"""The NPO paper's claims checked on one seed's results, and every figure and claim over the
seeds."""

from __future__ import annotations

import math
import statistics

KEPT_UTILITY = 0.9  # "utility kept": at least 90% of the target model's model utility


def _npo_family(name: str) -> bool:
    return "NPO" in name.upper()


def _value(record: dict, key: str) -> float:
    value = record.get(key)
    return 0.0 if value is None else float(value)


def best_with_utility_kept(epochs: list[dict], target_utility: float) -> dict | None:
    """The unlearning epoch of highest forget quality among those that keep at least
    ``KEPT_UTILITY`` of the target's model utility (ties: higher utility); None if none does."""
    kept = [
        e
        for e in epochs
        if e["step"] > 0 and _value(e, "model_utility") >= KEPT_UTILITY * target_utility
    ]
    if not kept:
        return None
    return max(kept, key=lambda e: (_value(e, "forget_quality"), _value(e, "model_utility")))


def _utility_lost_epoch(epochs: list[dict], target_utility: float) -> float | None:
    """First epoch whose model utility is below half the target's (None: never)."""
    return next(
        (e["epoch"] for e in epochs if _value(e, "model_utility") < 0.5 * target_utility), None
    )


def paper_findings(summary: dict) -> list[dict]:
    """The NPO paper's qualitative claims (Section 5.2), each checked against this run."""
    methods = summary["methods"]
    target_mu = summary["target"]["model_utility"]
    findings = []

    def add(claim: str, holds: bool, evidence: str) -> None:
        findings.append({"claim": claim, "holds": bool(holds), "evidence": evidence})

    def kept(name: str) -> tuple[float, float]:
        best = methods[name].get("utility_kept")
        return (
            (0.0, 0.0) if best is None else (best["forget_quality"] or 0.0, best["model_utility"])
        )

    npo = [n for n in methods if _npo_family(n)]
    baselines = [n for n in methods if not _npo_family(n)]

    def peak(name: str) -> tuple[float, float]:
        m = methods[name]
        return _value(m, "forget_quality"), _value(m, "model_utility")

    if npo and baselines:
        best_npo, best_base = max(npo, key=peak), max(baselines, key=peak)
        add(
            "NPO-based methods give the best forget quality / model utility trade-off "
            "(each method at its peak-forget-quality epoch, as the paper's Figure 5)",
            peak(best_npo) > peak(best_base),
            f"{best_npo}: forget quality {peak(best_npo)[0]:.3g}, utility "
            f"{peak(best_npo)[1]:.3g}; best baseline {best_base}: {peak(best_base)[0]:.3g}, "
            f"utility {peak(best_base)[1]:.3g}",
        )
        best_npo, best_base = max(npo, key=kept), max(baselines, key=kept)
        add(
            "... and against early-stopped baselines (each method at its best epoch that keeps "
            f"{KEPT_UTILITY:.0%} of the target's utility; not in the paper)",
            kept(best_npo) > kept(best_base),
            f"{best_npo}: forget quality {kept(best_npo)[0]:.3g}, utility "
            f"{kept(best_npo)[1]:.3g}; best baseline {best_base}: {kept(best_base)[0]:.3g}, "
            f"utility {kept(best_base)[1]:.3g}",
        )
    for name in ("GA", "GA+RT"):
        if name not in methods:
            continue
        m, final = methods[name], methods[name]["final"]
        add(
            f"{name} collapses: model utility is lost",
            _value(final, "model_utility") <= 0.5 * target_mu,
            f"model utility {target_mu:.3g} (target) -> {_value(final, 'model_utility'):.3g} "
            f"after the last epoch; forget KL {_value(final, 'forget_kl'):.3g}",
        )
        add(
            f"{name}'s forget quality peaks, then falls (below a tenth of its peak)",
            _value(final, "forget_quality") <= _value(m, "forget_quality") / 10,
            f"forget quality {_value(m, 'forget_quality'):.3g} at epoch {m['peak_epoch']:.1f}, "
            f"{_value(final, 'forget_quality'):.3g} after the last epoch",
        )
    for name in ("NPO", "NPO+RT"):
        if name not in methods:
            continue
        m, final = methods[name], methods[name]["final"]
        add(
            f"{name}'s forget quality reaches a plateau and stays (no collapse)",
            _value(final, "forget_quality") >= min(_value(m, "forget_quality") / 10, 0.05),
            f"forget quality {_value(m, 'forget_quality'):.3g} at epoch {m['peak_epoch']:.1f}, "
            f"{_value(final, 'forget_quality'):.3g} after the last epoch (model utility "
            f"{_value(final, 'model_utility'):.3g})",
        )
    if "GA" in methods and "NPO" in methods:
        lost = {n: _utility_lost_epoch(methods[n]["epochs"], target_mu) for n in ("GA", "NPO")}
        add(
            "NPO loses model utility more slowly than GA",
            lost["GA"] is not None and (lost["NPO"] is None or lost["NPO"] > lost["GA"]),
            "first epoch below half the target's utility: "
            + ", ".join(f"{n} {'never' if e is None else f'{e:.1f}'}" for n, e in lost.items()),
        )
        ga_kl, npo_kl = (_value(methods[n]["final"], "forget_kl") for n in ("GA", "NPO"))
        add(
            "GA's forget KL explodes while NPO's stays moderate",
            ga_kl > 3 * npo_kl,
            f"forget KL after the last epoch: GA {ga_kl:.3g}, NPO {npo_kl:.3g}",
        )
    if "NPO" in methods and "NPO+RT" in methods:
        with_rt, without = (_value(methods[n]["final"], "model_utility") for n in ("NPO+RT", "NPO"))
        add(
            "the retain term preserves model utility (NPO+RT above NPO)",
            with_rt > without,
            f"model utility after the last epoch: NPO+RT {with_rt:.3g}, NPO {without:.3g}",
        )
    return findings


# ------------------------------------------------------------------------ over the seeds

SPREAD = "mean and sample standard deviation (n - 1) over the seeds; min, max and each seed's value"
VERDICT_RULE = (
    "holds: the claim holds in every seed; does not hold: in no seed; "
    "mixed: in some seeds (how many is shown)"
)
REFERENCE_FIGURES = ("forget_quality", "model_utility", "forget_truth_ratio")
PEAK_FIGURES = ("forget_quality", "model_utility", "forget_truth_ratio", "forget_kl", "peak_epoch")
FINAL_FIGURES = ("forget_quality", "model_utility", "forget_kl")
KEPT_FIGURES = ("forget_quality", "model_utility", "epoch")
CURVE_FIGURES = ("forget_quality", "model_utility", "forget_kl")


def spread(values: list) -> dict:
    """``SPREAD`` of one figure; a seed without the figure (None) is left out of the statistics
    but kept in ``values``."""
    known = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {
        "mean": statistics.fmean(known) if known else None,
        "std": statistics.stdev(known) if len(known) > 1 else (0.0 if known else None),
        "min": min(known, default=None),
        "max": max(known, default=None),
        "values": list(values),
    }


def _spreads(records: list[dict | None], keys: tuple[str, ...]) -> dict:
    return {k: spread([None if r is None else r.get(k) for r in records]) for k in keys}


def verdict(holding: int, seeds: int) -> str:
    """``VERDICT_RULE``."""
    if holding == seeds:
        return "holds"
    return "does not hold" if holding == 0 else "mixed"


def judge_findings(per_seed: list[dict]) -> list[dict]:
    """Each paper claim over the seeds: its verdict and every seed's outcome and evidence."""
    outcomes: dict[str, list[dict]] = {}
    for run in per_seed:
        for f in run["findings"]:
            outcomes.setdefault(f["claim"], []).append(
                {"seed": run["seed"], "holds": f["holds"], "evidence": f["evidence"]}
            )
    judged = []
    for claim, seeds in outcomes.items():
        holding = sum(o["holds"] for o in seeds)
        judged.append(
            {
                "claim": claim,
                "verdict": verdict(holding, len(seeds)),
                "holds_in": holding,
                "seeds": len(seeds),
                "per_seed": seeds,
            }
        )
    return judged


def _epoch_curves(runs: list[dict]) -> list[dict]:
    """Per epoch: the figures of ``CURVE_FIGURES`` over the seeds (every seed has the same
    epochs: same schedule, same forget set)."""
    return [
        {"epoch": epochs[0]["epoch"], "step": epochs[0]["step"], **_spreads(epochs, CURVE_FIGURES)}
        for epochs in zip(*(run["epochs"] for run in runs), strict=True)
    ]


def over_seeds(per_seed: list[dict]) -> dict:
    """The figures of every model over the seeds (``SPREAD``) and the judged findings."""
    methods = {}
    for name in per_seed[0]["methods"]:
        runs = [s["methods"][name] for s in per_seed]
        methods[name] = {
            **_spreads(runs, PEAK_FIGURES),
            "final": _spreads([r["final"] for r in runs], FINAL_FIGURES),
            "utility_kept": _spreads([r["utility_kept"] for r in runs], KEPT_FIGURES),
            "epochs": _epoch_curves(runs),
            "seconds": spread([r["seconds"] for r in runs]),
        }
    return {
        "target": _spreads([s["target"] for s in per_seed], REFERENCE_FIGURES),
        "retain": _spreads([s["retain"] for s in per_seed], REFERENCE_FIGURES),
        "methods": methods,
        "findings": judge_findings(per_seed),
    }
