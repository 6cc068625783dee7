"""DPLoRAModule: LoRA-only trainable params, per-example loss, weights change under DP-SGD, adapter export."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch.utils.data import DataLoader

from dplightning.data import TextDataModule
from dplightning.errors import DPLightningError
from dplightning.module import DPLoRAModule
from dplightning.strategies import DPSGDStrategy


@pytest.fixture(scope="module")
def tiny() -> DPLoRAModule:
    return DPLoRAModule(model_name="tiny-llama", lora_rank=4, seed=0)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0], [3, 4, 0, 0, 0]])
    mask = (torch.arange(5)[None] < torch.tensor([[5], [3], [2]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_only_lora_parameters_are_trainable(tiny: DPLoRAModule) -> None:
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    frozen = sum(p.numel() for p in tiny.parameters() if not p.requires_grad)
    assert frozen > 10 * sum(p.numel() for p in tiny.parameters() if p.requires_grad)


def test_per_example_loss_matches_manual_computation_on_padded_batch(tiny: DPLoRAModule) -> None:
    batch = _batch()
    tiny.eval()
    losses = tiny.per_example_loss(batch)
    assert losses.shape == (3,)
    for i, length in enumerate([5, 3, 2]):
        ids = batch["input_ids"][i : i + 1, :length]
        logits = tiny.model(input_ids=ids).logits[0]
        manual = F.cross_entropy(logits[:-1], ids[0, 1:])
        torch.testing.assert_close(losses[i], manual, atol=1e-5, rtol=1e-4)


def test_lora_weights_change_after_a_private_step(tmp_path: Path) -> None:
    model = DPLoRAModule(model_name="tiny-llama", lora_rank=4, learning_rate=0.05, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = TextDataModule(tokenizer="tiny-llama", num_records=64, max_length=32, batch_size=8)
    strategy = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, clipping="per_adapter", device="cpu")
    trainer = pl.Trainer(
        max_steps=2,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    after = dict(model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert len(changed) == len(before)  # every LoRA tensor (A and B) moved
    assert all(torch.equal(frozen_before[n], after[n].detach()) for n in frozen_before)  # base untouched
    # per-adapter groups pair A and B of one adapted module
    assert all(len(v) == 2 for v in strategy.groups.values())
    out = model.save_adapter(tmp_path / "adapter")
    assert (out / "adapter_config.json").exists()


def test_adapter_loads_in_plain_peft(tmp_path: Path, tiny: DPLoRAModule) -> None:
    from peft import PeftModel

    from dplightning.models import load_causal_lm

    with torch.no_grad():
        for n, p in tiny.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    tiny.save_adapter(tmp_path / "a")
    plain = PeftModel.from_pretrained(load_causal_lm("tiny-llama", seed=0), tmp_path / "a").eval()
    tiny.eval()
    ids = _batch()["input_ids"][:1]
    torch.testing.assert_close(plain(input_ids=ids).logits, tiny(ids), atol=1e-5, rtol=1e-4)


def test_missing_lora_target_is_one_clear_error() -> None:
    with pytest.raises(DPLightningError, match="lora_target_modules"):
        DPLoRAModule(model_name="tiny-llama", lora_target_modules=["c_attn"])


def test_gpt2_default_targets() -> None:
    m = DPLoRAModule(model_name="tiny-gpt2", lora_rank=2)
    assert any("c_attn.lora_A" in n for n, p in m.named_parameters() if p.requires_grad)
    batch = _batch()
    batch = {k: v.clamp(max=200) for k, v in batch.items()}
    assert m.per_example_loss(batch).shape == (3,)


def test_checkpoint_holds_only_lora_weights(tiny: DPLoRAModule) -> None:
    ckpt: dict = {"state_dict": tiny.state_dict()}
    tiny.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])


def test_dataloader_with_empty_batch_is_accepted() -> None:
    data = TextDataModule(tokenizer="tiny-llama", num_records=50, max_length=16, batch_size=4)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, DataLoader)
    empty = loader.collate_fn([])
    assert empty["input_ids"].shape[0] == 0


def test_model_and_data_seeds_differ_with_a_logger(tmp_path: Path) -> None:
    """A model seed and a data seed in one run (the matrix's seeds 1, 2 with a fixed split): Lightning merges both
    modules' hparams for the logger and fails on a shared key with different values, so the names must differ."""
    from lightning.pytorch.loggers import TensorBoardLogger

    model = DPLoRAModule(model_name="tiny-llama", lora_rank=4, seed=1)
    data = TextDataModule(tokenizer="tiny-llama", num_records=60, max_length=16, batch_size=4, data_seed=0)
    trainer = pl.Trainer(
        max_steps=1,
        logger=TensorBoardLogger(str(tmp_path)),
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 1


class _OneInfLoss(DPLoRAModule):
    """Makes the first example's loss inf (a record the model cannot fit) and keeps the true per-example losses."""

    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = super().per_example_loss(batch)
        self.seen = losses.detach().clone()
        return losses + torch.where(torch.arange(losses.numel()) == 0, float("inf"), 0.0)


def _fit_one_step(model: DPLoRAModule, tmp_path: Path, strategy: DPSGDStrategy | None = None) -> pl.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    data = TextDataModule(tokenizer="tiny-llama", num_records=64, max_length=16, batch_size=8)
    # A real logger: without one Lightning leaves logged_metrics empty and the check would be vacuous.
    trainer = pl.Trainer(
        max_steps=1,
        strategy=strategy or "auto",
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def test_private_training_loss_is_not_logged_by_default(tmp_path: Path) -> None:
    model = DPLoRAModule(model_name="tiny-llama", lora_rank=4, seed=0)
    # Fixed-size batches: an empty Poisson batch skips training_step and would make this check vacuous.
    strategy = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, device="cpu", poisson_sampling=False)
    trainer = _fit_one_step(model, tmp_path, strategy)
    assert trainer.global_step == 1
    assert "train/loss" not in trainer.logged_metrics
    assert "train/loss" not in trainer.callback_metrics


def test_opted_in_training_loss_leaves_out_a_non_finite_example(tmp_path: Path) -> None:
    model = _OneInfLoss(model_name="tiny-llama", lora_rank=4, seed=0, log_private_loss=True)
    trainer = _fit_one_step(model, tmp_path)
    logged = trainer.logged_metrics["train/loss"]
    assert torch.isfinite(logged)
    torch.testing.assert_close(logged, model.seen[1:].mean())
    assert trainer.callback_metrics["train/loss"] == logged


def test_finite_mean_of_no_finite_loss_is_zero() -> None:
    assert DPLoRAModule.finite_mean(torch.tensor([float("nan"), float("inf")])) == 0.0
    assert DPLoRAModule.finite_mean(torch.tensor([1.0, float("-inf"), 3.0])) == 2.0


def test_log_private_loss_is_a_yaml_model_option(tmp_path: Path) -> None:
    from dplightning.cli import _lightning_cli_class

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model:\n  model_name: tiny-llama\n  lora_rank: 4\n  log_private_loss: true\n"
        "data:\n  num_records: 16\ntrainer:\n  logger: false\n"
    )
    cli = _lightning_cli_class()(
        DPLoRAModule, TextDataModule, run=False, args=["--config", str(cfg)], auto_configure_optimizers=False
    )
    assert cli.model.hparams.log_private_loss is True


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"optimizer": "adamw", "momentum": 0.9}, "momentum"),
        ({"optimizer": "sgd", "momentum": 1.0}, "momentum"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"lr_schedule": "cosine"}, "lr_schedule"),
    ],
)
def test_bad_optimizer_settings_are_one_clear_error(kwargs: dict, names: str) -> None:
    with pytest.raises(DPLightningError, match=f"model.{names}"):
        DPLoRAModule(model_name="tiny-llama", lora_rank=2, **kwargs)


