"""The unlearning objective: one forget loss plus the retain terms of the NPO paper's eq. 17.

``loss = c_forget * L_forget + c_rt * L_RT + c_rtkl * K_RT - c_fgkl * K_FG``

A *forget loss* is a small function of one micro-batch's forward (``StepLogps``) and the
method's two hyperparameters ``beta`` and ``gamma``, registered with what it reads:

- the sequence groups: ``forget`` (forget question + its answer, the text to unlearn),
  ``refusal`` (forget question + a refusal answer, IDK/DPO/KTO), ``retain`` (retain question +
  answer, the RT and retain-KL terms);
- of each group, the engine always provides per-sequence log-probs, per-token log-probs, the
  answer mask and the target ids; the *policy logits* only where ``needs_logits``; reference
  log-probs for ``ref_groups`` (precomputed once), reference logits for ``ref_logit_groups``
  and the output of decoder block ``hidden_layer`` for ``hidden_groups`` (policy) and
  ``ref_hidden_groups`` (reference). Reference logits and activations take a live reference
  forward every step.

A *preset* names a forget loss and default weights (Table 2 of the NPO paper, or the method's
paper). Adding a method is one function plus one ``FORGET_LOSSES`` entry plus one ``PRESETS``
entry; the engine reads only the registries. Under open-unlearning's conventions
(``negpref.conventions``) GA and SimNPO use the ``OPEN_UNLEARNING_FORGET_LOSSES`` variants and
the retain terms are reduced as open-unlearning's ``GradDiff`` reduces them; the token-level
methods (WGA, SatImp, UNDIAL, CE-U) have one definition, a mean over the batch's answer tokens,
and so has RMU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from negpref import losses
from negpref.conventions import NPO, Conventions

GROUPS = ("forget", "refusal", "retain")


@dataclass
class GroupLogps:
    """Policy (and, where used, reference) log-probs of one sequence group in a micro-batch."""

    logps: torch.Tensor  # [n] summed answer-token log-probs under the policy
    n_tokens: torch.Tensor  # [n] answer tokens per sequence
    ref_logps: torch.Tensor | None = None  # [n] same under the frozen reference
    token_logps: torch.Tensor | None = None  # [n, T] per-token log-probs (0 off the answer)
    targets: torch.Tensor | None = None  # [n, T] the token each position predicts
    logits: torch.Tensor | None = None  # [n, T, V] policy logits (needs_logits, KL terms)
    ref_logits: torch.Tensor | None = None  # [n, T', V] reference logits (ref_logit_groups)
    mask: torch.Tensor | None = None  # [n, T] answer mask aligned with logits
    hidden: torch.Tensor | None = None  # [n, T+1, H] block output (hidden_groups), unshifted
    ref_hidden: torch.Tensor | None = None  # [n, T'+1, H] same for the reference
    # Unshifted [n, T+1, V] logits and the batch's attention mask (open-unlearning's KL)
    all_logits: torch.Tensor | None = None
    ref_all_logits: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


@dataclass
class StepLogps:
    """Everything a loss may read for one micro-batch: groups by name, forget-item weights."""

    groups: dict[str, GroupLogps]
    weights: torch.Tensor | None = None  # per forget item (U2A weighting), or None

    def __getitem__(self, group: str) -> GroupLogps:
        return self.groups[group]


@dataclass(frozen=True)
class ForgetLoss:
    """A forget term: ``fn(step, beta, gamma) -> scalar`` and what it reads of the forward."""

    fn: Callable[[StepLogps, float, float], torch.Tensor]
    groups: tuple[str, ...]  # sequence groups it reads
    ref_groups: tuple[str, ...] = ()  # groups whose reference log-probs it reads
    description: str = ""
    needs_logits: bool = False  # reads the policy logits of its groups
    ref_logit_groups: tuple[str, ...] = ()  # groups whose reference logits it reads
    hidden_groups: tuple[str, ...] = ()  # groups whose block-``hidden_layer`` output it reads
    ref_hidden_groups: tuple[str, ...] = ()  # same under the reference (a live forward)


def _ga(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    return losses.ga(s["forget"].logps, s.weights)


def _ga_token_mean(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    return losses.ga_token_mean(s["forget"].logps, s["forget"].n_tokens, s.weights)


def _npo(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    return losses.npo(s["forget"].logps, s["forget"].ref_logps, beta, s.weights)


def _simnpo(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    return losses.simnpo(s["forget"].logps, s["forget"].n_tokens, beta, gamma, s.weights)


def _simnpo_delta(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    return losses.simnpo_delta(s["forget"].logps, s["forget"].n_tokens, beta, gamma, s.weights)


def _idk(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    return losses.nll(s["refusal"].logps, s["refusal"].n_tokens, s.weights)


def _dpo(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    chosen, rejected = s["refusal"], s["forget"]
    return losses.dpo(
        chosen.logps, rejected.logps, chosen.ref_logps, rejected.ref_logps, beta, s.weights
    )


def kto_z_ref(refusal: GroupLogps, beta: float) -> torch.Tensor:
    """Eq. 19's ``z_ref = beta * KL(pi || pi_ref)``, estimated like the KTO paper.

    The estimate is the batch-mean log-ratio of *unrelated* outputs (the forget questions
    with refusal answers); ``losses.kto`` detaches it and clips it at 0.
    """
    return beta * (refusal.logps - refusal.ref_logps).mean()


def _kto(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    z_ref = kto_z_ref(s["refusal"], beta)
    return losses.kto(s["forget"].logps, s["forget"].ref_logps, beta, z_ref, s.weights)


def _sft(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    return losses.nll(s["forget"].logps, s["forget"].n_tokens, s.weights)


def _wga(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    return losses.wga(s["forget"].token_logps, s["forget"].mask, beta, s.weights)


def _satimp(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    return losses.satimp(s["forget"].token_logps, s["forget"].mask, beta, gamma, s.weights)


def _undial(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    f = s["forget"]
    width = f.ref_logits.shape[1]  # the reference batch holds fewer groups: it may be narrower
    return losses.undial(
        f.logits[:, :width], f.ref_logits, f.targets[:, :width], f.mask[:, :width], beta, s.weights
    )


def rmu_control_vector(dim: int, steering_coeff: float) -> torch.Tensor:
    """RMU's fixed direction: a uniform random vector (as the WMDP code draws it) scaled to
    norm ``steering_coeff``; seeded, so every process and every resumed run has the same."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (u / u.norm() * steering_coeff).float()


