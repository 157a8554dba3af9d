"""TOFU evaluation throughput: negpref's evaluator vs a naive per-metric one, same items.

Both evaluate the same model (loaded once, ``--dtype``) on the same forget and retain items
and produce the same per-item figures: the answer's loss, exact memorization and extraction
strength (forget set), the paraphrased and perturbed answers' losses (truth ratio) and a
greedy generation for ROUGE.

- **ours**: ``negpref.eval.tofu.evaluate_tofu``: one length-sorted scoring pass per set in
  which a question is encoded once and its answer, paraphrase and perturbed answers continue
  its key/value cache; the answer's logits feed every metric that needs them; generation in
  longest-first batches of ``--gen-batch`` that stop when every row has emitted EOS.
- **ours_unshared**: the same with ``share_prompts=False`` (one full sequence per answer), to
  isolate what sharing the question saves.
- **naive**: the way open-unlearning evaluates: one pass per metric (probability, exact
  memorization, extraction strength, paraphrased probability, and one pass per perturbed
  answer index), each over the items in file order in batches of ``--batch-size``, full
  logits at every position; generation in file order in batches of ``--gen-batch``.

After a warm-up on one item, the three run one after the other in one process; items/s counts questions evaluated. The
figures of the naive evaluator are checked against ours (largest loss difference, share of
identical generations). Tokens are the positions each evaluator runs through the model in
scoring passes (generation excluded).
"""

from __future__ import annotations

import time

import torch

from negpref.data import collate, encode_qa
from negpref.errors import NegprefError
from negpref.eval.memorization import exact_memorization, extraction_strength, greedy_matches
from negpref.eval.tofu import TofuSets, evaluate_tofu, load_tofu_sets
from negpref.generation import Sampling, completion_text, generate_ids, prompt_ids
from negpref.logprobs import sequence_logps, split_answer
from negpref.threads import cpu_model


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="HF model directory (default: a tiny random Llama)")
    parser.add_argument("--data-dir", help="TOFU data directory (default: ../shared/data/tofu)")
    parser.add_argument("--split", default="forget10", help="TOFU forget split")
    parser.add_argument("--items", type=int, default=16, help="items of each set")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--gen-batch", type=int, default=32, help="generation batch (both)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="greedy tokens")
    parser.add_argument("--max-length", type=int, default=512, help="max tokens per sequence")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="weights"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: as is)")


def _model(args, sets: TofuSets):
    from negpref.models import ModelSpec, build_tokenizer, load_model, tiny_llama

    if args.model:
        return load_model(ModelSpec(args.model, dtype=args.dtype), "cpu")
    texts = [
        text
        for s in sets.present().values()
        for r in s.records
        for text in (r["question"], r["answer"], *r.get("perturbed_answer", []))
    ]
    tokenizer = build_tokenizer(texts, vocab_size=400)
    return tiny_llama(len(tokenizer), seed=0), tokenizer


class _Naive:
    """One pass per metric, items in file order, every position's logits."""

    def __init__(self, model, tokenizer, args):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.tokens = 0

    def passes(self, pairs):
        """Per batch of ``pairs`` in order: the forward's ``SequenceLogps``."""
        step = self.args.batch_size
        for start in range(0, len(pairs), step):
            encoded = [
                encode_qa(self.tokenizer, q, a, self.args.max_length)
                for q, a in pairs[start : start + step]
            ]
            batch = collate(encoded, self.tokenizer.pad_token_id)
            self.tokens += int(batch["attention_mask"].sum())
            yield sequence_logps(self.model, batch, keep_logits=True)

    def avg_losses(self, pairs) -> list[float]:
        return [v for out in self.passes(pairs) for v in (-out.logps / out.n_tokens).tolist()]

    def memorization(self, pairs, metric) -> list[float]:
        return [
            v
            for out in self.passes(pairs)
            for v in metric(greedy_matches(out.logits, out.targets, out.mask), out.mask).tolist()
        ]

    def generations(self, questions) -> list[str]:
        ids = [prompt_ids(self.tokenizer, q, self.args.max_length) for q in questions]
        rows = generate_ids(
            self.model,
            self.tokenizer,
            ids,
            Sampling(self.args.max_new_tokens, 0.0),
            self.args.gen_batch,
        )
        return [completion_text(self.tokenizer, r[0]).strip() for r in rows]

    def evaluate(self, eval_set, generate: bool = True) -> dict:
        records = eval_set.records
        questions = [r["question"] for r in records]
        gt = list(zip(questions, [r["answer"] for r in records]))
        figures = {"avg_gt_loss": self.avg_losses(gt)}
        if eval_set.kind == "forget":
            figures["exact_memorization"] = self.memorization(gt, exact_memorization)
            figures["extraction_strength"] = self.memorization(gt, extraction_strength)
        para = [(q, r["paraphrased_answer"]) for q, r in zip(questions, records)]
        figures["avg_paraphrased_loss"] = self.avg_losses(para)
        perturbed = [r["perturbed_answer"] for r in records]
        per_index = [
            self.avg_losses([(q, ps[j]) for q, ps in zip(questions, perturbed)])
            for j in range(len(perturbed[0]))
        ]
        figures["average_perturb_loss"] = [list(v) for v in zip(*per_index)]
        if generate:
            figures["generations"] = self.generations(questions)
        return figures


