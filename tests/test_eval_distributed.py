"""TOFU evaluation split over CPU processes (``accelerate launch``, gloo) gives the logs one
process gives: from ``negpref eval`` and from the evaluation callback during training."""

import json
from pathlib import Path

import pytest

from conftest import launch_cli, write_tiny_unlearn_inputs
from negpref.eval.shards import Shards

ROOT = Path(__file__).resolve().parents[1]
TOFU = ROOT.parent / "shared" / "data" / "tofu"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_tiny_unlearn_inputs(tmp_path_factory.mktemp("inputs"))


def cli(processes: int, *argv: str) -> dict:
    return launch_cli(list(argv), processes)


def test_one_process_maps_in_order():
    assert Shards().map(lambda x: x * x, [3, 1, 2]) == [9, 1, 4]


@pytest.mark.slow
def test_eval_over_two_processes_writes_the_one_process_logs(inputs, tmp_path):
    # Every sharded path: the scoring chunks (batch 2: several per set), generation batches,
    # the KL reference, the reference attack and GradNorm's per-item backwards.
    model = str(inputs / "model")
    argv = [
        "eval", "--model", model, "--ref-model", model, "--mia-ref-model", model,
        "--mia-gradnorm", "--holdout", str(TOFU / "retain90.json"), "--data-dir", str(TOFU), "--split", "forget01", "--limit", "5",
        "--batch-size", "2", "--max-new-tokens", "6", "--device", "cpu",
    ]  # fmt: skip
    one = cli(1, *argv, "--out", str(tmp_path / "one"))
    two = cli(2, *argv, "--out", str(tmp_path / "two"))
    assert one["run"]["processes"] == 1 and two["run"]["processes"] == 2
    # Each forward and generation batch is the one a single process runs, so the figures are
    # the same arithmetic: equal to the last bit, not within a tolerance.
    logs = [json.loads((tmp_path / d / "logs.json").read_text()) for d in ("one", "two")]
    assert logs[0] == logs[1]
    for key in ("forget_quality", "model_utility", "forget_truth_ratio"):
        assert one.get(key) == two.get(key), key
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


@pytest.mark.slow
def test_eval_callback_over_two_processes_matches_one(inputs, tmp_path):
    # DDP training at equal effective batch (1 x 2 micro-batches, 2 x 1) is bitwise the
    # single-process run (test_unlearn_distributed), and the evaluation batches follow the
    # per-device batch (2 either way), so the evaluations along it must be bitwise equal too.
    def unlearn(processes: int, out: Path) -> dict:
        return cli(
            processes, "unlearn", "--use-cpu", "--model", str(inputs / "model"),
            "--forget", str(inputs / "forget.jsonl"), "--retain", str(inputs / "retain.jsonl"),
            "--method", "NPO+RT", "--learning-rate", "3e-3", "--num-train-epochs", "1",
            "--per-device-train-batch-size", "2",
            "--gradient-accumulation-steps", str(2 // processes), "--warmup-epochs", "0",
            "--eval-every", "1", "--eval-split", "forget01", "--eval-data", str(TOFU),
            "--eval-limit", "3", "--save-strategy", "no",
            "--out", str(out),
        )  # fmt: skip

    one, two = tmp_path / "one", tmp_path / "two"
    assert unlearn(1, one)["processes"] == 1
    assert unlearn(2, two)["processes"] == 2
    evals = [
        [json.loads(x) for x in (d / "evals.jsonl").read_text().splitlines()] for d in (one, two)
    ]
    assert [e["step"] for e in evals[0]] == [0, 1, 2]  # 8 forget items / batch 4, and step 0
    assert evals[0] == evals[1]
    for step_file in sorted((one / "evals").iterdir()):
        assert json.loads(step_file.read_text()) == json.loads(
            (two / "evals" / step_file.name).read_text()
        ), step_file.name
