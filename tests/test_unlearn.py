"""Unlearning engine: step losses vs the paper's equations, reference paths, presets, run dir."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import negpref
from conftest import make_unlearn_engine as make_engine
from conftest import micro_loss, perturb, rounding_bound, train_step
from negpref.data import collate, encode_qa, load_lines, load_records
from negpref.logprobs import sequence_logps
from negpref.models import build_tokenizer, tiny_llama
from negpref.unlearn import FORGET_LOSSES, PRESETS, ForgetLoss, Preset, UnlearnConfig, run
from negpref.unlearn.dataset import build_data

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def forget():
    return load_records(TOFU / "forget01.json", ("question", "answer"))[:8]


@pytest.fixture(scope="module")
def retain():
    return load_records(TOFU / "retain90.json", ("question", "answer"))[:6]


@pytest.fixture(scope="module")
def idk():
    return load_lines(TOFU / "idontknow.jsonl")[:5]


@pytest.fixture(scope="module")
def tok(forget, retain, idk):
    texts = [r["question"] + " " + r["answer"] for r in forget + retain] + idk
    return build_tokenizer(texts, vocab_size=400)


def config(tmp_path, **changes):
    base = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        warmup_epochs=0,
        learning_rate=1e-3,
        save_strategy="no",
        save_model=False,
    )
    return UnlearnConfig(**{**base, **changes})


def one(model, enc, pad_id, keep_logits=False):
    """A sequence alone through the model: no batching, no padding."""
    with torch.no_grad():
        return sequence_logps(model, collate([enc], pad_id), keep_logits=keep_logits)


def logp_atol(models, encoded, pad_id) -> float:
    """fp32 rounding of these sequences' log-probs: a sum of n same-sign token terms is exact
    to n * eps * |log p|; the largest over the sequences and models."""
    outs = [one(m, e, pad_id) for m in models for e in encoded]
    return max(rounding_bound(torch.float32, int(o.n_tokens[0]), -o.logps[0].item()) for o in outs)


def micro_loss_atol(models, micro, pad_id) -> float:
    """Each loss term moves by <= 2 per unit of each of its <= 2 log-probs (DPO: beta <= 1 on
    each of 4), the retain terms by <= 1: 5 log-probs' rounding in all."""
    encoded = [e for group in micro.encoded.values() for e in group]
    return 5 * logp_atol(models, encoded, pad_id)


def hand_step(method, policy, reference, data, pairs, pad_id, weights=None):
    """Eq. 17 for one micro-batch, written from the NPO paper's formulas sequence by sequence."""
    beta = PRESETS[method].beta
    f_idx = [f for f, _ in pairs]
    r_idx = [r for _, r in pairs]

    def logps(model, seqs):
        outs = [one(model, s, pad_id) for s in seqs]
        return torch.stack([o.logps[0] for o in outs]), torch.stack([o.n_tokens[0] for o in outs])

    lp_f, n_f = logps(policy, [data.forget[i] for i in f_idx])
    ref_f, _ = logps(reference, [data.forget[i] for i in f_idx])
    w = torch.ones(len(pairs)) if weights is None else weights[f_idx]

    def mean(values):
        return (w * values).sum() / w.sum()

    name = PRESETS[method].forget_loss
    if name in ("idk", "dpo", "kto"):
        lp_r, n_r = logps(policy, [data.refusal[i] for i in f_idx])
        ref_r, _ = logps(reference, [data.refusal[i] for i in f_idx])
    if name == "ga":
        forget_term = mean(lp_f)
    elif name == "npo":  # eq. 3
        forget_term = mean((2 / beta) * torch.log1p(torch.exp(beta * (lp_f - ref_f))))
    elif name == "simnpo":
        forget_term = mean(-(2 / beta) * F.logsigmoid(-beta * lp_f / n_f))
    elif name in ("idk", "sft"):
        forget_term = mean(-lp_r / n_r) if name == "idk" else mean(-lp_f / n_f)
    elif name == "dpo":  # eq. 2 with the refusal as y_w and the forget answer as y_l
        forget_term = mean(-F.logsigmoid(beta * ((lp_r - ref_r) - (lp_f - ref_f))))
    elif name == "kto":  # eqs. 18-19, z_ref from refusal answers, clipped at 0
        z_ref = torch.clamp(beta * (lp_r - ref_r).mean(), min=0)
        forget_term = mean((2 / beta) * -F.logsigmoid(z_ref - beta * (lp_f - ref_f)))
    total = forget_term
    preset = PRESETS[method]
    if preset.c_rt:
        lp_rt, n_rt = logps(policy, [data.retain[i] for i in r_idx])
        total = total + preset.c_rt * (-lp_rt / n_rt).mean()
    if preset.c_rtkl:
        kls = []
        for i in r_idx:
            p = one(policy, data.retain[i], pad_id, keep_logits=True)
            q = one(reference, data.retain[i], pad_id, keep_logits=True)
            logp, logq = p.logits.log_softmax(-1)[0], q.logits.log_softmax(-1)[0]
            token_kl = (logp.exp() * (logp - logq)).sum(-1)
            kls.append((token_kl * p.mask[0]).sum() / p.mask[0].sum())
        total = total + preset.c_rtkl * torch.stack(kls).mean()
    return total