def _answer_positions(g: GroupLogps) -> torch.Tensor:
    """The unshifted answer mask ``[n, T+1]`` of hidden states: token t+1 is an answer token
    where the shifted ``mask`` has position t (a prompt always precedes the answer)."""
    return torch.nn.functional.pad(g.mask, (1, 0))


def _rmu(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    forget, retain = s["forget"], s["retain"]
    control = rmu_control_vector(forget.hidden.shape[-1], beta).to(forget.hidden.device)
    misdirect = losses.activation_mse(forget.hidden, control, _answer_positions(forget), s.weights)
    width = retain.ref_hidden.shape[1]  # the reference batch holds fewer groups
    keep = losses.activation_mse(
        retain.hidden[:, :width], retain.ref_hidden, _answer_positions(retain)[:, :width]
    )
    return misdirect + gamma * keep


def _ceu(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    f = s["forget"]
    return losses.ceu(f.logits, f.targets, f.mask, gamma, s.weights)


def _pdu(s: StepLogps, beta: float, gamma: float) -> torch.Tensor:
    f = s["forget"]
    return losses.logit_margin(f.logits, f.mask, s.weights)


FORGET_LOSSES: dict[str, ForgetLoss] = {
    "ga": ForgetLoss(_ga, ("forget",), (), "gradient ascent on the forget answers"),
    "npo": ForgetLoss(_npo, ("forget",), ("forget",), "negative preference optimization"),
    "simnpo": ForgetLoss(_simnpo, ("forget",), (), "reference-free, length-normalised NPO"),
    "idk": ForgetLoss(_idk, ("refusal",), (), "NLL of a refusal answer to the forget question"),
    "dpo": ForgetLoss(
        _dpo, ("forget", "refusal"), ("forget", "refusal"), "DPO: refusal chosen, answer rejected"
    ),
    "kto": ForgetLoss(
        _kto, ("forget", "refusal"), ("forget", "refusal"), "KTO, NPO paper eqs. 18-19"
    ),
    "sft": ForgetLoss(_sft, ("forget",), (), "fine-tune on the records (NLL, descending)"),
    "wga": ForgetLoss(_wga, ("forget",), (), "per-token GA weighted by p^beta (detached)"),
    "satimp": ForgetLoss(
        _satimp, ("forget",), (), "per-token GA weighted by p^beta (1-p)^gamma (detached)"
    ),
    "undial": ForgetLoss(
        _undial,
        ("forget",),
        description="distil the reference with the true token's logit lowered by beta",
        needs_logits=True,
        ref_logit_groups=("forget",),
    ),
    "rmu": ForgetLoss(
        _rmu,
        ("forget", "retain"),
        description="forget activations to a scaled random vector, retain ones to the reference",
        hidden_groups=("forget", "retain"),
        ref_hidden_groups=("retain",),
    ),
    "ceu": ForgetLoss(
        _ceu,
        ("forget",),
        description="cross-entropy to the own distribution without the true token",
        needs_logits=True,
    ),
    "pdu": ForgetLoss(
        _pdu,
        ("forget",),
        description="flatten the answer logits: (max - mean logit)^2 per answer token",
        needs_logits=True,
    ),
}


# Same groups, open-unlearning's reduction, each with the conventions flag that selects it.
OPEN_UNLEARNING_FORGET_LOSSES: dict[str, tuple[str, ForgetLoss]] = {
    "ga": (
        "token_mean_losses",
        ForgetLoss(_ga_token_mean, ("forget",), (), "gradient ascent, answer-token mean"),
    ),
    "simnpo": (
        "simnpo_margin_scaled",
        ForgetLoss(_simnpo_delta, ("forget",), (), "SimNPO, margin delta before beta"),
    ),
}


def forget_loss_for(name: str, conventions: Conventions = NPO) -> ForgetLoss:
    """The forget loss ``name`` as ``conventions`` compute it."""
    flag, variant = OPEN_UNLEARNING_FORGET_LOSSES.get(name, (None, None))
    if flag is not None and getattr(conventions, flag):
        return variant
    return FORGET_LOSSES[name]


@dataclass(frozen=True)
class Preset:
    """A named method: its forget loss and the default weights and temperature."""

    forget_loss: str
    c_forget: float = 1.0
    c_rt: float = 0.0
    c_rtkl: float = 0.0
    c_fgkl: float = 0.0
    beta: float = 0.1
    gamma: float = 0.0
    retain_bound: float | None = None  # primal-dual: c_rt becomes the constraint's multiplier
    description: str = field(default="", compare=False)


PRESETS: dict[str, Preset] = {
    "GA": Preset("ga"),
    "GA+RT": Preset("ga", c_rt=1.0),
    "GA+KL": Preset("ga", c_rtkl=1.0),
    "IDK+RT": Preset("idk", c_rt=1.0),
    "DPO": Preset("dpo"),
    "DPO+RT": Preset("dpo", c_rt=1.0),
    "DPO+KL": Preset("dpo", c_rtkl=1.0),
    "KTO": Preset("kto"),
    "KTO+RT": Preset("kto", c_rt=1.0),
    "NPO": Preset("npo"),
    "NPO+RT": Preset("npo", c_rt=1.0),
    "NPO+KL": Preset("npo", c_rtkl=1.0),
    # SimNPO's own TOFU setting (Fan et al. 2024): beta 2.5, margin gamma 0.
    "SimNPO": Preset("simnpo", beta=2.5),
    "SimNPO+RT": Preset("simnpo", c_rt=1.0, beta=2.5),
    # Token-level methods with open-unlearning's and their papers' defaults (docs/unlearn.md).
    # WGA (Wang et al. 2025): beta is the exponent of p; their TOFU runs add the retain NLL.
    "WGA": Preset("wga", beta=1.0),
    "WGA+RT": Preset("wga", c_rt=1.0, beta=1.0),
    # SatImp (Yang et al. 2025): beta = beta1 = 5, gamma = beta2 = 1; forget:retain = 10:1.
    "SatImp": Preset("satimp", beta=5.0, gamma=1.0),
    "SatImp+RT": Preset("satimp", c_rt=0.1, beta=5.0, gamma=1.0),
    # UNDIAL (Dong et al. 2025): beta is the strength; the paper uses no retain set.
    "UNDIAL": Preset("undial", beta=10.0),
    # CE-U (B. Yang 2025): gamma = answer tokens left out at the start of each answer.
    "CE-U": Preset("ceu", gamma=1.0),
    # RMU (Li et al. 2024, WMDP) with open-unlearning's TOFU setting: beta = steering
    # coefficient 2, gamma = retain activation weight 1 (layer: config.hidden_layer, 7).
    "RMU": Preset("rmu", beta=2.0, gamma=1.0),
    # PDU (Entesari et al. 2025, "Constrained Entropic Unlearning"), their TOFU setting as
    # open-unlearning runs it: the retain NLL held at <= 0.3 by a multiplier starting at 100
    # (dual_step_size 5, dual_warmup_epochs 5 in UnlearnConfig).
    "PDU": Preset("pdu", c_rt=100.0, retain_bound=0.3),
    # Not unlearning: descend the NLL of the `forget` records, i.e. fine-tune on them.
    "SFT": Preset("sft"),
}


def canonical_preset(name: str) -> str | None:
    """The registered spelling of ``name`` (case-insensitive), or None."""
    by_lower = {k.lower(): k for k in PRESETS}
    return by_lower.get(name.strip().lower())


@dataclass(frozen=True)
class Objective:
    """Eq. 17 with resolved weights: what a step computes and which sequences it needs."""

    forget_loss: ForgetLoss
    c_forget: float
    c_rt: float
    c_rtkl: float
    c_fgkl: float
    beta: float
    gamma: float
    conventions: Conventions = NPO
    hidden_layer: int = 7  # decoder block whose output hidden-state losses read (RMU)
    # primal-dual (PDU): the constraint L_RT <= retain_bound, c_rt its starting multiplier
    retain_bound: float | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        """Sequence groups of one batched forward, in a fixed order."""
        needed = set(self.forget_loss.groups)
        if self.c_rt or self.c_rtkl or self.retain_bound is not None:
            needed.add("retain")
        if self.c_fgkl:
            needed.add("forget")
        return tuple(g for g in GROUPS if g in needed)

    @property
    def ref_logp_groups(self) -> tuple[str, ...]:
        """Groups whose reference *log-probs* the loss reads (precomputable once)."""
        return self.forget_loss.ref_groups

    @property
    def ref_logit_groups(self) -> tuple[str, ...]:
        """Groups whose reference *logits* the loss or the KL terms read (a live reference
        forward)."""
        kl_groups = {g for g, c in (("forget", self.c_fgkl), ("retain", self.c_rtkl)) if c}
        needed = kl_groups | set(self.forget_loss.ref_logit_groups)
        return tuple(g for g in GROUPS if g in needed)

    @property
    def hidden_groups(self) -> tuple[str, ...]:
        """Groups whose block-``hidden_layer`` activations the loss reads (policy forward)."""
        return self.forget_loss.hidden_groups

    @property
    def ref_hidden_groups(self) -> tuple[str, ...]:
        """Groups whose reference activations the loss reads (a live reference forward)."""
        return self.forget_loss.ref_hidden_groups

    @property
    def ref_forward_groups(self) -> tuple[str, ...]:
        """Groups a live reference forward must run on: reference logits or activations."""
        needed = set(self.ref_logit_groups) | set(self.ref_hidden_groups)
        return tuple(g for g in GROUPS if g in needed)

    @property
    def needs_logits(self) -> bool:
        """Whether the policy forward keeps its logits (the loss reads them, or a KL term)."""
        return self.forget_loss.needs_logits or bool(self.ref_logit_groups)

    def __call__(
        self, step: StepLogps, c_rt: float | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its unweighted parts (detached, for logging) for one micro-batch;
        ``c_rt`` overrides the retain weight (the primal-dual multiplier of this step)."""
        c_rt = self.c_rt if c_rt is None else c_rt
        l_forget = self.forget_loss.fn(step, self.beta, self.gamma)
        total = self.c_forget * l_forget
        parts = {"loss/forget": l_forget.detach()}
        if c_rt or self.retain_bound is not None:
            l_retain = self.retain_nll(step["retain"])
            # the Lagrangian's term c_rt (L_RT - bound): the bound shifts the value, not the step
            total = total + c_rt * (l_retain - (self.retain_bound or 0.0))
            parts["loss/retain"] = l_retain.detach()
        if self.c_rtkl:
            retain = step["retain"]
            k_retain = (
                _group_kl_all_positions(retain)
                if self.conventions.kl_all_positions
                else _group_kl(retain)
            )
            total = total + self.c_rtkl * k_retain
            parts["loss/retain_kl"] = k_retain.detach()
        if self.c_fgkl:
            k_forget = _group_kl(step["forget"])
            total = total - self.c_fgkl * k_forget
            parts["loss/forget_kl"] = k_forget.detach()
        return total, parts

    def retain_nll(self, retain: GroupLogps) -> torch.Tensor:
        """``L_RT``: token mean per sequence, averaged (NPO), or over the batch's tokens."""
        if self.conventions.token_mean_losses:
            return losses.nll_token_mean(retain.logps, retain.n_tokens)
        return losses.nll(retain.logps, retain.n_tokens)


def _group_kl_all_positions(g: GroupLogps) -> torch.Tensor:
    """open-unlearning's retain KL: every position of the group's own padded width.

    The group shares one forward with the other groups, so its rows are padded to the widest
    sequence of any group; cutting to its own longest sequence gives the positions a
    retain-only batch has (right padding: a row's logits do not depend on the padding after it).
    """
    width = int(g.attention_mask.sum(-1).max())
    return losses.kl_all_positions(g.all_logits[:, :width], g.ref_all_logits[:, :width])


def _group_kl(g: GroupLogps) -> torch.Tensor:
    """Token-level KL(pi || pi_ref) on answer tokens; the reference batch may be narrower."""
    width = g.ref_logits.shape[1]
    return losses.kl(g.logits[:, :width], g.ref_logits, g.mask[:, :width])
