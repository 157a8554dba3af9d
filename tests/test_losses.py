"""negpref.losses against hand-computed values, autograd, and the NPO paper's statements."""

import itertools
import math

import pytest
import torch

from conftest import rounding_bound
from negpref import losses

LP = torch.tensor([-2.0, -1.0, -4.0], dtype=torch.float64)
REF = torch.tensor([-1.5, -1.5, -1.0], dtype=torch.float64)
# float64 rounding of a closed form (~16 roundings), relative: 3.6e-15 (was rel=1e-12)
CLOSED_FORM_REL = rounding_bound(torch.float64, 16, 1.0)


def softplus(x):
    return math.log1p(math.exp(x))


def logsigmoid(x):
    return -softplus(-x)


def test_values_against_hand_computation():
    beta = 0.5
    lp, ref = LP.tolist(), REF.tolist()
    n = len(lp)
    assert losses.ga(LP).item() == pytest.approx(sum(lp) / n)
    want_npo = sum((2 / beta) * math.log(1 + math.exp(a - b) ** beta) for a, b in zip(lp, ref)) / n
    assert losses.npo(LP, REF, beta).item() == pytest.approx(want_npo, rel=CLOSED_FORM_REL)
    want_w = [
        2 * math.exp(a) ** beta / (math.exp(a) ** beta + math.exp(b) ** beta)
        for a, b in zip(lp, ref)
    ]
    assert losses.npo_weight(LP, REF, beta).tolist() == pytest.approx(want_w, rel=CLOSED_FORM_REL)

    lengths = torch.tensor([4, 2, 8])
    want_nll = sum(-a / m for a, m in zip(lp, [4, 2, 8])) / n
    assert losses.nll(LP, lengths).item() == pytest.approx(want_nll)
    want_simnpo = (
        sum(-(2 / 2.5) * logsigmoid(-2.5 * a / m - 0.3) for a, m in zip(lp, [4, 2, 8])) / n
    )
    assert losses.simnpo(LP, lengths, beta=2.5, gamma=0.3).item() == pytest.approx(want_simnpo)

    chosen, ref_chosen = torch.tensor([-3.0, -2.0]), torch.tensor([-3.5, -1.0])
    rejected, ref_rejected = torch.tensor([-5.0, -1.0]), torch.tensor([-4.0, -2.0])
    margins = [(-3.0 + 3.5) - (-5.0 + 4.0), (-2.0 + 1.0) - (-1.0 + 2.0)]  # [1.5, -2.0]
    want_dpo = sum(-logsigmoid(0.1 * m) for m in margins) / 2
    got = losses.dpo(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    # float32 inputs: ~8 fp32 roundings (these margins of halves are exact), relative: 9.5e-7;
    # measured 5.4e-8 (was rel=1e-6)
    assert got.item() == pytest.approx(want_dpo, rel=rounding_bound(torch.float32, 8, 1.0))

    z = 0.2
    want_kto = sum((2 / beta) * -logsigmoid(z - beta * (a - b)) for a, b in zip(lp, ref)) / n
    assert losses.kto(LP, REF, beta, z_ref=z).item() == pytest.approx(want_kto, rel=CLOSED_FORM_REL)


def test_dpo_at_zero_margin_is_log2():
    x = torch.tensor([-1.0, -7.0])
    assert losses.dpo(x, x, x, x, beta=0.3).item() == pytest.approx(math.log(2))


def test_kto_clips_and_detaches_z_ref():
    z = torch.tensor(-5.0, requires_grad=True)
    # a negative KL estimate is clipped to 0
    assert losses.kto(LP, REF, 0.5, z_ref=z).item() == pytest.approx(
        losses.kto(LP, REF, 0.5, z_ref=0.0).item()
    )
    lp = LP.clone().requires_grad_()
    losses.kto(lp, REF, 0.5, z_ref=z.abs()).backward()
    assert z.grad is None


@pytest.mark.parametrize(
    "name, fn, analytic",
    [
        # d/d lp_i of each loss, divided by nothing: the mean contributes 1/n
        ("ga", lambda lp: losses.ga(lp), lambda lp: torch.ones_like(lp)),
        (
            "npo",
            lambda lp: losses.npo(lp, REF, 0.5),
            lambda lp: 2 * torch.sigmoid(0.5 * (lp - REF)),
        ),
        (
            "kto",
            lambda lp: losses.kto(lp, REF, 0.5, z_ref=0.2),
            lambda lp: 2 * torch.sigmoid(0.5 * (lp - REF) - 0.2),
        ),
        (
            "nll",
            lambda lp: losses.nll(lp, torch.tensor([4, 2, 8])),
            lambda lp: -1 / torch.tensor([4.0, 2.0, 8.0], dtype=lp.dtype),
        ),
        (
            "simnpo",
            lambda lp: losses.simnpo(lp, torch.tensor([4, 2, 8]), beta=2.5, gamma=0.3),
            lambda lp: (
                2
                * torch.sigmoid(2.5 * lp / torch.tensor([4.0, 2.0, 8.0], dtype=lp.dtype) + 0.3)
                / torch.tensor([4.0, 2.0, 8.0], dtype=lp.dtype)
            ),
        ),
    ],
)
def test_gradients_against_autograd(name, fn, analytic):
    lp = LP.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(lp), lp)
    torch.testing.assert_close(grad, analytic(LP) / len(LP))
    assert torch.autograd.gradcheck(fn, (LP.clone().requires_grad_(),))