ALL_FORGET_LOSSES = ["GA", "NPO+RT", "SimNPO+RT", "IDK+RT", "DPO+KL", "KTO+RT", "GA+KL", "SFT"]


@pytest.mark.parametrize("method", ALL_FORGET_LOSSES)
def test_step_loss_matches_the_papers_equations(tmp_path, tok, forget, retain, idk, method):
    engine = make_engine(config(tmp_path, method=method), tok, forget, retain, idk)
    reference = tiny_llama(len(tok), seed=0)
    perturb(engine.unwrapped)  # policy != reference, so every log-ratio term is non-trivial
    pairs = engine.data.stream(0, 4)
    micro = engine.data.micro_batch(pairs, engine.objective.groups)
    engine.unwrapped.eval()
    with torch.no_grad():
        loss, stats = micro_loss(engine, pairs)
    expected = hand_step(method, engine.unwrapped, reference, engine.data, pairs, tok.pad_token_id)
    assert torch.isfinite(loss)
    # measured <= 1.9e-6 at losses up to 187 (was rel=1e-4, abs=1e-5)
    atol = micro_loss_atol([engine.unwrapped, reference], micro, tok.pad_token_id)
    assert loss.item() == pytest.approx(expected.item(), abs=atol)
    if PRESETS[method].forget_loss in ("npo", "dpo", "kto"):  # apart (by 3.65) beyond rounding
        assert float(stats["logps/forget"]) != pytest.approx(
            float(stats["logps/ref_forget"]), abs=atol
        )


def test_kto_z_ref_is_positive_somewhere_and_matches(tmp_path, tok, forget, retain, idk):
    """KTO's baseline is only interesting when z_ref > 0: steer the policy to make it so."""
    engine = make_engine(config(tmp_path, method="KTO"), tok, forget, retain, idk)
    reference = tiny_llama(len(tok), seed=0)
    pairs = engine.data.stream(0, 4)
    micro = engine.data.micro_batch(pairs, engine.objective.groups)
    opt = torch.optim.SGD(engine.unwrapped.parameters(), lr=0.05)
    for _ in range(5):  # raise the refusal likelihood: log-ratio > 0
        batch = collate(micro.encoded["refusal"], tok.pad_token_id)
        (-sequence_logps(engine.unwrapped, batch).logps.mean()).backward()
        opt.step()
        opt.zero_grad()
    engine.unwrapped.eval()
    with torch.no_grad():
        loss, stats = micro_loss(engine, pairs)
    assert stats["logps/refusal"] > stats["logps/ref_refusal"]
    expected = hand_step("KTO", engine.unwrapped, reference, engine.data, pairs, tok.pad_token_id)
    npo_value = hand_step("NPO", engine.unwrapped, reference, engine.data, pairs, tok.pad_token_id)
    atol = micro_loss_atol([engine.unwrapped, reference], micro, tok.pad_token_id)
    assert loss.item() == pytest.approx(expected.item(), abs=atol)  # measured 4.8e-6 (was rel=1e-4)
    assert loss.item() < npo_value.item() - 1e-3  # z_ref > 0 shifts the loss below NPO's


