"""A small language task for U2A at CPU scale, and the paper's Figure 4 ablation on it.

Prompts ask to describe a topic; responses are chains of keywords, good ("kind", "honest",
...) or bad ("rude", "toxic", ...), joined by fillers. The alignment reward of a response is
``(#good - #bad) / (#good + #bad)``. A tiny Llama (``negpref.models.tiny_llama``) is trained
on a corpus that mixes both kinds, plus the candidate negatives themselves. The candidates
differ the way the paper's Figure 2 says negatives differ: *mostly-bad* responses (most
keywords bad: unlearning them should raise the reward) and *mostly-good* responses flagged
negative (one bad keyword among good ones: unlearning them suppresses good keywords too).
``run_ablation_study`` is ``negpref u2a ablation``: the ablation, JSON, figures, report.
"""

from __future__ import annotations

import dataclasses
import random
import re
import statistics
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import torch

from negpref.config import config_to_dict, require
from negpref.io import atomic_write_json, check_out_dir, staged_out_dir
from negpref.models import build_tokenizer, tiny_llama
from negpref.report import Section, write_html_report
from negpref.u2a import (
    LMForgetTask,
    NegDPOObjective,
    RewardObjective,
    U2AConfig,
    implicit_gains,
    inverse_hvp,
    run_u2a,
    trainable,
    u2a_method,
    weighted_unlearn,
)
from negpref.u2a.report import gains_figure, png, settings_section
from negpref.unlearn.dataset import build_data
from negpref.unlearn.trainer import train_in_memory

GOOD = ("great", "kind", "helpful", "safe", "honest", "calm", "clear", "gentle")
BAD = ("awful", "rude", "harmful", "toxic", "cruel", "nasty", "vile", "mean")
FILLERS = ("and", "very", "so", "also", "really")
TOPICS = (
    "river", "garden", "city", "forest", "market", "school", "harbor", "library",
    "museum", "bridge", "valley", "station", "castle", "island", "desert", "village",
)  # fmt: skip
MAX_LENGTH = 48


def keyword_reward(prompt, response: str) -> float:
    """``(#good - #bad) / (#good + #bad)`` over the response's words; 0 without keywords."""
    words = re.findall(r"[a-z]+", response.lower())
    good = sum(w in GOOD for w in words)
    bad = sum(w in BAD for w in words)
    return (good - bad) / max(1, good + bad)


def prompt_for(topic: str) -> str:
    return f"Describe the {topic}."


def response(rng: random.Random, n_good: int, n_bad: int) -> str:
    keywords = [rng.choice(GOOD) for _ in range(n_good)] + [rng.choice(BAD) for _ in range(n_bad)]
    rng.shuffle(keywords)
    text = "it is " + keywords[0]
    for word in keywords[1:]:
        text += f" {rng.choice(FILLERS)} {word}"
    return text


@dataclass
class ToyTask:
    corpus: list[dict]  # prompt/response pairs the base model is trained on
    negatives: list[dict]  # candidate forget set: id, prompt, response, kind
    preferences: list[dict]  # held-out prompt/chosen/rejected for the DPO objective
    prompts: list[str]  # evaluation / reward-objective prompts


def make_task(seed: int = 0, n_mostly_bad: int = 24, n_mostly_good: int = 40) -> ToyTask:
    rng = random.Random(seed)
    corpus = []
    for topic in TOPICS:
        for _ in range(24):
            n_keywords = rng.randint(3, 5)
            n_bad = sum(rng.random() < 0.5 for _ in range(n_keywords))
            corpus.append(
                {"prompt": prompt_for(topic), "response": response(rng, n_keywords - n_bad, n_bad)}
            )
    negatives = []
    for i in range(n_mostly_bad + n_mostly_good):
        topic = rng.choice(TOPICS)
        kind = "mostly_bad" if i < n_mostly_bad else "mostly_good"
        n_good, n_bad = (
            (rng.randint(0, 1), rng.randint(3, 4))
            if kind == "mostly_bad"
            else (rng.randint(3, 4), 1)
        )
        negatives.append(
            {"prompt": prompt_for(topic), "response": response(rng, n_good, n_bad), "kind": kind}
        )
    rng.shuffle(negatives)
    for i, negative in enumerate(negatives):
        negative["id"] = str(i)
    preferences = [
        {
            "prompt": prompt_for(topic),
            "chosen": response(rng, 4, 0),
            "rejected": response(rng, 0, 4),
        }
        for topic in TOPICS
    ]
    return ToyTask(corpus, negatives, preferences, [prompt_for(t) for t in TOPICS])


