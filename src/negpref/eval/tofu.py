"""The TOFU protocol: evaluation sets (``load_tofu_sets``, ``TofuSets``) and the per-item
evaluation of a model on them (``evaluate_tofu``), returning logs in TOFU's own format
(``negpref.eval.tofu_logs`` describes and aggregates them).

Per set: the answer's log-prob (one batched forward per batch of answers), a greedy generation
and its ROUGE recall (skipped with ``generate=False``), and the paraphrased and perturbed
answers' log-probs for the truth ratio. Item indices are positions in the source file, as
string keys (what JSON round-trips). The logs record the prompt format and conventions used
(``META_KEY``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from negpref.conventions import NPO, Conventions, get_conventions
from negpref.data import DEFAULT_PROMPT, PromptFormat, encode_qa, load_records
from negpref.data.records import TEXT, place
from negpref.errors import NegprefError
from negpref.eval import metrics
from negpref.eval.scoring import AnswerScores, model_attack_scores, score_encoded
from negpref.eval.shards import Shards
from negpref.eval.tofu_files import EVAL_FILES, HOLDOUT_FILE, META_KEY, short_list
from negpref.generation import greedy_generate

# Source files in a TOFU-format data directory.
RETAIN_PERTURBED = "retain_perturbed.json"
REAL_AUTHORS_PERTURBED = "real_authors_perturbed.json"
WORLD_FACTS_PERTURBED = "world_facts_perturbed.json"
TOFU_DIR_ENV = "NEGPREF_TOFU_DIR"
DEFAULT_TOFU_DIR = Path("..") / "shared" / "data" / "tofu"

# Real authors / world facts are scored against their answer itself (TOFU's base answer key).
_REQUIRED = {
    "forget": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
    "retain": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
    "real_authors": ("question", "answer", "perturbed_answer"),
    "world_facts": ("question", "answer", "perturbed_answer"),
    "holdout": ("question", "answer"),
}
_KINDS = {"question": TEXT, "answer": TEXT, "paraphrased_answer": TEXT}


@dataclass
class EvalSet:
    """Records of one evaluation set and their positions in the source (the log keys)."""

    kind: str
    records: list[dict]
    indices: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.records)

    @property
    def keys(self) -> list[str]:
        return [str(i) for i in self.indices]


@dataclass
class TofuSets:
    """Everything one TOFU evaluation reads. ``real_authors`` / ``world_facts`` / ``holdout``
    may be absent (then model utility is the harmonic mean of the components present)."""

    split: str
    forget: EvalSet
    retain: EvalSet
    real_authors: EvalSet | None = None
    world_facts: EvalSet | None = None
    holdout: EvalSet | None = None

    @classmethod
    def from_records(
        cls,
        forget: list[dict],
        retain: list[dict],
        real_authors: list[dict] | None = None,
        world_facts: list[dict] | None = None,
        holdout: list[dict] | None = None,
        split: str = "custom",
        limit: int | None = None,
        seed: int | None = None,
    ) -> TofuSets:
        """Build from in-memory TOFU-format records (validated; subsampled like the loader)."""
        given = {
            "forget": forget,
            "retain": retain,
            "real_authors": real_authors,
            "world_facts": world_facts,
            "holdout": holdout,
        }
        sets = {
            kind: make_eval_set(kind, records, f"{kind} records", limit, seed)
            for kind, records in given.items()
            if records is not None
        }
        return cls(split=split, **sets)

    def present(self) -> dict[str, EvalSet]:
        """The evaluation sets given, by kind, in TOFU's file order."""
        return {k: getattr(self, k) for k in EVAL_FILES if getattr(self, k) is not None}


