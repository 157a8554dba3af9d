"""The ``negpref align`` loop: DPO, generalized-link DPO, ranking NCE; MC-PO and OnMC-PO negatives.

One step, top to bottom (``AlignTrainer.micro_step``):

1. pick negatives per prompt: uniformly (``dpo``) or with the Monte-Carlo kernel (``mcpo``,
   ``onmcpo``) on scores from a no-grad batched forward over the candidates;
2. one batch ``[chosen..., negatives...]`` through the model (by default each prompt runs once
   and its completions continue from its key/value cache; ``--no-share-prompt``: TRL's single
   concatenated forward);
3. the loss on (policy, reference) log-probs -- reference log-probs were computed once before
   training (adapters disabled under LoRA) -- and TRL's metric names.

OnMC-PO starts a *round* every ``generate_every`` steps: the prompts of the round's batches get
``num_generations`` completions sampled from the current policy, which become (or join) their
candidates; generations and their reference log-probs are cached in ``OUT/generations``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from negpref import losses
from negpref.align.batches import (
    EncodedItem,
    answer_logps,
    batch_to,
    encode_items,
    forward_accepts,
    logps_of,
    shared_prompt_logps,
    split_answer,
)
from negpref.align.config import AlignConfig
from negpref.align.generate import Sampling, generate
from negpref.align.links import link_dpo
from negpref.align.mcpo import KernelDraw, draw, ranking_nce
from negpref.data import Encoded, collate, encode_qa
from negpref.data.preference import FieldNames, load_preferences
from negpref.io import append_jsonl, atomic_write_text, read_jsonl_through
from negpref.training import checkpoint as ckpt
from negpref.training.devices import new_accelerator

log = logging.getLogger(__name__)

EvalFn = Callable[["AlignTrainer"], dict]


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float]
    tokens: int


@dataclass
class Candidates:
    """One prompt's negatives pool: encodings and reference log-probs, in kernel order."""

    encoded: list[Encoded]
    ref_logps: torch.Tensor


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def total_steps(config: AlignConfig, n_items: int) -> int:
    if config.max_steps:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum
    return max(1, math.ceil(config.epochs * n_items / per_step))


def _mixed_precision(config: AlignConfig) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    cuda = torch.cuda.is_available() and not config.cpu
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"


