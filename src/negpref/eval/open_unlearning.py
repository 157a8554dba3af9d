"""open-unlearning's TOFU logs <-> ours (TOFU's format), so either serves as retain logs.

open-unlearning (``locuslab/open-unlearning``, ``src/evals``) writes ``TOFU_EVAL.json``:
``{metric: {"agg_value": x, "value_by_index": {item index: {...}}}}``, one entry per metric
and per metric it pre-computes, and ``TOFU_SUMMARY.json``: ``{metric: agg_value}``. Per set
(prefix ``forget``, ``retain``, ``ra`` real authors, ``wf`` world facts):

- ``{p}_Q_A_Prob``, ``{p}_Q_A_PARA_Prob``: ``{prob, avg_loss}`` of the answer / paraphrase;
- ``{p}_Q_A_PERT_Prob``: ``{prob: [...], avg_loss: [...]}`` over the perturbed answers;
- ``{p}_Q_A_ROUGE``: ``{rouge1_recall, rougeL_f1, rougeL_recall, input, ground_truth,
  generation}``;
- ``forget_truth_ratio`` / ``{p}_Truth_Ratio``: ``{score}`` = P(perturbed) / P(paraphrased);
- ``ra_Q_A_Prob_normalised``, ``wf_Q_A_Prob_normalised``: ``{prob}``;
- ``mia_<attack>``: ``{agg_value: AUC, auc, forget: {agg_value, value_by_index: {i: {score}}},
  holdout: {...}}`` where a *higher* score means non-member (the negative of ours);
- ``exact_memorization``, ``extraction_strength`` (forget set): ``{score}``;
- aggregates ``model_utility``, ``forget_quality``, ``privleak`` (on ``mia_min_k``).

``mia_reference_ratio`` is ours (open-unlearning's reference attack is the difference).

Real authors and world facts take the answer itself as the truth ratio's base (``ra_Q_A_Prob``
is both ``correct`` and the answer probability), as TOFU does.
"""

from __future__ import annotations

import math

import numpy as np

from negpref.errors import NegprefError
from negpref.eval import metrics
from negpref.eval.mia import ALL_ATTACKS

EVAL_FILE = "TOFU_EVAL.json"
SUMMARY_FILE = "TOFU_SUMMARY.json"
FORMATS = ("tofu", "open-unlearning")

# Our set kind -> open-unlearning's metric-name prefix.
PREFIXES = {"retain": "retain", "real_authors": "ra", "world_facts": "wf", "forget": "forget"}
# Our attack names -> open-unlearning's MIA metric names.
MIA_METRICS = {attack: f"mia_{attack}" for attack in ALL_ATTACKS}
# Forget-set memorization metrics: the same names here and there ({score} per item there).
MEMORIZATION_METRICS = ("exact_memorization", "extraction_strength")
PRIVLEAK_ATTACK = "min_k"  # open-unlearning's privleak is computed on Min-K%
AGGREGATES = ("model_utility", "forget_quality", "privleak")


def _has_paraphrase(kind: str) -> bool:
    return kind in ("forget", "retain")


def _truth_ratio_metric(kind: str) -> str:
    return "forget_truth_ratio" if kind == "forget" else f"{PREFIXES[kind]}_Truth_Ratio"


def _as_float(v) -> float:
    return math.nan if v is None else float(v)


def _finite_or_none(v: float):
    return v if math.isfinite(v) else None


def looks_like_open_unlearning(logs: dict) -> bool:
    """Whether ``logs`` holds open-unlearning metric entries (``agg_value``/``value_by_index``)."""
    return any(
        isinstance(v, dict) and ("value_by_index" in v or "agg_value" in v) for v in logs.values()
    )


def looks_like_summary(logs: dict) -> bool:
    """A ``TOFU_SUMMARY.json``: open-unlearning metric names mapped to bare numbers."""
    known = {f"{p}_Q_A_Prob" for p in PREFIXES.values()} | {"forget_truth_ratio", *AGGREGATES}
    return bool(known & set(logs)) and all(
        isinstance(v, (int, float)) or v is None for v in logs.values()
    )


# ------------------------------------------------------------------------------ reading


def _by_index(logs: dict, metric: str, where: str, needed_for: str) -> dict:
    entry = logs.get(metric)
    if not isinstance(entry, dict) or not isinstance(entry.get("value_by_index"), dict):
        raise NegprefError(
            f"{where}: open-unlearning logs lack {metric} (value_by_index), needed for "
            f"{needed_for}; evaluate the model with open-unlearning's TOFU metrics that include it"
        )
    return entry["value_by_index"]


def _field(per_item: dict, name: str, metric: str, where: str) -> dict:
    out = {}
    for k, v in per_item.items():
        if v is not None and not isinstance(v, dict):
            raise NegprefError(f"{where}: {metric} item {k}: expected an object, got {v!r}")
        if v is not None and name not in v:
            raise NegprefError(f"{where}: {metric} item {k}: no field {name!r}")
        out[k] = None if v is None else v[name]
    return out