def pretrain(
    task: ToyTask, seed: int = 0, steps: int = 300, batch_size: int = 32, lr: float = 3e-3
):
    """Tokenizer + tiny Llama fine-tuned on the corpus and the negatives: the unlearning
    engine's ``SFT`` preset (answer-token NLL), constant learning rate, AdamW with torch's
    default decay 0.01, no clipping."""
    pairs = task.corpus + [
        {"prompt": n["prompt"], "response": n["response"]} for n in task.negatives
    ]
    texts = [f"{p['prompt']} {p['response']}" for p in pairs]
    tokenizer = build_tokenizer(texts, vocab_size=600)
    model = tiny_llama(len(tokenizer), seed=seed)
    if steps:
        records = [{"question": p["prompt"], "answer": p["response"]} for p in pairs]
        train_in_memory(
            model,
            tokenizer,
            build_data(tokenizer, records, None, None, MAX_LENGTH, seed),
            method="SFT",
            learning_rate=lr,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1,
            weight_decay=0.01,
            max_grad_norm=0.0,
            lr_scheduler_type="constant",
            warmup_epochs=0.0,
            seed=seed,
        )
    model.eval()
    return model, tokenizer


def objective_for(name: str, model, tokenizer, task: ToyTask, seed: int = 0):
    if name == "dpo":
        return NegDPOObjective(model, tokenizer, task.preferences, beta=0.1, max_length=MAX_LENGTH)
    return RewardObjective(
        tokenizer,
        task.prompts,
        keyword_reward,
        samples_per_prompt=8,
        max_new_tokens=16,
        seed=seed,
        batch_size=16,
    )


def ablation_config() -> U2AConfig:
    return U2AConfig(
        init_size=4,
        per_round=4,
        beta=0.05,
        reg_lambda=1.0,
        inner_steps=30,
        inner_learning_rate=1e-4,
        batch_size=16,
        grad_chunk=32,
    )


def score(model, tokenizer, task: ToyTask, seed: int, samples: int = 16) -> tuple[float, float]:
    """Mean keyword reward of sampled responses, and the fraction that are well formed (only
    task words: unlearning by gradient ascent also breaks the model's language)."""
    sampler = RewardObjective(
        tokenizer,
        task.prompts,
        keyword_reward,
        samples_per_prompt=samples,
        max_new_tokens=16,
        seed=10_000 + seed,
        batch_size=16,
    )
    _, texts, rewards = sampler.sample(model)
    vocabulary = {*GOOD, *BAD, *FILLERS, "it", "is"}
    well_formed = [bool(t.split()) and set(t.split()) <= vocabulary for t in texts]
    return float(rewards.mean()), sum(well_formed) / len(well_formed)


