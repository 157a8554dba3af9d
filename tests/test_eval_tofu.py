"""TOFU sets, logs and aggregation: TOFU's published Llama-2-7B logs, loaders, bad input."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import hmean, ks_2samp

from conftest import rounding_bound
from negpref.cli import main
from negpref.errors import NegprefError
from negpref.eval import TofuSets, aggregate, load_logs, load_tofu_sets

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOFU_DIR = SHARED / "tofu"
LOGS_DIR = SHARED / "tofu-eval-logs"
FULL_LOGS = LOGS_DIR / "llama2-7b_full_wd0.01.json"
RETAIN90_LOGS = LOGS_DIR / "llama2-7b_retain90_wd0.01.json"
RETAIN95_LOGS = LOGS_DIR / "llama2-7b_retain95_wd0.01.json"
# float64 means of <= 300 items summed in another order, plus ~20 roundings per item, relative:
# 7.1e-14; measured 1.8e-16 (was rel=1e-12)
AGGREGATE_REL = rounding_bound(torch.float64, 300 + 20, 1.0)


def tofu_reference(run: dict, retain: dict) -> dict:
    """TOFU's published aggregation (aggregate_eval_stat.py), written out from its formulas."""
    names = {
        "eval_log.json": "retain",
        "eval_real_author_wo_options.json": "real_authors",
        "eval_real_world_wo_options.json": "world_facts",
        "eval_log_forget.json": "forget",
    }

    def arr(d, metric):
        return np.array(list(d[metric].values()), dtype=np.float64)

    def stat(d):  # TOFU's "paraphrased over perturbed", exp(mean perturbed loss - paraphrased)
        return np.exp(arr(d, "average_perturb_loss").mean(-1) - arr(d, "avg_paraphrased_loss"))

    out = {}
    for file, name in names.items():
        d = run[file]
        if "eval_log" in file:
            prob = np.mean(np.exp(-arr(d, "avg_gt_loss")))
        else:
            true = np.exp(-arr(d, "avg_gt_loss"))
            false = np.exp(-arr(d, "average_perturb_loss"))
            prob = np.mean(true / (true + false.sum(-1)))
        s = stat(d)
        out[f"{name}/prob"] = prob
        out[f"{name}/rougeL"] = arr(d, "rougeL_recall").mean()
        out[f"{name}/truth_ratio"] = (
            np.mean(np.minimum(s, 1 / s)) if "forget" in file else np.mean(np.maximum(0, 1 - 1 / s))
        )
    out["model_utility"] = hmean(
        [
            out[f"{n}/{m}"]
            for n in names.values()
            if n != "forget"
            for m in ("rougeL", "prob", "truth_ratio")
        ]
    )
    out["forget_quality"] = ks_2samp(
        stat(run["eval_log_forget.json"]), stat(retain["eval_log_forget.json"])
    ).pvalue
    return out


def test_aggregate_reproduces_tofu_on_published_llama2_logs():
    run, retain = load_logs(FULL_LOGS), load_logs(RETAIN90_LOGS)
    result = aggregate(run, retain)
    reference = tofu_reference(run, retain)
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, rel=AGGREGATE_REL), key
    assert result["forget_truth_ratio"] == result["forget/truth_ratio"]
    # The full model remembers the forget set: TOFU's forget quality is tiny.
    assert result["forget_quality"] < 1e-15
    assert 0.6 < result["model_utility"] < 0.65
    assert result["counts"]["forget"] == {"items": 300, "nan_items": 0, "empty_generations": 0}
    # The retain model against itself is indistinguishable.
    assert aggregate(retain, retain)["forget_quality"] == 1.0