def test_weighted_forget_items(tmp_path, tok, forget, retain, idk):
    weighted = [{**r, "weight": w} for r, w in zip(forget, [1.0, 0.0, 2.0, 0.5] * 2, strict=True)]
    engine = make_engine(config(tmp_path, method="NPO"), tok, weighted, None, None)
    reference = tiny_llama(len(tok), seed=0)
    perturb(engine.unwrapped)
    pairs = engine.data.stream(0, 4)
    micro = engine.data.micro_batch(pairs, engine.objective.groups)
    with torch.no_grad():
        loss, _ = micro_loss(engine, pairs)
    expected = hand_step(
        "NPO",
        engine.unwrapped,
        reference,
        engine.data,
        pairs,
        tok.pad_token_id,
        weights=engine.data.weights,
    )
    atol = micro_loss_atol([engine.unwrapped, reference], micro, tok.pad_token_id)
    assert loss.item() == pytest.approx(expected.item(), abs=atol)  # measured 1.9e-6 (was rel=1e-4)


def count_forwards(*models):
    calls = []
    for m in models:
        m.register_forward_pre_hook(
            lambda mod, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
        )
    return calls


@pytest.mark.parametrize(
    ("method", "ref_mode", "forward_rows"),
    [
        ("DPO", "precomputed", [8]),  # 4 forget + 4 refusal in one forward, no reference
        ("DPO", "live", [8, 8]),  # one policy forward, one reference forward
        ("NPO+RT", "precomputed", [8]),  # forget + retain together
        ("NPO+KL", "precomputed", [8, 4]),  # the reference runs on the retain rows only
    ],
)
def test_one_batched_forward_per_micro_batch(
    tmp_path, tok, forget, retain, idk, method, ref_mode, forward_rows
):
    engine = make_engine(
        config(tmp_path, method=method, ref_mode=ref_mode), tok, forget, retain, idk
    )
    models = [engine.unwrapped] + ([engine.frozen_ref] if engine.frozen_ref is not None else [])
    calls = count_forwards(*models)
    micro_loss(engine, engine.data.stream(0, 4))
    assert [shape[0] for shape in calls] == forward_rows


def test_precomputed_reference_equals_live(tmp_path, tok, forget, retain, idk):
    table = make_engine(config(tmp_path, method="DPO"), tok, forget, None, idk)
    engine = make_engine(config(tmp_path, method="DPO", ref_mode="live"), tok, forget, None, idk)
    assert table.frozen_ref is None and engine.frozen_ref is not None
    assert engine.data.ref_logps == {}  # live mode computes no table
    perturb(engine.unwrapped)  # the live reference is the frozen copy, not the policy
    for start in (0, 4):
        pairs = engine.data.stream(start, 4)
        micro = table.data.micro_batch(pairs, table.objective.groups)
        for group in ("forget", "refusal"):
            batch = collate(micro.encoded[group], tok.pad_token_id)
            live = engine.reference_forward(batch, keep_logits=False).logps
            # n same-sign fp32 terms: n * eps relative; measured 0 (was rtol=1e-6, atol=1e-5)
            rtol = rounding_bound(torch.float32, batch["answer_mask"].sum(-1).max().item(), 1.0)
            torch.testing.assert_close(live, micro.ref_logps[group], rtol=rtol, atol=0)

    # Whole runs: the same curve either way.
    kwargs = dict(forget_records=forget, idk_answers=idk, tokenizer=tok)
    curves = {}
    for mode in ("precomputed", "live"):
        res = run(
            config(tmp_path / mode, method="DPO", ref_mode=mode, num_train_epochs=2),
            model=tiny_llama(len(tok), seed=0),
            **kwargs,
        )
        curves[mode] = [m["loss"] for m in res.metrics]
    assert len(curves["live"]) == 4
    # DPO moves by <= beta <= 1 per unit of each of its 4 log-probs; measured 2.4e-7 (was 1e-5)
    atol = 4 * logp_atol([tiny_llama(len(tok), seed=0)], table.data.forget, tok.pad_token_id)
    assert curves["live"] == pytest.approx(curves["precomputed"], abs=atol)
    assert curves["live"][-1] < curves["live"][0]  # and it learns


