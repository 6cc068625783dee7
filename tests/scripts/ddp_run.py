"""Train with DP-SGD on 1 process or 2 gloo processes; save what the test compares.

Run by tests/test_ddp.py:

- ``python tests/scripts/ddp_run.py OUT.pt --devices 2 --noise 0.0``: a small classifier; rank 0 saves the
  initial and final weights and ε to ``OUT.pt``.
- ``python tests/scripts/ddp_run.py OUT.pt --devices 2 --model tiny-llama --precision bf16-mixed``: LoRA on the
  tiny random Llama with σ calibrated to ``--target-epsilon``; every rank saves ``OUT.pt.rank<r>``: its initial
  and final LoRA weights, ε, the trainer's precision, whether autocast was on in ``training_step``, and per
  step the reduced clipped sums, the releases (grid units + noise, float64), the grids, the noise std in grid
  units, the rank's number of examples and ``p.grad``.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dplightning.strategies import DDPDPSGDStrategy, DPSGDStrategy
from dplightning.strategies.batches import batch_size_of


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def small_classifier(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g))
    common = {"noise_multiplier": args.noise, "max_grad_norm": 0.5, "seed": 11}
    if args.devices > 1:
        strategy: pl.strategies.Strategy = DDPDPSGDStrategy(process_group_backend="gloo", **common)
    else:
        strategy = DPSGDStrategy(device="cpu", **common)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Net()
    initial = {f"initial.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    trainer.fit(model, DataLoader(data, batch_size=16))
    if trainer.is_global_zero:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state.update(initial)
        state["epsilon"] = torch.tensor(trainer.strategy.epsilon())
        torch.save(state, args.out)


class RecordingDDPDPSGD(DDPDPSGDStrategy):
    """Keeps, per step, the reduced clipped sums, the releases, the grids and the gradients handed on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps: list[dict[str, Any]] = []
        self._sums: dict[str, Tensor] = {}
        self._released: list[Tensor] = []
        self._examples = 0

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._examples += batch_size_of(args[0] if args else kwargs["batch"]) or 0
        return super().training_step(*args, **kwargs)

    def _reduce_sums(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        self._sums = super()._reduce_sums(sums)
        return self._sums

    def _add_noise(self, units: Tensor, std: float) -> Tensor:
        released = super()._add_noise(units, std)
        self._released.append(released.clone())
        return released

    def release_noisy_gradient(self) -> None:
        self._released = []
        super().release_noisy_gradient()
        # the releases, in the loop's order (groups as grids() lists them, each group's names in order), hold
        # each tensor's coordinates once, however the strategy batches its noise draws
        order = [(n, g, grid) for g, grid in self.grids().items() for n in self.groups[g]]
        flat = torch.cat([r.reshape(-1) for r in self._released])
        assert flat.numel() == sum(self._sums[n].numel() for n, _, _ in order), (
            "every tensor is released once"
        )
        pieces = [
            piece.view(self._sums[n].shape)
            for (n, _, _), piece in zip(order, flat.split([self._sums[n].numel() for n, _, _ in order]))
        ]
        self.steps.append(
            {
                "sums": {n: self._sums[n].clone() for n, _, _ in order},
                "released": {n: r for (n, _, _), r in zip(order, pieces)},
                "grid": {n: grid for n, _, grid in order},
                # the noise std in grid units, σ_g · C_g / γ_g
                "noise_std_units": {
                    n: self.noise_multipliers[g] * self.clip_thresholds[g] / grid for n, g, grid in order
                },
                "grad": {n: self._params[n].grad.detach().clone() for n, _, _ in order},  # type: ignore[union-attr]
                "clip_norm": self.total_clip_norm,
                "examples": self._examples,  # this rank's share of the step's Poisson batch
                "expected_batch_size": self.expected_batch_size,
            }
        )
        self._examples = 0


def tiny_llama(args: argparse.Namespace) -> None:
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule

    class Module(DPLoRAModule):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.autocast_in_training_step: list[bool] = []

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            self.autocast_in_training_step.append(torch.is_autocast_enabled("cpu"))
            return super().training_step(batch, batch_idx)

    data = TextDataModule(tokenizer="tiny-llama", num_records=160, max_length=24, batch_size=16)
    strategy = RecordingDDPDPSGD(
        target_epsilon=args.target_epsilon, max_grad_norm=0.5, seed=11, process_group_backend="gloo"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        precision=args.precision,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Module(model_name="tiny-llama", lora_rank=4, seed=0, learning_rate=0.05, optimizer="sgd")
    initial = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    trainer.fit(model, datamodule=data)
    torch.save(
        {
            "initial": initial,
            "final": {k: v.detach().clone() for k, v in model.trainable_state_dict().items()},
            "epsilon": strategy.epsilon(),
            "target_epsilon": args.target_epsilon,
            "accountant_steps": strategy.accountant.steps,
            "precision": str(trainer.precision),
            "autocast": model.autocast_in_training_step,
            "steps": strategy.steps,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
        },
        f"{args.out}.rank{trainer.global_rank}",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", choices=["small", "tiny-llama"], default="small")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    args = parser.parse_args()
    if args.model == "tiny-llama":
        tiny_llama(args)
    else:
        small_classifier(args)


if __name__ == "__main__":
    main()
