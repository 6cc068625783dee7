"""Drop-in DP-SGD for an existing Lightning project that is not a language model.

The module below is ordinary Lightning code: its ``training_step`` returns the mean loss over the batch. Making
it private takes two arguments to ``Trainer`` and nothing else::

    python examples/drop_in_classification.py --epsilon 3
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dplightning.callbacks import PrivacyBudget
from dplightning.strategies import DPSGDStrategy


def make_blobs(n: int, seed: int = 0) -> TensorDataset:
    """Two Gaussian blobs in 16-D, labels 0/1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 16, generator=g) + (y.float() * 2 - 1).unsqueeze(1) * 0.8
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    """A plain two-layer MLP classifier (LayerNorm, no batch norm)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)  # mean over the batch
        self.log("train/loss", loss, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(epsilon: float = 3.0, max_epochs: int = 5, seed: int = 0) -> dict[str, float]:
    pl.seed_everything(seed)
    train = DataLoader(make_blobs(2000, seed), batch_size=64, shuffle=True)
    val = DataLoader(make_blobs(500, seed + 1), batch_size=250)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        strategy=DPSGDStrategy(target_epsilon=epsilon, target_delta=1e-5, max_grad_norm=1.0, seed=seed),
        callbacks=[PrivacyBudget()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Classifier()
    trainer.fit(model, train, val)
    result = {"epsilon": trainer.strategy.epsilon(), "val_acc": float(trainer.callback_metrics["val/acc"])}
    print(
        f"trained privately: ε = {result['epsilon']:.3f} (δ = 1e-5), validation accuracy = {result['val_acc']:.3f}"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--max-epochs", type=int, default=5)
    args = parser.parse_args()
    main(args.epsilon, args.max_epochs)