def _shared_tokens(tokenizer, sets: TofuSets, max_length: int, shared: bool) -> int:
    """Positions our scoring pass runs: the question once per question when ``shared``."""
    total = 0
    for eval_set in sets.present().values():
        for r in eval_set.records:
            answers = [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
            encoded = [encode_qa(tokenizer, r["question"], a, max_length) for a in answers]
            if shared:
                total += len(split_answer(encoded[0])[0])
                total += sum(len(split_answer(e)[1]) for e in encoded)
            else:
                total += sum(len(e.input_ids) for e in encoded)
    return total


def _compare(ours: dict, naive: dict) -> dict:
    diffs, same, total = [], 0, 0
    for name, figures in naive.items():
        log = ours[name]
        keys = list(log["avg_gt_loss"])
        for metric in ("avg_gt_loss", "avg_paraphrased_loss", "exact_memorization"):
            if metric in figures:
                diffs += [abs(log[metric][k] - v) for k, v in zip(keys, figures[metric])]
        for k, pert in zip(keys, figures["average_perturb_loss"]):
            diffs += [abs(a - b) for a, b in zip(log["average_perturb_loss"][k], pert)]
        for k, text in zip(keys, figures["generations"]):
            same += log["generated_text"][k][1] == text
            total += 1
    return {"max_abs_diff": max(diffs), "identical_generations": same / total}


def _scoring_seconds(model, tokenizer, sets: TofuSets, args) -> dict:
    """Seconds of the scoring passes alone (no generation): ours, and the naive evaluator's."""
    start = time.perf_counter()
    evaluate_tofu(
        model, tokenizer, sets, args.batch_size, max_length=args.max_length, generate=False
    )
    ours = time.perf_counter() - start
    naive = _Naive(model, tokenizer, args)
    start = time.perf_counter()
    for eval_set in (sets.forget, sets.retain):
        naive.evaluate(eval_set, generate=False)
    naive_s = time.perf_counter() - start
    return {"ours_seconds": ours, "naive_seconds": naive_s, "speedup": naive_s / ours}


def check(args) -> None:
    if args.items < 1:
        raise NegprefError(f"--items: must be >= 1, got {args.items}")


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    full = load_tofu_sets(args.data_dir, args.split, limit=args.items)
    sets = TofuSets(split=full.split, forget=full.forget, retain=full.retain)
    model, tokenizer = _model(args, sets)
    model.eval()
    n_items = len(sets.forget) + len(sets.retain)
    figures: dict = {}
    logs = {}
    with torch.no_grad():
        # warm-up: the first forwards of a process pay for allocation and kernel choice
        warm = TofuSets.from_records(sets.forget.records[:1], sets.retain.records[:1])
        evaluate_tofu(model, tokenizer, warm, args.batch_size, 2, args.max_length)
        for name, shared in (("ours", True), ("ours_unshared", False)):
            start = time.perf_counter()
            logs[name] = evaluate_tofu(
                model, tokenizer, sets, args.batch_size, args.max_new_tokens, args.max_length,
                share_prompts=shared, generation_batch_size=args.gen_batch,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            figures[name] = {
                "seconds": seconds,
                "items_per_second": n_items / seconds,
                "scoring_tokens": _shared_tokens(tokenizer, sets, args.max_length, shared),
            }
        naive = _Naive(model, tokenizer, args)
        start = time.perf_counter()
        naive_figures = {
            "eval_log_forget.json": naive.evaluate(sets.forget),
            "eval_log.json": naive.evaluate(sets.retain),
        }
        seconds = time.perf_counter() - start
        figures["naive"] = {
            "seconds": seconds,
            "items_per_second": n_items / seconds,
            "scoring_tokens": naive.tokens,
        }
        figures["scoring"] = _scoring_seconds(model, tokenizer, sets, args)
    speedup = figures["ours"]["items_per_second"] / figures["naive"]["items_per_second"]
    return {
        "benchmark": "tofu-eval",
        "model": args.model or "random",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "items": n_items,
        "max_new_tokens": args.max_new_tokens,
        **figures,
        "same_figures": _compare(logs["ours"], naive_figures),
        "speedup": speedup,
        "sharing_speedup": figures["ours"]["items_per_second"]
        / figures["ours_unshared"]["items_per_second"],
        "target_speedup": 2.0,
        "meets_target": speedup >= 2.0,
    }
