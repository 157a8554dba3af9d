"""Per-item logs in TOFU's format, and TOFU's aggregates of them.

Logs are ``{eval file: {metric: {item index: value}}}`` with TOFU's file and metric names, so
ours and TOFU's published logs aggregate the same way (``aggregate``), and a forget-quality
reference can be any retain model's logs.

Eval files: ``eval_log.json`` (retain set), ``eval_log_forget.json`` (forget set),
``eval_real_author_wo_options.json``, ``eval_real_world_wo_options.json``; ours may add
``eval_log_holdout.json`` (membership-inference non-members; TOFU's own aggregation script
does not know it, drop it before feeding ours to TOFU's script).

Per-item metrics are TOFU's (``avg_gt_loss``, ``gt_loss``, ``num_token_gt``, ``generated_text``
= [question, generation, answer], ``rouge1_recall``, ``rougeL_recall``, ``avg_paraphrased_loss``,
``paraphrased_loss``, ``num_token_paraphrased``, ``average_perturb_loss``, ``perturb_loss``,
``num_token_perturb``, ``truth_ratio``, and ``normalized_gt_loss`` on real authors / world
facts) plus ours: ``kl_ref`` (KL(ref || model) per item, with a reference model), ``mia_*``
membership scores (with a holdout set) and, on the forget set, ``exact_memorization`` and
``extraction_strength`` (``negpref.eval.memorization``). ``negpref_meta`` (not an eval file) records the prompt
format and conventions of the evaluation. Logs evaluated without generation have no
``generated_text`` / ROUGE; the aggregates that need ROUGE are then reported missing.

``load_logs`` also reads open-unlearning's ``TOFU_EVAL.json`` (detected by its shape; see
``negpref.eval.open_unlearning``) and converts it to this format; ``write_logs`` writes either.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from negpref.data.records import load_json
from negpref.errors import NegprefError
from negpref.eval import metrics
from negpref.eval import open_unlearning as ou
from negpref.eval.mia import ALL_ATTACKS, mia_auc, mia_summary
from negpref.eval.tofu_files import (
    EVAL_FILES,
    FORGET_FILE,
    HOLDOUT_FILE,
    META_KEY,
    RETAIN_FILE,
    short_list,
)
from negpref.io import atomic_write_json

if TYPE_CHECKING:
    from negpref.eval.tofu import TofuSets

TOFU_LOGS_FILE = "logs.json"
# open-unlearning's reference AUC for PrivLeak when there is no retain model (privleak.yaml)
DEFAULT_PRIVLEAK_REF_AUC = 0.5

UTILITY_SETS = ("retain", "real_authors", "world_facts")
KNOWN_FILES = (*EVAL_FILES.values(), HOLDOUT_FILE)
# Metrics TOFU's aggregation reads (and so every eval file must hold); ROUGE-L only when the
# evaluation generated. The holdout needs any one per-item score.
_AGGREGATED_METRICS = (
    "avg_gt_loss",
    "avg_paraphrased_loss",
    "average_perturb_loss",
)
_OPTIONAL_METRICS = ("rougeL_recall",)
_HOLDOUT_METRICS = ("avg_gt_loss", *(f"mia_{a}" for a in ALL_ATTACKS))
MEMORIZATION_METRICS = ("exact_memorization", "extraction_strength")


def _logs_file(path: Path, what: str) -> Path:
    """``path``, or in a folder its ``logs.json`` or open-unlearning's ``TOFU_EVAL.json``."""
    if path.is_dir():
        for name in (TOFU_LOGS_FILE, ou.EVAL_FILE):
            if (path / name).is_file():
                return path / name
        raise NegprefError(
            f"{what} {path}: folder holds neither {TOFU_LOGS_FILE} nor {ou.EVAL_FILE}"
        )
    if not path.is_file():
        raise NegprefError(f"{what} {path}: file not found")
    return path


def load_logs(path: str | os.PathLike, what: str = "logs") -> dict[str, dict]:
    """Read logs in TOFU's format or open-unlearning's (``TOFU_EVAL.json``), detected from the
    content, as TOFU-format logs (``{eval file: {metric: {index: value}}}``), shape checked.

    ``path`` may be a folder holding ``logs.json`` or ``TOFU_EVAL.json``.
    """
    path = _logs_file(Path(path), what)
    logs = load_json(path, what)
    logs = as_tofu_logs(logs, f"{what} {path}")
    check_logs(logs, f"{what} {path}")
    return logs


