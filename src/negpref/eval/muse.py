"""MUSE-style evaluation (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation") on
MUSE-format data: text corpora (records with ``text``) and QA files (``question``, ``answer``).

- Verbatim memorization (``verbmem_forget``): each forget text is cut, in tokens, into a prefix
  of ``prefix_tokens`` (MUSE: 32) and the true continuation of the next
  ``continuation_tokens`` (MUSE: 128), or MUSE's pre-cut ``verbmem`` records (``prompt``,
  ``gt``, the continuation cut to ``continuation_tokens``) are read as they are; the model
  continues the prefix greedily for as many new tokens, scored by ROUGE-L F1 (stemmed) against
  the true continuation. Texts too short for a prefix and one continuation token are left out
  and listed. The same items also get exact
  memorization and extraction strength of the continuation under teacher forcing
  (``negpref.eval.memorization``; open-unlearning's MUSE ``extraction_strength``).
- Knowledge memorization (``knowmem_forget``, ``knowmem_retain``): greedy answers to the QA
  questions (formatted as TOFU's, ``PromptFormat``; at most ``qa_max_new_tokens``, MUSE: 32),
  cut at MUSE's stop strings, scored by ROUGE-L F1 against the answer (ROUGE-L recall logged
  too).
- Privacy leakage (``privleak_forget`` / ``privleak_holdout``): the membership-inference
  attacks of ``negpref.eval.mia`` on the whole forget and holdout texts, their AUCs, and
  PrivLeak against a retain model's MUSE logs (``retain_logs``) or a fixed reference AUC (0.5).

Logs are ``{set: {metric: {item index: value}}}`` (indices are positions in the source file)
plus ``negpref_meta``; ``aggregate_muse`` turns them into MUSE's numbers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from negpref.conventions import NPO, Conventions, get_conventions
from negpref.data import DEFAULT_PROMPT, Encoded, PromptFormat, encode_text, load_records
from negpref.data.records import TEXT, load_json
from negpref.errors import NegprefError
from negpref.eval import metrics
from negpref.eval.mia import mia_auc, mia_summary
from negpref.eval.scoring import model_attack_scores, score_encoded
from negpref.eval.tofu import subsample
from negpref.eval.tofu_files import META_KEY, short_list
from negpref.eval.tofu_logs import DEFAULT_PRIVLEAK_REF_AUC
from negpref.generation import greedy_continue, greedy_generate

# MUSE's defaults (its verbmem files hold 32-token prompts, continued for 128 new tokens; its
# knowmem answers are generated for up to 32 tokens and cut at these strings).
PREFIX_TOKENS = 32
CONTINUATION_TOKENS = 128
QA_MAX_NEW_TOKENS = 32
QA_STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")
MAX_LENGTH = 2048  # tokens of a privleak text scored (open-unlearning's MUSE max_length)
LOGS_FILE = "muse_logs.json"

VERBMEM, KNOWMEM_FORGET, KNOWMEM_RETAIN = "verbmem_forget", "knowmem_forget", "knowmem_retain"
PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT = "privleak_forget", "privleak_holdout"
SETS = (VERBMEM, KNOWMEM_FORGET, KNOWMEM_RETAIN, PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT)


@dataclass
class MuseSet:
    """Records of one source and their positions in it (the log keys)."""

    records: list[dict]
    indices: list[int]
    source: str

    @property
    def keys(self) -> list[str]:
        return [str(i) for i in self.indices]


@dataclass
class MuseSets:
    """What one MUSE evaluation reads: forget texts or pre-cut verbmem records (or both), and
    optionally the rest."""

    forget_text: MuseSet | None = None
    holdout_text: MuseSet | None = None
    forget_qa: MuseSet | None = None
    retain_qa: MuseSet | None = None
    verbmem: MuseSet | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.forget_text is None and self.verbmem is None:
            raise NegprefError(
                "MUSE evaluation needs forget texts (forget_text, records with 'text') or "
                "pre-cut verbmem records (verbmem, records with 'prompt' and 'gt')"
            )
        if self.holdout_text is not None and self.forget_text is None:
            raise NegprefError(
                "holdout_text: PrivLeak compares it with the forget texts; give forget_text"
            )

    @classmethod
    def from_records(
        cls,
        forget_text: list[dict] | None = None,
        holdout_text: list[dict] | None = None,
        forget_qa: list[dict] | None = None,
        retain_qa: list[dict] | None = None,
        verbmem: list[dict] | None = None,
        limit: int | None = None,
        seed: int | None = None,
    ) -> MuseSets:
        """From in-memory records (validated like files; subsampled like TOFU's sets)."""
        given = dict(
            forget_text=forget_text,
            holdout_text=holdout_text,
            forget_qa=forget_qa,
            retain_qa=retain_qa,
            verbmem=verbmem,
        )
        sets = {
            name: _read(name, records, f"{name} records", limit, seed)
            for name, records in given.items()
            if records is not None
        }
        return cls(**sets, sources={name: s.source for name, s in sets.items()})


_FIELDS = {
    "forget_text": ("text",),
    "holdout_text": ("text",),
    "forget_qa": ("question", "answer"),
    "retain_qa": ("question", "answer"),
    "verbmem": ("prompt", "gt"),
}
_KINDS = {"text": TEXT, "question": TEXT, "answer": TEXT, "prompt": TEXT, "gt": TEXT}


def _read(name: str, source, what: str, limit: int | None, seed: int | None) -> MuseSet:
    records = load_records(source, _FIELDS[name], what, kinds=_KINDS)
    if not len(records):
        raise NegprefError(f"{what}: no records")
    keep = subsample(len(records), limit, seed)
    label = str(source) if isinstance(source, (str, os.PathLike)) else what
    return MuseSet([records[i] for i in keep], keep, label)


def load_muse_sets(
    forget_text: str | os.PathLike | None,
    holdout_text: str | os.PathLike | None = None,
    forget_qa: str | os.PathLike | None = None,
    retain_qa: str | os.PathLike | None = None,
    verbmem: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int | None = None,
) -> MuseSets:
    """Read MUSE-format files: text corpora (``text``), QA files (``question``, ``answer``) and
    MUSE's pre-cut verbmem files (``prompt``, ``gt``)."""
    given = dict(
        forget_text=(forget_text, "forget_text"),
        holdout_text=(holdout_text, "holdout_text"),
        forget_qa=(forget_qa, "qa"),
        retain_qa=(retain_qa, "retain_qa"),
        verbmem=(verbmem, "verbmem"),
    )
    sets = {
        name: _read(name, path, f"{field_name} {path}", limit, seed)
        for name, (path, field_name) in given.items()
        if path is not None
    }
    return MuseSets(**sets, sources={name: s.source for name, s in sets.items()})


# ------------------------------------------------------------------------------- items


def verbmem_item(
    tokenizer, text: str, prefix_tokens: int, continuation_tokens: int
) -> Encoded | None:
    """BOS (if the tokenizer adds one) + the first ``prefix_tokens`` tokens of ``text`` as the
    prompt, the next ``continuation_tokens`` as the scored continuation; None if no token is
    left after the prefix."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    start = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
    prompt = ids[: start + prefix_tokens]
    continuation = ids[start + prefix_tokens : start + prefix_tokens + continuation_tokens]
    if len(prompt) < start + prefix_tokens or not continuation:
        return None
    return Encoded(
        input_ids=prompt + continuation,
        answer_mask=[0] * len(prompt) + [1] * len(continuation),
        truncated=False,
    )


def precut_verbmem_item(tokenizer, prompt: str, gt: str, continuation_tokens: int) -> Encoded:
    """A MUSE verbmem record: its ``prompt`` (special tokens added) and the first
    ``continuation_tokens`` tokens of its ``gt``, as MUSE's script truncates it."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    gt_ids = tokenizer(gt, add_special_tokens=False)["input_ids"][:continuation_tokens]
    return Encoded(
        input_ids=prompt_ids + gt_ids,
        answer_mask=[0] * len(prompt_ids) + [1] * len(gt_ids),
        truncated=False,
    )


def _verbmem_items(
    tokenizer, sets: MuseSets, prefix_tokens: int, continuation_tokens: int
) -> tuple[MuseSet, list[Encoded | None]]:
    """The verbmem source and its items: pre-cut records when given, else cut forget texts."""
    if sets.verbmem is not None:
        items = [
            precut_verbmem_item(tokenizer, r["prompt"], r["gt"], continuation_tokens)
            for r in sets.verbmem.records
        ]
        return sets.verbmem, [item if sum(item.answer_mask) else None for item in items]
    items = [
        verbmem_item(tokenizer, r["text"], prefix_tokens, continuation_tokens)
        for r in sets.forget_text.records
    ]
    return sets.forget_text, items


def cut_at_stop(text: str, stop_strings=QA_STOP_STRINGS) -> str:
    """``text`` up to the first stop string (MUSE stops a knowmem answer there)."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[: min(cuts)].strip() if cuts else text


def _split(item: Encoded) -> tuple[list[int], list[int]]:
    prompt = [t for t, scored in zip(item.input_ids, item.answer_mask) if not scored]
    return prompt, [t for t, scored in zip(item.input_ids, item.answer_mask) if scored]


# ------------------------------------------------------------------------------- evaluation


def _verbmem_log(
    model, tokenizer, sets: MuseSets, prefix_tokens, continuation_tokens, batch_size, desc
) -> tuple[dict[str, dict], list[str]]:
    texts, items = _verbmem_items(tokenizer, sets, prefix_tokens, continuation_tokens)
    kept = [(k, item) for k, item in zip(texts.keys, items) if item is not None]
    skipped = [k for k, item in zip(texts.keys, items) if item is None]
    if not kept:
        raise NegprefError(
            f"{texts.source}: no item leaves a token to continue after its prefix "
            f"(prefix_tokens {prefix_tokens}); lower it"
        )
    keys = [k for k, _ in kept]
    encoded = [item for _, item in kept]
    prompts, continuations = zip(*(_split(item) for item in encoded))
    truth = tokenizer.batch_decode(list(continuations), skip_special_tokens=True)
    truth = [t.strip() for t in truth]
    generations = greedy_continue(
        model, tokenizer, list(prompts), batch_size, continuation_tokens, desc("verbmem")
    )
    f1, recall = metrics.rouge_l_scores(truth, generations)
    prefixes = tokenizer.batch_decode(list(prompts), skip_special_tokens=True)
    scores = score_encoded(
        model, tokenizer.pad_token_id, encoded, truth, batch_size, memorization=True
    )
    log = {
        "rougeL_f1": dict(zip(keys, f1)),
        "rougeL_recall": dict(zip(keys, recall)),
        "exact_memorization": dict(zip(keys, scores.exact_memorization)),
        "extraction_strength": dict(zip(keys, scores.extraction_strength)),
        "generated_text": {k: [p, g, t] for k, p, g, t in zip(keys, prefixes, generations, truth)},
    }
    return log, skipped


def _knowmem_log(
    model, tokenizer, qa: MuseSet, max_new_tokens, batch_size, prompt, desc
) -> dict[str, dict]:
    questions = [r["question"] for r in qa.records]
    answers = [r["answer"] for r in qa.records]
    generations = greedy_generate(
        model, tokenizer, questions, batch_size, max_new_tokens, desc=desc, prompt=prompt
    )
    generations = [cut_at_stop(g) for g in generations]
    f1, recall = metrics.rouge_l_scores(answers, generations)
    return {
        "rougeL_f1": dict(zip(qa.keys, f1)),
        "rougeL_recall": dict(zip(qa.keys, recall)),
        "generated_text": {
            k: [q, g, a] for k, q, g, a in zip(qa.keys, questions, generations, answers)
        },
    }


def _privleak_log(
    model, tokenizer, texts: MuseSet, mia_k, batch_size, conventions, attack_models, desc
) -> dict[str, dict]:
    plain = [r["text"] for r in texts.records]
    encoded = [encode_text(tokenizer, t, MAX_LENGTH) for t in plain]
    pad_id = tokenizer.pad_token_id
    scores = score_encoded(
        model, pad_id, encoded, plain, batch_size, mia_k=mia_k, conventions=conventions, desc=desc
    )
    attacks = {
        **scores.mia,
        **model_attack_scores(model, pad_id, encoded, plain, scores, batch_size, **attack_models),
    }
    log = {"avg_loss": dict(zip(texts.keys, scores.avg_losses))}
    log.update({f"mia_{a}": dict(zip(texts.keys, v)) for a, v in attacks.items()})
    return log


def evaluate_muse(
    model,
    tokenizer,
    sets: MuseSets,
    prefix_tokens: int = PREFIX_TOKENS,
    continuation_tokens: int = CONTINUATION_TOKENS,
    qa_max_new_tokens: int = QA_MAX_NEW_TOKENS,
    batch_size: int = 8,
    mia_k: float | None = None,
    prompt: PromptFormat = DEFAULT_PROMPT,
    conventions: Conventions | str = NPO,
    mia_ref_model=None,
    gradnorm: bool = False,
    progress: bool = False,
) -> dict[str, dict]:
    """MUSE's per-item logs of ``model`` on ``sets`` (module docstring); verbatim memorization
    always, knowledge memorization with QA files, privacy leakage with a holdout corpus.

    ``mia_k`` defaults to the conventions' (0.2, open-unlearning's 0.4); ``mia_ref_model`` and
    ``gradnorm`` add the reference and GradNorm attacks to the privacy-leakage sets.
    """
    conventions = get_conventions(conventions)
    mia_k = conventions.mia_k if mia_k is None else mia_k

    def desc(what: str) -> str | None:
        return what if progress else None

    was_training = model.training
    model.eval()
    logs: dict[str, dict] = {}
    try:
        logs[VERBMEM], skipped = _verbmem_log(
            model, tokenizer, sets, prefix_tokens, continuation_tokens, batch_size, desc
        )
        for name, qa in ((KNOWMEM_FORGET, sets.forget_qa), (KNOWMEM_RETAIN, sets.retain_qa)):
            if qa is not None:
                logs[name] = _knowmem_log(
                    model, tokenizer, qa, qa_max_new_tokens, batch_size, prompt, desc(name)
                )
        if sets.holdout_text is not None and sets.forget_text is not None:
            attack_models = dict(mia_ref_model=mia_ref_model, gradnorm=gradnorm)
            for name, texts in (
                (PRIVLEAK_FORGET, sets.forget_text),
                (PRIVLEAK_HOLDOUT, sets.holdout_text),
            ):
                logs[name] = _privleak_log(
                    model,
                    tokenizer,
                    texts,
                    mia_k,
                    batch_size,
                    conventions,
                    attack_models,
                    desc(name),
                )
    finally:
        model.train(was_training)
    logs[META_KEY] = {
        "benchmark": "muse",
        "prefix_tokens": prefix_tokens,
        "continuation_tokens": continuation_tokens,
        "qa_max_new_tokens": qa_max_new_tokens,
        "verbmem_skipped": skipped,
        "prompt_format": prompt.describe(tokenizer),
        "conventions": conventions.name,
        "mia_k": mia_k if PRIVLEAK_FORGET in logs else None,
    }
    return logs


# ------------------------------------------------------------------------------- aggregates


def check_muse_logs(logs, where: str) -> dict:
    """``logs`` if they are MUSE logs of ours (one of ``SETS`` present), else one-line error."""
    if not isinstance(logs, dict) or not any(isinstance(logs.get(s), dict) for s in SETS):
        raise NegprefError(
            f"{where}: not MUSE logs (expected {LOGS_FILE} from negpref eval --benchmark muse, "
            f"holding some of {', '.join(SETS)})"
        )
    unknown = [k for k in logs if k not in SETS and k != META_KEY]
    if unknown:
        raise NegprefError(
            f"{where}: unknown set(s) {', '.join(unknown)}; known: {', '.join(SETS)}"
        )
    return logs


def load_muse_logs(path: str | os.PathLike, what: str = "retain_logs") -> dict:
    """Our MUSE logs from ``path`` (the file, or a folder holding ``muse_logs.json``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LOGS_FILE)
    if not os.path.isfile(path):
        raise NegprefError(f"{what} {path}: file not found")
    return check_muse_logs(load_json(path, what), f"{what} {path}")