def apply_lora(model, config: AlignConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


class AlignTrainer:
    def __init__(
        self,
        config: AlignConfig,
        model,
        tokenizer,
        data,
        run_dir: str | Path | None = None,
        eval_fn: EvalFn | None = None,
    ):
        """``data``: ``PreferenceData``, or any source ``load_preferences`` reads (a path, a
        ``datasets.Dataset``/``DatasetDict``, a list of dict records)."""
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        data = load_preferences(
            data,
            FieldNames(config.prompt_field, config.chosen_field, config.rejected_field),
            config.num_candidates,
            config.max_length,
        )
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.eval_fn = eval_fn
        self.accelerator = new_accelerator(
            mixed_precision=_mixed_precision(config),
            cpu=config.cpu,
            gradient_accumulation_steps=config.grad_accum,
        )
        set_seed(config.seed)
        self.items: list[EncodedItem] = encode_items(
            tokenizer, data.records, config.max_length, data.source
        )
        if config.gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        if config.lora_r:
            model = apply_lora(model, config)
        # OnMC-PO needs reference log-probs of new completions during training: LoRA gets them
        # with the adapters disabled, full fine-tuning from a frozen copy of the start model.
        self.ref_model = None
        if config.method == "onmcpo" and not config.lora_r:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # the fused kernel (CPU and CUDA) skips the per-parameter temporaries of the loop one
        optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
        )
        self.total_steps = total_steps(config, len(self.items))
        scheduler = get_scheduler(
            config.lr_scheduler, optimizer, config.warmup_steps, self.total_steps
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            model, optimizer, scheduler
        )
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.trim = forward_accepts(unwrapped, "logits_to_keep")
        # the shared-prompt forward needs the cache, which checkpointing turns off in training
        self.share_prompt = (
            config.share_prompt
            and not config.gradient_checkpointing
            and forward_accepts(unwrapped, "logits_to_keep", "past_key_values", "position_ids")
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.schedule = self._schedule()
        self.online: dict[int, Candidates] = {}
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.history = History()
        if config.lora_r:  # the frozen base reloads from the model; checkpoints hold adapters
            self.accelerator.register_save_state_pre_hook(ckpt.keep_trainable_only)
        self._precompute_reference()

    # -- data order and reference -------------------------------------------------------------

    def _schedule(self) -> list[list[list[int]]]:
        """This process's item indices per micro-batch, per optimizer step.

        Reshuffled passes over the data; with several processes each global micro-batch of
        ``batch_size * num_processes`` prompts is split between them (data parallel).
        """
        order_gen = torch.Generator().manual_seed(self.config.seed)
        b, g = self.config.batch_size, self.config.grad_accum
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        needed = self.total_steps * g * b * world
        stream: list[int] = []
        while len(stream) < needed:
            stream += torch.randperm(len(self.items), generator=order_gen).tolist()
        micro = [stream[i + rank * b : i + (rank + 1) * b] for i in range(0, needed, b * world)]
        return [micro[i : i + g] for i in range(0, len(micro), g)]

    @contextmanager
    def reference(self):
        """The reference policy: a frozen copy, the model with adapters off, or the start model."""
        if self.ref_model is not None:
            yield self.ref_model
        elif self.config.lora_r:
            model = self.accelerator.unwrap_model(self.model)
            with model.disable_adapter():
                yield model
        else:  # before the first step the policy is the reference
            if self.step:
                raise RuntimeError("no reference model kept for full fine-tuning after step 0")
            yield self.model

    def _logps(self, model, encoded: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.batch_size * max(2, self.config.num_negatives + 1)
        return logps_of(
            model,
            encoded,
            self.pad_id,
            size,
            self.accelerator.device,
            self.accelerator.autocast,
            self.trim,
        )

    def _precompute_reference(self) -> None:
        encoded = [e for it in self.items for e in (it.chosen, *it.candidates)]
        with self.reference() as ref:
            ref_logps, _ = self._logps(ref, encoded)
        pos = 0
        for it in self.items:
            it.ref_chosen = ref_logps[pos].item()
            it.ref_candidates = ref_logps[pos + 1 : pos + 1 + len(it.candidates)].tolist()
            pos += 1 + len(it.candidates)

    # -- negatives ----------------------------------------------------------------------------

    def candidates(self, index: int) -> Candidates:
        item = self.items[index]
        offline = Candidates(item.candidates, torch.tensor(item.ref_candidates))
        online = self.online.get(index)
        if online is None:
            return offline
        if self.config.online_candidates == "replace":
            return online
        return Candidates(
            offline.encoded + online.encoded, torch.cat([offline.ref_logps, online.ref_logps])
        )

    def completion_logps(
        self, indices: list[int], encoded: list[Encoded], owner: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy log-probs and lengths of ``encoded``; ``encoded[j]`` answers ``indices[owner[j]]``."""
        device = self.accelerator.device
        with self.accelerator.autocast():
            if self.share_prompt:
                prompts = [split_answer(self.items[i].chosen)[0] for i in indices]
                answers = [split_answer(e)[1] for e in encoded]
                return shared_prompt_logps(self.model, prompts, answers, owner, self.pad_id, device)
            batch = batch_to(collate(encoded, self.pad_id), device)
            return answer_logps(self.model, batch, self.trim)

    @torch.no_grad()
    def _kernel_scores(
        self, indices: list[int], pools: list[Candidates]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [B, K_max] of every candidate under the current policy, and the valid mask."""
        encoded = [e for p in pools for e in p.encoded]
        owner = [b for b, p in enumerate(pools) for _ in p.encoded]
        logps, lengths = (t.float().cpu() for t in self.completion_logps(indices, encoded, owner))
        if self.config.kernel_score == "implicit_reward":
            ref = torch.cat([p.ref_logps for p in pools])
            flat = self.config.beta * (logps - ref)
        elif self.config.kernel_length_normalize:
            flat = logps / lengths.clamp(min=1)
        else:
            flat = logps
        k_max = max(len(p.encoded) for p in pools)
        scores = torch.zeros(len(pools), k_max, dtype=torch.float64)
        mask = torch.zeros(len(pools), k_max, dtype=torch.bool)
        pos = 0
        for i, p in enumerate(pools):
            k = len(p.encoded)
            scores[i, :k] = flat[pos : pos + k].double()
            mask[i, :k] = True
            pos += k
        return scores, mask

    def pick_negatives(self, indices: list[int]) -> tuple[list[list[int]], KernelDraw | None]:
        """Per prompt, the candidate positions used as negatives this step."""
        pools = [self.candidates(i) for i in indices]
        m = self.config.num_negatives
        if m == 0:
            return [list(range(len(p.encoded))) for p in pools], None
        if self.config.method == "dpo":
            return [
                torch.randint(len(p.encoded), (m,), generator=self.generator).tolist()
                for p in pools
            ], None
        scores, mask = self._kernel_scores(indices, pools)
        kernel = draw(
            scores,
            mask,
            self.config.kernel_temperature,
            self.config.kernel_steps,
            m,
            self.generator,
        )
        return kernel.indices.tolist(), kernel

    # -- one step -----------------------------------------------------------------------------

    def compute_loss(self, indices: list[int], negatives: list[list[int]]) -> StepOutput:
        """Loss and TRL-named metrics of prompts ``indices`` against their ``negatives``."""
        cfg, device = self.config, self.accelerator.device
        pools = [self.candidates(i) for i in indices]
        chosen = [self.items[i].chosen for i in indices]
        negs = [pool.encoded[j] for pool, js in zip(pools, negatives, strict=True) for j in js]
        b = len(indices)
        neg_owner = [o for o, js in enumerate(negatives) for _ in js]
        # one batch [chosen..., negatives...], as TRL's concatenated forward
        logps = self.completion_logps(indices, chosen + negs, list(range(b)) + neg_owner)[0]
        logps = logps.float()
        owner = torch.tensor(neg_owner, device=device)
        chosen_logps, neg_logps = logps[:b], logps[b:]
        ref_chosen = torch.tensor([self.items[i].ref_chosen for i in indices], device=device)
        ref_neg = torch.cat(
            [pool.ref_logps[js] for pool, js in zip(pools, negatives, strict=True)]
        ).to(device)
        # every prompt weighs the same, whatever its number of negatives
        counts = torch.bincount(owner, minlength=b).float()
        pair_weights = 1.0 / counts[owner]
        if cfg.loss == "nce":
            width = int(counts.max())
            slot = torch.cat([torch.arange(int(c), device=device) for c in counts])
            neg_ratios = torch.zeros(b, width, device=device)
            neg_mask = torch.zeros(b, width, dtype=torch.bool, device=device)
            neg_ratios[owner, slot] = neg_logps - ref_neg
            neg_mask[owner, slot] = True
            loss = ranking_nce(chosen_logps - ref_chosen, neg_ratios, neg_mask, cfg.beta)
        else:
            args = (chosen_logps[owner], neg_logps, ref_chosen[owner], ref_neg)
            weights = None if bool((counts == 1).all()) else pair_weights
            if cfg.loss == "link":
                loss = link_dpo(*args, beta=cfg.beta, link=cfg.link, weights=weights)
            else:
                loss = losses.dpo(*args, beta=cfg.beta, weights=weights)
        chosen_rewards = cfg.beta * (chosen_logps - ref_chosen).detach()
        neg_rewards = cfg.beta * (neg_logps - ref_neg).detach()

        # metrics: mean over each prompt's negatives, then over prompts
        def per_prompt(values: torch.Tensor) -> float:
            return (values * pair_weights).sum().item() / b

        metrics = {
            "loss": loss.item(),
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": per_prompt(neg_rewards),
            "rewards/margins": per_prompt(chosen_rewards[owner] - neg_rewards),
            "rewards/accuracies": per_prompt((chosen_rewards[owner] > neg_rewards).float()),
            "logps/chosen": chosen_logps.detach().mean().item(),
            "logps/rejected": per_prompt(neg_logps.detach()),
        }
        # tokens of the prompt+completion sequences, as TRL counts them, shared prompt or not
        return StepOutput(loss, metrics, sum(len(e.input_ids) for e in chosen + negs))

    def micro_step(self, indices: list[int]) -> dict[str, float]:
        negatives, kernel = self.pick_negatives(indices)
        with self.accelerator.accumulate(self.model):
            out = self.compute_loss(indices, negatives)
            self.accelerator.backward(out.loss)
            if self.accelerator.sync_gradients and self.config.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        self.tokens += out.tokens
        metrics = dict(out.metrics)
        if kernel is not None:
            metrics["mcpo/kernel_entropy"] = kernel.entropy.mean().item()
            metrics["mcpo/hardest_hit_rate"] = kernel.hardest_hit_rate
            metrics["mcpo/accept_rate"] = kernel.accept_rate
            metrics["mcpo/drawn_index"] = kernel.indices.tolist()
        return metrics

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its logged record."""
        start = time.perf_counter()
        micro = [self.micro_step(indices) for indices in self.schedule[self.step]]
        self.train_seconds += time.perf_counter() - start
        self.step += 1
        record: dict = {"step": self.step}
        for key in micro[0]:
            values = [m[key] for m in micro]
            record[key] = (
                sum(values) / len(values)
                if isinstance(values[0], float)
                else [x for v in values for x in v]
            )
        record["learning_rate"] = self.scheduler.get_last_lr()[0]
        record["num_tokens"] = self.tokens
        return record

    # -- OnMC-PO rounds -------------------------------------------------------------------------

    def start_round(self) -> None:
        """Sample candidates from the current policy for the prompts of the next round."""
        cfg = self.config
        round_index = self.step // cfg.generate_every
        upcoming = self.schedule[self.step : self.step + cfg.generate_every]
        indices = sorted({i for step in upcoming for micro in step for i in micro})
        prompts = [self.items[i].record.prompt for i in indices]
        sampling = Sampling(
            cfg.gen_max_new_tokens, cfg.gen_temperature, cfg.gen_top_p, cfg.gen_top_k,
            cfg.num_generations,
        )  # fmt: skip
        texts = generate(
            self.unwrapped_model(), self.tokenizer, prompts, sampling, cfg.max_length,
            batch_size=cfg.batch_size * 2, seed=cfg.seed * 100_003 + round_index,
        )  # fmt: skip
        kept = {}
        for i, completions in zip(indices, texts, strict=True):
            chosen = self.items[i].record.chosen.strip()
            if new := [c for c in completions if c.strip() != chosen]:
                kept[i] = new
        dropped = sum(map(len, texts)) - sum(map(len, kept.values()))
        if dropped:
            log.warning("round %d: dropped %d generation(s) equal to chosen", round_index, dropped)
        encoded = {
            i: [
                encode_qa(self.tokenizer, self.items[i].record.prompt, c, cfg.max_length)
                for c in cs
            ]
            for i, cs in kept.items()
        }
        flat = [e for es in encoded.values() for e in es]
        ref_logps = torch.empty(0)
        if flat:
            with self.reference() as ref:
                ref_logps = self._logps(ref, flat)[0]
        self.online, pos = {}, 0
        for i, es in encoded.items():
            self.online[i] = Candidates(es, ref_logps[pos : pos + len(es)])
            pos += len(es)
        if self.run_dir is not None:
            rows = [
                {"item": i, "completions": cs, "ref_logps": self.online[i].ref_logps.tolist()}
                for i, cs in kept.items()
            ]
            gen_dir = self.run_dir / "generations"
            gen_dir.mkdir(parents=True, exist_ok=True)
            text = "".join(json.dumps(r) + "\n" for r in rows)
            atomic_write_text(gen_dir / f"round_{round_index:04d}.jsonl", text)

    # -- the loop -------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        if self.eval_fn is None:
            return {}
        record = {"step": self.step, **self.eval_fn(self)}
        self.history.evals.append(record)
        self._log(record)
        return record

    def _log(self, record: dict) -> None:
        if self.run_dir is not None and self.accelerator.is_main_process:
            append_jsonl(self.run_dir / "metrics.jsonl", record)

    def train(self, steps: int | None = None) -> History:
        """Run ``steps`` optimizer steps (default: to the end), evaluating as configured."""
        cfg = self.config
        end = self.total_steps if steps is None else min(self.total_steps, self.step + steps)
        from tqdm.auto import tqdm

        if self.step == 0:
            self.evaluate()
        progress = tqdm(
            total=end - self.step, desc=f"align {cfg.method}", disable=None, leave=False
        )
        while self.step < end:
            if cfg.method == "onmcpo" and self.step % cfg.generate_every == 0:
                self.start_round()
            record = self.train_step()
            progress.update()
            self.history.steps.append(record)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._log(record)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != self.total_steps:
                self.evaluate()
            if self.step == self.total_steps:
                self.evaluate()
            if self.run_dir is not None and self._checkpoint_due():
                self.save_checkpoint()
        progress.close()
        return self.history

    # -- checkpoints ----------------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        every = self.config.save_every
        if every < 0:
            return False
        if self.step == self.total_steps:
            return True
        if every > 0:
            return self.step % every == 0
        per_epoch = math.ceil(len(self.items) / (self.config.batch_size * self.config.grad_accum))
        return self.step % per_epoch == 0

    def trainer_state(self) -> dict:
        """Everything besides accelerate's tensors that the next step depends on, as JSON."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "generator": self.generator.get_state().tolist(),
            "online": [
                {
                    "item": i,
                    "encoded": [dataclasses.asdict(e) for e in c.encoded],
                    "ref_logps": c.ref_logps.tolist(),
                }
                for i, c in self.online.items()
            ],
        }

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(
            self.accelerator, self.unwrapped_model(), self.run_dir, self.step,
            self.trainer_state(), self.config.save_total_limit,
        )  # fmt: skip

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint`` (verified): weights, optimizer, schedule, RNG, history."""
        state = ckpt.load_checkpoint(self.accelerator, checkpoint, bool(self.config.lora_r))
        self.step, self.tokens = state["step"], state["tokens"]
        self.train_seconds = state["train_seconds"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.online = {
            row["item"]: Candidates(
                [Encoded(**e) for e in row["encoded"]], torch.tensor(row["ref_logps"])
            )
            for row in state["online"]
        }
        if self.run_dir is not None:
            records = read_jsonl_through(self.run_dir / "metrics.jsonl", self.step)
            self.history.steps = [r for r in records if "loss" in r]
            self.history.evals = [r for r in records if "loss" not in r]

    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)


def reward_eval(
    reward: Callable[[object, str], float], prompts: list, config: AlignConfig
) -> EvalFn:
    """Mean reward of ``eval_samples`` sampled completions per prompt (same seed every time)."""
    sampling = Sampling(
        config.eval_max_new_tokens, config.eval_temperature, num_samples=config.eval_samples
    )

    def evaluate(trainer: AlignTrainer) -> dict:
        texts = generate(
            trainer.unwrapped_model(),
            trainer.tokenizer,
            prompts,
            sampling,
            config.max_length,
            batch_size=config.batch_size * 2,
            seed=config.seed + 1,
        )
        values = torch.tensor(
            [reward(p, t) for p, ts in zip(prompts, texts, strict=True) for t in ts]
        )
        return {"eval/reward": values.mean().item(), "eval/reward_std": values.std().item()}

    return evaluate
