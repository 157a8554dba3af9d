"""``negpref bench step-cost`` on a random model and on a saved model directory (--model)."""

import argparse
import json

import pytest

from negpref.bench import step_cost
from negpref.errors import NegprefError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--hidden", "64", "--layers", "1", "--vocab", "256", "--batch", "2", "--seq-len", "24",
        "--items", "4", "--reps", "2"]  # fmt: skip


def parse(argv):
    parser = argparse.ArgumentParser()
    step_cost.add_arguments(parser)
    args = parser.parse_args(argv)
    step_cost.check(args)
    return args


def test_step_cost_reports_every_mode_and_ratios_of_its_step_times():
    figures = step_cost.run(parse(TINY))
    step = {mode: figures[f"{mode}_step_s"] for mode in step_cost.MODES}
    assert all(t > 0 for t in step.values()), step
    assert set(figures["peak_mem_mb"]) == set(step_cost.MODES)
    # the ratios are the same two medians divided: equal up to float rounding (approx's 1e-6)
    assert figures["npo_rt_precomputed_over_ga"] == pytest.approx(
        step["npo_rt_precomputed"] / step["ga"]
    )
    assert figures["npo_rt_live_over_npo_rt_precomputed"] == pytest.approx(
        step["npo_rt_live"] / step["npo_rt_precomputed"]
    )
    assert figures["npo_precomputed_over_ga"] == pytest.approx(step["npo_precomputed"] / step["ga"])
    assert figures["ga_bf16_over_ga"] == pytest.approx(step["ga_bf16"] / step["ga"])
    # the precomputed modes computed their reference table; live modes and GA have none
    by_mode = figures["precompute_s_by_mode"]
    assert set(by_mode) == {"npo_precomputed", "npo_rt_precomputed", "npo_precomputed_bf16"}
    assert figures["precompute_bf16_over_float32"] == pytest.approx(
        by_mode["npo_precomputed_bf16"] / by_mode["npo_precomputed"]
    )
    assert figures["precompute_s"] == figures["precompute_s_by_mode"]["npo_precomputed"] > 0
    # NPO+RT adds the retain sequences to the policy forward: more activations than NPO alone
    assert figures["peak_mem_mb"]["npo_rt_precomputed"] > figures["peak_mem_mb"]["npo_precomputed"]
    setup = figures["setup"]
    assert setup["model"] == "random" and setup["vocab"] == 256 and setup["hidden"] == 64
    assert setup["cpu_model"] and setup["threads"] == 1
    assert setup["cpu_native_bf16"] is False  # conftest sets NEGPREF_CPU_BF16=0


def test_step_cost_loads_a_saved_model_directory(tmp_path):
    from negpref.models import build_tokenizer, save_model, tiny_llama

    tokenizer = build_tokenizer([f"item {i} is number {i * 7}" for i in range(50)], 300)
    model = tiny_llama(len(tokenizer), seed=3)
    save_model(model, tokenizer, tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--modes", "ga,npo_rt_live", "--batch", "2",
            "--seq-len", "24", "--items", "4", "--reps", "2"]  # fmt: skip
    figures = step_cost.run(parse(argv))
    setup = figures["setup"]
    assert setup["model"] == str(tmp_path / "model")
    assert setup["vocab"] == len(tokenizer) and setup["hidden"] == 64  # the saved model's
    assert setup["parameters"] == sum(p.numel() for p in model.parameters())
    assert setup["modes"] == ["ga", "npo_rt_live"]
    assert figures["ga_step_s"] > 0 and figures["npo_rt_live_step_s"] > 0
    assert "npo_live_step_s" not in figures  # not run
    assert figures["npo_rt_live_over_npo_rt_precomputed"] is None  # one side not run


def test_step_cost_modes_names_the_valid_ones():
    with pytest.raises(NegprefError, match=r"--modes: unknown mode.*npo_rt_live") as err:
        parse([*TINY, "--modes", "ga,npo_fast"])
    assert "npo_fast" in str(err.value)


def test_tofu_eval_benchmark_gives_the_naive_evaluators_figures(capsys):
    from negpref.cli import main

    argv = ["bench", "tofu-eval", "--json", "--items", "3", "--max-new-tokens", "6",
            "--batch-size", "4", "--gen-batch", "4", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["items"] == 6 and figures["model"] == "random"
    # The same per-item figures from one pass per question as from one pass per metric: the
    # losses are token means of log-probs computed in other batch layouts, equal up to fp32
    # rounding of tiny_llama's logits (hidden 64, magnitude ~log 400): measured 1.0e-6.
    assert figures["same_figures"]["max_abs_diff"] <= 64 * 6 * 1.2e-7
    assert 0 <= figures["same_figures"]["identical_generations"] <= 1
    # The question is encoded once for its 7 answers instead of 7 times.
    assert figures["ours"]["scoring_tokens"] < figures["ours_unshared"]["scoring_tokens"]
    assert figures["ours_unshared"]["scoring_tokens"] <= figures["naive"]["scoring_tokens"]
    scoring = figures["scoring"]
    assert scoring["speedup"] == pytest.approx(scoring["naive_seconds"] / scoring["ours_seconds"])
    assert figures["speedup"] == pytest.approx(
        figures["ours"]["items_per_second"] / figures["naive"]["items_per_second"]
    )


def test_shared_prompts_benchmark_runs_fewer_positions(capsys):
    from negpref.cli import main

    argv = ["bench", "shared-prompts", "--json", "--records", "4", "--candidates", "3",
            "--batch-size", "2", "--steps", "2", "--max-length", "64", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for method in ("dpo", "mcpo"):
        shared, unshared = figures[method]["shared"], figures[method]["unshared"]
        assert 0 < shared["positions"] < unshared["positions"], method
        assert shared["seconds_per_step"] > 0 and unshared["seconds_per_step"] > 0
    # MC-PO also scores every candidate each step: more positions than DPO's two completions
    assert figures["mcpo"]["unshared"]["positions"] > figures["dpo"]["unshared"]["positions"]