def as_tofu_logs(logs, where: str) -> dict:
    """TOFU-format logs unchanged; open-unlearning's converted; anything else refused."""
    if not isinstance(logs, dict) or not logs:
        raise NegprefError(f"{where}: expected {{eval file: {{metric: {{index: value}}}}}}")
    if all(k in KNOWN_FILES or k == META_KEY for k in logs):
        return logs
    if ou.looks_like_summary(logs):
        raise NegprefError(
            f"{where}: an open-unlearning summary ({ou.SUMMARY_FILE}) holds only aggregates; pass "
            f"the {ou.EVAL_FILE} beside it, which has the per-item values"
        )
    if ou.looks_like_open_unlearning(logs):
        converted = ou.from_open_unlearning(logs, where, EVAL_FILES, HOLDOUT_FILE)
        if META_KEY in logs:
            converted[META_KEY] = logs[META_KEY]
        return converted
    return logs  # check_logs names what is unknown


def check_logs(logs, where: str) -> None:
    if not isinstance(logs, dict) or not logs:
        raise NegprefError(f"{where}: expected {{eval file: {{metric: {{index: value}}}}}}")
    unknown = [f for f in logs if f not in KNOWN_FILES and f != META_KEY]
    if unknown:
        raise NegprefError(
            f"{where}: unknown eval file(s) {', '.join(unknown)}; known: {', '.join(KNOWN_FILES)} "
            f"(TOFU's format) or open-unlearning's {ou.EVAL_FILE}"
        )
    for file, per_metric in eval_files(logs).items():
        if not isinstance(per_metric, dict):
            raise NegprefError(f"{where}: {file} must map metric names to {{index: value}}")
        if file == HOLDOUT_FILE:
            present = [m for m in _HOLDOUT_METRICS if isinstance(per_metric.get(m), dict)]
            if not present:
                raise NegprefError(
                    f"{where}: {file} lacks per-item scores ({', '.join(_HOLDOUT_METRICS)})"
                )
            for metric in present:
                _check_numbers(per_metric[metric], f"{where}: {file} metric {metric}")
            continue
        missing = [m for m in _AGGREGATED_METRICS if not isinstance(per_metric.get(m), dict)]
        if missing:
            raise NegprefError(f"{where}: {file} lacks metric(s) {', '.join(missing)}")
        keys = set(per_metric["avg_gt_loss"])
        for metric in (*_AGGREGATED_METRICS, *_OPTIONAL_METRICS):
            if metric not in per_metric:
                continue
            if set(per_metric[metric]) != keys:
                raise NegprefError(
                    f"{where}: {file} metric {metric} covers other items than avg_gt_loss"
                )
            _check_numbers(per_metric[metric], f"{where}: {file} metric {metric}")


def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_numbers(values: dict, where: str) -> None:
    """Per-item values are numbers (null = not computed), or lists of them (perturbed)."""
    for index, value in values.items():
        items = value if isinstance(value, list) else [value]
        if not all(_is_number(v) for v in items):
            raise NegprefError(
                f"{where} item {index}: expected a number (or null), got {value!r:.60}; the "
                "logs must hold numbers"
            )


def eval_files(logs: dict) -> dict[str, dict]:
    """The per-set logs, without the ``negpref_meta`` record."""
    return {f: v for f, v in logs.items() if f != META_KEY}


def item_keys(per_metric: dict) -> list[str]:
    """Item indices of one eval file (the holdout may hold only attack scores)."""
    for metric in _HOLDOUT_METRICS:
        if isinstance(per_metric.get(metric), dict):
            return list(per_metric[metric])
    return []


def _values(per_metric: dict, metric: str, keys: list[str]) -> list:
    return [per_metric[metric][k] for k in keys]


def _as_float(v) -> float:
    return math.nan if v is None else float(v)


def _item_ratios(per_metric: dict, keys: list[str]) -> np.ndarray:
    para = [_as_float(v) for v in _values(per_metric, "avg_paraphrased_loss", keys)]
    pert = [[_as_float(x) for x in p] for p in _values(per_metric, "average_perturb_loss", keys)]
    return metrics.truth_ratios(para, pert)


def _n_nan(per_metric: dict, keys: list[str]) -> int:
    def bad(k: str) -> bool:
        values = [per_metric["avg_gt_loss"][k]] if "avg_gt_loss" in per_metric else []
        if "avg_paraphrased_loss" in per_metric:
            values += [
                per_metric["avg_paraphrased_loss"][k],
                *per_metric["average_perturb_loss"][k],
            ]
        return not all(math.isfinite(_as_float(v)) for v in values)

    return sum(bad(k) for k in keys)


