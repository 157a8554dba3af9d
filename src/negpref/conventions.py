"""The one switch between the NPO paper's conventions and open-unlearning's.

Both compute the same methods; they differ in how a few terms are reduced, which makes numbers
(and learning rates) incomparable across the two unless the same convention is used. Each
difference is one field here; ``docs/conventions.md`` tabulates them. The math of each variant
lives in ``negpref.losses`` / ``negpref.eval.mia``; code reads the flags and picks the function.
"""

from __future__ import annotations

from dataclasses import dataclass

from negpref.errors import NegprefError


@dataclass(frozen=True)
class Conventions:
    name: str
    # GA and the retain NLL: answer-token mean over the batch (True) or mean over sequences of
    # the summed (GA) / token-mean (NLL) log-prob (False, NPO paper eq. 17).
    token_mean_losses: bool
    # Retain KL: KL(ref || policy) over every position (True) or KL(policy || ref) on answer
    # tokens, per-sequence means averaged (False).
    kl_all_positions: bool
    # SimNPO margin: ``delta`` inside the temperature, gamma = beta * delta (True), or gamma
    # added after it (False, SimNPO paper).
    simnpo_margin_scaled: bool
    # Min-K% / Min-K%++: leave the last answer token (EOS) out of the scored tokens.
    mia_drop_eos: bool
    mia_k: float  # default fraction of tokens for Min-K% / Min-K%++


NPO = Conventions(
    "npo",
    token_mean_losses=False,
    kl_all_positions=False,
    simnpo_margin_scaled=False,
    mia_drop_eos=False,
    mia_k=0.2,
)
OPEN_UNLEARNING = Conventions(
    "open-unlearning",
    token_mean_losses=True,
    kl_all_positions=True,
    simnpo_margin_scaled=True,
    mia_drop_eos=True,
    mia_k=0.4,
)
CONVENTIONS = {c.name: c for c in (NPO, OPEN_UNLEARNING)}
DEFAULT = NPO.name


def get_conventions(name: str | Conventions) -> Conventions:
    """The conventions called ``name`` (``npo`` or ``open-unlearning``)."""
    if isinstance(name, Conventions):
        return name
    if name not in CONVENTIONS:
        raise NegprefError(
            f"--conventions: unknown {name!r}; choose one of {', '.join(CONVENTIONS)}"
        )
    return CONVENTIONS[name]
