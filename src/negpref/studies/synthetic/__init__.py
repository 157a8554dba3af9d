"""The NPO paper's synthetic experiments: Figures 3, 4, 10 and Theorem 2's divergence study."""

from negpref.studies.synthetic.divergence import DivergenceConfig, run_divergence
from negpref.studies.synthetic.study import (
    BetaSweepConfig,
    Figure4Config,
    run_beta_sweep,
    run_figure4,
)
from negpref.studies.synthetic.unlearn import METHODS, PAPER_METHODS, Arm, method_loss, unlearn

__all__ = [
    "METHODS",
    "PAPER_METHODS",
    "Arm",
    "BetaSweepConfig",
    "DivergenceConfig",
    "Figure4Config",
    "method_loss",
    "run_beta_sweep",
    "run_divergence",
    "run_figure4",
    "unlearn",
]
