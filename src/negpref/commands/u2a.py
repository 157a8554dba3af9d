"""``negpref u2a``: select and weight the negative samples worth unlearning, then unlearn them.

``negpref u2a --model DIR --forget NEG.jsonl ...`` runs Algorithm 1 of the U2A paper on a
causal LM; ``negpref u2a synthetic`` and ``negpref u2a ablation`` reproduce its checks at CPU
scale (a softmax policy with an exact objective; the Figure 4 ablation on a tiny LM).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from negpref.config import add_config_arguments, build_config, config_to_dict, require
from negpref.errors import NegprefError
from negpref.io import append_jsonl, atomic_write_json, check_out_dir, staged_out_dir
from negpref.report import write_html_report
from negpref.u2a import U2AConfig

EPILOG = """examples:
  negpref u2a --model MODEL_DIR --forget negatives.jsonl --objective dpo \\
      --preference heldout_prefs.jsonl --loss npo --out runs/u2a
  negpref u2a --gguf model.gguf --forget negatives.jsonl --objective reward \\
      --prompts prompts.jsonl --reward refusal_keywords --lora --out runs/u2a
  negpref u2a synthetic --out runs/u2a-synthetic
  negpref u2a ablation --out runs/u2a-ablation

negatives: JSON/JSONL records with prompt+response, question+answer or prompt+rejected.
rewards: refusal_keywords (U2A Table 5), toy_keywords, or module:function (prompt, response)->float.
"""


@dataclass
class U2ARunConfig(U2AConfig):
    """Everything ``negpref u2a`` needs: Algorithm 1's settings plus data, model, objective."""

    model: str = field(default="", metadata={"help": "model directory (or hub id when online)"})
    gguf: str = field(default="", metadata={"help": "GGUF file (path, or name inside --model)"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    forget: str = field(default="", metadata={"help": "candidate negatives (JSON / JSONL)"})
    loss: str = field(
        default="ga",
        metadata={"help": "unlearning loss", "choices": ["ga", "graddiff", "npo", "npo_rt"]},
    )
    retain: str = field(default="", metadata={"help": "retain set for graddiff / npo_rt"})
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
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "LoRA target modules"}
    )

    def validate(self) -> None:
        super().validate()
        require(bool(self.model or self.gguf), "model", self.model, "give --model or --gguf")
        require(bool(self.forget), "forget", self.forget, "give the candidate negatives file")
        if self.loss in ("graddiff", "npo_rt"):
            require(bool(self.retain), "retain", self.retain, f"--loss {self.loss} needs it")
        if self.objective == "dpo":
            require(
                bool(self.preference), "preference", self.preference, "--objective dpo needs it"
            )
        else:
            require(bool(self.prompts), "prompts", self.prompts, "--objective reward needs it")
            require(
                bool(self.reward) != bool(self.reward_model),
                "reward",
                self.reward,
                "--objective reward needs exactly one of --reward and --reward-model",
            )
        for name in ("reward_samples", "max_new_tokens", "max_length", "lora_r"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")


def register(sub) -> None:
    parser = sub.add_parser(
        "u2a",
        help="select and weight negative samples, then unlearn them to align",
        description=__doc__.split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, U2ARunConfig)
    _add_output_arguments(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue a killed run after its last saved round"
    )
    parser.set_defaults(func=_main)
    modes = parser.add_subparsers(dest="u2a_mode", metavar="{synthetic,ablation}")
    synthetic = modes.add_parser("synthetic", help="known-answer check on a softmax policy")
    synthetic.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="problem seeds")
    _add_output_arguments(synthetic)
    synthetic.set_defaults(func=_synthetic)
    ablation = modes.add_parser("ablation", help="Figure 4: top-K by gain vs random K")
    ablation.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds")
    ablation.add_argument("--k", type=int, nargs="+", default=[4, 8, 16, 32], help="set sizes K")
    ablation.add_argument(
        "--objective", choices=["reward", "dpo"], default="reward", help="J used for the gains"
    )
    ablation.add_argument("--loss", choices=["ga", "npo"], default="ga", help="unlearning loss")
    ablation.add_argument("--inner-steps", type=int, default=30, help="unlearning steps per K")
    ablation.add_argument("--rounds", type=int, default=10, help="rounds of the U2A runs")
    ablation.add_argument("--inner-lr", type=float, default=1e-4, help="unlearning learning rate")
    ablation.add_argument("--pretrain-steps", type=int, default=300, help="base model training")
    _add_output_arguments(ablation)
    ablation.set_defaults(func=_ablation)


