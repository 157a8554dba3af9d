"""bf16 where the hardware computes it natively: the ``auto`` rule, and loss curves under bf16
autocast close to float32."""

from pathlib import Path

import pytest
import torch

import negpref.models as models
from negpref.data import load_lines, load_records
from negpref.errors import NegprefError
from negpref.models import build_tokenizer, resolve_dtype, tiny_llama
from negpref.unlearn import UnlearnConfig
from negpref.unlearn.dataset import build_data
from negpref.unlearn.trainer import train_in_memory

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**changes):
    return UnlearnConfig(output_dir="unused", report_to="none", use_cpu=True, **changes)


def test_auto_is_bf16_exactly_where_the_cpu_computes_it_natively(monkeypatch):
    monkeypatch.delenv("NEGPREF_CPU_BF16")
    for flags, native in (({"avx2", "amx_bf16"}, True), ({"avx512_bf16"}, True), ({"avx2"}, False)):
        monkeypatch.setattr(models, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert models.cpu_native_bf16() is native
        assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
        assert _config().bf16 is native  # autocast; the weights stay float32 masters
        assert _config(mixed_precision="no").bf16 is False
        assert _config(dtype="float32").bf16 is False  # an explicit dtype is taken as given
        assert _config(mixed_precision="bf16").bf16 is True
    assert models.training_dtype("auto") == "float32"
    monkeypatch.setenv("NEGPREF_CPU_BF16", "1")  # the override wins over the flags (avx2 only)
    assert models.cpu_native_bf16() and _config().bf16
    monkeypatch.setenv("NEGPREF_CPU_BF16", "yes")
    with pytest.raises(NegprefError, match=r"\$NEGPREF_CPU_BF16='yes': must be 1"):
        models.cpu_native_bf16()


def _loss_curve(mixed_precision: str) -> list[float]:
    forget = load_records(TOFU / "forget01.json", ("question", "answer"))[:8]
    retain = load_records(TOFU / "retain90.json", ("question", "answer"))[:8]
    idk = load_lines(TOFU / "idontknow.jsonl")[:5]
    tok = build_tokenizer([r["question"] + " " + r["answer"] for r in forget + retain] + idk, 400)
    data = build_data(tok, forget, retain, idk, 128, seed=0)
    model = tiny_llama(len(tok), seed=0)
    trainer = train_in_memory(
        model, tok, data, method="NPO+RT", learning_rate=1e-3, num_train_epochs=4,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, warmup_epochs=0,
        mixed_precision=mixed_precision,
    )  # fmt: skip
    assert trainer.args.bf16 is (mixed_precision == "bf16")
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_bf16_autocast_loss_curve_stays_within_bf16_rounding_of_float32():
    fp32, bf16 = _loss_curve("no"), _loss_curve("bf16")
    assert len(fp32) == len(bf16) == 8
    assert fp32 != bf16  # autocast did run
    # bf16 keeps 8 significant bits, so one rounding moves a value by up to 2^-8 relative. The
    # loss is a mean over hundreds of token terms whose roundings mostly cancel, so the curve
    # stays within one such rounding of float32 (measured: 4.1e-4 relative at most, 8 steps).
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 2**-8 * abs(a), (fp32, bf16)
