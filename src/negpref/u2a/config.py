"""``U2AConfig`` (Algorithm 1's settings) and ``U2ARunConfig`` (a whole ``negpref u2a`` job):
documented dataclasses, loadable from YAML and flags (``negpref.config``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from negpref.config import require
from negpref.errors import NegprefError
from negpref.unlearn.objectives import PRESETS, canonical_preset

# The unlearning registry's methods whose loss is a per-sample forget loss (weighted by U2A)
# plus at most the retain NLL: the inner problem of eq. 8. KL terms and refusal answers are
# not per-sample losses of a negative, so their methods have no U2A form.
U2A_METHODS = ("GA", "GA+RT", "NPO", "NPO+RT")


def u2a_method(name: str) -> str:
    """The registry spelling (``negpref.unlearn.objectives.PRESETS``) of a U2A method."""
    canonical = canonical_preset(name)
    if canonical not in U2A_METHODS:
        raise NegprefError(f"loss: must be one of {', '.join(U2A_METHODS)}, got {name!r}")
    return canonical


def needs_retain(method: str) -> bool:
    return PRESETS[u2a_method(method)].c_rt > 0


@dataclass
class U2AConfig:
    """Hyper-parameters of Algorithm 1 (paper defaults where the paper gives one)."""

    rounds: int = field(default=10, metadata={"help": "T: maximum number of rounds"})
    init_size: int = field(default=16, metadata={"help": "M: samples selected in round 1"})
    per_round: int = field(default=8, metadata={"help": "N: samples added per later round"})
    delta: float = field(
        default=0.01,
        metadata={"help": "early stop when g improves by no more than this (negative: never)"},
    )
    reg_lambda: float = field(
        default=1.0, metadata={"help": "lambda of the inner regulariser lambda*||theta-theta0||^2"}
    )
    beta: float = field(default=0.5, metadata={"help": "weight of the sqrt sparsity term"})
    md_step_size: float = field(
        default=0.03, metadata={"help": "eta of the mirror-descent (eq. 12) weight update"}
    )
    md_steps: int = field(default=5, metadata={"help": "mirror-descent steps per round"})
    hessian: str = field(
        default="identity",
        metadata={
            "help": "H^-1: identity (paper's diagonal assumption) or cg",
            "choices": ["identity", "cg"],
        },
    )
    gamma: float = field(
        default=1.0, metadata={"help": "diagonal assumption hess l_i = I/gamma (hessian=identity)"}
    )
    cg_iters: int = field(
        default=10, metadata={"help": "conjugate-gradient iterations (hessian=cg)"}
    )
    inner_steps: int = field(
        default=20, metadata={"help": "optimizer steps of the inner problem per round"}
    )
    inner_learning_rate: float = field(
        default=1e-4,
        metadata={"help": "learning rate of the inner (unlearning) problem; the outer step on "
                  "the weights is md_step_size"},
    )  # fmt: skip
    inner_optimizer: str = field(
        default="adamw",
        metadata={"help": "optimizer of the inner problem", "choices": ["adamw", "sgd"]},
    )
    batch_size: int = field(default=8, metadata={"help": "samples per inner step / HVP chunk"})
    grad_chunk: int = field(
        default=16,
        metadata={"help": "samples per vectorised per-sample-gradient call (memory bound)"},
    )
    min_weight: float = field(
        default=1e-8, metadata={"help": "weights below this are floored and renormalised"}
    )
    seed: int = field(default=0, metadata={"help": "fixes the inner minibatch order"})

    def validate(self) -> None:
        for name in (
            "rounds",
            "init_size",
            "per_round",
            "md_steps",
            "cg_iters",
            "batch_size",
            "grad_chunk",
        ):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
        require(self.inner_steps >= 0, "inner_steps", self.inner_steps, "must be >= 0")
        require(math.isfinite(self.delta), "delta", self.delta, "must be finite")
        require(self.beta >= 0, "beta", self.beta, "must be >= 0")
        for name in ("reg_lambda", "md_step_size", "gamma", "inner_learning_rate"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        require(0 < self.min_weight < 1, "min_weight", self.min_weight, "must be in (0, 1)")
        require(
            self.hessian in ("identity", "cg"), "hessian", self.hessian, "must be identity or cg"
        )
        require(
            self.inner_optimizer in ("adamw", "sgd"),
            "inner_optimizer",
            self.inner_optimizer,
            "must be adamw or sgd",
        )


@dataclass
class U2ARunConfig(U2AConfig):
    """Everything ``negpref u2a`` / ``negpref.u2a.run`` needs: Algorithm 1's settings plus data,
    model, objective and output folder."""

    model: str = field(default="", metadata={"help": "model directory (or hub id when online)"})
    gguf: str = field(default="", metadata={"help": "GGUF file (path, or name inside model)"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    forget: str = field(default="", metadata={"help": "candidate negatives (JSON / JSONL)"})
    loss: str = field(
        default="GA",
        metadata={"help": f"unlearning method of the registry: {', '.join(U2A_METHODS)}"},
    )
    retain: str = field(default="", metadata={"help": "retain set for GA+RT / NPO+RT"})
    retain_weight: float = field(default=1.0, metadata={"help": "weight of the retain NLL"})
    npo_beta: float = field(default=0.1, metadata={"help": "beta of NPO"})
    objective: str = field(
        default="dpo",
        metadata={"help": "alignment objective J", "choices": ["dpo", "reward"]},
    )
    preference: str = field(default="", metadata={"help": "held-out prompt/chosen/rejected (dpo)"})
    dpo_beta: float = field(default=0.1, metadata={"help": "beta of the DPO objective"})
    prompts: str = field(default="", metadata={"help": "prompts to sample from (reward)"})
    reward: str = field(default="", metadata={"help": "reward: registered name or module:function"})
    reward_model: str = field(default="", metadata={"help": "sequence-classification reward model"})
    reward_samples: int = field(default=4, metadata={"help": "samples per prompt (reward)"})
    max_new_tokens: int = field(default=32, metadata={"help": "sampled response length (reward)"})
    max_length: int = field(default=256, metadata={"help": "max tokens of prompt + response"})
    lora: bool = field(default=True, metadata={"help": "train LoRA adapters (else all weights)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "LoRA target modules"}
    )
    out: str = field(default="", metadata={"help": "output directory"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing out directory"})
    resume: bool = field(
        default=False, metadata={"help": "continue a killed run after its last saved round"}
    )

    def validate(self) -> None:
        super().validate()
        require(bool(self.model or self.gguf), "model", self.model, "give model or gguf")
        require(bool(self.forget), "forget", self.forget, "give the candidate negatives file")
        require(bool(self.out), "out", self.out, "give an output directory")
        self.loss = u2a_method(self.loss)
        if needs_retain(self.loss):
            require(bool(self.retain), "retain", self.retain, f"loss {self.loss} needs it")
        if self.objective == "dpo":
            require(bool(self.preference), "preference", self.preference, "objective dpo needs it")
        else:
            require(bool(self.prompts), "prompts", self.prompts, "objective reward needs it")
            require(
                bool(self.reward) != bool(self.reward_model),
                "reward",
                self.reward,
                "objective reward needs exactly one of reward and reward_model",
            )
        for name in ("reward_samples", "max_new_tokens", "max_length", "lora_r"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
