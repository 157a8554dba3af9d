"""``--conventions open-unlearning``: every term against a hand computation of open-unlearning's
definition (``locuslab/open-unlearning``: ``trainer/unlearn/grad_ascent.py``, ``grad_diff.py``,
``simnpo.py``, ``trainer/utils.py::compute_kl_divergence``, ``evals/metrics/utils.py::
tokenwise_logprobs``, ``evals/metrics/mia/min_k*.py``), and the default (NPO paper) terms
against the formulas negpref computed before the switch existed.

Tolerances: float32 sums over at most a few hundred tokens x a vocabulary of 400, so 1e-5
relative (float32 eps 1.2e-7 x reduction lengths of ~100) on losses; log-softmax outputs of
the same logits compare to 1e-6 absolute.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_unlearn_engine, micro_loss
from negpref import losses
from negpref.conventions import NPO, OPEN_UNLEARNING, get_conventions
from negpref.data import collate, load_records
from negpref.errors import NegprefError
from negpref.eval import mia
from negpref.logprobs import token_logps_from_logits
from negpref.models import build_tokenizer
from negpref.unlearn import UnlearnConfig

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
IGNORE = -100  # the label of a token that carries no loss (HF / open-unlearning)
RTOL = 1e-5  # float32 sums over ~100 tokens (see module docstring)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_batch(seed=0, batch=3, width=9, vocab=11):
    """Logits, ids and answer masks of right-padded rows with different prompt/answer spans."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, width, vocab, generator=gen)
    input_ids = torch.randint(0, vocab, (batch, width), generator=gen)
    answer_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, (start, stop) in enumerate([(2, 9), (3, 6), (1, 4)][:batch]):
        answer_mask[row, start:stop] = 1
    return logits, input_ids, answer_mask


def hf_labels(input_ids, answer_mask):
    return input_ids.masked_fill(answer_mask == 0, IGNORE)


def their_mean_ce(logits, labels):
    """A causal LM's ``outputs.loss``: CE of next tokens, mean over every labelled token."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
    )


def their_sum_ce(logits, labels):
    """open-unlearning's ``compute_batch_nll``: per-sequence summed CE."""
    per_token = F.cross_entropy(
        logits[:, :-1].transpose(-1, -2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )
    return per_token.sum(-1)


def ours_per_sequence(logits, input_ids, answer_mask):
    token_logps, mask = token_logps_from_logits(logits, input_ids, answer_mask)
    return token_logps.sum(-1), mask.sum(-1), token_logps, mask


# ------------------------------------------------------------------------- pure terms


def test_ga_is_the_token_mean_over_the_batch():
    logits, ids, answer = random_batch()
    logps, n_tokens, _, _ = ours_per_sequence(logits, ids, answer)
    theirs = -their_mean_ce(logits, hf_labels(ids, answer))  # GradAscent: loss = -outputs.loss
    torch.testing.assert_close(losses.ga_token_mean(logps, n_tokens), theirs, rtol=RTOL, atol=0)
    # ... which is not the NPO paper's mean of per-sequence sums (the rows differ in length)
    assert not math.isclose(float(losses.ga(logps)), float(theirs), rel_tol=1e-3)


def test_retain_nll_is_the_token_mean_over_the_batch():
    logits, ids, answer = random_batch(seed=1)
    logps, n_tokens, _, _ = ours_per_sequence(logits, ids, answer)
    theirs = their_mean_ce(logits, hf_labels(ids, answer))  # GradDiff NLL: outputs.loss
    torch.testing.assert_close(losses.nll_token_mean(logps, n_tokens), theirs, rtol=RTOL, atol=0)
    per_sequence_means = float((-logps / n_tokens).mean())
    assert float(losses.nll(logps, n_tokens)) == pytest.approx(per_sequence_means, rel=RTOL)
    assert not math.isclose(per_sequence_means, float(theirs), rel_tol=1e-3)


def test_token_mean_with_weights_weighs_each_sequence_tokens():
    values, counts = torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])
    weights = torch.tensor([1.0, 3.0])
    # (1*-6 + 3*-2) / (1*3 + 3*1)
    assert float(losses.token_mean(values, counts, weights)) == pytest.approx(-12.0 / 6.0)


def test_retain_kl_is_ref_to_policy_over_every_position():
    policy, _, _ = random_batch(seed=2)
    ref, _, _ = random_batch(seed=3)
    vocab = policy.shape[-1]
    # compute_kl_divergence: kl_div(log pi, log pi_ref, batchmean, log_target) on [B*T, V]
    theirs = F.kl_div(
        F.log_softmax(policy, -1).view(-1, vocab),
        F.log_softmax(ref, -1).view(-1, vocab),
        reduction="batchmean",
        log_target=True,
    )
    torch.testing.assert_close(losses.kl_all_positions(policy, ref), theirs, rtol=RTOL, atol=0)
    by_hand = sum(
        float(
            (
                F.softmax(ref[b, t], -1)
                * (F.log_softmax(ref[b, t], -1) - F.log_softmax(policy[b, t], -1))
            ).sum()
        )
        for b in range(policy.shape[0])
        for t in range(policy.shape[1])
    ) / (policy.shape[0] * policy.shape[1])
    assert float(theirs) == pytest.approx(by_hand, rel=RTOL)


