"""Train a small classifier with DP-SGD on 1 process or 2 gloo processes; save the initial and final weights.

Run by tests/test_ddp.py:  python tests/scripts/ddp_run.py OUT.pt --devices 2 --noise 0.0
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dplightning.strategies import DDPDPSGDStrategy, DPSGDStrategy


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