def _mean(values: dict) -> float:
    return metrics.mean_finite([math.nan if v is None else float(v) for v in values.values()])


def _aucs(logs: dict) -> dict[str, float]:
    forget, holdout = logs.get(PRIVLEAK_FORGET), logs.get(PRIVLEAK_HOLDOUT)
    if not forget or not holdout:
        return {}
    return {
        metric.removeprefix("mia_"): mia_auc(
            [math.nan if v is None else v for v in forget[metric].values()],
            [math.nan if v is None else v for v in holdout[metric].values()],
        )
        for metric in forget
        if metric.startswith("mia_") and metric in holdout
    }


def aggregate_muse(
    logs: dict,
    retain_logs: dict | None = None,
    privleak_ref_auc: float | None = DEFAULT_PRIVLEAK_REF_AUC,
) -> dict:
    """MUSE's numbers from per-item logs: ``verbmem_forget/rougeL_f1`` (and ``/rougeL_recall``,
    ``/exact_memorization``, ``/extraction_strength``), ``knowmem_{forget,retain}/rougeL_f1``
    (and recall), ``mia/<attack>`` AUCs (forget texts members, holdout non-members) and
    ``privleak/<attack>`` against the retain logs' AUCs when given, else ``privleak_ref_auc``
    (``privleak_reference`` says which), ``counts``. Non-finite values are None."""
    check_muse_logs(logs, "logs")
    result: dict = {}
    counts: dict[str, dict] = {}
    for name in (VERBMEM, KNOWMEM_FORGET, KNOWMEM_RETAIN):
        per_metric = logs.get(name)
        if per_metric is None:
            continue
        for metric, values in per_metric.items():
            if metric != "generated_text":
                result[f"{name}/{metric}"] = _mean(values)
        texts = per_metric.get("generated_text", {})
        counts[name] = {
            "items": len(per_metric["rougeL_f1"]),
            "empty_generations": sum(not str(t[1]).strip() for t in texts.values()),
        }
    skipped = logs.get(META_KEY, {}).get("verbmem_skipped") or []
    if VERBMEM in counts:
        counts[VERBMEM]["skipped_short"] = len(skipped)
    retain_aucs = _aucs(retain_logs) if retain_logs is not None else {}
    result.update(mia_summary(_aucs(logs), retain_aucs, privleak_ref_auc))
    for name in (PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT):
        if name in logs:
            counts[name] = {"items": len(logs[name]["avg_loss"])}
    result["counts"] = counts
    if skipped:
        result["verbmem_skipped"] = f"texts {short_list(skipped)}: no token after the prefix"
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
    }
