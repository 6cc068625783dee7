"""Hook-based per-example gradients match autograd run one example at a time, for frozen and tied parameters,
and a model that hides the batch inside another dimension is refused once the true batch size is known."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from dplightning.errors import DPLightningError
from dplightning.privacy.per_example_grads import PerExampleGradients

LossFn = Callable[[Tensor], Tensor]  # inputs [B, ...] -> per-example losses [B]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, S, 4] -> [B]
        return self.fc2(torch.tanh(self.fc1(x))).sum((1, 2))


class TiedLM(nn.Module):
    """Embedding and output head share one weight, as in GPT-2 and most small LMs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:  # [B, S] -> [B]
        logits = self.head(torch.tanh(self.mix(self.emb(ids))))
        return nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)


class GPT2Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(8, 4), Conv1D(1, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x))).sum((1, 2))


class Flattening(nn.Module):
    """Flattens tokens into the batch before its layer, so each row is a token, not an example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        return self.fc(x.reshape(-1, x.shape[-1])).reshape(b, -1).sum(1)


def _frozen_bias_mlp() -> MLP:
    net = MLP()
    net.fc1.bias.requires_grad_(False)
    net.fc2.weight.requires_grad_(False)  # the reverse: bias trains, weight is frozen
    return net


def _one_at_a_time(net: nn.Module, x: Tensor) -> dict[str, Tensor]:
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    rows: dict[str, list[Tensor]] = {n: [] for n in trainable}
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(net(x[i : i + 1]).sum(), list(trainable.values()))
        for name, g in zip(trainable, grads, strict=True):
            rows[name].append(g)
    return {n: torch.stack(v) for n, v in rows.items()}


def _hooked(net: nn.Module, x: Tensor, batch_size: int | None = None) -> dict[str, Tensor]:
    engine = PerExampleGradients(net, loss_reduction="mean")
    engine.expected_batch_size = batch_size
    net(x).mean().backward()
    grads = engine.pop()
    engine.remove()
    return grads


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor]]] = {
    "mlp": (MLP, lambda: torch.randn(5, 3, 4)),
    "frozen_bias": (_frozen_bias_mlp, lambda: torch.randn(5, 3, 4)),
    "tied": (TiedLM, lambda: torch.randint(0, 9, (5, 4))),
    "conv1d": (GPT2Block, lambda: torch.randn(5, 3, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("declare_batch", [False, True])
def test_hook_grads_equal_autograd_one_example_at_a_time(case: str, declare_batch: bool) -> None:
    torch.manual_seed(0)
    make_net, make_x = CASES[case]
    net, x = make_net(), make_x()
    got = _hooked(net, x, x.shape[0] if declare_batch else None)
    want = _one_at_a_time(net, x)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def test_param_names_are_trainable_named_parameters_once() -> None:
    net = TiedLM()
    assert PerExampleGradients(net).param_names == ["emb.weight", "mix.weight", "mix.bias"]
    frozen = _frozen_bias_mlp()
    assert PerExampleGradients(frozen).param_names == ["fc1.weight", "fc2.bias"]


def test_flattened_batch_rejected_once_batch_size_is_declared() -> None:
    net, x = Flattening(), torch.randn(3, 5, 4)
    engine = PerExampleGradients(net)
    engine.expected_batch_size = 3
    with pytest.raises(DPLightningError, match=r"layer 'fc' has 15 rows .* batch as the first dimension"):
        net(x)


def test_flattened_batch_without_declared_size_keeps_per_row_grads() -> None:
    # Without the true batch size the layers only need to agree, so every token counts as an example.
    net, x = Flattening(), torch.randn(3, 5, 4)
    grads = _hooked(net, x)
    assert grads["fc.weight"].shape == (15, 1, 4)


def test_layers_disagreeing_on_batch_still_rejected_without_declared_size() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)  # [B, S, 4]
            return self.b(h.reshape(-1, 4)).sum()  # [B*S, 1]

    net = Mixed()
    PerExampleGradients(net)
    with pytest.raises(DPLightningError, match="disagree on the batch dimension"):
        net(torch.randn(3, 5, 4)).backward()