def _add_output_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


@contextlib.contextmanager
def _warnings_to_stderr(collected: list[str]):
    """U2A's corrections (clamps, renormalisations) as one line each, kept for the summary;
    other libraries' warnings go through unchanged."""
    from negpref.u2a import U2AWarning

    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if not issubclass(category, U2AWarning):
                return default(message, category, *args, **kwargs)
            collected.append(str(message))
            print(f"negpref u2a: warning: {message}", file=sys.stderr)

        warnings.simplefilter("always", U2AWarning)
        warnings.showwarning = show
        yield


def _out_dir(args) -> Path:
    if args.out is None:
        raise NegprefError("--out: give an output directory")
    return check_out_dir(args.out, overwrite=args.overwrite)


def _print(args, summary: dict, line: str) -> None:
    print(json.dumps(summary) if args.json else line)


def _main(args) -> int:
    cfg = build_config(U2ARunConfig, args)
    out = _out_dir(args)
    collected: list[str] = []
    with (
        _warnings_to_stderr(collected),
        staged_out_dir(out, args.overwrite, resume=args.resume) as stage,
    ):
        # Rounds are saved in the stage: a killed run continues with --resume.
        run = _run(cfg, stage / "checkpoints")
        summary = _write_run(run, cfg, stage, collected)
    _print(
        args,
        summary,
        f"selected {summary['selected']} of {summary['candidates']} negatives; "
        f"J {summary['objective_initial']:.4g} -> {summary['objective_final']:.4g} "
        f"({summary['stop_reason']}); wrote {out}",
    )
    return 0


def _run(cfg: U2ARunConfig, state_dir: Path) -> dict:
    from negpref.data.records import PROMPT, load_records
    from negpref.models import ModelSpec, check_lora_targets, load_model
    from negpref.u2a import run_u2a
    from negpref.u2a_objectives import (
        LMForgetTask,
        NegDPOObjective,
        RewardModelScorer,
        RewardObjective,
        load_negatives,
        load_reward_fn,
    )

    # every input file is read and checked before the model loads
    negatives = load_negatives(cfg.forget, cfg.max_length)
    retain = (
        load_negatives(cfg.retain, cfg.max_length) if cfg.loss in ("graddiff", "npo_rt") else None
    )
    if cfg.objective == "dpo":
        pairs = load_records(
            cfg.preference,
            ("prompt", "chosen", "rejected"),
            "preference pairs",
            kinds={"prompt": PROMPT},
            max_length=cfg.max_length,
        )
    else:
        rows = load_records(
            cfg.prompts,
            what="prompts",
            kinds={"prompt": PROMPT, "question": PROMPT},
            max_length=cfg.max_length,
        )
        for i, r in enumerate(rows):
            if not (r.get("prompt") or r.get("question")):
                raise NegprefError(f"{rows.where(i)}: needs a `prompt` (or `question`) field")
        prompts = [r.get("prompt") or r.get("question") for r in rows]
    model, tokenizer = load_model(ModelSpec(cfg.model, cfg.gguf or None, cfg.dtype), cfg.device)
    from transformers import set_seed

    set_seed(cfg.seed)  # the LoRA initialisation and any sampling follow --seed
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        check_lora_targets(model, cfg.lora_targets, "--lora-targets")
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=cfg.lora_targets,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise NegprefError(f"--lora-targets {cfg.lora_targets}: {e}") from None
    else:
        model.requires_grad_(True)
    task = LMForgetTask(
        model,
        tokenizer,
        negatives,
        cfg.loss,
        cfg.npo_beta,
        cfg.max_length,
        retain,
        cfg.retain_weight,
        cfg.batch_size,
    )
    if cfg.objective == "dpo":
        objective = NegDPOObjective(
            model, tokenizer, pairs, cfg.dpo_beta, cfg.max_length, cfg.batch_size
        )
    else:
        reward = (
            RewardModelScorer(cfg.reward_model, cfg.device)
            if cfg.reward_model
            else load_reward_fn(cfg.reward)
        )
        objective = RewardObjective(
            tokenizer,
            prompts,
            reward,
            cfg.reward_samples,
            cfg.max_new_tokens,
            cfg.seed,
            cfg.batch_size,
            cfg.max_length,
        )
    algorithm = U2AConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(U2AConfig)})

    def progress(record: dict) -> None:
        print(
            f"negpref u2a: round {record['round']}: {record['set_size']} selected, "
            f"J {record['objective']:.4g}, g {record['g']:.4g}",
            file=sys.stderr,
        )

    result = run_u2a(model, task, objective, algorithm, on_round=progress, state_dir=state_dir)
    return {"result": result, "model": model, "tokenizer": tokenizer, "negatives": negatives}


