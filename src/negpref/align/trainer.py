"""``AlignTrainer``: DPO, generalized-link DPO, ranking NCE; MC-PO and OnMC-PO negatives.

A ``transformers.Trainer`` (``negpref.training.trainer.NegprefTrainer``) whose data are item
indices in a seeded order; one micro-batch, top to bottom (``AlignTrainer.compute_loss``):

1. pick negatives per prompt: uniformly (``dpo``) or with the Monte-Carlo kernel (``mcpo``,
   ``onmcpo``) on scores from a no-grad batched forward over the candidates;
2. one batch ``[chosen..., negatives...]`` through the model (by default each prompt runs once
   and its completions continue from its key/value cache; ``--no-share-prompt``: TRL's single
   concatenated forward);
3. the loss on (policy, reference) log-probs -- reference log-probs were computed once before
   training (adapters disabled under LoRA) -- and TRL's metric names.

OnMC-PO starts a *round* every ``generate_every`` steps: the prompts of the round's batches get
``num_generations`` completions sampled from the current policy, which become (or join) their
candidates; generations and their reference log-probs are cached in ``OUT/generations``. The
negative sampler's generator and the online candidates go into each checkpoint's
``negpref_state.json``, so a resumed run continues bitwise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from negpref import losses
from negpref.align.batches import EncodedItem, encode_items
from negpref.align.config import AlignConfig
from negpref.align.links import link_dpo
from negpref.align.mcpo import KernelDraw, draw, ranking_nce
from negpref.data import Encoded, collate, encode_qa
from negpref.data.preference import FieldNames, load_preferences
from negpref.errors import NegprefError
from negpref.generation import Sampling, generate
from negpref.io import atomic_write_text
from negpref.logprobs import (
    answer_logps,
    batch_to,
    batched_logps,
    can_share_prompts,
    forward_accepts,
    shared_prompt_scores,
    split_answer,
)
from negpref.models import add_lora
from negpref.training.trainer import NegprefTrainer, plan_steps

log = logging.getLogger(__name__)


@dataclass
class Candidates:
    """One prompt's negatives pool: encodings and reference log-probs, in kernel order."""

    encoded: list[Encoded]
    ref_logps: torch.Tensor


class PromptStream(torch.utils.data.Dataset):
    """Item ``i`` is the prompt index at stream position ``i``: reshuffled passes (seeded)."""

    def __init__(self, n_items: int, length: int, seed: int):
        order_gen = torch.Generator().manual_seed(seed)
        stream: list[int] = []
        while len(stream) < length:
            stream += torch.randperm(n_items, generator=order_gen).tolist()
        self.stream = stream[:length]

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, position: int) -> int:
        return self.stream[position]