def test_lora_reference_is_the_base_model_with_adapters_off(tmp_path, tok, forget, retain, idk):
    base = tiny_llama(len(tok), seed=0)
    engine = make_engine(
        config(tmp_path, method="NPO", ref_mode="live", lora=True, lora_r=4),
        tok,
        forget,
        None,
        None,
        model=tiny_llama(len(tok), seed=0),
    )
    assert engine.frozen_ref is None  # no second copy of the model
    assert sum(p.numel() for p in [p for p in engine.model.parameters() if p.requires_grad]) < sum(
        p.numel() for p in base.parameters()
    )
    for _ in range(3):
        assert math.isfinite(train_step(engine, _)["loss"])
    batch = collate(engine.data.forget[:4], tok.pad_token_id)
    with torch.no_grad():
        expected = sequence_logps(base, batch).logps
        policy = sequence_logps(engine.unwrapped, batch).logps
    reference = engine.reference_forward(batch, keep_logits=False).logps
    # n same-sign fp32 terms: n * eps relative; measured 0 (was rtol=1e-6, atol=1e-5)
    rtol = rounding_bound(torch.float32, batch["answer_mask"].sum(-1).max().item(), 1.0)
    torch.testing.assert_close(reference, expected, rtol=rtol, atol=0)
    assert (policy - expected).abs().max() > 1e-2  # the adapters did train


def test_presets_follow_table_2_and_a_new_method_is_one_entry(tmp_path, tok, forget, monkeypatch):
    assert {
        "GA",
        "GA+RT",
        "GA+KL",
        "IDK+RT",
        "DPO",
        "DPO+RT",
        "DPO+KL",
        "KTO",
        "KTO+RT",
        "NPO",
        "NPO+RT",
        "NPO+KL",
        "SimNPO",
        "SimNPO+RT",
        "SFT",
        # open-unlearning's methods (issue 16), tested in test_methods.py
        "WGA",
        "WGA+RT",
        "SatImp",
        "SatImp+RT",
        "UNDIAL",
        "CE-U",
        "RMU",
        "PDU",
    } == set(PRESETS)
    table2 = {  # c_GA / c_FG, c_RT, c_FGKL, c_RTKL
        "GA": ("ga", 1, 0, 0, 0),
        "GA+RT": ("ga", 1, 1, 0, 0),
        "GA+KL": ("ga", 1, 0, 0, 1),
        "IDK+RT": ("idk", 1, 1, 0, 0),
    }
    for name, (loss, c_forget, c_rt, c_fgkl, c_rtkl) in table2.items():
        p = PRESETS[name]
        assert (p.forget_loss, p.c_forget, p.c_rt, p.c_fgkl, p.c_rtkl) == (
            loss,
            c_forget,
            c_rt,
            c_fgkl,
            c_rtkl,
        )
    for name, p in PRESETS.items():
        assert p.forget_loss in FORGET_LOSSES
        if p.forget_loss in ("npo", "dpo", "kto"):
            assert p.beta == 0.1, name
    objective = UnlearnConfig(method="dpo+kl", beta=0.5, c_rtkl=3).objective()
    assert objective.groups == ("forget", "refusal", "retain")
    assert objective.ref_logp_groups == ("forget", "refusal")
    assert objective.ref_logit_groups == ("retain",)
    assert (objective.beta, objective.c_rtkl, objective.c_forget) == (0.5, 3, 1)

    # A new method: a loss function and two registry entries, nothing else.
    def squared_logp(step, beta, gamma):
        return (step["forget"].logps ** 2).mean() * -1e-4

    monkeypatch.setitem(FORGET_LOSSES, "sq", ForgetLoss(squared_logp, ("forget",)))
    monkeypatch.setitem(PRESETS, "SQ", Preset("sq"))
    res = run(
        config(tmp_path, method="sq"),
        model=tiny_llama(len(tok), seed=0),
        tokenizer=tok,
        forget_records=forget,
    )
    assert res.summary["method"] == "SQ" and res.metrics[0]["loss/forget"] < 0


