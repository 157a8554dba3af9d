"""Generalized-link DPO (Proposition 4.1), the MC-PO kernels and the ranking-NCE loss."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.optimize import minimize_scalar

from conftest import rounding_bound
from negpref import losses
from negpref.align import links, mcpo


def _logps(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [(-20 + 5 * torch.randn(n, generator=g, dtype=torch.float64)) for _ in range(4)]


def _closed_form_atol(*logps):
    """float64 rounding of a closed form: ~10 roundings on values of the log-probs' size."""
    return rounding_bound(torch.float64, 10, max(t.abs().max().item() for t in logps))


def test_power_link_is_dpo_up_to_a_reference_constant_values_and_gradients():
    pc, pr, rc, rr = _logps()
    beta = 0.3
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    per_tuple = links.link_losses(pc, pr, rc, rr, beta, "power")
    dpo_per_tuple = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    # eq. 27: log(u_theta^l + u_ref^l) = -log sigma(l * margin) + l * log u_ref
    atol = _closed_form_atol(pc, pr, rc, rr)  # 6.9e-14 here; measured 4.4e-16 (was 1e-12)
    torch.testing.assert_close(per_tuple, dpo_per_tuple + beta * (rr - rc), rtol=0, atol=atol)
    link_loss = links.link_dpo(pc, pr, rc, rr, beta, "power")
    dpo_loss = losses.dpo(pc, pr, rc, rr, beta)
    g_link = torch.autograd.grad(link_loss, (pc, pr))
    g_dpo = torch.autograd.grad(dpo_loss, (pc, pr))
    for a, b in zip(g_link, g_dpo, strict=True):  # beta * sigma(.) / n is 1-Lipschitz in the margin
        torch.testing.assert_close(a, b, rtol=0, atol=atol)  # measured 6.9e-18


def test_gaussian_objective_minimised_over_gamma_matches_closed_form_and_scipy():
    pc, pr, rc, rr = _logps(1, 3)
    beta = 0.5
    for name in links.LINKS:
        xi_theta = torch.exp(links.log_link(name, pr - pc, beta))
        xi_ref = torch.exp(links.log_link(name, rr - rc, beta))
        closed = links.link_losses(pc, pr, rc, rr, beta, name)
        for i in range(3):

            def nll(log_gamma, i=i, xt=xi_theta, xr=xi_ref):
                gamma = torch.tensor(math.exp(log_gamma), dtype=torch.float64)
                return links.gaussian_nll(xt[i], xr[i], gamma).item()

            best = minimize_scalar(
                nll, bounds=(-80, 20), method="bounded", options={"xatol": 1e-10}
            )
            gamma_star = links.optimal_gamma(xi_theta[i], xi_ref[i])
            # The nll has second derivative 1 in log gamma at its minimum, so it locates the
            # minimum only to d with d^2 / 2 = its own rounding (~4 roundings), plus Brent's
            # xatol; d log gamma = d gamma / gamma. Measured 4.9e-8 (was rel=1e-6).
            nll_rounding = rounding_bound(torch.float64, 4, abs(best.fun))
            located = math.sqrt(2 * nll_rounding) + 1e-10
            assert math.exp(best.x) == pytest.approx(gamma_star.item(), rel=located)
            # eq. 25: min over gamma = 1 + log(pi) + log(xi_theta^2 + xi_ref^2); off the minimum
            # by d^2 / 2 <= one nll rounding, plus the rounding of both sides. Measured 8.9e-16
            # (was abs=1e-9).
            expected = 1 + math.log(math.pi) + closed[i].item()
            assert best.fun == pytest.approx(expected, abs=3 * nll_rounding)


def test_cdf_links_against_scipy():
    log_u = torch.tensor([-3.0, -0.2, 0.0, 1.5], dtype=torch.float64)
    lam = 0.7
    s = (lam * log_u).numpy()
    expected = {
        "logistic": np.log(1 / (1 + np.exp(-s))),
        "probit": stats.norm.logcdf(s),
        "cloglog": np.log(1 - np.exp(-np.exp(s))),
        "power": s / 2,
    }
    # float64 rounding of two closed forms (~16 roundings), relative. Measured 2.1e-16 (was 1e-12)
    rtol = rounding_bound(torch.float64, 16, 1.0)
    for name, values in expected.items():
        np.testing.assert_allclose(links.log_link(name, log_u, lam).numpy(), values, rtol=rtol)
    extreme = torch.tensor([-500.0, 500.0], dtype=torch.float64, requires_grad=True)
    for name in links.LINKS:
        value = links.link_losses(extreme, -extreme, torch.zeros(2), torch.zeros(2), 1.0, name)
        (grad,) = torch.autograd.grad(value.sum(), extreme)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all(), name
    with pytest.raises(ValueError, match="unknown link"):
        links.log_link("cubic", log_u, 1.0)


