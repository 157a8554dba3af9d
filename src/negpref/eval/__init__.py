"""Evaluation: TOFU metrics and protocol, membership inference, forget KL, perplexity.

``load_tofu_sets`` / ``TofuSets.from_records`` -> ``evaluate_tofu`` -> per-item logs in TOFU's
format -> ``aggregate`` (model utility, forget quality, ...). ``TofuEvalCallback`` runs the same
during unlearning. ``run(EvalConfig)`` / ``run_aggregate(AggregateConfig)`` are the jobs of
``negpref eval`` / ``negpref eval aggregate`` (``negpref.eval.job``).
"""

from negpref.eval.callback import TofuEvalCallback, aggregate_eval_dir, peak_forget_quality
from negpref.eval.config import AggregateConfig, EvalConfig
from negpref.eval.job import run, run_aggregate
from negpref.eval.tofu import EvalSet, TofuSets, evaluate_tofu, load_tofu_sets
from negpref.eval.tofu_logs import aggregate, load_logs

__all__ = [
    "AggregateConfig",
    "EvalConfig",
    "EvalSet",
    "TofuEvalCallback",
    "TofuSets",
    "aggregate",
    "aggregate_eval_dir",
    "evaluate_tofu",
    "load_logs",
    "load_tofu_sets",
    "peak_forget_quality",
    "run",
    "run_aggregate",
]