def _set_from_open_unlearning(logs: dict, kind: str, where: str) -> dict[str, dict]:
    prefix = PREFIXES[kind]
    gt_metric = f"{prefix}_Q_A_Prob"
    para_metric = f"{prefix}_Q_A_PARA_Prob" if _has_paraphrase(kind) else gt_metric
    pert_metric = f"{prefix}_Q_A_PERT_Prob"
    needed = f"the {kind} set's truth ratio"
    gt = _by_index(logs, gt_metric, where, f"the {kind} set's probability")
    para = _by_index(logs, para_metric, where, needed)
    pert = _by_index(logs, pert_metric, where, needed)
    if set(para) != set(gt) or set(pert) != set(gt):
        raise NegprefError(
            f"{where}: {gt_metric}, {para_metric} and {pert_metric} cover different items"
        )
    keys = list(gt)
    # A single perturbed answer is logged as a number, several as a list; an item open-unlearning
    # could not score is None (NaN here: left out of every aggregate, and counted).
    pert_losses = {
        k: v if isinstance(v, list) else [v]
        for k, v in _field(pert, "avg_loss", pert_metric, where).items()
    }
    para_losses = _field(para, "avg_loss", para_metric, where)
    ratios = metrics.truth_ratios(
        [_as_float(para_losses[k]) for k in keys],
        [[_as_float(x) for x in pert_losses[k]] for k in keys],
    )
    per_metric: dict[str, dict] = {
        "avg_gt_loss": _field(gt, "avg_loss", gt_metric, where),
        "avg_paraphrased_loss": para_losses,
        "average_perturb_loss": pert_losses,
        "truth_ratio": dict(zip(keys, ratios.tolist())),
    }
    rouge_metric = f"{prefix}_Q_A_ROUGE"
    if rouge_metric in logs:
        rouge = _by_index(logs, rouge_metric, where, f"the {kind} set's ROUGE")
        for name in ("rougeL_recall", "rouge1_recall"):
            per_metric[name] = {k: rouge[k].get(name) if rouge.get(k) else None for k in keys}
        per_metric["generated_text"] = {
            k: [rouge[k].get("input"), rouge[k].get("generation"), rouge[k].get("ground_truth")]
            for k in keys
            if rouge.get(k)
        }
    return per_metric


def _mia_from_open_unlearning(logs: dict, where: str) -> tuple[dict, dict]:
    """Per-item attack scores of forget and holdout, in our sign (higher: member)."""
    forget: dict[str, dict] = {}
    holdout: dict[str, dict] = {}
    for attack, metric in MIA_METRICS.items():
        entry = logs.get(metric)
        if not isinstance(entry, dict) or "forget" not in entry or "holdout" not in entry:
            continue
        for side, target in (("forget", forget), ("holdout", holdout)):
            per_item = _field(
                (entry[side] or {}).get("value_by_index") or {}, "score", f"{metric}.{side}", where
            )
            target[f"mia_{attack}"] = {
                k: None if v is None else -float(v) for k, v in per_item.items()
            }
        if attack == "loss":  # the LOSS attack's score is the holdout's token-mean NLL
            holdout["avg_gt_loss"] = {
                k: -v if v is not None else None for k, v in holdout["mia_loss"].items()
            }
    return forget, holdout


def from_open_unlearning(logs: dict, where: str, tofu_files: dict, holdout_file: str) -> dict:
    """open-unlearning's ``TOFU_EVAL.json`` as our (TOFU-format) logs.

    ``tofu_files`` maps our set kinds to TOFU's eval file names, ``holdout_file`` is ours.
    """
    converted: dict[str, dict] = {}
    for kind, file in tofu_files.items():
        if f"{PREFIXES[kind]}_Q_A_Prob" in logs:
            converted[file] = _set_from_open_unlearning(logs, kind, where)
    if tofu_files["forget"] in converted:
        for metric in MEMORIZATION_METRICS:
            if metric in logs:
                per_item = _by_index(logs, metric, where, metric)
                converted[tofu_files["forget"]][metric] = _field(per_item, "score", metric, where)
    mia_forget, mia_holdout = _mia_from_open_unlearning(logs, where)
    if mia_forget:
        forget_file = tofu_files["forget"]
        if forget_file not in converted:
            raise NegprefError(
                f"{where}: open-unlearning logs hold MIA scores but no forget_Q_A_Prob"
            )
        converted[forget_file].update(mia_forget)
        converted[holdout_file] = mia_holdout
    if not converted:
        raise NegprefError(
            f"{where}: open-unlearning logs hold none of "
            f"{', '.join(f'{p}_Q_A_Prob' for p in PREFIXES.values())}"
        )
    return converted


# ------------------------------------------------------------------------------ writing


def _entry(per_item: dict[str, dict], agg_value: float) -> dict:
    return {"agg_value": _finite_or_none(agg_value), "value_by_index": per_item}


def _prob_entry(avg_losses: dict) -> dict:
    probs = {k: math.exp(-_as_float(v)) for k, v in avg_losses.items()}
    per_item = {
        k: {"prob": _finite_or_none(probs[k]), "avg_loss": avg_losses[k]} for k in avg_losses
    }
    return _entry(per_item, metrics.mean_finite(list(probs.values())))