def test_exact_kernel_draws_follow_the_softmax():
    scores = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    result = mcpo.draw(scores, mask, 0.5, 0, 20000, torch.Generator().manual_seed(0))
    target = torch.softmax(scores / 0.5 + torch.where(mask, 0.0, -torch.inf), -1)
    torch.testing.assert_close(result.probs, target.float())
    for row in range(2):
        counts = torch.bincount(result.indices[row], minlength=4).numpy()
        assert counts[3] == 0 or row == 0  # the masked candidate is never drawn
        k = int(mask[row].sum())
        expected = target[row, :k].double() / target[row, :k].double().sum() * counts.sum()
        assert stats.chisquare(counts[:k], expected.numpy()).pvalue > 1e-3
    expected_entropy = -(target * target.clamp_min(1e-30).log()).sum(-1)
    torch.testing.assert_close(result.entropy, expected_entropy.float())
    assert result.hardest.tolist() == [2, 0]
    assert result.accept_rate == 1.0


def test_independence_mh_chain_converges_to_the_target():
    scores = torch.tensor([[0.0, 1.0, 2.0, 0.5, -2.0]])
    mask = torch.ones_like(scores, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    result = mcpo.draw(scores, mask, 1.0, 30, 20000, gen)
    counts = torch.bincount(result.indices[0], minlength=5).numpy()
    target = torch.softmax(scores[0].double(), -1).numpy()
    assert stats.chisquare(counts, target / target.sum() * counts.sum()).pvalue > 1e-3
    assert 0 < result.accept_rate < 1
    one_step = mcpo.draw(scores, mask, 1.0, 1, 20000, gen)  # a short chain stays near uniform
    one_step_counts = torch.bincount(one_step.indices[0], minlength=5).numpy() / 20000
    assert abs(one_step_counts - target).sum() > 0.1


def test_temperature_limits():
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    mask = torch.ones_like(scores, dtype=torch.bool)
    hot = mcpo.draw(scores, mask, 1e6, 0, 1)
    cold = mcpo.draw(scores, mask, 1e-3, 0, 50)
    # softmax(s / T) = (1 + (s - mean s) / T) / 3 + O(T^-2): |s - mean s| <= 1 here, plus fp32
    # rounding of 3 terms. 4.5e-7; measured 3.6e-7 (was 1e-5)
    atol = 1 / (3 * 1e6) + rounding_bound(torch.float32, 3, 1 / 3)
    torch.testing.assert_close(hot.probs, torch.full((1, 3), 1 / 3), atol=atol, rtol=0)
    assert cold.indices.eq(2).all() and cold.hardest_hit_rate == 1.0
    with pytest.raises(ValueError, match="temperature"):
        mcpo.kernel_log_probs(scores, mask, 0.0)


def test_ranking_nce_reduces_to_dpo_with_one_negative_and_counts_all_negatives():
    pc, pr, rc, rr = _logps(2)
    beta = 0.2
    chosen, rejected = pc - rc, pr - rr
    one = mcpo.ranking_nce(chosen, rejected[:, None], torch.ones(6, 1, dtype=torch.bool), beta)
    atol = _closed_form_atol(pc, pr, rc, rr)  # measured 0 (was 1e-12)
    torch.testing.assert_close(one, losses.dpo(pc, pr, rc, rr, beta), rtol=0, atol=atol)
    negatives = torch.stack([rejected, rejected + 1.0, rejected - 3.0], 1)
    mask = torch.tensor([[True, True, False]] * 6)
    value = mcpo.ranking_nce(chosen, negatives, mask, beta)
    expected = -(
        beta * chosen
        - torch.logsumexp(
            torch.stack([beta * chosen, beta * negatives[:, 0], beta * negatives[:, 1]], 1), 1
        )
    ).mean()
    torch.testing.assert_close(value, expected, rtol=0, atol=atol)  # measured 0
