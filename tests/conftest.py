"""Shared test fixtures and the rounding bound every floating-point tolerance is derived from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from negpref.threads import single_threaded

FP32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7
FP64_EPS = torch.finfo(torch.float64).eps  # 2.22e-16


def rounding_bound(dtype: torch.dtype, terms: int, magnitude: float) -> float:
    """Worst-case rounding error of `terms` floating-point operations (a sum of `terms` values,
    or a closed form of `terms` roundings) on values of size `magnitude`: eps * terms * magnitude
    (Higham's n*u bound for recursive summation, with eps = 2u as a factor-2 margin)."""
    return torch.finfo(dtype).eps * terms * magnitude


def reordered_grad_atol(grads, hidden: int, tokens: int) -> float:
    """fp32 gradients computed in another order (batching, chunking, vmap) agree to
    eps * (terms summed) * the largest entry; the longest sum is the hidden width times the
    tokens of a sequence."""
    return rounding_bound(torch.float32, hidden * tokens, max(g.abs().max().item() for g in grads))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread avoids oversubscribing the 2-core machine."""
    with single_threaded():
        yield


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Tests never reach a hub: a name not found locally fails as it would offline (tests of
    online behaviour patch ``negpref.hub.offline_reason`` themselves)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _float32_default(monkeypatch):
    """Every figure a test checks is float32 on any CPU: ``auto`` would choose bf16 on one with
    AMX-BF16 (``negpref.models.cpu_native_bf16``). The bf16 tests set the variable to 1."""
    monkeypatch.setenv("NEGPREF_CPU_BF16", "0")


def write_tiny_unlearn_inputs(root):
    """A tiny random Llama (``root/model``) and 8 TOFU forget01 / retain90 records each
    (``root/forget.jsonl``, ``root/retain.jsonl``): what the run-level tests unlearn."""
    import json
    from pathlib import Path

    from negpref.data import load_records
    from negpref.models import build_tokenizer, save_model, tiny_llama

    tofu = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
    forget = load_records(tofu / "forget01.json")[:8]
    retain = load_records(tofu / "retain90.json")[:8]
    tok = build_tokenizer([r["question"] + " " + r["answer"] for r in forget + retain], 400)
    save_model(tiny_llama(len(tok), seed=0), tok, root / "model")
    for name, recs in (("forget", forget), ("retain", retain)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def make_unlearn_engine(cfg, tok, forget, retain, idk, model=None):
    """An ``UnlearnTrainer`` on a tiny Llama (or ``model``), reference already precomputed."""
    from negpref.models import tiny_llama
    from negpref.unlearn.dataset import build_data
    from negpref.unlearn.trainer import UnlearnTrainer

    cfg = cfg.resolved()
    if cfg.output_dir in (None, "trainer_output"):
        cfg = cfg.replace(output_dir="unused", report_to=[])
    data = build_data(tok, forget, retain, idk, cfg.max_length, cfg.seed)
    model = model if model is not None else tiny_llama(len(tok), seed=0)
    trainer = UnlearnTrainer(model, cfg, processing_class=tok, data=data)
    trainer.precompute_reference()
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.total_steps)
    trainer.current_gradient_accumulation_steps = cfg.gradient_accumulation_steps
    return trainer


def micro_loss(trainer, micro_pairs):
    """Loss and figures of one micro-batch (stream pairs) through ``compute_loss``."""
    inputs = trainer._prepare_inputs(trainer.collate(micro_pairs))
    loss = trainer.compute_loss(trainer.model, inputs)
    stats = {k: v[-1] for k, v in trainer._step_metrics.items()}
    trainer._step_metrics.clear()
    return loss, stats


def train_step(trainer, step):
    """One optimizer step of ``trainer`` at stream step ``step``: its averaged figures."""
    from negpref.bench.step_cost import train_step as trainer_step

    return trainer_step(trainer, step)


def perturb(model, seed=1, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def launch_cli(
    argv: list[str],
    processes: int = 1,
    config: str = "accelerate_cpu2.yaml",
    script: tuple[str, ...] = ("-m", "negpref.cli"),
    env: dict | None = None,
) -> dict:
    """The CLI (``argv`` then ``--json``) in one process, or under ``accelerate launch`` with
    ``configs/CONFIG`` on ``processes`` CPU processes, one thread each; the one JSON object it
    printed (only the main process reports)."""
    launcher = list(script)
    if processes > 1:
        configs = Path(__file__).resolve().parents[1] / "configs"
        launcher = [
            "-m", "accelerate.commands.launch", "--num_processes", str(processes),
            "--config_file", str(configs / config), *launcher,
        ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *launcher, *argv, "--json"],
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(printed) == 1, proc.stdout[-3000:]
    return printed[0]
