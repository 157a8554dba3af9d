"""``negpref unlearn`` on several CPU processes (accelerate launch, gloo): DDP, FSDP and ZeRO
follow the single-process run, and the process count changes neither the loss curve nor which
retain item each forget item is trained with."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch_cli, write_tiny_unlearn_inputs
from negpref.unlearn import UnlearnConfig, run
from negpref.unlearn.dataset import UnlearnData

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ddp": "accelerate_cpu2.yaml",
    "fsdp": "accelerate_fsdp_cpu2.yaml",
    "zero2": "accelerate_zero2_cpu2.yaml",
    "zero3": "accelerate_zero3_cpu2.yaml",
}
DISTRIBUTED = {"ddp": "MULTI_CPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
CURVE = ("loss", "loss/forget", "nll/retain", "npo/weight", "grad_norm", "learning_rate")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_tiny_unlearn_inputs(tmp_path_factory.mktemp("unlearn"))


def common(inputs: Path) -> dict:
    return dict(
        model=str(inputs / "model"),
        forget=str(inputs / "forget.jsonl"),
        retain=str(inputs / "retain.jsonl"),
        method="NPO+RT",
        num_train_epochs=2,
        learning_rate=3e-3,
        warmup_epochs=0.5,
        save_strategy="no",
    )


def launch(config: str, processes: int, options: dict, out: Path, script: list[str], env=None):
    """``accelerate launch`` of the CLI's unlearn on ``processes`` CPU processes; its summary."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    argv = ["unlearn", "--use-cpu", *flags, f"--out={out}"]
    return launch_cli(argv, processes, config, tuple(script), env)


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # as each launched process (OMP_NUM_THREADS=1)
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_two_processes_match_one(inputs, tmp_path, kind):
    options = {**common(inputs), "per_device_train_batch_size": 2}
    # Effective batch 4 either way: 1 process x 2 micro-batches, or 2 processes x 1.
    single = run(
        UnlearnConfig(
            **options, gradient_accumulation_steps=2, use_cpu=True, output_dir=str(tmp_path / "1")
        )
    )
    two = tmp_path / "2"
    summary = launch(
        CONFIGS[kind], 2, {**options, "gradient_accumulation_steps": 1}, two,
        ["-m", "negpref.cli"],
    )  # fmt: skip
    assert summary["processes"] == 2
    assert summary["distributed"] == DISTRIBUTED[kind]
    curve = metrics(two)
    assert len(curve) == len(single.metrics) == 4
    weights = load_file(two / "model" / "model.safetensors")
    if kind == "ddp":
        # The same arithmetic either way, so bitwise equal: every micro-batch runs with the
        # same shapes on one thread, the 1/grad_accum and 1/world-size scalings are exact
        # halvings and a sum of two gradients is the same in either order. Measured: 0
        # difference over the 24 metrics and 20 weight tensors.
        rel = abs_ = 0.0
    else:
        # FSDP and ZeRO reduce-scatter the gradients in flat shards and clip the norm from
        # the shards' partial sums: other summation orders, so the issue's 1e-5 relative bound.
        rel, abs_ = 1e-5, 1e-7
    for a, b in zip(single.metrics, curve, strict=True):
        for key in CURVE:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=abs_), (a["step"], key)
    state = single.model.state_dict()
    assert set(weights) <= set(state)
    for name, value in weights.items():
        if kind == "ddp":
            torch.testing.assert_close(value, state[name], rtol=0, atol=0)
        else:
            # Each tensor to 1e-5 of its norm: elementwise bounds fail on the odd element whose
            # gradient is near zero, where Adam's m/sqrt(v) turns a last-bit change into a
            # visible step (measured under ZeRO-3: one element of 8192 off by 1.9e-6, 1e-4 of
            # its value; the tensor's relative error 1e-6).
            assert (value - state[name]).norm() <= 1e-5 * state[name].norm(), name


@pytest.mark.slow
def test_process_count_changes_neither_curve_nor_retain_pairing(inputs, tmp_path):
    """1, 2 and 4 processes at effective batch 4 (micro-batch 1 x accumulation 4 / 2 / 1)."""
    options = {**common(inputs), "per_device_train_batch_size": 1, "num_train_epochs": 3}
    runs = {}
    for processes in (1, 2, 4):
        out, pairs_dir = tmp_path / f"run{processes}", tmp_path / f"pairs{processes}"
        pairs_dir.mkdir()
        summary = launch(
            "accelerate_cpu2.yaml", processes,
            {**options, "gradient_accumulation_steps": 4 // processes}, out,
            [str(ROOT / "tests" / "record_pairs.py")], env={"NEGPREF_PAIRS_DIR": str(pairs_dir)},
        )  # fmt: skip
        assert summary["processes"] == processes and summary["effective_batch"] == 4
        per_rank = [json.loads((pairs_dir / f"rank{r}.json").read_text()) for r in range(processes)]
        runs[processes] = (metrics(out), per_rank)

    # The pairs the seeded stream assigns: what every process count must train on, per step.
    # It depends on the item counts and the seed only (default 0).
    data = UnlearnData([None] * 8, [], [None] * 8, weights=None, seed=0, truncated={})
    steps = len(runs[1][0])
    assert steps == 3 * 8 // 4
    want = [sorted(map(list, data.stream(4 * s, 4))) for s in range(steps)]
    for processes, (_, per_rank) in runs.items():
        accumulation = 4 // processes
        for rank_pairs in per_rank:
            assert len(rank_pairs) == steps * accumulation  # one micro-batch of 1 per entry
        for s in range(steps):
            trained = sorted(
                pair
                for rank_pairs in per_rank
                for batch in rank_pairs[s * accumulation : (s + 1) * accumulation]
                for pair in batch
            )
            # each forget item with its own retain partner: no process repeats another's draw
            assert trained == want[s], (processes, s)

    # The same micro-batches, summed in another order (accumulation vs all-reduce): 1e-5
    # relative, the bound, on figures of size ~1-1000.
    base = runs[1][0]
    for processes in (2, 4):
        for a, b in zip(base, runs[processes][0], strict=True):
            for key in CURVE:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (processes, key)
