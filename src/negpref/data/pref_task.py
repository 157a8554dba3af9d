"""A small offline preference task with a programmatic reward, sized for CPU.

Prompts ask for a review of a topic ("Review the hotel."); a completion gives an opinion on
three aspects of it ("the room was lovely , the staff was rude and the view was plain .").
The reward is a sentiment lexicon score, ``(#positive - #negative) / #opinion words`` in
[-1, 1]. Each preference record holds K+1 completions on the same aspects with random
opinions: the best-scoring one is ``chosen``, the other K are the ``rejected`` candidates (as
UltraFeedback keeps its best completion and the rest). Candidates differ only in their opinion
words, so some are near misses of the chosen one (hard negatives) and some are far (easy).

The SFT split holds completions with uniformly random opinions: a model fit to it is a
reference policy with expected reward about 0, which preference optimization should raise.
The reward is ``negpref.rewards.sentiment`` (registered as ``sentiment``).
"""

from __future__ import annotations

import random
from pathlib import Path

from negpref.errors import NegprefError
from negpref.io import atomic_write_text
from negpref.rewards import NEGATIVE, NEUTRAL, POSITIVE, sentiment

TOPICS = {
    "hotel": ("room", "staff", "breakfast", "view"),
    "movie": ("plot", "acting", "music", "ending"),
    "restaurant": ("food", "service", "wine", "dessert"),
    "phone": ("screen", "battery", "camera", "speaker"),
    "city": ("weather", "people", "streets", "museums"),
    "book": ("story", "characters", "writing", "cover"),
    "concert": ("band", "crowd", "sound", "venue"),
    "car": ("engine", "seats", "brakes", "radio"),
}
PROMPTS = ("Review the {topic}.", "What did you think of the {topic}?", "Describe the {topic}.")
ASPECTS = 3  # opinions per completion
_OPINIONS = (POSITIVE, NEGATIVE, NEUTRAL)


def _completion(aspects: tuple[str, ...], opinions: list[str]) -> str:
    clauses = [f"the {a} was {o}" for a, o in zip(aspects, opinions, strict=True)]
    return " , ".join(clauses[:-1]) + " and " + clauses[-1] + " ."


def _random_opinions(rng: random.Random) -> list[str]:
    return [rng.choice(rng.choice(_OPINIONS)) for _ in range(ASPECTS)]


def prompts() -> list[str]:
    return [p.format(topic=t) for t in TOPICS for p in PROMPTS]


def _topic(prompt: str) -> str:
    return next(t for t in TOPICS if t in prompt)


def make_preferences(n_records: int, k: int, seed: int = 0) -> list[dict]:
    """``n_records`` records, each a chosen completion and ``k`` strictly worse candidates."""
    if k < 1:
        raise NegprefError(f"--k: need at least one rejected candidate, got {k}")
    rng = random.Random(seed)
    all_prompts = prompts()
    records, attempts = [], 0
    while len(records) < n_records:
        attempts += 1
        if attempts > 100 * n_records:
            raise NegprefError(f"--k {k}: too many candidates to keep a strict best one")
        prompt = all_prompts[len(records) % len(all_prompts)]
        aspects = tuple(rng.sample(TOPICS[_topic(prompt)], ASPECTS))
        texts = [_completion(aspects, _random_opinions(rng)) for _ in range(k + 1)]
        ranked = sorted(texts, key=lambda t: sentiment(prompt, t), reverse=True)
        best, rest = ranked[0], ranked[1:]
        # a strict winner and distinct candidates, or the record says nothing
        if len(set(ranked)) < len(ranked) or any(
            sentiment(prompt, t) >= sentiment(prompt, best) for t in rest
        ):
            continue
        rng.shuffle(rest)
        records.append({"prompt": prompt, "chosen": best, "rejected": rest})
    return records


def make_sft(n_examples: int, seed: int = 0) -> list[dict]:
    """Prompt/completion pairs with uniformly random opinions (QA field names)."""
    rng = random.Random(seed)
    all_prompts = prompts()
    out = []
    for i in range(n_examples):
        prompt = all_prompts[i % len(all_prompts)]
        aspects = tuple(rng.sample(TOPICS[_topic(prompt)], ASPECTS))
        out.append({"question": prompt, "answer": _completion(aspects, _random_opinions(rng))})
    return out


def corpus_texts(seed: int = 0) -> list[str]:
    """Task text in the plain QA format, for training a small tokenizer (whole-word tokens)."""
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in make_sft(2000, seed)]


def task_tokenizer(seed: int = 0):
    """A byte-level BPE tokenizer fit to the task (every task word is one token)."""
    from negpref.models import build_tokenizer

    return build_tokenizer(corpus_texts(seed), vocab_size=700)


def write_task(out: str | Path, n_records: int = 96, k: int = 4, seed: int = 0) -> dict:
    """Write ``train.jsonl`` (preferences), ``eval.jsonl`` and ``sft.jsonl`` into ``out``."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": make_preferences(n_records, k, seed),
        "eval": make_preferences(len(prompts()), k, seed + 1),
        "sft": make_sft(4 * n_records, seed + 2),
    }
    for name, rows in splits.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return {name: len(rows) for name, rows in splits.items()}