class AlignTrainer(NegprefTrainer):
    """Preference optimization with (Monte-Carlo) negatives: a ``transformers.Trainer``.

    ``AlignTrainer(model, args, train_dataset=..., processing_class=tokenizer)`` then
    ``train()``, like TRL's ``DPOTrainer``: ``train_dataset`` is anything
    ``load_preferences`` reads (a path, a ``datasets.Dataset``/``DatasetDict``, a list of
    ``prompt``/``chosen``/``rejected`` records, ``PreferenceData``); ``rejected`` may be a list
    of candidates. Metrics carry TRL's names (``rewards/chosen``, ``rewards/margins``, ...).
    """

    def __init__(
        self,
        model,
        args: AlignConfig,
        train_dataset=None,
        processing_class=None,
        callbacks=None,
        run_dir: str | Path | None = None,
    ):
        if processing_class is None:
            raise NegprefError("AlignTrainer: pass the tokenizer as processing_class")
        data = load_preferences(
            train_dataset,
            FieldNames(args.prompt_field, args.chosen_field, args.rejected_field),
            args.num_candidates,
            args.max_length,
        )
        self.config, self.tokenizer = args, processing_class
        self.pad_id = processing_class.pad_token_id
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.items: list[EncodedItem] = encode_items(
            processing_class, data.records, args.max_length, data.source
        )
        if args.lora and not hasattr(model, "peft_config"):
            model = add_lora(model, args)
        # OnMC-PO needs reference log-probs of new completions during training: LoRA gets them
        # with the adapters disabled, full fine-tuning from a frozen copy of the start model.
        self.ref_model = None
        if args.method == "onmcpo" and not args.lora:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        effective_batch, total_steps = plan_steps(args, len(self.items))
        self.run_name_for_progress = f"align {args.method}"
        super().__init__(
            model=model,
            args=args,
            n_items=len(self.items),
            train_dataset=PromptStream(len(self.items), total_steps * effective_batch, args.seed),
            data_collator=self.collate,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        self.trim = forward_accepts(self.model, "logits_to_keep")
        # the shared-prompt forward needs the cache, which checkpointing turns off in training
        self.share_prompt = (
            args.share_prompt and not args.gradient_checkpointing and can_share_prompts(self.model)
        )
        self.generator = torch.Generator().manual_seed(args.seed)
        self.online: dict[int, Candidates] = {}
        self.tokens = 0
        self._reference_ready = False
        self.precompute_reference()
        if args.method == "onmcpo":
            self.add_callback(_OnlineRounds(self))

    @staticmethod
    def collate(indices: list[int]) -> dict:
        return {"indices": torch.tensor(indices, dtype=torch.long)}

    @contextmanager
    def reference(self):
        """The reference policy: a frozen copy, the model with adapters off, or the start model."""
        if self.ref_model is not None:
            yield self.ref_model
        elif self.config.lora:
            model = self.unwrapped
            with model.disable_adapter():
                yield model
        else:  # before the first step the policy is the reference
            if self._reference_ready:
                raise RuntimeError("no reference model kept for full fine-tuning after step 0")
            with self.whole_weights(self.model):
                yield self.model

    def _logps(self, model, encoded: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.per_device_train_batch_size * max(2, self.config.num_negatives + 1)
        return batched_logps(
            model,
            encoded,
            self.pad_id,
            size,
            self.args.device,
            self.accelerator.autocast,
            self.trim,
        )

    def precompute_reference(self) -> None:
        """Reference log-probs of every chosen answer and candidate, once, before training."""
        encoded = [e for it in self.items for e in (it.chosen, *it.candidates)]
        with self.reference() as ref, torch.no_grad():
            ref_logps, _ = self._logps(ref, encoded)
        self._reference_ready = True
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
        self, indices: list[int], encoded: list[Encoded], owner: list[int], model=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy log-probs and lengths of ``encoded``; ``encoded[j]`` answers ``indices[owner[j]]``."""
        device, model = self.args.device, model if model is not None else self.model
        with self.accelerator.autocast():
            if self.share_prompt:
                prompts = [split_answer(self.items[i].chosen)[0] for i in indices]
                answers = [split_answer(e)[1] for e in encoded]
                out = shared_prompt_scores(model, prompts, answers, owner, self.pad_id, device)
                return out.logps, out.n_tokens
            batch = batch_to(collate(encoded, self.pad_id), device)
            return answer_logps(model, batch, self.trim)

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

    def pair_loss(
        self, indices: list[int], negatives: list[list[int]], model=None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Loss, TRL-named metrics and tokens of prompts ``indices`` against ``negatives``;
        ``model``: the policy as the Trainer wraps it (DDP/FSDP), default the bare one."""
        cfg, device = self.config, self.args.device
        pools = [self.candidates(i) for i in indices]
        chosen = [self.items[i].chosen for i in indices]
        negs = [pool.encoded[j] for pool, js in zip(pools, negatives, strict=True) for j in js]
        b = len(indices)
        neg_owner = [o for o, js in enumerate(negatives) for _ in js]
        # one batch [chosen..., negatives...], as TRL's concatenated forward
        owners = list(range(b)) + neg_owner
        logps = self.completion_logps(indices, chosen + negs, owners, model)[0]
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
        def per_prompt(values: torch.Tensor) -> torch.Tensor:
            return (values * pair_weights).sum() / b

        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": per_prompt(neg_rewards),
            "rewards/margins": per_prompt(chosen_rewards[owner] - neg_rewards),
            "rewards/accuracies": per_prompt((chosen_rewards[owner] > neg_rewards).float()),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": per_prompt(neg_logps.detach()),
        }
        # tokens of the prompt+completion sequences, as TRL counts them, shared prompt or not
        return loss, metrics, sum(len(e.input_ids) for e in chosen + negs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One micro-batch: pick negatives, one batched forward, the preference loss."""
        indices = inputs["indices"].tolist()
        negatives, kernel = self.pick_negatives(indices)
        loss, metrics, tokens = self.pair_loss(indices, negatives, model)
        self.tokens += tokens
        if kernel is not None:
            metrics["mcpo/kernel_entropy"] = kernel.entropy.mean()
            metrics["mcpo/hardest_hit_rate"] = torch.tensor(kernel.hardest_hit_rate)
            metrics["mcpo/accept_rate"] = torch.tensor(kernel.accept_rate)
        metrics["tokens"] = torch.tensor(float(tokens))
        self.store_metrics(metrics)
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["num_tokens"] = self.tokens * self.accelerator.num_processes
        super().log(logs, start_time)

    # -- OnMC-PO rounds -------------------------------------------------------------------------

    def start_round(self) -> None:
        """Sample candidates from the current policy for the prompts of the next round."""
        cfg, step = self.config, self.state.global_step
        round_index = step // cfg.generate_every
        indices = self._upcoming_items(step, min(step + cfg.generate_every, self.total_steps))
        prompts = [self.items[i].record.prompt for i in indices]
        sampling = Sampling(
            cfg.gen_max_new_tokens, cfg.gen_temperature, cfg.gen_top_p, cfg.gen_top_k,
            cfg.num_generations,
        )  # fmt: skip
        with self.accelerator.autocast():
            texts = generate(
                self.unwrapped, self.tokenizer, prompts, sampling, cfg.max_length,
                batch_size=cfg.per_device_train_batch_size * 2,
                seed=cfg.seed * 100_003 + round_index,
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
        if self.run_dir is not None and self.accelerator.is_main_process:
            rows = [
                {"item": i, "completions": cs, "ref_logps": self.online[i].ref_logps.tolist()}
                for i, cs in kept.items()
            ]
            gen_dir = self.run_dir / "generations"
            gen_dir.mkdir(parents=True, exist_ok=True)
            text = "".join(json.dumps(r) + "\n" for r in rows)
            atomic_write_text(gen_dir / f"round_{round_index:04d}.jsonl", text)

    def _upcoming_items(self, start: int, end: int) -> list[int]:
        """This process's prompt indices in optimizer steps ``start .. end - 1``.

        accelerate deals the stream's micro-batches round-robin over processes.
        """
        b, g = self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        stream = self.train_dataset.stream
        found = set()
        for step in range(start, end):
            for a in range(g):
                batch = (step * g + a) * world + rank
                found.update(stream[batch * b : (batch + 1) * b])
        return sorted(found)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """The sampler's generator, the token count and the online candidates, as JSON."""
        return {
            **super().checkpoint_state(),
            "tokens": self.tokens,
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

    def load_checkpoint_state(self, state: dict) -> None:
        self.tokens = state["tokens"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.online = {
            row["item"]: Candidates(
                [Encoded(**e) for e in row["encoded"]], torch.tensor(row["ref_logps"])
            )
            for row in state["online"]
        }


class _OnlineRounds(TrainerCallback):
    """OnMC-PO: a new round of sampled candidates every ``generate_every`` steps."""

    def __init__(self, trainer: AlignTrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.trainer.config.generate_every == 0:
            self.trainer.start_round()


class RewardEvaluation:
    """Mean reward of ``eval_samples`` sampled completions per prompt (same seed every time);
    an evaluation callback (``on_evaluate(state, model, tokenizer)``)."""

    def __init__(self, reward: Callable[[object, str], float], prompts: list, config: AlignConfig):
        self.reward, self.prompts, self.config = reward, prompts, config
        self.sampling = Sampling(
            config.eval_max_new_tokens, config.eval_temperature, num_samples=config.eval_samples
        )

    def on_evaluate(self, state, model, tokenizer) -> dict:
        cfg = self.config
        texts = generate(
            model,
            tokenizer,
            self.prompts,
            self.sampling,
            cfg.max_length,
            batch_size=cfg.per_device_train_batch_size * 2,
            seed=cfg.seed + 1,
        )
        values = torch.tensor(
            [self.reward(p, t) for p, ts in zip(self.prompts, texts, strict=True) for t in ts]
        )
        return {"reward": values.mean().item(), "reward_std": values.std().item()}
