"""TOFU evaluation during ``negpref unlearn`` from the command line (the NPO paper's Figure 6)."""

import json
from pathlib import Path

import pytest

from conftest import write_tiny_unlearn_inputs
from negpref.cli import main
from negpref.eval import evaluate_tofu, load_tofu_sets
from negpref.io import atomic_write_json
from negpref.models import ModelSpec, load_model

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


def test_eval_every_writes_curves_tensorboard_and_the_peak_checkpoint(tmp_path, capsys):
    write_tiny_unlearn_inputs(tmp_path)
    sets = load_tofu_sets(TOFU, "forget01", limit=3)
    # the start model stands in for the retain model: forget quality is then 1 at step 0
    model, tokenizer = load_model(ModelSpec(str(tmp_path / "model")), "cpu")
    logs = evaluate_tofu(model, tokenizer, sets, batch_size=3, generate=False)
    atomic_write_json(tmp_path / "retain_logs.json", logs)
    out = tmp_path / "run"
    argv = [
        "unlearn", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"),
        "--method", "GA", "--learning-rate", "1e-2", "--num-train-epochs", "2",
        "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1",
        "--warmup-epochs", "0", "--use-cpu", "--eval-every", "1", "--eval-split", "forget01",
        "--eval-data", str(TOFU), "--eval-limit", "3", "--no-eval-generation",
        "--retain-logs", str(tmp_path / "retain_logs.json"), "--save-strategy", "steps",
        "--save-steps", "1", "--save-total-limit", "4", "--out", str(out), "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    # 8 forget items x 2 epochs / batch 4 = 4 steps: evaluated at 0, 1, 2, 3, 4
    assert [e["step"] for e in evals] == [0, 1, 2, 3, 4]
    assert all(e["forget_quality"] is not None for e in evals)
    assert evals[0]["forget_quality"] == 1.0  # the same model as the reference logs
    assert (out / "evals" / "step_000004.json").is_file()  # per-item logs, TOFU format
    peak = summary["peak_forget_quality"]
    best = max(evals, key=lambda e: (e["forget_quality"], -e["step"]))  # no ROUGE: no utility
    assert peak["step"] == best["step"] and peak["forget_quality"] == best["forget_quality"]
    # step 0 has no checkpoint (the start model); any later peak names its checkpoint-N
    assert peak["checkpoint"] == (f"checkpoint-{peak['step']}" if peak["step"] else None)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*"))))
    events.Reload()
    curve = events.Scalars("eval/forget_quality")
    assert [s.step for s in curve] == [e["step"] for e in evals]
    for point, e in zip(curve, evals, strict=True):  # TensorBoard stores float32
        assert point.value == pytest.approx(e["forget_quality"], rel=2**-23)
    assert "eval/forget_truth_ratio" in events.Tags()["scalars"]
    assert len(events.Scalars("train/loss")) == 4
