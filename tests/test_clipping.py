"""Per-example gradients from hooks equal a per-example autograd loop; clipping bounds every group."""

from __future__ import annotations

import pytest
import torch
from conftest import clipped_sums
from torch import nn

from dplightning.errors import DPLightningError
from dplightning.privacy.clipping import group_key, make_groups, per_example_norms
from dplightning.privacy.per_example_grads import PerExampleGradients


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def per_example_loss(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(ids))  # [B, S, 6]
        h = torch.tanh(self.fc(h)) + 0.5 * torch.tanh(self.fc(h * 0.3))  # fc used twice per forward
        logits = self.head(h).mean(1)
        return nn.functional.cross_entropy(logits, y, reduction="none")


def _naive(net: Net, ids: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(ids.shape[0]):
        net.zero_grad()
        net.per_example_loss(ids[i : i + 1], y[i : i + 1]).sum().backward()
        for n, p in net.named_parameters():
            out[n].append(p.grad.detach().clone())
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hook_grads_equal_per_example_autograd(reduction: str) -> None:
    torch.manual_seed(0)
    net = Net()
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    engine = PerExampleGradients(net, loss_reduction=reduction)  # type: ignore[arg-type]
    losses = net.per_example_loss(ids, y)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    got = engine.pop()
    engine.remove()
    want = _naive(net, ids, y)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)
    # the per-example grads sum to the ordinary batch gradient
    net.zero_grad()
    net.per_example_loss(ids, y).sum().backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(got[name].sum(0), p.grad, atol=1e-5, rtol=1e-4)


def test_hooks_skip_no_grad_forward() -> None:
    net = Net()
    engine = PerExampleGradients(net)
    with torch.no_grad():
        net.per_example_loss(torch.randint(0, 11, (3, 4)), torch.zeros(3, dtype=torch.long))
    assert engine.pop() == {}


def test_batchnorm_and_unsupported_layers_rejected() -> None:
    with pytest.raises(DPLightningError, match="batch norm"):
        PerExampleGradients(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(DPLightningError, match="no per-example gradient rule"):
        PerExampleGradients(nn.Sequential(nn.Conv2d(1, 1, 3)))
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(DPLightningError, match="no trainable parameters"):
        PerExampleGradients(frozen)


def test_group_keys_pair_lora_adapters() -> None:
    names = [
        "model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
        "model.base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight",
        "model.base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight",
    ]
    adapters = make_groups(names, "per_adapter")
    assert list(adapters) == [
        "model.base_model.model.model.layers.0.self_attn.q_proj",
        "model.base_model.model.model.layers.0.self_attn.v_proj",
    ]
    assert all(len(v) == 2 for v in adapters.values())
    assert len(make_groups(names, "per_layer")) == 4
    assert make_groups(names, "flat") == {"all": names}
    assert group_key("fc.bias", "per_adapter") == "fc"


@pytest.mark.parametrize("mode", ["flat", "per_layer", "per_adapter"])
def test_clipped_contributions_bounded_in_every_mode(mode: str) -> None:
    torch.manual_seed(1)
    names = [
        "a.lora_A.default.weight",
        "a.lora_B.default.weight",
        "b.lora_A.default.weight",
        "b.lora_B.default.weight",
    ]
    grads = {n: torch.randn(9, 4, 3) * torch.logspace(-2, 2, 9).view(9, 1, 1) for n in names}
    groups = make_groups(names, mode)  # type: ignore[arg-type]
    thresholds = {g: 0.7 for g in groups}
    for i in range(9):  # clip one example at a time: its clipped contribution is the sum
        one = {n: g[i : i + 1] for n, g in grads.items()}
        summed, _ = clipped_sums(one, groups, thresholds)
        contrib = per_example_norms({n: v.unsqueeze(0) for n, v in summed.items()}, groups)
        for g in groups:
            assert contrib[g].item() <= 0.7 * (1 + 1e-5)
    # unclipped examples pass through unchanged
    small = {n: g[:1] * 1e-3 for n, g in grads.items()}
    summed, _ = clipped_sums(small, groups, thresholds)
    for n in names:  # in the gradient's own precision, as the strategy hands it to the optimizer
        torch.testing.assert_close(summed[n].to(small[n].dtype), small[n][0])


def test_l1_norms() -> None:
    g = {"w": torch.tensor([[[1.0, -2.0]], [[3.0, 4.0]]])}
    norms = per_example_norms(g, {"all": ["w"]}, p=1.0)
    torch.testing.assert_close(norms["all"], torch.tensor([3.0, 7.0]))