def _set_summary(kind: str, per_metric: dict) -> dict[str, float]:
    keys = list(per_metric["avg_gt_loss"])
    gt_avg = np.array([_as_float(v) for v in _values(per_metric, "avg_gt_loss", keys)])
    if kind in ("retain", "forget"):
        prob = metrics.mean_finite(np.exp(-gt_avg))
    else:
        pert = _values(per_metric, "average_perturb_loss", keys)
        prob = metrics.mean_finite(
            [metrics.normalized_prob(g, [_as_float(x) for x in p]) for g, p in zip(gt_avg, pert)]
        )
    ratios = _item_ratios(per_metric, keys)
    ratio_stat = metrics.forget_truth_ratio if kind == "forget" else metrics.utility_truth_ratio
    summary = {"prob": prob, "truth_ratio": ratio_stat(ratios)}
    if "rougeL_recall" in per_metric:
        summary["rougeL"] = metrics.mean_finite(_values(per_metric, "rougeL_recall", keys))
    if "rouge1_recall" in per_metric:
        summary["rouge1"] = metrics.mean_finite(_values(per_metric, "rouge1_recall", keys))
    for name in MEMORIZATION_METRICS:
        if name in per_metric:
            summary[name] = metrics.mean_finite([_as_float(v) for v in per_metric[name].values()])
    return summary


def _forget_items(logs: dict) -> dict[str, str | None]:
    """Forget-log item keys -> answer (from ``generated_text``), to identify the split."""
    per_metric = logs[FORGET_FILE]
    texts = per_metric.get("generated_text", {})
    return {k: (texts[k][2] if k in texts else None) for k in per_metric["avg_gt_loss"]}


def _compare_forget_items(ours: dict, theirs: dict, what: str) -> None:
    if set(ours) != set(theirs):
        raise NegprefError(
            f"{what} hold {len(theirs)} forget items but these logs hold {len(ours)} "
            f"({len(set(ours) ^ set(theirs))} indices differ): forget quality compares truth "
            "ratios of the same forget items; evaluate the retain model on the same split, "
            "limit and sampling"
        )

    def differs(k: str) -> bool:
        a, b = ours[k], theirs[k]
        # Logs without generated_text cannot be told apart beyond their indices. Whitespace is
        # ignored: open-unlearning's answers are decoded from tokens, which may drop the space
        # before punctuation.
        return (
            isinstance(a, str) and isinstance(b, str) and "".join(a.split()) != "".join(b.split())
        )

    differ = [k for k in ours if differs(k)]
    if differ:
        raise NegprefError(
            f"{what}: the forget answers differ at items {short_list(differ)}; those logs come "
            "from a different forget split"
        )


def check_retain_logs(logs: dict, retain_logs: dict, what: str = "retain logs") -> None:
    """Refuse a forget-quality reference evaluated on other forget items (split or size)."""
    for name, candidate in (("these logs", logs), (what, retain_logs)):
        if FORGET_FILE not in candidate:
            raise NegprefError(f"{name} have no {FORGET_FILE}: forget quality needs the forget set")
    _compare_forget_items(_forget_items(logs), _forget_items(retain_logs), what)


def check_retain_logs_match_sets(retain_logs: dict, sets: TofuSets, what: str) -> None:
    """Before evaluating: the reference logs must cover exactly the forget items of ``sets``."""
    if FORGET_FILE not in retain_logs:
        raise NegprefError(f"{what} have no {FORGET_FILE}: forget quality needs the forget set")
    ours = {k: r["answer"] for k, r in zip(sets.forget.keys, sets.forget.records)}
    _compare_forget_items(ours, _forget_items(retain_logs), what)


def _attack_aucs(logs: dict) -> dict[str, float]:
    forget, holdout = logs.get(FORGET_FILE, {}), logs.get(HOLDOUT_FILE, {})
    return {
        attack: mia_auc(
            [_as_float(v) for v in forget[f"mia_{attack}"].values()],
            [_as_float(v) for v in holdout[f"mia_{attack}"].values()],
        )
        for attack in ALL_ATTACKS
        if f"mia_{attack}" in forget and f"mia_{attack}" in holdout
    }