def _write_run(run: dict, cfg: U2ARunConfig, stage: Path, collected) -> dict:
    from negpref.models import save_model
    from negpref.u2a_report import run_sections

    result, negatives = run["result"], run["negatives"]
    ids = [n["id"] for n in negatives]
    summary = {
        "candidates": len(negatives),
        "selected": len(result.selected),
        "objective_initial": result.objective_initial,
        "objective_final": result.objective_final,
        "stop_reason": result.stop_reason,
        "rounds": len(result.log) - 1,
        "warnings": collected,
    }
    for i, w in zip(result.selected, result.weights):
        append_jsonl(
            stage / "selected.jsonl",
            {"id": ids[i], "index": i, "weight": w, "initial_gain": result.initial_gains[i]},
        )
    for record in result.log:
        append_jsonl(stage / "u2a_log.jsonl", record)
    for i, gain in enumerate(result.initial_gains):
        append_jsonl(stage / "gains.jsonl", {"id": ids[i], "index": i, "initial_gain": gain})
    save_model(run["model"], run["tokenizer"], stage / "model")
    atomic_write_json(stage / "config.json", config_to_dict(cfg))
    atomic_write_json(stage / "summary.json", summary)
    write_html_report(
        stage / "report.html", "negpref u2a", run_sections(result, ids, config_to_dict(cfg))
    )
    return summary


def _synthetic(args) -> int:
    from negpref.u2a_report import SYNTHETIC_KEYS, synthetic_report
    from negpref.u2a_synthetic import default_config, evaluate

    out = _out_dir(args)
    results = [evaluate(seed) for seed in args.seeds]
    settings = config_to_dict(default_config())
    sections, figures = synthetic_report(results, settings)
    with staged_out_dir(out, args.overwrite) as stage:
        atomic_write_json(stage / "synthetic.json", {"runs": results, "config": settings})
        for name, png in figures.items():
            (stage / name).write_bytes(png)
        write_html_report(stage / "report.html", "negpref u2a synthetic", sections)
    summary = {"runs": [{k: r[k] for k in SYNTHETIC_KEYS} for r in results]}
    line = "\n".join(
        f"seed {r['seed']}: selected {r['selected']}, precision {r['precision']:.2f}, recall "
        f"{r['recall']:.2f}; J u2a {r['J_u2a']:.4f}, all {r['J_all']:.4f}, random "
        f"{r['J_random_mean']:.4f}"
        for r in results
    )
    _print(args, summary, f"{line}\nwrote {out}")
    return 0


def _ablation(args) -> int:
    from negpref.u2a_report import ablation_report
    from negpref.u2a_toy import ablation_config, run_ablation

    out = _out_dir(args)
    cfg = dataclasses.replace(
        ablation_config(), inner_steps=args.inner_steps, rounds=args.rounds, inner_lr=args.inner_lr
    )
    cfg.validate()
    result = run_ablation(
        tuple(args.k), tuple(args.seeds), args.objective, cfg, args.pretrain_steps, args.loss
    )
    sections, figures = ablation_report(result, config_to_dict(cfg))
    with staged_out_dir(out, args.overwrite) as stage:
        atomic_write_json(stage / "ablation.json", result)
        for name, png in figures.items():
            (stage / name).write_bytes(png)
        write_html_report(stage / "report.html", "negpref u2a ablation", sections)
    summary = {k: v for k, v in result.items() if k not in ("gains", "kinds")}
    line = "\n".join(
        f"K={r['k']}: top-K {r['top_k']['mean']:.3f}+-{r['top_k']['std']:.3f}  "
        f"random {r['random_k']['mean']:.3f}+-{r['random_k']['std']:.3f}"
        for r in result["rows"]
    )
    _print(args, summary, f"{line}\nwrote {out}")
    return 0