def test_simnpo_margin_is_inside_the_temperature():
    logits, ids, answer = random_batch(seed=4)
    logps, n_tokens, _, _ = ours_per_sequence(logits, ids, answer)
    beta, delta = 2.5, 0.7
    labels = hf_labels(ids, answer)
    # simnpo.py: (sum NLL / answer tokens - delta), then -logsigmoid(beta * .) * 2 / beta
    nll_mean = their_sum_ce(logits, labels) / (labels != IGNORE).sum(-1)
    theirs = -F.logsigmoid(beta * (nll_mean - delta)).mean() * 2 / beta
    ours = losses.simnpo_delta(logps, n_tokens, beta, delta)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)
    # the same as the SimNPO paper's form with gamma = beta * delta, not gamma = delta
    torch.testing.assert_close(ours, losses.simnpo(logps, n_tokens, beta, beta * delta))
    assert float(losses.simnpo(logps, n_tokens, beta, delta)) != pytest.approx(float(theirs))


def their_min_k_tokens(logits, ids, answer, row):
    """tokenwise_logprobs: log-probs of the labelled tokens but the last (the EOS)."""
    log_probs = F.log_softmax(logits, -1)[:, :-1]
    labelled = (hf_labels(ids, answer)[row] != IGNORE).nonzero().flatten()[:-1]
    start, end = int(labelled[0]), int(labelled[-1])
    targets = log_probs[row].gather(-1, ids[row, 1:].unsqueeze(-1)).squeeze(-1)
    return targets[start - 1 : end], log_probs[row, start - 1 : end]


def test_min_k_leaves_out_eos_and_defaults_to_k_04():
    logits, ids, answer = random_batch(seed=5)
    _, _, token_logps, mask = ours_per_sequence(logits, ids, answer)
    k = get_conventions("open-unlearning").mia_k
    assert (k, NPO.mia_k) == (0.4, 0.2)
    kept = mia.drop_last_answer_token(mask)
    ours = mia.min_k_scores(token_logps, kept, k)
    ours_pp = mia.min_k_plus_plus_scores(token_logps, logits[:, :-1], kept, k)
    for row in range(logits.shape[0]):
        lp, vocab_lp = their_min_k_tokens(logits, ids, answer, row)
        n = max(1, int(len(lp) * k))
        # MinKProbAttack: -mean of the n lowest; the sign is theirs (higher: non-member)
        theirs = -float(lp.sort().values[:n].mean())
        assert float(ours[row]) == pytest.approx(-theirs, rel=RTOL)
        mu = (vocab_lp.exp() * vocab_lp).sum(-1)
        sigma = ((vocab_lp.exp() * vocab_lp.square()).sum(-1) - mu.square()).clamp(min=1e-6)
        z = (lp - mu) / sigma.sqrt()
        theirs_pp = -float(z.sort().values[:n].mean())
        assert float(ours_pp[row]) == pytest.approx(-theirs_pp, rel=RTOL)
    assert kept.sum() == mask.sum() - mask.shape[0]  # exactly one token per row left out


def test_unknown_conventions_are_refused():
    with pytest.raises(NegprefError, match="--conventions: unknown 'tofu'"):
        get_conventions("tofu")
    with pytest.raises(NegprefError, match="--conventions"):
        UnlearnConfig(model="m", forget="f", conventions="tofu").validate()


# ----------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def records():
    forget = load_records(TOFU / "forget01.json", ("question", "answer"))[:4]
    retain = load_records(TOFU / "retain90.json", ("question", "answer"))[:4]
    # Short retain answers: the retain rows are padded to the forget rows' width in the shared
    # forward, which open-unlearning's retain-only batch does not have.
    retain = [{**r, "answer": " ".join(r["answer"].split()[:3])} for r in retain]
    return forget, retain


@pytest.fixture(scope="module")
def tok(records):
    forget, retain = records
    return build_tokenizer([r["question"] + " " + r["answer"] for r in forget + retain], 400)


def engine_step(tok, records, **changes):
    """One micro-batch of the engine with a perturbed policy, and its groups' sequences."""
    forget, retain = records
    cfg = UnlearnConfig(
        model="unused",
        forget="unused",
        output_dir="unused",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        **changes,
    ).resolved()
    engine = make_unlearn_engine(cfg, tok, forget, retain, None)
    data = engine.data
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the policy away from its reference: the KL is not 0
        for p in engine.unwrapped.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    micro = data.micro_batch(data.stream(0, 4), engine.objective.groups)
    _, stats = micro_loss(engine, data.stream(0, 4))
    return engine, micro, stats