def _mean_metric(per_metric: dict | None, metric: str) -> float | None:
    if per_metric is None or metric not in per_metric:
        return None
    return metrics.mean_finite([_as_float(v) for v in per_metric[metric].values()])


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def aggregate(
    logs: dict,
    retain_logs: dict | None = None,
    privleak_ref_auc: float | None = DEFAULT_PRIVLEAK_REF_AUC,
) -> dict:
    """TOFU's aggregates of ``logs`` (``aggregate_eval_stat.py``), plus KL, perplexity, MIA.

    Keys: ``model_utility`` (harmonic mean of ``{retain,real_authors,world_facts}/{prob,rougeL,
    truth_ratio}``), ``forget_quality`` (KS p-value of forget truth ratios against
    ``retain_logs``; None without them) and ``forget_ks_statistic``, ``forget_truth_ratio``,
    ``forget/{prob,rougeL,truth_ratio}``, ``*/rouge1``, ``forget_kl`` / ``retain_kl`` (with a
    reference model), ``forget_perplexity`` / ``retain_perplexity``, ``mia/<attack>`` AUCs and
    ``privleak/<attack>`` (MUSE's, in percent: against the retain logs' AUC when they hold
    holdout scores, else against ``privleak_ref_auc``; ``privleak_reference`` says which; None
    turns the fixed reference off), per-set ``counts`` (items, NaN items, empty generations)
    and ``missing`` (aggregates that could not be computed, and why). Non-finite values are
    reported as None.
    """
    logs = as_tofu_logs(logs, "logs")
    check_logs(logs, "logs")
    if retain_logs is not None:
        retain_logs = as_tofu_logs(retain_logs, "retain logs")
        check_logs(retain_logs, "retain logs")
        check_retain_logs(logs, retain_logs)
    result: dict = {"model_utility": None, "forget_quality": None, "forget_ks_statistic": None}
    components = []
    missing: dict[str, str] = {}
    counts = {}
    for kind, file in EVAL_FILES.items():
        if file not in logs:
            continue
        per_metric = logs[file]
        for name, value in _set_summary(kind, per_metric).items():
            result[f"{kind}/{name}"] = value
            if kind in UTILITY_SETS and name in ("prob", "rougeL", "truth_ratio"):
                components.append(value)
        if "rougeL_recall" not in per_metric:
            missing[f"{kind}/rougeL"] = "no generations in the logs (evaluated without generation)"
            if kind in UTILITY_SETS:
                missing["model_utility"] = f"needs ROUGE-L, which the {kind} logs lack"
        keys = list(per_metric["avg_gt_loss"])
        texts = per_metric.get("generated_text", {})
        counts[kind] = {
            "items": len(keys),
            "nan_items": _n_nan(per_metric, keys),
            "empty_generations": sum(not str(t[1]).strip() for t in texts.values()),
        }
    if components and "model_utility" not in missing:
        result["model_utility"] = metrics.model_utility(components)
    if FORGET_FILE in logs:
        result["forget_truth_ratio"] = result["forget/truth_ratio"]
        if retain_logs is not None:
            keys = list(logs[FORGET_FILE]["avg_gt_loss"])
            retain_keys = list(retain_logs[FORGET_FILE]["avg_gt_loss"])
            pvalue, statistic = metrics.forget_quality(
                _item_ratios(logs[FORGET_FILE], keys),
                _item_ratios(retain_logs[FORGET_FILE], retain_keys),
            )
            result["forget_quality"], result["forget_ks_statistic"] = pvalue, statistic
    for kind, file in (("forget", FORGET_FILE), ("retain", RETAIN_FILE)):
        kl = _mean_metric(logs.get(file), "kl_ref")
        if kl is not None:
            result[f"{kind}_kl"] = kl
        per_metric = logs.get(file, {})
        if "gt_loss" in per_metric and "num_token_gt" in per_metric:
            result[f"{kind}_perplexity"] = metrics.perplexity(
                [_as_float(v) for v in per_metric["gt_loss"].values()],
                list(per_metric["num_token_gt"].values()),
            )
    retain_aucs = _attack_aucs(retain_logs) if retain_logs is not None else {}
    result.update(mia_summary(_attack_aucs(logs), retain_aucs, privleak_ref_auc))
    if HOLDOUT_FILE in logs:
        keys = item_keys(logs[HOLDOUT_FILE])
        counts["holdout"] = {"items": len(keys), "nan_items": _n_nan(logs[HOLDOUT_FILE], keys)}
    result["counts"] = counts
    if missing:
        result["missing"] = missing
    return _finite_or_none(result)


def write_logs(
    folder: str | os.PathLike, logs: dict, aggregates: dict, log_format: str = "tofu"
) -> list[Path]:
    """Write ``logs`` into ``folder`` as TOFU's ``logs.json``, or as open-unlearning's
    ``TOFU_EVAL.json`` + ``TOFU_SUMMARY.json`` (``aggregates`` fill their ``agg_value``s)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if log_format == "tofu":
        atomic_write_json(folder / TOFU_LOGS_FILE, logs)
        return [folder / TOFU_LOGS_FILE]
    if log_format != "open-unlearning":
        raise NegprefError(
            f"log_format: must be one of {', '.join(ou.FORMATS)}, got {log_format!r}"
        )
    theirs = ou.to_open_unlearning(eval_files(logs), aggregates, EVAL_FILES, HOLDOUT_FILE)
    if META_KEY in logs:
        theirs[META_KEY] = logs[META_KEY]
    atomic_write_json(folder / ou.EVAL_FILE, theirs)
    atomic_write_json(folder / ou.SUMMARY_FILE, ou.summary(theirs))
    return [folder / ou.EVAL_FILE, folder / ou.SUMMARY_FILE]
