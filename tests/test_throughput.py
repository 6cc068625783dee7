"""Throughput settings: padding to the longest example changes no loss, precision "auto", the thread policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dplightning import hardware
from dplightning.data import CausalLMCollator
from dplightning.errors import DPLightningError
from dplightning.hardware import (
    apply_thread_policy,
    bf16_is_fast,
    cpu_flags,
    is_zeroth_order,
    resolve_precision,
    resolve_threads,
)

LENGTHS = (3, 11, 7, 16, 1, 9)  # one item longer than max_length, one of a single token
MAX_LENGTH = 14


def _items(vocab: int = 250) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (n,), generator=gen).tolist()} for n in LENGTHS]


# ----------------------------------------------------------------------------------------------- padding
def test_pad_to_longest_batch_layout() -> None:
    items = _items()
    longest = CausalLMCollator(256, MAX_LENGTH)(items)
    fixed = CausalLMCollator(256, MAX_LENGTH, pad_to="max_length")(items)
    assert longest["input_ids"].shape == (len(items), MAX_LENGTH)  # the 16-token item is cut to 14
    short = CausalLMCollator(256, MAX_LENGTH)(items[:3])
    assert short["input_ids"].shape == (3, 11)
    short_fixed = CausalLMCollator(256, MAX_LENGTH, pad_to="max_length")(items[:3])
    assert short_fixed["input_ids"].shape == (3, MAX_LENGTH)
    width = short["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(short[key], short_fixed[key][:, :width])
    assert (short_fixed["labels"][:, width:] == -100).all() and (
        short_fixed["attention_mask"][:, width:] == 0
    ).all()
    assert (short_fixed["input_ids"][:, width:] == 256).all()
    assert torch.equal(longest["labels"], fixed["labels"])
    # Right padding: each row is its tokens, then only padding.
    for row, n in enumerate(min(n, MAX_LENGTH) for n in LENGTHS):
        assert fixed["attention_mask"][row, :n].all() and not fixed["attention_mask"][row, n:].any()
    with pytest.raises(ValueError, match="pad_to"):
        CausalLMCollator(0, 8, pad_to="left")  # type: ignore[arg-type]


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
def test_pad_to_longest_gives_the_same_per_example_losses(model_name: str) -> None:
    from dplightning.module import DPLoRAModule

    module = DPLoRAModule(model_name=model_name, lora_rank=4, seed=0).eval()
    items = [it for it in _items() if len(it["input_ids"]) < MAX_LENGTH]  # the two batches differ in width
    longest = CausalLMCollator(256, MAX_LENGTH)(items)
    fixed = CausalLMCollator(256, MAX_LENGTH, pad_to="max_length")(items)
    assert longest["input_ids"].shape[1] < fixed["input_ids"].shape[1]
    with torch.no_grad():
        a = module.per_example_loss(longest)
        b = module.per_example_loss(fixed)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- precision
@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"fpu", "avx512f", "avx512_bf16"}))


@pytest.fixture
def plain_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"fpu", "avx2", "avx512f"}))


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\nprocessor\t: 1\n"
    )
    assert {"amx_bf16", "avx2"} <= cpu_flags(str(info))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_bf16_is_fast_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for flags, fast in [
        ({"avx512_bf16"}, True),
        ({"amx_bf16"}, True),
        ({"avx512f", "avx2"}, False),
        (set(), False),
    ]:
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert bf16_is_fast("cpu") is fast
        assert bf16_is_fast(torch.device("cpu")) is fast
    assert bf16_is_fast("mps") is False


def test_auto_precision_on_a_bf16_cpu(bf16_cpu: None) -> None:
    assert resolve_precision("auto", accelerator="cpu") == "bf16-mixed"
    assert resolve_precision("AUTO", accelerator="cpu") == "bf16-mixed"
    if not torch.cuda.is_available():
        assert resolve_precision("auto") == "bf16-mixed"  # accelerator "auto" → CPU here


def test_auto_precision_on_a_cpu_without_bf16(plain_cpu: None) -> None:
    assert resolve_precision("auto", accelerator="cpu") == "32-true"


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed", "64-true", 32, 64, "bf16", None])
def test_explicit_precision_is_left_alone(explicit: object, plain_cpu: None) -> None:
    assert resolve_precision(explicit, accelerator="cpu") == explicit


def test_auto_precision_keeps_dpzo_in_fp32(bf16_cpu: None) -> None:
    from dplightning.strategies import DPSGDStrategy, DPZOStrategy

    assert resolve_precision("auto", strategy=DPZOStrategy(noise_multiplier=1.0, device="cpu")) == "32-true"
    assert (
        resolve_precision("auto", strategy=DPSGDStrategy(noise_multiplier=1.0, device="cpu")) == "bf16-mixed"
    )
    assert (
        resolve_precision("bf16-mixed", strategy=DPZOStrategy(noise_multiplier=1.0, device="cpu"))
        == "bf16-mixed"
    )


def test_cli_trainer_resolves_auto(bf16_cpu: None) -> None:
    from dplightning.cli import auto_precision_trainer_class

    trainer_cls = auto_precision_trainer_class()
    kwargs = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
    }
    assert trainer_cls(**kwargs).precision == "bf16-mixed"  # the default is "auto"
    assert trainer_cls(precision="32-true", **kwargs).precision == "32-true"


def test_cli_trainer_keeps_dpzo_in_fp32_from_auto(bf16_cpu: None) -> None:
    """The CLI's Trainer on a bf16 CPU: ``precision="auto"`` is 32-true for a DP-ZO strategy (an object, or a user's
    registered preset name), bf16-mixed for DP-SGD; an explicit bf16-mixed is honoured for DP-ZO too."""
    from lightning.pytorch.strategies import StrategyRegistry

    from dplightning.cli import auto_precision_trainer_class
    from dplightning.strategies import DPSGDStrategy, DPZOStrategy

    trainer_cls = auto_precision_trainer_class()
    kwargs = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
    }

    def zo() -> DPZOStrategy:
        return DPZOStrategy(noise_multiplier=1.0, device="cpu")

    assert trainer_cls(strategy=zo(), **kwargs).precision == "32-true"
    assert trainer_cls(strategy=zo(), precision="auto", **kwargs).precision == "32-true"
    assert trainer_cls(strategy=zo(), precision="bf16-mixed", **kwargs).precision == "bf16-mixed"
    sgd = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    assert trainer_cls(strategy=sgd, **kwargs).precision == "bf16-mixed"
    name = "test_dplightning_zo_preset"
    StrategyRegistry.register(name, DPZOStrategy, noise_multiplier=1.0, device="cpu")
    try:
        assert is_zeroth_order(name)
        trainer = trainer_cls(strategy=name, **kwargs)
        assert isinstance(trainer.strategy, DPZOStrategy) and trainer.precision == "32-true"
    finally:
        StrategyRegistry.remove(name)
    assert not is_zeroth_order("ddp") and not is_zeroth_order("no_such_strategy")


def test_cli_parses_precision_auto_and_rejects_typos(
    tmp_path: Path, plain_cpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from dplightning.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  model_name: tiny-llama\ntrainer:\n  precision: auto\n  logger: false\n")
    with pytest.raises(SystemExit) as printed:
        main(["fit", "--config", str(cfg), "--print_config"])
    assert printed.value.code == 0 and "precision: auto" in capsys.readouterr().out
    assert main(["fit", "--config", str(cfg), "--trainer.precision", "bf16-mxed", "--print_config"]) == 2
    assert "trainer.precision" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ threads
def test_thread_policy_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "available_cores", lambda: 7)
    assert resolve_threads({}) == (7, "all cores")
    assert resolve_threads({"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert resolve_threads({"OMP_NUM_THREADS": "4,2"}) == (4, "OMP_NUM_THREADS")
    assert resolve_threads({"OMP_NUM_THREADS": "lots"}) == (
        7,
        "all cores",
    )  # malformed: ignored, as OpenMP does
    assert resolve_threads({"DPLIGHTNING_THREADS": "5", "OMP_NUM_THREADS": "3"}) == (5, "DPLIGHTNING_THREADS")
    for bad in ("0", "-2", "two"):
        with pytest.raises(DPLightningError, match="DPLIGHTNING_THREADS"):
            resolve_threads({"DPLIGHTNING_THREADS": bad})


def test_apply_thread_policy_sets_torch_threads_and_exports_an_explicit_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = torch.get_num_threads()
    try:
        env = {"DPLIGHTNING_THREADS": "1"}
        assert apply_thread_policy(env) == 1 and torch.get_num_threads() == 1
        assert env["OMP_NUM_THREADS"] == "1"  # Lightning's DDP launchers and child processes keep it
        monkeypatch.setattr(hardware, "available_cores", lambda: 2)
        env = {}
        assert apply_thread_policy(env) == 2 and torch.get_num_threads() == 2
        assert "OMP_NUM_THREADS" not in env  # DDP launchers still split the cores between processes
    finally:
        torch.set_num_threads(before)
