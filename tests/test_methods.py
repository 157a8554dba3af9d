"""Token-level methods (WGA, SatImp, UNDIAL, CE-U): each loss against a hand computation on
small tensors, then through the engine against the same formula written per sequence."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    make_unlearn_engine,
    micro_loss,
    perturb,
    reordered_grad_atol,
    rounding_bound,
    train_step,
)
from negpref import losses
from negpref.cli import main
from negpref.data import load_records
from negpref.models import build_tokenizer, save_model, tiny_llama
from negpref.unlearn import PRESETS, UnlearnConfig, run

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
TOKEN_PRESETS = ["WGA", "WGA+RT", "SatImp", "SatImp+RT", "UNDIAL", "CE-U"]

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the losses on small tensors ---------------------------------------------------------------

# Two sequences of per-token log-probs; row 0 has 3 answer tokens, row 1 has 2 (then padding).
TOKEN_LOGPS = torch.tensor([[-0.2, -1.5, -3.0, 0.0], [-0.7, -0.05, 0.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
ANSWER_TOKENS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
# Float64 inputs: a handful of exp/pow/log roundings per token and a sum of 5 terms.
ATOL64 = rounding_bound(torch.float64, 20, 10.0)


def hand_token_mean(term, weights=(1.0, 1.0)):
    """sum_i w_i sum_t term(i, t) / sum_i w_i n_i over the answer tokens, in Python floats."""
    num = sum(weights[i] * term(i, t) for i, t in ANSWER_TOKENS)
    return num / sum(weights[i] for i, _ in ANSWER_TOKENS)


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_wga_is_the_probability_weighted_token_mean_of_log_p(beta):
    lp = TOKEN_LOGPS.clone().requires_grad_(True)
    loss = losses.wga(lp, MASK, beta)
    p = [[math.exp(v) for v in row] for row in TOKEN_LOGPS.tolist()]
    expected = hand_token_mean(lambda i, t: p[i][t] ** beta * TOKEN_LOGPS[i, t].item())
    assert loss.item() == pytest.approx(expected, abs=ATOL64)
    loss.backward()
    # The weight p^beta is a constant: d loss / d log p_t = p_t^beta / N (not p^b (1 + b log p))
    grad = torch.zeros_like(TOKEN_LOGPS)
    for i, t in ANSWER_TOKENS:
        grad[i, t] = p[i][t] ** beta / len(ANSWER_TOKENS)
    torch.testing.assert_close(lp.grad, grad, atol=ATOL64, rtol=0)
    weighted = losses.wga(TOKEN_LOGPS, MASK, beta, torch.tensor([2.0, 0.5], dtype=torch.float64))
    expected = hand_token_mean(lambda i, t: p[i][t] ** beta * TOKEN_LOGPS[i, t].item(), (2.0, 0.5))
    assert float(weighted) == pytest.approx(expected, abs=ATOL64)


def test_wga_with_exponent_0_is_open_unlearnings_gradient_ascent():
    ga = losses.ga_token_mean((TOKEN_LOGPS * MASK).sum(-1), MASK.sum(-1))
    torch.testing.assert_close(losses.wga(TOKEN_LOGPS, MASK, 0.0), ga, atol=ATOL64, rtol=0)


def test_satimp_is_minus_the_weighted_cross_entropy():
    beta1, beta2 = 5.0, 1.0
    lp = TOKEN_LOGPS.clone().requires_grad_(True)
    loss = losses.satimp(lp, MASK, beta1, beta2)
    p = [[math.exp(v) for v in row] for row in TOKEN_LOGPS.tolist()]

    def weight(i, t):
        return p[i][t] ** beta1 * (1 - p[i][t]) ** beta2

    # -mean_t p^b1 (1-p)^b2 CE_t with CE_t = -log p_t
    expected = hand_token_mean(lambda i, t: -weight(i, t) * -TOKEN_LOGPS[i, t].item())
    assert loss.item() == pytest.approx(expected, abs=ATOL64)
    loss.backward()
    grad = torch.zeros_like(TOKEN_LOGPS)
    for i, t in ANSWER_TOKENS:
        grad[i, t] = weight(i, t) / len(ANSWER_TOKENS)
    torch.testing.assert_close(lp.grad, grad, atol=ATOL64, rtol=0)
    # beta1 = beta2 = 0 is plain gradient ascent
    torch.testing.assert_close(
        losses.satimp(TOKEN_LOGPS, MASK, 0.0, 0.0), losses.wga(TOKEN_LOGPS, MASK, 0.0)
    )


# Logits over a 4-token vocabulary: [batch 2, positions 3, vocab 4]; targets and answer mask.
LOGITS = torch.tensor(
    [
        [[2.0, 0.5, -1.0, 0.3], [0.1, 1.2, 0.0, -0.4], [0.0, 0.0, 3.0, 1.0]],
        [[-0.5, 0.2, 0.9, 1.4], [1.0, -2.0, 0.5, 0.0], [0.3, 0.3, 0.3, 0.3]],
    ],
    dtype=torch.float64,
)
REF_LOGITS = torch.tensor(
    [
        [[1.5, 0.0, -0.5, 0.0], [0.4, 2.0, 0.1, -0.2], [0.2, 0.1, 2.5, 0.5]],
        [[-0.1, 0.0, 1.1, 1.0], [0.7, -1.0, 0.0, 0.2], [0.0, 0.0, 0.0, 0.0]],
    ],
    dtype=torch.float64,
)
TARGETS = torch.tensor([[0, 1, 2], [3, 0, 1]])
LOGIT_MASK = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.float64)


def softmax_list(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def hand_soft_ce(i, t, target_probs):
    """-sum_v q_v log softmax(LOGITS[i, t])_v, and its gradient softmax - q, in floats."""
    row = LOGITS[i, t].tolist()
    log_z = max(row) + math.log(sum(math.exp(v - max(row)) for v in row))
    ce = -sum(q * (v - log_z) for q, v in zip(target_probs, row, strict=True))
    grad = [p - q for p, q in zip(softmax_list(row), target_probs, strict=True)]
    return ce, grad


def check_soft_ce_loss(loss_fn, targets_for, scored):
    """``loss_fn(logits)`` against the hand mean over ``scored`` positions, value and grad."""
    logits = LOGITS.clone().requires_grad_(True)
    loss = loss_fn(logits)
    loss.backward()
    expected_grad = torch.zeros_like(LOGITS)
    total = 0.0
    for i, t in scored:
        ce, grad = hand_soft_ce(i, t, targets_for(i, t))
        total += ce
        expected_grad[i, t] = torch.tensor(grad, dtype=torch.float64) / len(scored)
    assert loss.item() == pytest.approx(total / len(scored), abs=ATOL64)
    torch.testing.assert_close(logits.grad, expected_grad, atol=ATOL64, rtol=0)


@pytest.mark.parametrize("beta", [10.0, 3.0])
def test_undial_distils_the_reference_with_the_true_token_lowered(beta):
    def lowered_reference(i, t):
        row = REF_LOGITS[i, t].tolist()
        row[TARGETS[i, t]] -= beta
        return softmax_list(row)

    ref = REF_LOGITS.clone().requires_grad_(True)
    check_soft_ce_loss(
        lambda logits: losses.undial(logits, ref, TARGETS, LOGIT_MASK, beta),
        lowered_reference,
        [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)],
    )
    assert ref.grad is None  # the reference is a constant target


@pytest.mark.parametrize(
    ("ignore_first", "scored"),
    [
        (1, [(0, 1), (0, 2), (1, 2)]),  # each answer's first token left out
        (0, [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]),
        (2, [(0, 2)]),
    ],
)
def test_ceu_is_cross_entropy_to_the_own_distribution_without_the_true_token(ignore_first, scored):
    def without_true_token(i, t):
        probs = softmax_list(
            [v for v_id, v in enumerate(LOGITS[i, t].tolist()) if v_id != TARGETS[i, t]]
        )
        probs.insert(int(TARGETS[i, t]), 0.0)
        return probs

    check_soft_ce_loss(
        lambda logits: losses.ceu(logits, TARGETS, LOGIT_MASK, ignore_first),
        without_true_token,
        scored,
    )


def test_undial_of_the_policy_itself_tends_to_ceu():
    """With the policy as its own reference and strength -> inf, UNDIAL's target is CE-U's
    (the true token's probability e^-beta: 0 in float64 at beta 1e4)."""
    mask = torch.ones(2, 3, dtype=torch.float64)
    torch.testing.assert_close(
        losses.undial(LOGITS, LOGITS, TARGETS, mask, 1e4),
        losses.ceu(LOGITS, TARGETS, mask, 0),
        atol=ATOL64,
        rtol=0,
    )


def test_token_level_losses_weigh_each_sequences_tokens():
    """Per-item weights (U2A): sequence i's tokens count w_i times; weight 0 drops a row."""
    mask = torch.ones(2, 3, dtype=torch.float64)
    kept_row = losses.ceu(LOGITS[:1], TARGETS[:1], mask[:1], 0)
    weighted = losses.ceu(LOGITS, TARGETS, mask, 0, torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(weighted, kept_row, atol=ATOL64, rtol=0)
    kept_row = losses.undial(LOGITS[1:], REF_LOGITS[1:], TARGETS[1:], mask[1:])
    weighted = losses.undial(LOGITS, REF_LOGITS, TARGETS, mask, 10.0, torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(weighted, kept_row, atol=ATOL64, rtol=0)


# --- through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records():
    forget = load_records(TOFU / "forget01.json", ("question", "answer"))[:8]
    retain = load_records(TOFU / "retain90.json", ("question", "answer"))[:6]
    return forget, retain


@pytest.fixture(scope="module")
def tok(records):
    forget, retain = records
    return build_tokenizer([r["question"] + " " + r["answer"] for r in forget + retain], 400)


@pytest.fixture(scope="module")
def memorized(tok, records, tmp_path_factory):
    """A tiny model fitted to the forget answers (token probabilities 0.2-0.94 between the
    10th and 90th percentile): at a random model's p ~ 1/V the weights p^beta are all ~0."""
    cfg = config(
        tmp_path_factory.mktemp("sft"), method="SFT", num_train_epochs=40, learning_rate=1e-2
    )
    model = run(cfg, model=tiny_llama(len(tok), seed=0), tokenizer=tok, forget_records=records[0])
    return model.model.eval().state_dict()


def fresh(tok, state):
    model = tiny_llama(len(tok), seed=0)
    model.load_state_dict(state)
    return model.eval()


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
    return UnlearnConfig(**{**base, **changes}).resolved()


def make_engine(cfg, tok, records, model=None):
    forget, retain = records
    return make_unlearn_engine(cfg, tok, forget, retain, None, model)


def alone(model, encoded):
    """One sequence through the model with no batch and no padding: shifted logits, targets
    and the 0/1 answer mask of the positions that predict an answer token."""
    ids = torch.tensor([encoded.input_ids])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1]
    return logits, ids[0, 1:], torch.tensor(encoded.answer_mask[1:]).bool()


def hand_token_terms(method, policy, reference, seqs):
    """Per answer token, the method's term written from its paper, one sequence at a time."""
    preset = PRESETS[method]
    beta, gamma = preset.beta, preset.gamma
    terms = []
    for seq in seqs:
        logits, targets, answer = alone(policy, seq)
        logp = logits.log_softmax(-1)
        true_logp = logp.gather(-1, targets[:, None])[:, 0]
        p = true_logp.detach().exp()
        if preset.forget_loss == "wga":
            term = p**beta * true_logp
        elif preset.forget_loss == "satimp":
            term = -(p**beta) * (1 - p) ** gamma * -true_logp
        elif preset.forget_loss == "undial":
            with torch.no_grad():
                ref_logits = alone(reference, seq)[0]
            ref_logits[torch.arange(len(targets)), targets] -= beta
            term = -(ref_logits.softmax(-1) * logp).sum(-1)
        elif preset.forget_loss == "ceu":
            suppressed = logits.detach().clone()
            suppressed[torch.arange(len(targets)), targets] = -math.inf
            term = -(suppressed.softmax(-1).nan_to_num() * logp).sum(-1)
            answer = answer & (answer.cumsum(0) > gamma)  # the first answer token is left out
        terms.append(term[answer])
    return torch.cat(terms)


def hand_loss(method, policy, reference, data, pairs):
    """c_forget * (mean over the micro-batch's answer tokens) + c_rt * retain NLL (NPO paper:
    the mean over retain sequences of their token-mean NLL)."""
    preset = PRESETS[method]
    forget = [data.forget[f] for f, _ in pairs]
    total = preset.c_forget * hand_token_terms(method, policy, reference, forget).mean()
    if preset.c_rt:
        nlls = []
        for _, r in pairs:
            logits, targets, answer = alone(policy, data.retain[r])
            nlls.append(F.cross_entropy(logits[answer], targets[answer]))
        total = total + preset.c_rt * torch.stack(nlls).mean()
    return total


def loss_atol(stats, vocab: int, n_tokens: int) -> float:
    """fp32: each token term is a log-softmax over the vocabulary (V roundings) scaled by its
    (same-sign) weight, then a mean over < 8 * n_tokens answer tokens (2 groups of 4); the
    error is relative to the size of each part of the loss, summed."""
    scale = sum(abs(float(v)) for k, v in stats.items() if k.startswith("loss/"))
    return rounding_bound(torch.float32, vocab + 8 * n_tokens, scale)


@pytest.mark.parametrize("method", TOKEN_PRESETS)
def test_engine_step_equals_the_hand_formula(tmp_path, tok, records, memorized, method):
    """Loss and gradient of one batched, padded engine micro-batch equal the formula computed
    sequence by sequence on an unpadded copy of the same policy."""
    engine = make_engine(config(tmp_path, method=method), tok, records, fresh(tok, memorized))
    perturb(engine.unwrapped, scale=0.01)  # policy != reference: UNDIAL's target is not its own
    pairs = engine.data.stream(0, 4)
    micro = engine.data.micro_batch(pairs, engine.objective.groups)
    engine.unwrapped.eval()
    hand_policy = copy.deepcopy(engine.unwrapped)
    reference = fresh(tok, memorized)
    loss, stats = micro_loss(engine, pairs)
    loss.backward()
    expected = hand_loss(method, hand_policy, reference, engine.data, pairs)
    expected.backward()
    n_tokens = max(len(e.input_ids) for group in micro.encoded.values() for e in group)
    # measured <= 2.4e-7 (CE-U) against atol >= 5.9e-7 (SatImp); gradients <= 9.2e-8
    assert loss.item() == pytest.approx(expected.item(), abs=loss_atol(stats, len(tok), n_tokens))
    assert float(stats["loss/forget"]) != 0.0
    engine_grads = [p.grad for p in engine.unwrapped.parameters()]
    hand_grads = [p.grad for p in hand_policy.parameters()]
    grad_atol = reordered_grad_atol(hand_grads, hidden=64, tokens=n_tokens)
    for got, want in zip(engine_grads, hand_grads, strict=True):
        torch.testing.assert_close(got, want, atol=grad_atol, rtol=0)


def test_each_method_gets_exactly_what_it_declares(tmp_path, tok, records):
    """Logits are kept only for losses that read them; a live reference only for UNDIAL."""
    declared = {
        "WGA+RT": (False, ()),
        "SatImp": (False, ()),
        "CE-U": (True, ()),
        "UNDIAL": (True, ("forget",)),
    }
    for method, (needs_logits, ref_logit_groups) in declared.items():
        engine = make_engine(config(tmp_path, method=method), tok, records)
        objective = engine.objective
        assert (objective.needs_logits, objective.ref_logit_groups) == (
            needs_logits,
            ref_logit_groups,
        ), method
        assert objective.ref_logp_groups == () and engine.precomputed_groups == ()
        assert engine.live_ref_groups == ref_logit_groups
        assert (engine.frozen_ref is not None) == bool(ref_logit_groups), method


def test_undial_with_lora_uses_the_base_with_adapters_off(tmp_path, tok, records, memorized):
    """With LoRA the UNDIAL reference is the policy's base (no frozen copy); before any step
    the adapters are zero, so policy and reference are the same model."""
    cfg = config(tmp_path, method="UNDIAL", lora=True)
    engine = make_engine(cfg, tok, records, fresh(tok, memorized))
    assert engine.frozen_ref is None
    pairs = engine.data.stream(0, 4)
    micro = engine.data.micro_batch(pairs, engine.objective.groups)
    engine.unwrapped.eval()
    with torch.no_grad():
        loss, stats = micro_loss(engine, pairs)
        base = fresh(tok, memorized)
        expected = hand_loss("UNDIAL", base, base, engine.data, pairs)
    n_tokens = max(len(e.input_ids) for e in micro.encoded["forget"])
    # see test_engine_step_equals_the_hand_formula
    assert loss.item() == pytest.approx(expected.item(), abs=loss_atol(stats, len(tok), n_tokens))


def test_one_optimizer_step_reports_the_hand_loss(tmp_path, tok, records, memorized):
    """``train_step`` logs the loss of the weights it starts from, then moves them."""
    cfg = config(tmp_path, method="SatImp+RT")
    engine = make_engine(cfg, tok, records, fresh(tok, memorized))
    pairs = engine.data.stream(0, 4)
    with torch.no_grad():
        expected = hand_loss("SatImp+RT", copy.deepcopy(engine.unwrapped), None, engine.data, pairs)
    before = [p.detach().clone() for p in [p for p in engine.model.parameters() if p.requires_grad]]
    metrics = train_step(engine, 0)
    n_tokens = max(len(e.input_ids) for e in engine.data.forget + engine.data.retain)
    atol = loss_atol(metrics, len(tok), n_tokens)
    assert metrics["loss"] == pytest.approx(expected.item(), abs=atol)
    assert any(
        not torch.equal(b, p)
        for b, p in zip(
            before, [p for p in engine.model.parameters() if p.requires_grad], strict=True
        )
    )


def test_conventions_leave_the_token_level_terms_alone(tmp_path, tok, records):
    """One definition under both conventions; only the retain NLL's reduction follows them."""
    stats = {}
    for conventions in ("npo", "open-unlearning"):
        engine = make_engine(
            config(tmp_path, method="WGA+RT", conventions=conventions), tok, records
        )
        perturb(engine.unwrapped)
        with torch.no_grad():
            stats[conventions] = micro_loss(engine, engine.data.stream(0, 4))[1]
    npo, ou = stats["npo"], stats["open-unlearning"]
    assert float(npo["loss/forget"]) == float(ou["loss/forget"])
    assert float(npo["loss/retain"]) != float(ou["loss/retain"])


# --- by name, from Python and the command line ---------------------------------------------------


@pytest.mark.parametrize("method", [*TOKEN_PRESETS, "RMU"])
def test_every_new_preset_runs_by_name_and_unlearns(tmp_path, tok, records, memorized, method):
    forget, retain = records
    cfg = config(tmp_path, method=method.lower(), num_train_epochs=2, hidden_layer=0)
    res = run(
        cfg,
        model=fresh(tok, memorized),
        tokenizer=tok,
        forget_records=forget,
        retain_records=retain if method in ("WGA+RT", "SatImp+RT", "RMU") else None,
    )
    assert res.summary["method"] == method and len(res.metrics) == 4
    first, last = res.metrics[0], res.metrics[-1]
    assert all(math.isfinite(m["loss"]) for m in res.metrics)
    assert last["logps/forget"] < first["logps/forget"]  # the forget answers got less likely


def test_cli_runs_a_token_level_preset(tmp_path, tok, records, capsys):
    forget, retain = records
    save_model(tiny_llama(len(tok), seed=0), tok, tmp_path / "model")
    paths = {}
    for name, recs in (("forget", forget), ("retain", retain)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["unlearn", "--model", str(tmp_path / "model"), "--forget", str(paths["forget"])]
    argv += ["--retain", str(paths["retain"]), "--out", str(tmp_path / "run"), "--json"]
    argv += [
        "--method",
        "wga+rt",
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "1",
        "--num-train-epochs",
        "1",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "WGA+RT" and summary["steps"] == 2
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "method: WGA+RT" in saved and "c_rt: 1.0" in saved and "beta: 1.0" in saved


# --- RMU: activations of one block ---------------------------------------------------------------


def test_activation_mse_by_hand():
    acts = torch.tensor(
        [[[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], [[0.0, 0.0], [2.0, 2.0], [1.0, -1.0]]],
        dtype=torch.float64,
    )
    target = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])

    def sq(i, t):  # squared error averaged over the 2 hidden units
        return sum((acts[i, t, d].item() - target[d].item()) ** 2 for d in range(2)) / 2

    per_seq = [(sq(0, 1) + sq(0, 2)) / 2, sq(1, 1)]
    loss = losses.activation_mse(acts, target, mask)
    assert loss.item() == pytest.approx(sum(per_seq) / 2, abs=ATOL64)
    weighted = losses.activation_mse(acts, target, mask, torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx((per_seq[0] + 3 * per_seq[1]) / 4, abs=ATOL64)


def test_rmu_control_vector_is_fixed_and_scaled():
    from negpref.unlearn.objectives import rmu_control_vector

    u = rmu_control_vector(64, 2.0)
    assert float(u.norm()) == pytest.approx(2.0, rel=rounding_bound(torch.float32, 64, 1.0))
    assert bool((u >= 0).all())  # a uniform draw, as the WMDP code does
    torch.testing.assert_close(u, rmu_control_vector(64, 2.0), atol=0, rtol=0)


def block_output(model, encoded, layer):
    """Output of ``model.model.layers[layer]`` for one unpadded sequence, by a forward hook
    (not through ``output_hidden_states``, which the engine uses)."""
    cache = []
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, out: cache.append(out))
    ids = torch.tensor([encoded.input_ids])
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    return cache[0][0]


def hand_rmu(policy, reference, data, pairs, steering):
    """RMU's two activation terms, forget rows to the control vector and retain rows to the
    reference, each a mean over sequences of their answer positions' mean squared error."""
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    control = (u / u.norm() * steering).float()

    def seq_mse(acts, target, encoded):
        answer = torch.tensor(encoded.answer_mask).bool()
        return ((acts - target) ** 2).mean(-1)[answer].mean()

    forget = [data.forget[f] for f, _ in pairs]
    retain = [data.retain[r] for _, r in pairs]
    misdirect = torch.stack([seq_mse(block_output(policy, e, 0), control, e) for e in forget])
    with torch.no_grad():
        frozen = [block_output(reference, e, 0) for e in retain]
    keep = torch.stack(
        [seq_mse(block_output(policy, e, 0), f, e) for e, f in zip(retain, frozen, strict=True)]
    )
    return misdirect.mean(), keep.mean()


def test_rmu_engine_step_equals_the_hand_formula(tmp_path, tok, records, memorized):
    cfg = config(tmp_path, method="RMU", hidden_layer=0)
    engine = make_engine(cfg, tok, records, fresh(tok, memorized))
    assert engine.live_ref_groups == ("retain",) and engine.frozen_ref is not None
    perturb(engine.unwrapped, scale=0.01)  # retain activations differ from the reference's
    pairs = engine.data.stream(0, 4)
    micro = engine.data.micro_batch(pairs, engine.objective.groups)
    engine.unwrapped.eval()
    hand_policy = copy.deepcopy(engine.unwrapped)
    loss, _ = micro_loss(engine, pairs)
    loss.backward()
    misdirect, keep = hand_rmu(hand_policy, fresh(tok, memorized), engine.data, pairs, 2.0)
    expected = misdirect + 1.0 * keep  # alpha (gamma) 1
    expected.backward()
    n_tokens = max(len(e.input_ids) for group in micro.encoded.values() for e in group)
    # fp32: squared errors of 64 hidden units, then means over < 8 * n_tokens positions;
    # measured 2.4e-7 against 6.0e-4, gradients 1.2e-7
    atol = rounding_bound(torch.float32, 64 + 8 * n_tokens, abs(expected.item()))
    assert loss.item() == pytest.approx(expected.item(), abs=atol)
    assert keep.item() > 10 * atol  # the retain term shows in the comparison (measured 49x)
    # blocks after the steered one get no gradient, in both
    pairs_of_grads = list(zip(engine.unwrapped.parameters(), hand_policy.parameters(), strict=True))
    assert [a.grad is None for a, _ in pairs_of_grads] == [
        b.grad is None for _, b in pairs_of_grads
    ]
    hand_grads = [b.grad for _, b in pairs_of_grads if b.grad is not None]
    grad_atol = reordered_grad_atol(hand_grads, hidden=64, tokens=n_tokens)
    for got, want in pairs_of_grads:
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, atol=grad_atol, rtol=0)


def test_trainable_params_restrict_what_moves(tmp_path, tok, records, memorized):
    only = r"model\.layers\.0\.mlp\.down_proj\.weight"
    cfg = config(tmp_path, method="RMU", hidden_layer=0, trainable_params=[only])
    engine = make_engine(cfg, tok, records, fresh(tok, memorized))
    before = {n: p.detach().clone() for n, p in engine.unwrapped.named_parameters()}
    assert math.isfinite(train_step(engine, 0)["loss"])
    moved = [n for n, p in engine.unwrapped.named_parameters() if not torch.equal(before[n], p)]
    assert moved == ["model.layers.0.mlp.down_proj.weight"]


def test_rmu_bad_layer_and_patterns_are_one_line_errors(tmp_path, tok, records):
    from negpref.errors import NegprefError
    from negpref.unlearn.trainer import check_model_settings

    model = tiny_llama(len(tok), seed=0)

    def check(**changes):
        cfg = config(tmp_path, **changes)
        check_model_settings(model, cfg, cfg.objective())

    with pytest.raises(NegprefError, match=r"hidden_layer: 1 .* 2 blocks: choose 0\.\.0"):
        check(method="RMU", hidden_layer=1)
    with pytest.raises(NegprefError, match=r"trainable_params: .* match no trainable parameter"):
        check(method="GA", trainable_params=["nothing"])
    check(method="GA", lora=True, trainable_params=[".*lora_A.*"])  # adapter names: not yet
    assert all(p.requires_grad for p in model.parameters())  # checking changed nothing
    with pytest.raises(NegprefError, match="hidden_layer: 7"):  # the engine checks too
        make_engine(config(tmp_path, method="RMU"), tok, records)
    with pytest.raises(NegprefError, match="trainable_params: '\\(' is not a regex"):
        config(tmp_path, trainable_params=["("])


def test_trainable_params_name_lora_adapters(tmp_path, tok, records):
    cfg = config(tmp_path, method="GA", lora=True, trainable_params=[".*lora_A.*"])
    engine = make_engine(cfg, tok, records)
    trained = [n for n, p in engine.unwrapped.named_parameters() if p.requires_grad]
    assert trained and all("lora_A" in n for n in trained)


# --- PDU: logit-margin flattening under a primal-dual retain constraint -------------------------


def test_logit_margin_is_the_squared_gap_between_max_and_mean_logit():
    logits = LOGITS.clone().requires_grad_(True)
    loss = losses.logit_margin(logits, LOGIT_MASK)
    loss.backward()
    scored = [(i, t) for i in range(2) for t in range(3) if LOGIT_MASK[i, t]]
    expected, grad = 0.0, torch.zeros_like(LOGITS)
    for i, t in scored:
        row = LOGITS[i, t].tolist()
        gap = max(row) - sum(row) / len(row)
        expected += gap**2 / len(scored)
        for v in range(len(row)):  # d gap^2 / d z_v = 2 gap ([v is the argmax] - 1/V)
            grad[i, t, v] = 2 * gap * ((v == row.index(max(row))) - 1 / len(row)) / len(scored)
    assert loss.item() == pytest.approx(expected, abs=ATOL64)
    torch.testing.assert_close(logits.grad, grad, atol=ATOL64, rtol=0)
    assert losses.logit_margin(torch.zeros(1, 2, 5), torch.ones(1, 2)).item() == 0.0  # uniform


def _pdu_history(tok, records, memorized, **changes):
    from negpref.unlearn.dataset import build_data
    from negpref.unlearn.trainer import train_in_memory

    forget, retain = records
    data = build_data(tok, forget, retain, None, 128, seed=0)
    options = dict(method="PDU", learning_rate=1e-3, num_train_epochs=3, warmup_epochs=0)
    options.update(per_device_train_batch_size=4, gradient_accumulation_steps=1, **changes)
    trainer = train_in_memory(fresh(tok, memorized), tok, data, **options)
    return trainer, [row for row in trainer.state.log_history if "loss" in row]


def test_pdu_multiplier_ascends_on_the_retain_constraint(tok, records, memorized):
    """After each step the multiplier moves by dual_step_size x (step's retain NLL - bound),
    floored at 0, and never during the warm-up epochs; the loss is the Lagrangian."""
    eta, bound = 2.0, 0.5
    trainer, rows = _pdu_history(
        tok, records, memorized, dual_step_size=eta, retain_bound=bound, dual_warmup_epochs=1
    )
    assert len(rows) == 6  # 8 forget items, batch 4, 3 epochs
    weights = [row["dual/retain_weight"] for row in rows]
    # the preset's start: steps 1-2 are the warm-up epoch, step 3 the first to move it after
    assert weights[:3] == [100.0] * 3
    # Figures are logged as float32: each is within 2 fp32 roundings of its float64 value.
    for s in range(3, 6):
        expected = max(0.0, weights[s - 1] + eta * (rows[s - 1]["loss/retain"] - bound))
        assert weights[s] == pytest.approx(expected, rel=2 * 2**-23, abs=1e-6)
    assert trainer.retain_weight == pytest.approx(
        max(0.0, weights[5] + eta * (rows[5]["loss/retain"] - bound)), rel=2 * 2**-23
    )
    for row in rows:
        lagrangian = row["loss/forget"] + row["dual/retain_weight"] * (row["loss/retain"] - bound)
        assert row["loss"] == pytest.approx(lagrangian, rel=1e-5)  # 4 float32 terms
    assert trainer.checkpoint_state()["retain_weight"] == trainer.retain_weight
    trainer.load_checkpoint_state({"retain_weight": 7.5})
    assert trainer.retain_weight == 7.5


def test_pdu_multiplier_drops_to_zero_when_the_constraint_holds(tok, records, memorized):
    """A bound far above the retain NLL: the multiplier falls by eta x slack each step, to 0."""
    _, rows = _pdu_history(
        tok, records, memorized, dual_step_size=50.0, retain_bound=20.0, dual_warmup_epochs=0
    )
    weights = [row["dual/retain_weight"] for row in rows]
    assert weights[0] == 100.0 and weights[1] < 100.0 and weights[-1] == 0.0
    assert PRESETS["PDU"].retain_bound == 0.3 and PRESETS["PDU"].c_rt == 100.0
