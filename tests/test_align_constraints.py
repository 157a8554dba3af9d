"""Constrained DPO vs constrained RLHF (Proposition 3.1) and its population losses."""

import json
import math

import pytest
import torch

from conftest import rounding_bound
from negpref.cli import main
from negpref.studies import dpo_constraints as cs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_appendix_c_dpo_is_forward_kl_and_rlhf_is_reverse_kl():
    # Appendix C: two responses, equal pi_ref, lambda = 1 -> up to constants
    # DPO = KL(pi* || pi_theta) and RLHF = KL(pi_theta || pi*), pi* = softmax(r*)
    reward = torch.tensor([[1.0, -0.5], [0.3, 2.0], [0.0, 0.0]], dtype=torch.float64)
    problem = cs.Problem(reward, torch.full_like(reward, math.log(0.5)), 1.0)
    pi_star = torch.log_softmax(reward, -1)
    gen = torch.Generator().manual_seed(0)
    dpo_offsets, rlhf_offsets = [], []
    for _ in range(5):
        log_pi = torch.log_softmax(torch.randn(3, 2, generator=gen, dtype=torch.float64), -1)
        forward_kl = (pi_star.exp() * (pi_star - log_pi)).sum(-1).mean()
        reverse_kl = (log_pi.exp() * (log_pi - pi_star)).sum(-1).mean()
        # each ordered pair (y1, y2) has weight pi_ref(y1) pi_ref(y2) = 1/4
        dpo_offsets.append((cs.dpo_loss(problem, log_pi) / 0.25 - forward_kl).item())
        rlhf_offsets.append((cs.rlhf_loss(problem, log_pi) - reverse_kl).item())
    # each offset is ~16 float64 roundings of values <= 4 (|log pi| <= 2.8, |r| <= 2); a spread
    # is two offsets' error: 2.8e-14; measured 0 and 2.2e-16 (was 1e-12)
    spread_bound = 2 * rounding_bound(torch.float64, 16, 4.0)
    assert max(dpo_offsets) - min(dpo_offsets) <= spread_bound
    assert max(rlhf_offsets) - min(rlhf_offsets) <= spread_bound


def test_unconstrained_optima_coincide_with_pi_star_star():
    problem = cs.make_problem(prompts=2, responses=3, seed=1)
    rlhf = cs.fit_norm(problem, "rlhf", math.inf)
    dpo = cs.fit_norm(problem, "dpo", math.inf)
    optimum = problem.optimum()
    assert cs.kl(rlhf, optimum) < 1e-9 and cs.kl(dpo, optimum) < 1e-9
    full = cs.gap(problem, cs.fit_dim(problem, "rlhf", 6), cs.fit_dim(problem, "dpo", 6))
    assert full["kl_rlhf_dpo"] < 1e-9 and abs(full["reward_gap"]) < 1e-6


def test_constraints_open_a_gap_that_closes_without_them():
    problem = cs.make_problem(prompts=2, responses=3, seed=0)
    dims = cs.sweep(problem, "dim", [1, 2, 4])
    assert dims[0]["kl_rlhf_dpo"] > 1e-4 and dims[0]["rlhf_suboptimality_of_dpo"] > 1e-5
    assert dims[-1]["kl_rlhf_dpo"] < 1e-9  # d = P(R-1) reaches every policy
    # the RLHF optimum of a class is never beaten by the DPO optimum on the RLHF loss
    assert all(r["rlhf_suboptimality_of_dpo"] > -1e-9 for r in dims)
    radius = float(torch.linalg.norm(problem.optimum() - problem.log_ref))
    norms = cs.sweep(problem, "norm", [0.5 * radius, math.inf])
    assert norms[0]["kl_rlhf_dpo"] > 1e-7 and norms[-1]["kl_rlhf_dpo"] < 1e-9
    steps = cs.sweep(problem, "steps", [3, 300])
    assert steps[0]["kl_rlhf_dpo"] > 100 * steps[-1]["kl_rlhf_dpo"]


def test_constraint_study_cli_writes_json_plots_and_report(tmp_path, capsys):
    out = tmp_path / "study"
    argv = [
        "align",
        "constraint-study",
        "--out",
        str(out),
        "--prompts",
        "2",
        "--responses",
        "2",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["sweeps"]) == {"dim", "norm", "steps"}
    assert result["sweeps"]["dim"][-1]["kl_rlhf_dpo"] < 1e-9
    for name in ("constraint_study.json", "constraint_gap.png", "penalty.png", "report.html"):
        assert (out / name).stat().st_size > 0
    assert (out / "penalty.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 2  # exists, no --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["align", "constraint-study", "--out", str(tmp_path / "x"), "--responses", "one"])
    assert (
        main(["align", "constraint-study", "--out", str(tmp_path / "y"), "--responses", "1"]) == 2
    )
    assert "responses: must be >= 2" in capsys.readouterr().err