def subsample(n: int, limit: int | None, seed: int | None) -> list[int]:
    """Item positions kept: all; the first ``limit`` (TOFU's ``ds_size``, ``seed=None``); or
    ``limit`` drawn with ``random.Random(seed)``, in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    if seed is None:
        return list(range(limit))
    return sorted(random.Random(seed).sample(range(n), limit))


def _check_record(kind: str, record: dict, where: str) -> None:
    missing = [k for k in _REQUIRED[kind] if record.get(k) in (None, "", [])]
    if missing:
        raise NegprefError(
            f"{where}: missing field(s) {', '.join(missing)}; {kind} items need "
            f"{', '.join(_REQUIRED[kind])}"
        )
    if not isinstance(record["answer"], str):
        raise NegprefError(f"{where}: 'answer' must be a string")
    perturbed = record.get("perturbed_answer")
    if perturbed is not None:
        items = [perturbed] if isinstance(perturbed, str) else perturbed
        if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
            raise NegprefError(
                f"{where}: 'perturbed_answer' must be a non-empty string or list of them"
            )


def make_eval_set(
    kind: str, records: list[dict], source: str, limit: int | None, seed: int | None
) -> EvalSet:
    if not records:
        raise NegprefError(f"{source}: no {kind} items")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise NegprefError(f"{place(records, i, source)}: expected a JSON object")
        _check_record(kind, record, place(records, i, source))
    keep = subsample(len(records), limit, seed)
    return EvalSet(kind=kind, records=[records[i] for i in keep], indices=keep, source=source)


def resolve_tofu_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir``, else ``$NEGPREF_TOFU_DIR``, else ``../shared/data/tofu`` from the cwd."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise NegprefError(f"data_dir {data_dir}: no such directory")
        return path
    env = os.environ.get(TOFU_DIR_ENV)
    if env:
        if not Path(env).is_dir():
            raise NegprefError(f"${TOFU_DIR_ENV}={env}: no such directory")
        return Path(env)
    if DEFAULT_TOFU_DIR.is_dir():
        return DEFAULT_TOFU_DIR
    raise NegprefError(
        f"no TOFU data: set data_dir to a folder with forgetNN.json, forgetNN_perturbed.json, "
        f"{RETAIN_PERTURBED}, ..., or set ${TOFU_DIR_ENV}"
    )


def _split_percent(split: str) -> int:
    match = re.fullmatch(r"forget(\d{2})", split)
    if not match:
        raise NegprefError(f"split {split!r}: expected forgetNN, e.g. forget01, forget10")
    return int(match.group(1))


def _forget_eval_file(data_dir: Path, split: str) -> Path:
    """The split's own perturbed file, else forget10's for splits beyond 10% (NPO paper E.1.1)."""
    own = data_dir / f"{split}_perturbed.json"
    if own.is_file():
        return own
    fallback = data_dir / "forget10_perturbed.json"
    if _split_percent(split) > 10 and fallback.is_file():
        return fallback
    raise NegprefError(
        f"{own}: not found; the forget set's truth ratio needs paraphrased and perturbed answers "
        f"(splits above 10% use {fallback.name})"
    )


def check_perturbed_matches(
    perturbed: list[dict], split_questions: list, perturbed_source: str, split_source: str
) -> None:
    """Every evaluation item must be a question of the forget split; report those that are not."""
    known = {json.dumps(q, sort_keys=True) for q in split_questions}
    stray = [
        i for i, r in enumerate(perturbed) if json.dumps(r["question"], sort_keys=True) not in known
    ]
    if stray:
        raise NegprefError(
            f"{perturbed_source}: {len(stray)} of {len(perturbed)} items ask questions that are "
            f"not in {split_source} (items {short_list(stray)}); the perturbed set must come from "
            "the same forget split"
        )


def load_tofu_sets(
    data_dir: str | os.PathLike | None,
    split: str,
    limit: int | None = None,
    seed: int | None = None,
    holdout: str | os.PathLike | None = None,
) -> TofuSets:
    """Read the TOFU evaluation sets of ``split`` from a TOFU-format directory.

    Forget: ``{split}_perturbed.json`` (``forget10_perturbed.json`` for splits above 10%,
    checked to be questions of ``{split}.json``); retain: ``retain_perturbed.json``; real
    authors and world facts: ``*_perturbed.json``; holdout (membership-inference non-members):
    ``holdout`` or ``holdout{NN}.json`` when present. ``limit`` keeps the first ``limit`` items
    of each set (TOFU evaluates 300), or a seeded sample with ``seed``.
    """
    percent = _split_percent(split)
    root = resolve_tofu_dir(data_dir)
    forget_eval_path = _forget_eval_file(root, split)
    split_records = load_records(
        root / f"{split}.json", ("question", "answer"), "forget split", kinds=_KINDS
    )
    forget_records = load_records(
        forget_eval_path, _REQUIRED["forget"], "forget evaluation", kinds=_KINDS
    )
    check_perturbed_matches(
        forget_records,
        [r["question"] for r in split_records],
        str(forget_eval_path),
        str(root / f"{split}.json"),
    )

    def read(kind: str, path: Path) -> EvalSet:
        records = load_records(path, _REQUIRED[kind], f"{kind} evaluation", kinds=_KINDS)
        return make_eval_set(kind, records, str(path), limit, seed)

    holdout_path = Path(holdout) if holdout is not None else root / f"holdout{percent:02d}.json"
    if holdout is not None and not holdout_path.is_file():
        raise NegprefError(f"holdout {holdout}: file not found")
    return TofuSets(
        split=split,
        forget=make_eval_set("forget", forget_records, str(forget_eval_path), limit, seed),
        retain=read("retain", root / RETAIN_PERTURBED),
        real_authors=read("real_authors", root / REAL_AUTHORS_PERTURBED),
        world_facts=read("world_facts", root / WORLD_FACTS_PERTURBED),
        holdout=read("holdout", holdout_path) if holdout_path.is_file() else None,
    )


# ---------------------------------------------------------------------------------- evaluation


def _perturbed_lists(records: list[dict]) -> list[list[str]]:
    return [
        [p] if isinstance(p, str) else list(p) for p in (r["perturbed_answer"] for r in records)
    ]


def _gt_metrics(keys: list[str], scores: AnswerScores) -> dict[str, dict]:
    metrics_by_key: dict[str, dict] = {
        "avg_gt_loss": dict(zip(keys, scores.avg_losses)),
        "gt_loss": {k: -lp for k, lp in zip(keys, scores.logps)},
        "num_token_gt": dict(zip(keys, scores.n_tokens)),
    }
    if scores.kl_ref is not None:
        metrics_by_key["kl_ref"] = dict(zip(keys, scores.kl_ref))
    if scores.mia is not None:
        for attack, values in scores.mia.items():
            metrics_by_key[f"mia_{attack}"] = dict(zip(keys, values))
    if scores.exact_memorization is not None:
        metrics_by_key["exact_memorization"] = dict(zip(keys, scores.exact_memorization))
        metrics_by_key["extraction_strength"] = dict(zip(keys, scores.extraction_strength))
    return metrics_by_key


def _evaluate_set(
    model,
    tokenizer,
    eval_set: EvalSet,
    batch_size: int,
    max_length: int,
    max_new_tokens: int | None,
    ref_model=None,
    mia_k: float | None = None,
    progress: bool = False,
    prompt: PromptFormat = DEFAULT_PROMPT,
    conventions: Conventions = NPO,
    answers_only: bool = False,
    memorization: bool = False,
    mia_ref_model=None,
    gradnorm: bool = False,
    share_prompts: bool = True,
    generation_batch_size: int | None = None,
    drop_finished_rows: bool = True,
    shards: Shards | None = None,
) -> dict[str, dict]:
    """Per-item logs of one set; ``max_new_tokens=None`` skips generation (and ROUGE),
    ``answers_only`` also the truth ratio (the holdout set only feeds membership inference).
    ``memorization`` adds exact memorization / extraction strength of the answers; with
    ``mia_k``, ``mia_ref_model`` and ``gradnorm`` add the reference and GradNorm attacks."""
    kind, records, keys = eval_set.kind, eval_set.records, eval_set.keys
    questions = [r["question"] for r in records]
    answers = [r["answer"] for r in records]

    def desc(what: str) -> str | None:
        return f"{kind}: {what}" if progress else None

    # One scoring pass for every answer a question needs (its answer, paraphrase and perturbed
    # answers continue one encoding of the question); KL, MIA and memorization on the answer.
    # Unshared: one pass per kind of answer, each a full sequence per answer.
    has_paraphrase = "paraphrased_answer" in _REQUIRED[kind] and not answers_only
    perturbed = [] if answers_only else _perturbed_lists(records)
    pairs = list(zip(questions, answers))
    if has_paraphrase:
        pairs += [(q, r["paraphrased_answer"]) for q, r in zip(questions, records)]
    pairs += [(q, p) for q, ps in zip(questions, perturbed) for p in ps]
    encoded = [encode_qa(tokenizer, q, a, max_length, prompt) for q, a in pairs]
    n = len(records)
    gt_extras = dict(ref_model=ref_model, mia_k=mia_k, memorization=memorization)

    def score(start: int, stop: int, what: str, **extra) -> AnswerScores:
        return score_encoded(
            model,
            tokenizer.pad_token_id,
            encoded[start:stop],
            [a for _, a in pairs[start:stop]],
            batch_size,
            desc=desc(what),
            conventions=conventions,
            share_prompts=share_prompts,
            shards=shards,
            **extra,
        )

    if share_prompts:
        detail = [i < n for i in range(len(pairs))]
        scores = score(0, len(pairs), "answers", detail=detail, **gt_extras)
    else:
        kinds = [score(0, n, "answers", **gt_extras)]
        if has_paraphrase:
            kinds.append(score(n, 2 * n, "paraphrased"))
        kinds.append(score(2 * n if has_paraphrase else n, len(pairs), "perturbed"))
        scores = AnswerScores.concat(kinds)
    gt = scores.subset(0, n)
    log = _gt_metrics(keys, gt)
    if mia_k is not None and (mia_ref_model is not None or gradnorm):
        extra = model_attack_scores(
            model,
            tokenizer.pad_token_id,
            encoded[:n],
            answers,
            gt,
            batch_size,
            mia_ref_model,
            gradnorm,
            shards=shards,
        )
        log.update({f"mia_{attack}": dict(zip(keys, v)) for attack, v in extra.items()})
    if answers_only:
        return log

    if max_new_tokens is not None:
        generations = greedy_generate(
            model,
            tokenizer,
            questions,
            generation_batch_size or batch_size,
            max_new_tokens,
            max_length,
            desc("generation"),
            prompt=prompt,
            drop_finished_rows=drop_finished_rows,
            map_batches=(shards or Shards()).map,
        )
        rouge1, rouge_l = metrics.rouge_recalls(answers, generations)
        log["generated_text"] = {
            k: [q, g, a] for k, q, g, a in zip(keys, questions, generations, answers)
        }
        log["rouge1_recall"] = dict(zip(keys, rouge1))
        log["rougeL_recall"] = dict(zip(keys, rouge_l))

    # TOFU scores real authors / world facts against the answer itself
    para = scores.subset(n, 2 * n) if has_paraphrase else gt
    pert = scores.subset(2 * n if has_paraphrase else n, len(pairs))
    bounds = np.cumsum([0, *(len(ps) for ps in perturbed)]).tolist()
    spans = list(itertools.pairwise(bounds))
    pert_avg = [pert.avg_losses[a:b] for a, b in spans]
    para_avg = para.avg_losses

    log["average_perturb_loss"] = dict(zip(keys, pert_avg))
    log["avg_paraphrased_loss"] = dict(zip(keys, para_avg))
    log["truth_ratio"] = dict(zip(keys, metrics.truth_ratios(para_avg, pert_avg).tolist()))
    log["paraphrased_loss"] = {k: -lp for k, lp in zip(keys, para.logps)}
    log["perturb_loss"] = {k: [-lp for lp in pert.logps[a:b]] for k, (a, b) in zip(keys, spans)}
    log["num_token_paraphrased"] = dict(zip(keys, para.n_tokens))
    log["num_token_perturb"] = {k: pert.n_tokens[a:b] for k, (a, b) in zip(keys, spans)}
    if kind in ("real_authors", "world_facts"):
        log["normalized_gt_loss"] = {
            k: -math.log(metrics.normalized_prob(g, p))
            for k, g, p in zip(keys, gt.avg_losses, pert_avg)
        }
    return log


def evaluate_tofu(
    model,
    tokenizer,
    sets: TofuSets,
    batch_size: int = 8,
    max_new_tokens: int = 200,
    max_length: int = 512,
    ref_model=None,
    mia_k: float | None = None,
    progress: bool = False,
    prompt: PromptFormat = DEFAULT_PROMPT,
    conventions: Conventions | str = NPO,
    generate: bool = True,
    mia_ref_model=None,
    gradnorm: bool = False,
    share_prompts: bool = True,
    generation_batch_size: int | None = None,
    drop_finished_rows: bool = True,
    shards: Shards | None = None,
) -> dict[str, dict]:
    """Evaluate ``model`` on every set of ``sets``; return per-item logs in TOFU's format.

    With ``ref_model`` the forget and retain logs hold ``kl_ref`` (forget / retain KL); with a
    holdout set, the forget and holdout logs hold the ``mia_*`` attack scores (Min-K% over
    ``mia_k`` of the tokens, default: the conventions' 0.2 or 0.4), plus the reference attacks
    against ``mia_ref_model`` (e.g. the retain model) and, with ``gradnorm``, GradNorm. The
    forget log holds ``exact_memorization`` and ``extraction_strength`` per item (open-unlearning
    computes them on the forget set only). Questions are formatted by
    ``prompt``. ``generate=False`` skips greedy generation, so the logs hold no ROUGE (the
    aggregates that need it say so). ``progress`` shows progress bars (stderr).
    ``share_prompts`` scores a question's answers continuing one encoding of the question
    (off: one full sequence per answer; the values agree up to float rounding).
    ``generation_batch_size`` (default ``batch_size``) rows are generated together: a decoding
    step reads every weight once whatever the batch, so larger batches take fewer steps.
    ``drop_finished_rows`` lets a row leave its generation batch at EOS (off: ``model.generate``
    runs every row until the batch's last one ends; the tokens agree up to float rounding).
    ``shards`` (e.g. ``Shards.of_processes()``) splits the forwards and generation batches over
    processes, each of which must call this with the same arguments; every process returns the
    whole logs, equal to one process's (``negpref.eval.shards``).
    """
    conventions = get_conventions(conventions)
    mia_k = conventions.mia_k if mia_k is None else mia_k
    options = dict(
        batch_size=batch_size,
        max_length=max_length,
        share_prompts=share_prompts,
        generation_batch_size=generation_batch_size,
        drop_finished_rows=drop_finished_rows,
        shards=shards,
        progress=progress,
        prompt=prompt,
        conventions=conventions,
    )
    attack_models = dict(mia_ref_model=mia_ref_model, gradnorm=gradnorm)
    was_training = model.training
    model.eval()
    logs: dict[str, dict] = {}
    try:
        for kind, eval_set in sets.present().items():
            logs[EVAL_FILES[kind]] = _evaluate_set(
                model,
                tokenizer,
                eval_set,
                max_new_tokens=max_new_tokens if generate else None,
                ref_model=ref_model if kind in ("forget", "retain") else None,
                mia_k=mia_k if kind == "forget" and sets.holdout is not None else None,
                memorization=kind == "forget",
                **attack_models,
                **options,
            )
        if sets.holdout is not None:
            logs[HOLDOUT_FILE] = _evaluate_set(
                model,
                tokenizer,
                sets.holdout,
                max_new_tokens=None,
                mia_k=mia_k,
                answers_only=True,
                **attack_models,
                **options,
            )
    finally:
        model.train(was_training)
    logs[META_KEY] = {
        "prompt_format": prompt.describe(tokenizer),
        "conventions": conventions.name,
        "mia_k": mia_k if sets.holdout is not None else None,
        "generation": generate,
    }
    return logs