def test_pairing_and_order_are_seeded(tok, forget, retain, idk):
    def stream(seed):
        return build_data(tok, forget, retain, idk, 256, seed).stream(0, 24)

    assert stream(0) == stream(0) and stream(0) != stream(1)
    pairs = stream(0)
    for epoch in range(3):  # each epoch is a permutation of the forget set
        assert sorted(f for f, _ in pairs[epoch * 8 : epoch * 8 + 8]) == list(range(8))
    # 8 forget items, 6 retain items: an epoch's partners cover the retain set before repeating
    assert set(r for _, r in pairs[:6]) == set(range(6))
    refusals = build_data(tok, forget, retain, idk, 256, 0).refusal
    assert refusals == build_data(tok, forget, retain, idk, 256, 0).refusal


class Recorder:
    def __init__(self):
        self.evals, self.steps = [], []

    def on_evaluate(self, state, model, tokenizer):
        assert not model.training
        self.evals.append(state.step)
        batch = collate([encode_qa(tokenizer, "Who?", "Nobody.", 64)], tokenizer.pad_token_id)
        with torch.no_grad():
            return {"probe_logp": float(sequence_logps(model, batch).logps[0])}

    def on_step_end(self, state, metrics):
        assert metrics["step"] == state.step and state.total_steps == 5
        self.steps.append(state.step)


def test_run_directory_metrics_callbacks_and_api(tmp_path, tok, forget, retain, capsys):
    recorder = Recorder()
    cfg = config(
        tmp_path,
        method="NPO+RT",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=2.5,
        max_length=80,
        save_model=True,
        save_strategy="epoch",
    )
    # negpref.unlearn is the package *and* the function.
    res = negpref.unlearn(
        cfg,
        model=tiny_llama(len(tok), seed=0),
        tokenizer=tok,
        forget_records=forget,
        retain_records=retain,
        callbacks=[recorder],
    )
    out = Path(cfg.output_dir)
    # 8 items x 2.5 epochs / effective batch 4 = 5 steps; epochs end after steps 2 and 4.
    assert res.summary["steps"] == 5 and recorder.steps == [1, 2, 3, 4, 5]
    assert recorder.evals == [0, 2, 4, 5]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(res.metrics))
    keys = {
        "loss",
        "loss/forget",
        "loss/retain",
        "logps/forget",
        "logps/ref_forget",
        "npo/weight",
        "nll/retain",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "step",
        "epoch",
    }
    assert keys <= set(lines[0])
    # policy == reference up to rounding d: the weight 2 sigma(beta d) is 1 + beta d / 2, d the
    # fp32 rounding of a <= 80-token same-sign sum of this mean size; measured 0 (was 1e-5)
    d = rounding_bound(torch.float32, 80, abs(lines[0]["logps/forget"]))
    assert lines[0]["npo/weight"] == pytest.approx(1.0, abs=PRESETS["NPO+RT"].beta / 2 * d)
    assert lines[-1]["logps/forget"] < lines[0]["logps/forget"]
    assert [ln["epoch"] for ln in lines] == [0.5, 1.0, 1.5, 2.0, 2.5]
    evals = [json.loads(ln) for ln in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4, 5] and evals == res.evals
    saved = UnlearnConfig(**__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert saved.c_rt == 1.0 and saved.beta == 0.1 and saved.method == "NPO+RT"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truncated"]["forget"] > 0 and summary["truncated"]["forget"] == sum(
        encode_qa(tok, r["question"], r["answer"], 80).truncated for r in forget
    )
    assert "truncated" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").is_file()
    # the newest two of save_total_limit=2 (default)
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-4", "checkpoint-5"]
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    reloaded = type(res.model).from_pretrained(out / "model")
    for (name, a), b in zip(
        res.model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