def group_forward(model, encoded, pad_id):
    batch = collate(encoded, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, batch


def test_engine_under_open_unlearning_matches_their_grad_diff(tok, records):
    engine, micro, stats = engine_step(
        tok, records, method="GA+RT", c_rtkl=1.0, conventions="open-unlearning"
    )
    policy, reference = engine.unwrapped, engine.frozen_ref
    forget_logits, forget = group_forward(policy, micro.encoded["forget"], tok.pad_token_id)
    retain_logits, retain = group_forward(policy, micro.encoded["retain"], tok.pad_token_id)
    ref_retain_logits, _ = group_forward(reference, micro.encoded["retain"], tok.pad_token_id)
    shared_width = max(len(e.input_ids) for g in micro.encoded.values() for e in g)
    assert shared_width > retain["input_ids"].shape[1]  # padding differs from theirs
    forget_labels = hf_labels(forget["input_ids"], forget["answer_mask"])
    retain_labels = hf_labels(retain["input_ids"], retain["answer_mask"])
    vocab = retain_logits.shape[-1]
    expected = {
        "loss/forget": -their_mean_ce(forget_logits, forget_labels),
        "loss/retain": their_mean_ce(retain_logits, retain_labels),
        "loss/retain_kl": F.kl_div(
            F.log_softmax(retain_logits, -1).view(-1, vocab),
            F.log_softmax(ref_retain_logits, -1).view(-1, vocab),
            reduction="batchmean",
            log_target=True,
        ),
    }
    assert float(expected["loss/retain_kl"]) > 1e-4  # the perturbation shows
    for name, value in expected.items():
        assert float(stats[name]) == pytest.approx(float(value), rel=RTOL), name


def test_engine_simnpo_under_open_unlearning(tok, records):
    beta, delta = 2.5, 0.4
    engine, micro, stats = engine_step(
        tok, records, method="SimNPO", gamma=delta, conventions="open-unlearning"
    )
    logits, forget = group_forward(engine.unwrapped, micro.encoded["forget"], tok.pad_token_id)
    labels = hf_labels(forget["input_ids"], forget["answer_mask"])
    nll_mean = their_sum_ce(logits, labels) / (labels != IGNORE).sum(-1)
    theirs = -F.logsigmoid(beta * (nll_mean - delta)).mean() * 2 / beta
    assert float(stats["loss/forget"]) == pytest.approx(float(theirs), rel=RTOL)


def test_engine_default_keeps_the_npo_paper_terms(tok, records):
    engine, micro, stats = engine_step(tok, records, method="GA+RT", c_rtkl=1.0)
    assert engine.objective.conventions is NPO
    policy, reference = engine.unwrapped, engine.frozen_ref
    forget_logits, forget = group_forward(policy, micro.encoded["forget"], tok.pad_token_id)
    retain_logits, retain = group_forward(policy, micro.encoded["retain"], tok.pad_token_id)
    ref_logits, _ = group_forward(reference, micro.encoded["retain"], tok.pad_token_id)
    labels = hf_labels(forget["input_ids"], forget["answer_mask"])
    retain_labels = hf_labels(retain["input_ids"], retain["answer_mask"])
    n_retain = (retain_labels != IGNORE).sum(-1)
    # GA: mean over sequences of the summed answer log-prob; RT: mean of per-sequence means
    ga = (-their_sum_ce(forget_logits, labels)).mean()
    rt = (their_sum_ce(retain_logits, retain_labels) / n_retain).mean()
    # KL(policy || ref) per answer token, per-sequence means averaged
    p_logp = F.log_softmax(retain_logits[:, :-1], -1)
    q_logp = F.log_softmax(ref_logits[:, :-1], -1)
    token_kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1)
    answer = retain["answer_mask"][:, 1:].float()
    kl = ((token_kl * answer).sum(-1) / answer.sum(-1)).mean()
    for name, value in (("loss/forget", ga), ("loss/retain", rt), ("loss/retain_kl", kl)):
        assert float(stats[name]) == pytest.approx(float(value), rel=RTOL), name


def test_conventions_are_recorded_in_the_config():
    cfg = UnlearnConfig(model="m", forget="f", output_dir="o", conventions="open-unlearning")
    assert cfg.objective().conventions is OPEN_UNLEARNING
    assert cfg.objective().forget_loss.description == "negative preference optimization"
    cfg = UnlearnConfig(
        model="m", forget="f", output_dir="o", method="GA", conventions="open-unlearning"
    )
    assert cfg.objective().forget_loss.description == "gradient ascent, answer-token mean"