def test_dpo_gradient_against_autograd():
    beta = 0.1
    chosen = torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-5.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref_c = torch.tensor([-3.5, -1.0], dtype=torch.float64)
    ref_r = torch.tensor([-4.0, -2.0], dtype=torch.float64)
    loss = losses.dpo(chosen, rejected, ref_c, ref_r, beta)
    g_c, g_r = torch.autograd.grad(loss, (chosen, rejected))
    margin = (chosen - ref_c) - (rejected - ref_r)
    coeff = beta * torch.sigmoid(-beta * margin.detach()) / 2
    torch.testing.assert_close(g_c, -coeff)
    torch.testing.assert_close(g_r, coeff)


def _softmax_model(seed=0):
    """log pi(y|x) of a linear softmax classifier: per-sample log-probs with parameters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    theta = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def logps(t):
        return torch.log_softmax(x @ t, -1)[torch.arange(6), y]

    return theta, logps


def test_npo_gradient_is_weighted_ga_gradient_eq5():
    """grad NPO = E[W * grad log pi] with W = npo_weight (eq. 5)."""
    beta = 0.7
    theta, logps = _softmax_model()
    ref = logps(theta).detach() + torch.linspace(-1, 1, 6, dtype=torch.float64)
    (g_npo,) = torch.autograd.grad(losses.npo(logps(theta), ref, beta), theta)
    weights = losses.npo_weight(logps(theta), ref, beta).detach()
    per_sample = [torch.autograd.grad(logps(theta)[i], theta)[0] for i in range(6)]
    expected = sum(w * g for w, g in zip(weights, per_sample)) / 6
    torch.testing.assert_close(g_npo, expected)
    # eq. 5's descent direction: an NPO step moves along -E[W grad log pi]
    assert torch.allclose(-g_npo, -expected)
    # the weight is 1 at the reference and vanishes as a sample is unlearned
    assert losses.npo_weight(ref, ref, beta).tolist() == pytest.approx([1.0] * 6)
    assert losses.npo_weight(ref - 100, ref, beta).max().item() < 1e-20


def test_proposition1_npo_reduces_to_ga_as_beta_to_zero():
    theta, logps = _softmax_model(seed=1)
    ref = logps(theta).detach() + 0.5
    target = (losses.ga(logps(theta)) - ref.mean()).item()
    (g_ga,) = torch.autograd.grad(losses.ga(logps(theta)), theta)
    per_sample = torch.stack([torch.autograd.grad(logps(theta)[i], theta)[0] for i in range(6)])
    value_errors, grad_errors = [], []
    for beta in (1.0, 1e-1, 1e-2, 1e-3, 1e-4):
        shifted = losses.npo(logps(theta), ref, beta) - (2 / beta) * math.log(2)
        value_errors.append(abs(shifted.item() - target))
        (g_npo,) = torch.autograd.grad(losses.npo(logps(theta), ref, beta), theta)
        grad_errors.append((g_npo - g_ga).abs().max().item())
    assert all(a > b for a, b in itertools.pairwise(value_errors))
    assert all(a > b for a, b in itertools.pairwise(grad_errors))
    # (2/b) softplus(b d) = (2/b) log 2 + d + b d^2 / 4 - O(b^3) with d = -0.5 here, plus the
    # float64 rounding of the (2/b) log 2 shift; its gradient 2 sigma(b d) = 1 + b d / 2 - O(b^3)
    # weights each sample's gradient. Measured 6.250002e-6 and 1.5245e-5 against these bounds
    # 6.250025e-6 and 1.5298e-5 (were 1e-3 and 1e-4).
    smallest, d = 1e-4, 0.5  # the last beta; |log pi - ref|
    shift = (2 / smallest) * math.log(2)
    value_bound = smallest * d**2 / 4 + rounding_bound(torch.float64, 8, shift)
    grad_bound = (smallest * d / 2 * per_sample.abs().mean(0)).max().item()
    assert value_errors[-1] <= value_bound and grad_errors[-1] <= grad_bound
    assert value_errors[0] > 100 * value_errors[-1]


def test_npo_is_bounded_below_while_ga_is_not():
    ref = torch.zeros(4, dtype=torch.float64)
    for beta in (1e-3, 0.1, 1.0, 10.0):
        for lp_value in (0.0, -10.0, -1e3, -1e6):
            lp = torch.full((4,), lp_value, dtype=torch.float64)
            assert losses.npo(lp, ref, beta).item() >= 0.0
    # GA keeps decreasing linearly without bound
    values = [losses.ga(torch.full((4,), v)).item() for v in (-1.0, -1e3, -1e6)]
    assert values == [-1.0, -1e3, -1e6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log_ratio", [1e4, -1e4])
def test_stable_for_extreme_log_ratios(dtype, log_ratio):
    lp = torch.full((3,), log_ratio, dtype=dtype, requires_grad=True)
    ref = torch.zeros(3, dtype=dtype)
    lengths = torch.ones(3)
    checks = {
        "npo": lambda: losses.npo(lp, ref, 0.1),
        "kto": lambda: losses.kto(lp, ref, 0.1, z_ref=1.0),
        "dpo": lambda: losses.dpo(lp, ref, ref, lp.detach() * 0, 0.1),
        "simnpo": lambda: losses.simnpo(lp, lengths, 2.5),
        "npo_weight": lambda: losses.npo_weight(lp, ref, 0.1).sum(),
    }
    for name, fn in checks.items():
        value = fn()
        (grad,) = torch.autograd.grad(value, lp)
        assert torch.isfinite(value).all(), name
        assert torch.isfinite(grad).all(), name
    # NPO is asymptotically linear (slope 2) for large ratios and ~0 for small ones: softplus(1e3)
    # is 1e3 and softplus(-1e3) underflows to exactly 0, so only the ~4 roundings of the dtype
    # remain. Measured 1.6e-3 relative in bfloat16, 0 in float32 (was rel=1e-2, abs=1e-3).
    npo = losses.npo(lp, ref, 0.1).float().item()
    expected = 2 * log_ratio if log_ratio > 0 else 0.0
    assert npo == pytest.approx(expected, rel=rounding_bound(dtype, 4, 1.0), abs=0)


def test_weights_reduction():
    w = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    got = losses.npo(LP, REF, 0.5, weights=w)
    per = (2 / 0.5) * torch.nn.functional.softplus(0.5 * (LP - REF))
    assert got.item() == pytest.approx(((per * w).sum() / w.sum()).item())
    # integer weights are sample duplication
    dup = losses.ga(torch.tensor([-2.0, -4.0, -4.0, -4.0]))
    assert (
        losses.ga(torch.tensor([-2.0, -4.0]), weights=torch.tensor([1.0, 3.0])).item() == dup.item()
    )


@pytest.mark.parametrize(
    "weights, message",
    [
        (torch.tensor([1.0, -1.0, 1.0]), "non-negative"),
        (torch.zeros(3), "all zero"),
        (torch.ones(2), "one weight per sample"),
        (torch.tensor([1.0, float("nan"), 1.0]), "finite"),
    ],
)
def test_bad_weights_raise(weights, message):
    with pytest.raises(ValueError, match=message):
        losses.ga(LP, weights=weights)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf")])
def test_bad_beta_raises(beta):
    with pytest.raises(ValueError, match="beta"):
        losses.npo(LP, REF, beta)


def test_kl_against_hand_computation():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    kl_pq = float((p * (p / q).log()).sum())
    kl_qp = float((q * (q / p).log()).sum())
    policy = torch.stack([p.log(), q.log()]).unsqueeze(0)  # [1, 2 tokens, 3]
    ref = torch.stack([q.log(), q.log()]).unsqueeze(0)
    mask = torch.tensor([[1, 1]])
    # token 2 has policy == ref: KL 0, so the mean over two tokens halves token 1's KL
    assert losses.kl(policy, ref, mask).item() == pytest.approx(kl_pq / 2)
    assert losses.kl(policy, ref, mask, direction="ref||policy").item() == pytest.approx(kl_qp / 2)
    # masking token 2 out leaves token 1 alone
    assert losses.kl(policy, ref, torch.tensor([[1, 0]])).item() == pytest.approx(kl_pq)
    # logits shifted by a constant are the same distribution, up to float64 rounding of the
    # shifted log-softmax (3 terms, 2 tokens): 3.5e-15; measured 2.8e-17 (was abs=1e-12)
    atol = rounding_bound(torch.float64, 3 * 2, (policy + 3.0).abs().max().item())
    assert losses.kl(policy + 3.0, policy, mask).item() == pytest.approx(0.0, abs=atol)
    with pytest.raises(ValueError, match="direction"):
        losses.kl(policy, ref, mask, direction="forward")


def test_kl_gradient_against_autograd():
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert torch.autograd.gradcheck(lambda x: losses.kl(x, ref, mask), (policy,))
