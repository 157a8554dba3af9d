"""U2A — Unlearning to Align: choose and weight the negative samples worth unlearning.

- ``types``: shared types (``Grads``, the ``ForgetTask`` / ``AlignmentObjective`` protocols,
  ``U2AWarning``), imported by the other modules, which never import each other in a circle;
- ``implicit``: per-sample gradients, Hessian-vector products, marginal gains (eq. 9);
- ``algorithm``: Algorithm 1 (``run_u2a``): selection, mirror descent on the simplex, the inner
  unlearning problem (``weighted_unlearn``), resumable rounds;
- ``objectives``: causal-LM forget tasks (the unlearning registry's GA, GA+RT, NPO, NPO+RT) and
  alignment objectives (held-out DPO, rewards of sampled responses);
- ``config``: ``U2AConfig`` (Algorithm 1) and ``U2ARunConfig`` (a whole job);
- ``job``: ``run(U2ARunConfig)``, what ``negpref u2a`` calls; ``report``: its figures.

Paper reproductions (the softmax check, the Figure 4 ablation) are in ``negpref.studies``.
"""

from negpref.u2a.algorithm import (
    FunctionObjective,
    U2AResult,
    entropy,
    floor_weights,
    inverse_hvp,
    mirror_descent_step,
    run_u2a,
    sparsity_gradient,
    top_new,
    update_weights,
    weighted_unlearn,
)
from negpref.u2a.config import U2A_METHODS, U2AConfig, U2ARunConfig, u2a_method
from negpref.u2a.implicit import (
    conjugate_gradient,
    grads_of,
    implicit_gains,
    inner_hvp,
    per_sample_grads,
    trainable,
)
from negpref.u2a.job import U2ARun, run
from negpref.u2a.objectives import (
    LMForgetTask,
    NegDPOObjective,
    RewardObjective,
    load_negatives,
)
from negpref.u2a.types import AlignmentObjective, ForgetTask, Grads, U2AWarning

__all__ = [
    "U2A_METHODS",
    "AlignmentObjective",
    "ForgetTask",
    "FunctionObjective",
    "Grads",
    "LMForgetTask",
    "NegDPOObjective",
    "RewardObjective",
    "U2AConfig",
    "U2AResult",
    "U2ARun",
    "U2ARunConfig",
    "U2AWarning",
    "conjugate_gradient",
    "entropy",
    "floor_weights",
    "grads_of",
    "implicit_gains",
    "inner_hvp",
    "inverse_hvp",
    "load_negatives",
    "mirror_descent_step",
    "per_sample_grads",
    "run",
    "run_u2a",
    "sparsity_gradient",
    "top_new",
    "trainable",
    "u2a_method",
    "update_weights",
    "weighted_unlearn",
]