class _LrRecorder(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.momenta: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.momenta.append(optimizer.param_groups[0].get("momentum", -1.0))


def test_sgd_momentum_and_linear_schedule_reach_the_private_optimizer_steps() -> None:
    model = DPLoRAModule(
        model_name="tiny-llama",
        lora_rank=2,
        optimizer="sgd",
        learning_rate=0.4,
        momentum=0.9,
        lr_schedule="linear",
        seed=0,
    )
    data = TextDataModule(tokenizer="tiny-llama", num_records=64, max_length=16, batch_size=8)
    strategy = DPSGDStrategy(noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=1.0, device="cpu", seed=0)
    recorder = _LrRecorder()
    quiet_trainer(strategy, [recorder], max_steps=4, limit_val_batches=0).fit(model, datamodule=data)
    assert recorder.lrs == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert recorder.momenta == [0.9] * 4


def _notes_file(tmp_path: Path) -> str:
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(f"patient {i} was seen for a follow-up visit" for i in range(64)) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("private", "dataset", "flag", "on"),
    [
        (True, "file", None, False),  # the default a user with private notes gets
        (True, "file", True, True),
        (True, "synthetic", None, True),
        (False, "file", None, False),  # the same data may be private whoever trains on it
        (False, "file", True, True),
        (False, "synthetic", False, False),
    ],
)
def test_heldout_metrics_on_a_private_file_are_off_unless_asked(
    tmp_path: Path, private: bool, dataset: str, flag: bool | None, on: bool
) -> None:
    """Validation/test metrics on held-out records leave the process uncovered by ε: off by default for a
    data file (validation skipped, test refused), on when asked or for the synthetic generator."""
    source = _notes_file(tmp_path) if dataset == "file" else "pseudo_clinical"
    data = TextDataModule(
        dataset=source,
        tokenizer="tiny-llama",
        num_records=64,
        max_length=16,
        batch_size=8,
        heldout_metrics=flag,
    )
    strategy = (
        DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, device="cpu", poisson_sampling=False)
        if private
        else "auto"
    )
    model = DPLoRAModule(model_name="tiny-llama", lora_rank=4, seed=0)
    trainer = quiet_trainer(strategy, max_steps=1, val_check_interval=1, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    assert ("val/perplexity" in trainer.callback_metrics) is on
    if on:
        assert "test/perplexity" in trainer.test(model, datamodule=data, verbose=False)[0]
    else:
        with pytest.raises(DPLightningError, match=r"data.heldout_metrics: true"):
            trainer.test(model, datamodule=data, verbose=False)
        # loaders taken from the data module by hand, outside any trainer, are off too
        assert len(data.val_dataloader()) == 0
        with pytest.raises(DPLightningError, match=r"data.heldout_metrics: true"):
            data.test_dataloader()