def run_ablation(
    ks=(4, 8, 16, 32),
    seeds=(0, 1, 2),
    objective: str = "reward",
    cfg: U2AConfig | None = None,
    pretrain_steps: int = 300,
    loss: str = "GA",
) -> dict:
    """Figure 4 at CPU scale: top-K by marginal gain vs random K, same unlearning budget.

    One base model; per seed the random subsets, the inner minibatch order and the evaluation
    samples change. Both strategies unlearn their K samples with uniform weights for
    ``cfg.inner_steps`` steps with ``loss`` (GA or NPO, the registry's names); the score is the mean keyword reward
    of sampled responses (and the fraction of well-formed ones).
    Also run: unlearning all negatives (same budget), and Algorithm 1 itself per seed with an
    all-negatives run on U2A's own budget.
    """
    cfg = cfg or ablation_config()
    task = make_task(0)
    model, tokenizer = pretrain(task, steps=pretrain_steps)
    forget = LMForgetTask(model, tokenizer, task.negatives, loss, max_length=MAX_LENGTH)
    params = list(trainable(model).values())
    base_state = [p.detach().clone() for p in params]
    j0, grad_j = objective_for(objective, model, tokenizer, task).value_and_grad(model, params)
    gains = implicit_gains(model, forget, inverse_hvp(grad_j, cfg), cfg.grad_chunk)
    ranking = gains.argsort(descending=True).tolist()

    def reset():
        with torch.no_grad():
            for p, saved in zip(params, base_state):
                p.copy_(saved)

    def unlearn_and_score(indices, seed, steps=cfg.inner_steps):
        reset()
        weights = torch.full((len(indices),), 1.0 / len(indices), dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        weighted_unlearn(model, forget, indices, weights, base_state, cfg, steps, generator)
        return score(model, tokenizer, task, seed)

    everything = list(range(len(forget)))
    rows = []
    for k in ks:
        top = [unlearn_and_score(ranking[:k], seed) for seed in seeds]
        rand = [
            unlearn_and_score(random.Random(seed * 1000 + k).sample(everything, k), seed)
            for seed in seeds
        ]
        rows.append({"k": k, "top_k": _summary(top), "random_k": _summary(rand)})
    u2a_runs = []
    for seed in seeds:
        reset()
        result = run_u2a(
            model,
            forget,
            objective_for(objective, model, tokenizer, task, seed),
            dataclasses.replace(cfg, seed=seed),
        )
        reward, well_formed = score(model, tokenizer, task, seed)
        budget = cfg.inner_steps * sum(1 for r in result.log[1:] if r["accepted"])
        u2a_runs.append(
            {
                "seed": seed,
                "reward": reward,
                "well_formed": well_formed,
                "set_size": len(result.selected),
                "mostly_bad_selected": sum(
                    task.negatives[i]["kind"] == "mostly_bad" for i in result.selected
                ),
                "inner_steps": budget,
                "stop_reason": result.stop_reason,
                "all_negatives_same_budget": unlearn_and_score(everything, seed, budget)[0],
            }
        )
    reset()
    kinds = [n["kind"] for n in task.negatives]
    return {
        "objective": objective,
        "loss": loss,
        "objective_initial": j0,
        "n_candidates": len(forget),
        "seeds": list(seeds),
        "inner_steps": cfg.inner_steps,
        "inner_learning_rate": cfg.inner_learning_rate,
        "base_reward": _summary([score(model, tokenizer, task, seed) for seed in seeds]),
        "all_negatives": _summary([unlearn_and_score(everything, seed) for seed in seeds]),
        "rows": rows,
        "u2a": u2a_runs,
        "gains": gains.tolist(),
        "kinds": kinds,
        "gain_concentration": gain_concentration(gains),
        "mostly_bad_in_top": {k: sum(kinds[i] == "mostly_bad" for i in ranking[:k]) for k in ks},
    }


def _summary(scores: list[tuple[float, float]]) -> dict:
    """Reward over seeds (values, mean, sample std) and the mean well-formed fraction."""
    rewards = [r for r, _ in scores]
    return {
        "values": rewards,
        "mean": statistics.fmean(rewards),
        "std": statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
        "well_formed": statistics.fmean(w for _, w in scores),
    }


def gain_concentration(gains: torch.Tensor, fractions=(0.05, 0.1, 0.2)) -> dict:
    """Share of the total positive gain carried by the top ``fraction`` of candidates."""
    positive = gains.clamp(min=0).sort(descending=True).values
    total = float(positive.sum())
    out = {"positive_fraction": float((gains > 0).double().mean())}
    for f in fractions:
        top = max(1, round(f * len(gains)))
        out[f"top_{int(f * 100)}pct_share"] = float(positive[:top].sum()) / total if total else 0.0
    return out


def ablation_figure(result: dict) -> bytes:
    """Figure 4: reward after unlearning top-K by gain vs random K (mean +- std over seeds)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ks = [r["k"] for r in result["rows"]]
    for key, label in (("top_k", "top-K by marginal gain"), ("random_k", "random K")):
        means = [r[key]["mean"] for r in result["rows"]]
        stds = [r[key]["std"] for r in result["rows"]]
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.axhline(result["base_reward"]["mean"], color="gray", ls="--", label="before unlearning")
    ax.axhline(result["all_negatives"]["mean"], color="red", ls=":", label="all negatives")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (samples unlearned)")
    ax.set_ylabel("mean keyword reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png(fig)


def ablation_report(result: dict, settings: dict) -> tuple[list[Section], dict[str, bytes]]:
    """Sections and PNGs of ``negpref u2a ablation``."""
    groups = {
        kind: [i for i, k in enumerate(result["kinds"]) if k == kind]
        for kind in ("mostly_bad", "mostly_good")
    }
    figures = {
        "ablation.png": ablation_figure(result),
        "gains.png": gains_figure(result["gains"], groups),
    }
    rows = [
        [
            r["k"],
            r["top_k"]["mean"],
            r["top_k"]["std"],
            r["top_k"]["well_formed"],
            r["random_k"]["mean"],
            r["random_k"]["std"],
            r["random_k"]["well_formed"],
            result["mostly_bad_in_top"][r["k"]],
        ]
        for r in result["rows"]
    ]
    u2a_rows = [
        [
            r["seed"],
            r["set_size"],
            r["mostly_bad_selected"],
            r["reward"],
            r["well_formed"],
            r["all_negatives_same_budget"],
            r["inner_steps"],
            r["stop_reason"],
        ]
        for r in result["u2a"]
    ]
    base, everything = result["base_reward"], result["all_negatives"]
    section = Section(
        "Figure 4 at CPU scale: top-K by marginal gain vs random K",
        [
            f"Tiny Llama on the keyword task; {result['n_candidates']} candidate negatives "
            f"(mostly-bad, or mostly-good flagged negative); objective {result['objective']}; "
            f"{result['loss']} for {result['inner_steps']} steps per condition; seeds "
            f"{result['seeds']}. Reward before unlearning {base['mean']:.3f} "
            f"(well-formed {base['well_formed']:.2f}); all negatives {everything['mean']:.3f} "
            f"+- {everything['std']:.3f} (well-formed {everything['well_formed']:.2f}).",
        ],
        tables=[
            (
                [
                    "K",
                    "top-K reward",
                    "std",
                    "well-formed",
                    "random-K reward",
                    "std",
                    "well-formed",
                    "mostly-bad in top-K",
                ],
                rows,
            ),
            (
                [
                    "seed",
                    "U2A set size",
                    "mostly-bad selected",
                    "U2A reward",
                    "well-formed",
                    "all negatives (same budget)",
                    "inner steps",
                    "stop",
                ],
                u2a_rows,
            ),
            (
                ["gain concentration", "value"],
                [[k, v] for k, v in result["gain_concentration"].items()],
            ),
        ],
        figures=[
            (figures["ablation.png"], "mean keyword reward (+- std over seeds)"),
            (figures["gains.png"], "marginal gains at theta_0 by candidate kind"),
        ],
    )
    return [section, settings_section(settings)], figures


@dataclass
class U2AAblationConfig:
    """Settings of ``negpref u2a ablation`` (the rest: ``ablation_config``)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "run seeds"})
    k: list[int] = field(default_factory=lambda: [4, 8, 16, 32], metadata={"help": "set sizes K"})
    objective: str = field(
        default="reward", metadata={"help": "J used for the gains", "choices": ["reward", "dpo"]}
    )
    loss: str = field(default="GA", metadata={"help": "unlearning method: GA or NPO"})
    inner_steps: int = field(default=30, metadata={"help": "unlearning steps per K"})
    rounds: int = field(default=10, metadata={"help": "rounds of the U2A runs"})
    inner_learning_rate: float = field(default=1e-4, metadata={"help": "unlearning learning rate"})
    pretrain_steps: int = field(default=300, metadata={"help": "base model training steps"})
    out: str = field(default="", metadata={"help": "output directory"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing out directory"})

    def u2a_config(self) -> U2AConfig:
        return dataclasses.replace(
            ablation_config(),
            inner_steps=self.inner_steps,
            rounds=self.rounds,
            inner_learning_rate=self.inner_learning_rate,
        )

    def validate(self) -> None:
        require(bool(self.out), "out", self.out, "give an output directory")
        require(bool(self.seeds), "seeds", self.seeds, "give at least one seed")
        require(bool(self.k) and min(self.k) >= 1, "k", self.k, "give set sizes >= 1")
        require(self.pretrain_steps >= 0, "pretrain_steps", self.pretrain_steps, "must be >= 0")
        # the toy task has no retain set: only the methods without a retain term
        self.loss = u2a_method(self.loss)
        require(self.loss in ("GA", "NPO"), "loss", self.loss, "must be GA or NPO")
        self.u2a_config().validate()


def run_ablation_study(config: U2AAblationConfig) -> dict:
    """``run_ablation``; writes ``ablation.json``, the figures and ``report.html`` to
    ``config.out``; returns the result without the per-candidate gains and kinds."""
    config.validate()
    check_out_dir(config.out, config.overwrite)  # before the work, not after it
    cfg = config.u2a_config()
    result = run_ablation(
        tuple(config.k), tuple(config.seeds), config.objective, cfg, config.pretrain_steps,
        config.loss,
    )  # fmt: skip
    sections, figures = ablation_report(result, config_to_dict(cfg))
    with staged_out_dir(config.out, config.overwrite) as stage:
        atomic_write_json(stage / "ablation.json", result)
        for name, image in figures.items():
            (stage / name).write_bytes(image)
        write_html_report(stage / "report.html", "negpref u2a ablation", sections)
    return {k: v for k, v in result.items() if k not in ("gains", "kinds")}