def _pert_entry(avg_losses: dict) -> dict:
    per_item, item_means = {}, []
    for k, losses in avg_losses.items():
        probs = [math.exp(-_as_float(x)) for x in losses]
        per_item[k] = {"prob": probs, "avg_loss": list(losses)}
        item_means.append(float(np.mean(probs)))
    return _entry(per_item, metrics.mean_finite(item_means))


def _set_to_open_unlearning(kind: str, per_metric: dict) -> dict[str, dict]:
    prefix = PREFIXES[kind]
    keys = list(per_metric["avg_gt_loss"])
    out = {f"{prefix}_Q_A_Prob": _prob_entry(per_metric["avg_gt_loss"])}
    if _has_paraphrase(kind):
        out[f"{prefix}_Q_A_PARA_Prob"] = _prob_entry(per_metric["avg_paraphrased_loss"])
    pert = per_metric["average_perturb_loss"]
    out[f"{prefix}_Q_A_PERT_Prob"] = _pert_entry(pert)
    ratios = metrics.truth_ratios(
        [_as_float(per_metric["avg_paraphrased_loss"][k]) for k in keys],
        [[_as_float(x) for x in pert[k]] for k in keys],
    )
    aggregate_ratio = (
        metrics.forget_truth_ratio if kind == "forget" else metrics.utility_truth_ratio
    )
    out[_truth_ratio_metric(kind)] = _entry(
        {k: {"score": _finite_or_none(float(r))} for k, r in zip(keys, ratios)},
        aggregate_ratio(ratios),
    )
    if not _has_paraphrase(kind):
        normalised = {
            k: metrics.normalized_prob(
                _as_float(per_metric["avg_gt_loss"][k]), [_as_float(x) for x in pert[k]]
            )
            for k in keys
        }
        out[f"{prefix}_Q_A_Prob_normalised"] = _entry(
            {k: {"prob": v} for k, v in normalised.items()},
            metrics.mean_finite(list(normalised.values())),
        )
    for metric in MEMORIZATION_METRICS:
        if metric in per_metric:
            values = per_metric[metric]
            out[metric] = _entry(
                {k: {"score": v} for k, v in values.items()},
                metrics.mean_finite([_as_float(v) for v in values.values()]),
            )
    if "rougeL_recall" in per_metric:
        texts = per_metric.get("generated_text", {})
        per_item = {}
        for k in keys:
            question, generation, answer = texts.get(k, [None, None, None])
            per_item[k] = {
                "rouge1_recall": per_metric.get("rouge1_recall", {}).get(k),
                "rougeL_recall": per_metric["rougeL_recall"][k],
                "input": question,
                "ground_truth": answer,
                "generation": generation,
            }
        out[f"{prefix}_Q_A_ROUGE"] = _entry(
            per_item,
            metrics.mean_finite([_as_float(v) for v in per_metric["rougeL_recall"].values()]),
        )
    return out


def _mia_to_open_unlearning(forget: dict, holdout: dict, aucs: dict) -> dict[str, dict]:
    out = {}
    for attack, metric in MIA_METRICS.items():
        name = f"mia_{attack}"
        if name not in forget or name not in holdout:
            continue
        sides = {}
        for side, per_metric in (("forget", forget), ("holdout", holdout)):
            scores = {k: None if v is None else -float(v) for k, v in per_metric[name].items()}
            sides[side] = _entry(
                {k: {"score": s} for k, s in scores.items()},
                metrics.mean_finite([_as_float(s) for s in scores.values()]),
            )
        auc = aucs.get(f"mia/{attack}")
        out[metric] = {"agg_value": auc, "auc": auc, **sides}
    return out


def to_open_unlearning(logs: dict, aggregates: dict, tofu_files: dict, holdout_file: str) -> dict:
    """Our logs (and their ``aggregate``) as open-unlearning's ``TOFU_EVAL.json``.

    Not written: ``rougeL_f1`` (TOFU evaluation scores ROUGE recall only).
    """
    out: dict[str, dict] = {}
    for kind, file in tofu_files.items():
        if file in logs:
            out.update(_set_to_open_unlearning(kind, logs[file]))
    if holdout_file in logs and tofu_files["forget"] in logs:
        out.update(
            _mia_to_open_unlearning(logs[tofu_files["forget"]], logs[holdout_file], aggregates)
        )
    out["model_utility"] = {"agg_value": aggregates.get("model_utility")}
    if aggregates.get("forget_quality") is not None:
        out["forget_quality"] = {"agg_value": aggregates["forget_quality"]}
    if aggregates.get(f"privleak/{PRIVLEAK_ATTACK}") is not None:
        out["privleak"] = {"agg_value": aggregates[f"privleak/{PRIVLEAK_ATTACK}"]}
    return dict(sorted(out.items()))


def summary(open_unlearning_logs: dict) -> dict:
    """``TOFU_SUMMARY.json``: every metric's ``agg_value`` that is not None (their rule)."""
    return {
        name: entry["agg_value"]
        for name, entry in open_unlearning_logs.items()
        if isinstance(entry, dict) and entry.get("agg_value") is not None
    }