def test_cli_aggregate_json_matches_reference(capsys):
    assert (
        main(
            [
                "eval",
                "aggregate",
                "--logs",
                str(FULL_LOGS),
                "--retain-logs",
                str(RETAIN90_LOGS),
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    reference = tofu_reference(load_logs(FULL_LOGS), load_logs(RETAIN90_LOGS))
    assert printed["forget_quality"] == pytest.approx(
        reference["forget_quality"], rel=AGGREGATE_REL
    )
    assert printed["model_utility"] == pytest.approx(reference["model_utility"], rel=AGGREGATE_REL)
    nine = [
        f"{s}/{m}"
        for s in ("retain", "real_authors", "world_facts")
        for m in ("prob", "rougeL", "truth_ratio")
    ]
    assert all(isinstance(printed[k], float) for k in [*nine, "forget_truth_ratio"])


def test_cli_aggregate_refuses_retain_logs_of_another_split(capsys, tmp_path):
    code = main(
        ["eval", "aggregate", "--logs", str(FULL_LOGS), "--retain-logs", str(RETAIN95_LOGS)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "200 forget items" in err and "300" in err
    # Same size, different items: answers of items 3 and 8 changed.
    other = load_logs(RETAIN90_LOGS)
    for k in ("3", "8"):
        other["eval_log_forget.json"]["generated_text"][k][2] = "A different author entirely."
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    assert main(["eval", "aggregate", "--logs", str(FULL_LOGS), "--retain-logs", str(path)]) == 2
    assert "differ at items 3, 8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "malformed JSON"),
        ('{"eval_other.json": {}}', "unknown eval file"),
        ('{"eval_log.json": {"avg_gt_loss": {"0": 1.0}}}', "lacks metric"),
    ],
)
def test_cli_aggregate_rejects_bad_logs(tmp_path, capsys, content, message):
    path = tmp_path / "logs.json"
    path.write_text(content)
    assert main(["eval", "aggregate", "--logs", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_aggregate_counts_and_skips_nan_items():
    run = copy.deepcopy(load_logs(FULL_LOGS))
    forget = run["eval_log_forget.json"]
    forget["avg_paraphrased_loss"]["5"] = float("nan")
    forget["generated_text"]["7"][1] = ""
    result = aggregate(run, load_logs(RETAIN90_LOGS))
    assert result["counts"]["forget"]["nan_items"] == 1
    assert result["counts"]["forget"]["empty_generations"] == 1
    assert np.isfinite(result["forget_quality"]) and np.isfinite(result["forget_truth_ratio"])


def test_load_tofu_sets_real_data_and_limits():
    sets = load_tofu_sets(TOFU_DIR, "forget10", limit=5)
    assert [len(s) for s in sets.present().values()] == [5, 5, 5, 5]
    assert sets.forget.keys == ["0", "1", "2", "3", "4"]  # TOFU's ds_size: the first items
    assert sets.forget.source.endswith("forget10_perturbed.json") and sets.holdout is None
    full = load_tofu_sets(TOFU_DIR, "forget05")
    assert len(full.forget) == 200 and len(full.retain) == 400
    assert len(full.real_authors) == 100 and len(full.world_facts) == 117
    # Beyond 10% the forget10 perturbed set stands in (NPO paper, Appendix E.1.1).
    assert load_tofu_sets(TOFU_DIR, "forget50", limit=3).forget.source.endswith(
        "forget10_perturbed.json"
    )
    seeded = load_tofu_sets(TOFU_DIR, "forget10", limit=5, seed=1)
    assert (
        seeded.forget.indices
        == load_tofu_sets(TOFU_DIR, "forget10", limit=5, seed=1).forget.indices
    )
    assert seeded.forget.indices != [0, 1, 2, 3, 4] and seeded.forget.indices == sorted(
        seeded.forget.indices
    )


def _copy_tofu(tmp_path: Path, names) -> Path:
    for name in names:
        shutil.copy(TOFU_DIR / name, tmp_path / name)
    return tmp_path


EVAL_FILES = ["retain_perturbed.json", "real_authors_perturbed.json", "world_facts_perturbed.json"]


def test_perturbed_set_of_other_questions_is_reported(tmp_path):
    root = _copy_tofu(tmp_path, ["forget01.json", *EVAL_FILES])
    lines = (TOFU_DIR / "forget01_perturbed.json").read_text().splitlines()
    for i in (3, 7):
        record = json.loads(lines[i])
        record["question"] = "Where was a different author born?"
        lines[i] = json.dumps(record)
    (root / "forget01_perturbed.json").write_text("\n".join(lines))
    with pytest.raises(NegprefError, match=r"2 of 40 items .* \(items 3, 7\)"):
        load_tofu_sets(root, "forget01")


def test_missing_files_and_bad_split(tmp_path, monkeypatch):
    root = _copy_tofu(tmp_path, ["forget05.json", *EVAL_FILES])
    with pytest.raises(NegprefError, match=r"forget05_perturbed\.json: not found"):
        load_tofu_sets(root, "forget05")
    with pytest.raises(NegprefError, match="expected forgetNN"):
        load_tofu_sets(TOFU_DIR, "forget_10")
    monkeypatch.delenv("NEGPREF_TOFU_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NegprefError, match="set data_dir"):
        load_tofu_sets(None, "forget10")
    monkeypatch.setenv("NEGPREF_TOFU_DIR", str(TOFU_DIR))
    assert len(load_tofu_sets(None, "forget01").forget) == 40


def test_from_records_validates_and_subsamples():
    item = {"question": "q?", "answer": "a", "paraphrased_answer": "b", "perturbed_answer": ["c"]}
    sets = TofuSets.from_records(forget=[item] * 4, retain=[item] * 2, limit=3)
    assert len(sets.forget) == 3 and len(sets.retain) == 2 and sets.real_authors is None
    with pytest.raises(NegprefError, match="forget records record 2: missing field"):
        TofuSets.from_records(forget=[item, {"question": "q", "answer": "a"}], retain=[item])
    with pytest.raises(NegprefError, match="perturbed_answer"):
        TofuSets.from_records(forget=[{**item, "perturbed_answer": [1]}], retain=[item])


def test_cli_eval_checks_input_before_loading_a_model(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")
    out = tmp_path / "out"
    assert main(["eval", "--out", str(out)]) == 2
    assert "model: " in capsys.readouterr().err
    # Retain logs of 300 forget items against a 5-item evaluation: refused, before any load.
    code = main(
        [
            "eval",
            "--model",
            missing_model,
            "--data-dir",
            str(TOFU_DIR),
            "--limit",
            "5",
            "--retain-logs",
            str(RETAIN90_LOGS),
            "--out",
            str(out),
        ]
    )
    assert code == 2 and "300 forget items" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = main(["eval", "--model", missing_model, "--data-dir", str(TOFU_DIR), "--out", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
