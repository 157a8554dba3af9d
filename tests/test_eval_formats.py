"""Evaluation logs in TOFU's format and open-unlearning's (TOFU_EVAL.json / TOFU_SUMMARY.json),
read wherever logs are read and written by ``negpref eval --log-format``."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from negpref.cli import main
from negpref.errors import NegprefError
from negpref.eval import aggregate, load_logs
from negpref.eval.tofu_logs import write_logs

LOGS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu-eval-logs"
FULL_LOGS = LOGS_DIR / "llama2-7b_full_wd0.01.json"
RETAIN90_LOGS = LOGS_DIR / "llama2-7b_retain90_wd0.01.json"


def same_numbers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            # one JSON round trip of float64 values: exact, up to exp/log of the probabilities
            assert b[key] == pytest.approx(a[key], rel=1e-12), key
        else:
            assert a[key] == b[key], key


def test_published_logs_round_trip_through_open_unlearning_format(tmp_path):
    run, retain = load_logs(FULL_LOGS), load_logs(RETAIN90_LOGS)
    # Real authors / world facts take the answer as the truth ratio's base; TOFU's published
    # logs score it twice (paraphrase slot and answer, ~1e-4 apart from batching), negpref and
    # open-unlearning once. Use one value, as negpref's own logs do.
    for logs in (run, retain):
        for file in ("eval_real_author_wo_options.json", "eval_real_world_wo_options.json"):
            logs[file]["avg_paraphrased_loss"] = dict(logs[file]["avg_gt_loss"])
    expected = aggregate(run, retain)
    for name, logs, reference in (("run", run, retain), ("retain", retain, None)):
        write_logs(tmp_path / name, logs, aggregate(logs, reference), "open-unlearning")
    theirs = json.loads((tmp_path / "run" / "TOFU_EVAL.json").read_text())
    # their metric names and per-item fields
    assert {
        "forget_Q_A_Prob",
        "forget_Q_A_PARA_Prob",
        "forget_Q_A_PERT_Prob",
        "forget_Q_A_ROUGE",
        "forget_truth_ratio",
        "retain_Truth_Ratio",
        "ra_Q_A_Prob_normalised",
        "wf_Q_A_ROUGE",
        "model_utility",
        "forget_quality",
    } <= set(theirs)
    item = theirs["forget_Q_A_Prob"]["value_by_index"]["0"]
    assert item["prob"] == pytest.approx(math.exp(-item["avg_loss"]))
    assert len(theirs["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["avg_loss"]) == 5
    assert theirs["model_utility"]["agg_value"] == pytest.approx(expected["model_utility"])
    summary = json.loads((tmp_path / "run" / "TOFU_SUMMARY.json").read_text())
    assert summary["forget_quality"] == expected["forget_quality"]
    assert summary["forget_truth_ratio"] == pytest.approx(expected["forget_truth_ratio"])

    # read back (a file, or the folder holding it): the same aggregates, but perplexity, which
    # needs per-item token counts that open-unlearning does not log
    again = aggregate(load_logs(tmp_path / "run"), load_logs(tmp_path / "retain/TOFU_EVAL.json"))
    for key in ("forget_perplexity", "retain_perplexity"):
        assert expected.pop(key) > 1 and key not in again
    same_numbers(expected, again)


def hand_made_pair(n_items: int = 6):
    """The same forget-set numbers in TOFU's format and in open-unlearning's, written by hand
    from each format's documented structure (not by negpref's converter)."""
    rng = np.random.default_rng(0)
    para = rng.uniform(0.5, 2.0, n_items)
    pert = rng.uniform(0.5, 2.5, (n_items, 3))
    gt = rng.uniform(0.2, 1.5, n_items)
    keys = [str(i) for i in range(n_items)]
    tofu = {
        "eval_log_forget.json": {
            "avg_gt_loss": dict(zip(keys, gt.tolist())),
            "avg_paraphrased_loss": dict(zip(keys, para.tolist())),
            "average_perturb_loss": dict(zip(keys, pert.tolist())),
            "rougeL_recall": dict.fromkeys(keys, 0.5),
        }
    }

    def prob_entry(losses):
        return {
            "agg_value": float(np.mean(np.exp(-np.asarray(losses)))),
            "value_by_index": {
                k: {"prob": float(np.exp(-np.asarray(v))), "avg_loss": v}
                for k, v in zip(keys, losses)
            },
        }

    ratios = np.exp(-pert.mean(-1)) / np.exp(-para)  # P(wrong) / P(correct)
    ours = {
        "forget_Q_A_Prob": prob_entry(gt.tolist()),
        "forget_Q_A_PARA_Prob": prob_entry(para.tolist()),
        "forget_Q_A_PERT_Prob": {
            "agg_value": float(np.exp(-pert).mean()),
            "value_by_index": {
                k: {"prob": np.exp(-v).tolist(), "avg_loss": v.tolist()} for k, v in zip(keys, pert)
            },
        },
        "forget_truth_ratio": {
            "agg_value": float(np.mean(np.minimum(ratios, 1 / ratios))),
            "value_by_index": {k: {"score": float(r)} for k, r in zip(keys, ratios)},
        },
        "forget_Q_A_ROUGE": {
            "agg_value": 0.5,
            "value_by_index": {
                k: {
                    "rouge1_recall": 0.5,
                    "rougeL_f1": 0.5,
                    "rougeL_recall": 0.5,
                    "input": f"question {k}",
                    "ground_truth": f"answer {k}",
                    "generation": "",
                }
                for k in keys
            },
        },
        "forget_quality": {"agg_value": None},
        "model_utility": {"agg_value": 0.6},
        "privleak": {"agg_value": 0.0},
    }
    return tofu, ours, ratios


def test_open_unlearning_retain_logs_give_the_same_forget_quality(tmp_path, capsys):
    tofu_retain, ou_retain, retain_ratios = hand_made_pair()
    run = copy.deepcopy(tofu_retain)
    run["eval_log_forget.json"]["avg_paraphrased_loss"] = dict.fromkeys(
        run["eval_log_forget.json"]["avg_gt_loss"], 3.0
    )  # an unlearned model: paraphrase now much less likely than the perturbations
    paths = {}
    for name, content in (("run", run), ("tofu", tofu_retain), ("ou", ou_retain)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(content))
    results = {}
    for name in ("tofu", "ou"):
        args = ["eval", "aggregate", "--logs", str(paths["run"]), "--retain-logs", str(paths[name])]
        assert main([*args, "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    run_forget = run["eval_log_forget.json"]
    run_ratios = np.exp(
        np.array(list(run_forget["avg_paraphrased_loss"].values()))
        - np.array(list(run_forget["average_perturb_loss"].values())).mean(-1)
    )
    expected = ks_2samp(run_ratios, retain_ratios).pvalue
    assert results["tofu"]["forget_quality"] == pytest.approx(expected, rel=1e-12)
    assert results["ou"]["forget_quality"] == pytest.approx(expected, rel=1e-12)
    assert results["ou"]["forget_quality"] < 0.05  # the run differs from the retain model


def test_open_unlearning_summary_is_refused_with_a_pointer(tmp_path, capsys):
    path = tmp_path / "TOFU_SUMMARY.json"
    path.write_text(json.dumps({"forget_quality": 0.9, "forget_truth_ratio": 0.6}))
    assert main(["eval", "aggregate", "--logs", str(path)]) == 2
    err = capsys.readouterr().err
    assert "holds only aggregates; pass the TOFU_EVAL.json beside it" in err
    assert "Traceback" not in err


def test_open_unlearning_logs_missing_a_needed_metric_name_it(tmp_path):
    _, ou_retain, _ = hand_made_pair()
    del ou_retain["forget_Q_A_PARA_Prob"]
    path = tmp_path / "TOFU_EVAL.json"
    path.write_text(json.dumps(ou_retain))
    with pytest.raises(NegprefError, match=r"lack forget_Q_A_PARA_Prob .* truth ratio"):
        load_logs(path, "retain_logs")


def test_write_logs_refuses_an_unknown_format(tmp_path):
    with pytest.raises(NegprefError, match="log_format"):
        write_logs(tmp_path, load_logs(RETAIN90_LOGS), {}, "csv")
