"""Per-example gradients from hooks equal a per-example autograd loop; clipping bounds every group; the
streaming clip-and-sum gives the plain implementation's integers bit for bit."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import clipped_sums, load_benchmark
from torch import nn

from dplightning.errors import DPLightningError
from dplightning.privacy import clipping
from dplightning.privacy.clipping import (
    clip_factors,
    clip_to_grid_and_sum,
    group_grids,
    group_key,
    make_groups,
    per_example_norms,
)
from dplightning.privacy.discretization import CLIP_MARGIN, l2_grid, to_grid
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


def test_dropout_is_refused_and_zero_dropout_accepted() -> None:
    """Dropout's masks depend on an example's row in the batch: one record would move the others' contributions."""
    with pytest.raises(DPLightningError, match=r"dropout \(p=0.1\)"):
        PerExampleGradients(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)))
    functional = nn.Linear(3, 3)
    functional.attention_dropout = 0.2  # how Llama-style attention applies it: a float, no nn.Dropout module
    with pytest.raises(DPLightningError, match="'0' applies dropout"):
        PerExampleGradients(nn.Sequential(functional))
    hidden = nn.Linear(3, 3)
    hidden.hidden_dropout = 0.1  # Bloom's and Falcon's blocks: F.dropout at a rate held as a float
    with pytest.raises(DPLightningError, match="applies dropout"):
        PerExampleGradients(nn.Sequential(hidden))
    PerExampleGradients(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0)))  # p = 0 is the identity
    from dplightning.module import DPLoRAModule

    with pytest.raises(DPLightningError, match="lora_dropout: 0"):
        PerExampleGradients(DPLoRAModule(model_name="tiny-llama", lora_dropout=0.1).model)
    PerExampleGradients(DPLoRAModule(model_name="tiny-llama").model)


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


# ------------------------------------------------------------------------ exact clip-and-sum: fast = plain
def _plain_clip_to_grid_and_sum(
    grads: dict[str, torch.Tensor],
    groups: dict[str, list[str]],
    thresholds: dict[str, float],
    grids: dict[str, float],
    p: float = 2.0,
    stability: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The straightforward clip-and-sum: whole float64 copies, non-finite examples masked to 0, clip, round to
    the grid (non-finite products to 0), re-check each example's integers, int64 sum of those within."""
    wide = {n: g.detach().double() for n, g in grads.items()}
    norms = per_example_norms(wide, groups, p)
    summed = {}
    for group, names in groups.items():
        finite = torch.isfinite(norms[group])
        factors = clip_factors(norms[group].nan_to_num(0.0), thresholds[group] * (1 - CLIP_MARGIN), stability)
        factors = torch.where(finite, factors, torch.zeros_like(factors))
        units = {}
        for n in names:
            g = wide[n].flatten(1)
            contribution = torch.where(finite[:, None], g, torch.zeros_like(g)) * factors[:, None]
            units[n] = to_grid(contribution.nan_to_num(0.0, 0.0, 0.0), grids[group])
        powers = [u.double().abs().sum(1) if p == 1.0 else u.double().pow(2).sum(1) for u in units.values()]
        norm = torch.stack(powers).sum(0)
        within = (norm if p == 1.0 else norm.sqrt()) <= thresholds[group] / grids[group] * (
            1 - CLIP_MARGIN / 4
        )
        for n, u in units.items():
            summed[n] = torch.where(within[:, None], u, torch.zeros_like(u)).sum(0).view(grads[n].shape[1:])
    return summed, norms


_NAMES = [f"l{i}.{proj}.lora_{ab}.default.weight" for i in range(2) for proj in ("q", "v") for ab in "AB"]


def _hostile_batch(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-example gradients whose norms span the dtype's range: zero, subnormal-small, huge, an inf, a NaN,
    one huge coordinate, and ordinary examples below and above C."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max ** 0.5 / 64  # squares stay finite in float64, whatever the dtype
    tiny = torch.finfo(dtype).tiny
    scales = torch.tensor([0.0, tiny, 1e-3, 0.3, 1.0, 3.0, 1e3, big] * 3, dtype=torch.float64)
    grads = {}
    for k, name in enumerate(_NAMES):
        shape = (len(scales), 7 + 5 * k, 3 + k)
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * scales.view(-1, 1, 1) / 10
        grads[name] = g.to(dtype)
    grads[_NAMES[0]][9, 1, 1] = math.inf  # an inf in one example's first adapter ...
    grads[_NAMES[3]][10, 0, 0] = math.nan  # ... a NaN in another's last
    grads[_NAMES[2]][11] = 0.0
    grads[_NAMES[2]][11, 0, 0] = big  # all of one example's norm in one coordinate
    return grads


def _both(grads: dict[str, torch.Tensor], mode: str, stability: float | None) -> tuple[Any, Any]:
    groups = make_groups(list(grads), mode)  # type: ignore[arg-type]
    p = 1.0 if mode == "flat_l1" else 2.0
    thresholds = {g: 0.5 + i for i, g in enumerate(groups)}
    grids = group_grids(groups, {n: g.shape[1:].numel() for n, g in grads.items()}, thresholds, p)
    args = (grads, groups, thresholds, grids)
    return clip_to_grid_and_sum(*args, p=p, stability=stability), _plain_clip_to_grid_and_sum(
        *args, p=p, stability=stability
    )


def _assert_identical(got: Any, want: Any) -> None:
    assert got[0].keys() == want[0].keys()
    for name, units in want[0].items():
        assert got[0][name].dtype == torch.int64 and got[0][name].shape == units.shape, name
        assert torch.equal(got[0][name], units), name
    for group, norm in want[1].items():
        assert got[1][group].dtype == torch.float64
        assert torch.equal(got[1][group].isnan(), norm.isnan()), group
        assert torch.equal(got[1][group].nan_to_num(0.0), norm.nan_to_num(0.0)), group


@pytest.fixture
def exact_path_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Small blocks (several per tensor, one row left over) and a record of the groups the plain path redid."""
    calls: list[str] = []
    plain = clipping._exact_group_sums

    def record(mats: Any, clip: Any) -> Any:
        calls.extend(mats)
        return plain(mats, clip)

    monkeypatch.setattr(clipping, "_BLOCK_ELEMENTS", 100)
    monkeypatch.setattr(clipping, "_exact_group_sums", record)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stability", [None, 1e-3])
@pytest.mark.parametrize("mode", ["flat", "per_layer", "per_adapter", "flat_l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_streaming_clip_and_sum_equals_the_plain_one_bit_for_bit(
    dtype: torch.dtype, mode: str, stability: float | None, threads: int, exact_path_calls: list[str]
) -> None:
    grads = _hostile_batch(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, want = _both(grads, mode, stability)
    finally:
        torch.set_num_threads(previous)
    _assert_identical(got, want)
    assert exact_path_calls == []  # inf, NaN, zero, tiny and huge examples all stay on the streaming path
    for name in _NAMES:  # one bad example masks only its own group: the finite ones still add up
        assert got[0][name].abs().sum() > 0


def test_wide_tensors_sum_rows_as_the_whole_matrix_does() -> None:
    """Above torch's grain size a lone row is reduced by several threads, in another order; blocks of two rows
    or more keep the whole matrix's per-row sums (norms equal bit for bit) on two threads."""
    gen = torch.Generator().manual_seed(3)
    grads = {"w": torch.randn(5, 3, 40_000, generator=gen)}
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, want = _both(grads, "flat", None)
    finally:
        torch.set_num_threads(previous)
    _assert_identical(got, want)


def test_an_example_alone_is_clipped_as_in_a_batch_on_two_threads() -> None:
    """A lone row above torch's grain size is reduced by two threads in another order than a row of a batch, so
    an example's norm (hence its clip factor and, at rounding ties, its integers) would depend on whether the
    (micro-)batch held anything else: a dependence on other records that the bound C does not cover. Alone or
    in a batch, every example gets the same norm and integers, bit for bit."""
    gen = torch.Generator().manual_seed(6)
    grads = {"w": torch.randn(8, 40_000, generator=gen, dtype=torch.float64) * 0.05}
    groups, thresholds = {"all": ["w"]}, {"all": 1.0}
    grids = group_grids(groups, {"w": 40_000}, thresholds)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = clip_to_grid_and_sum(grads, groups, thresholds, grids)
        alone = [clip_to_grid_and_sum({"w": g[None]}, groups, thresholds, grids) for g in grads["w"]]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(torch.cat([norms["all"] for _, norms in alone]), batch[1]["all"])
    assert torch.equal(torch.stack([units["w"] for units, _ in alone]).sum(0), batch[0]["w"])


@pytest.mark.parametrize(
    "constant, value",
    [("_FOLD_MAX_GRID", 2.0**-40), ("_SCALED_CAP", 1.0), ("_EXACT_FLOAT_INTEGERS", 1.0)],
)
def test_each_bail_out_of_the_streaming_path_gives_the_plain_result(
    constant: str, value: float, exact_path_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clipping, constant, value)
    grads = _hostile_batch(torch.float32, seed=1)
    got, want = _both(grads, "per_adapter", None)
    _assert_identical(got, want)
    assert sorted(exact_path_calls) == sorted(_NAMES)


def test_underflowing_norms_fall_back_to_the_plain_path_and_stay_within_c(
    exact_path_calls: list[str],
) -> None:
    """Squares of float64 values near 1e-300 underflow, so automatic clipping with a tiny stability over-scales:
    the integer re-check rejects such examples, and the group is redone by the plain path."""
    gen = torch.Generator().manual_seed(2)
    grads = {"w": torch.randn(6, 64, generator=gen, dtype=torch.float64) * 1e-300}
    grads["w"][3] = torch.randn(64, generator=gen, dtype=torch.float64) * 1e-3
    groups, c = {"all": ["w"]}, 1e-8
    grid = l2_grid(c, 64)
    got = clip_to_grid_and_sum(grads, groups, {"all": c}, {"all": grid}, stability=1e-300)
    want = _plain_clip_to_grid_and_sum(grads, groups, {"all": c}, {"all": grid}, stability=1e-300)
    _assert_identical(got, want)
    assert exact_path_calls == ["w"]
    assert got[0]["w"].abs().sum() > 0  # the ordinary example still counts


def _integer_norm_at_most(units: torch.Tensor, bound: float, p: float) -> bool:
    """``‖units‖_p ≤ bound``, decided exactly on Python integers and fractions."""
    values = [int(v) for v in units.flatten().tolist()]
    if p == 1.0:
        return Fraction(sum(abs(v) for v in values)) <= Fraction(bound)
    return Fraction(sum(v * v for v in values)) <= Fraction(bound) ** 2


@pytest.mark.parametrize("stability", [None, 1e-300])
@pytest.mark.parametrize("mode", ["flat", "per_adapter", "flat_l1"])
def test_each_example_moves_the_sum_by_at_most_its_bound(
    mode: str, stability: float | None, exact_path_calls: list[str]
) -> None:
    """Every example alone contributes an integer vector of norm ≤ C/γ in each group (checked in exact
    arithmetic), and the batch's sum is the sum of the examples' contributions."""
    grads = _hostile_batch(torch.float64, seed=4)
    grads[_NAMES[1]][2] *= 1e-300  # squares that underflow, for the automatic-clipping case
    groups = make_groups(_NAMES, mode)  # type: ignore[arg-type]
    p = 1.0 if mode == "flat_l1" else 2.0
    thresholds = dict.fromkeys(groups, 0.7)
    grids = group_grids(groups, {n: g.shape[1:].numel() for n, g in grads.items()}, thresholds, p)
    batch, _ = clip_to_grid_and_sum(grads, groups, thresholds, grids, p=p, stability=stability)
    total = {n: torch.zeros_like(u) for n, u in batch.items()}
    for i in range(grads[_NAMES[0]].shape[0]):
        one = {n: g[i : i + 1] for n, g in grads.items()}
        units, _ = clip_to_grid_and_sum(one, groups, thresholds, grids, p=p, stability=stability)
        for group, names in groups.items():
            joined = torch.cat([units[n].flatten() for n in names])
            assert _integer_norm_at_most(joined, thresholds[group] / grids[group], p), (i, group)
        for n, u in units.items():
            total[n] += u
    for n in batch:
        assert torch.equal(batch[n], total[n]), n


def _odd_layouts(count: int) -> dict[str, torch.Tensor]:
    """One adapter group of float16 / bfloat16 / float32 parameters in awkward layouts: a 1-D bias ``[B]``, a
    transposed and a strided view, a broadcast (stride 0) batch, an empty parameter; an inf in one example."""
    gen = torch.Generator().manual_seed(count)
    grads = {
        "m.lora_A.d.weight": torch.randn(count, 13, 5, generator=gen).half().transpose(1, 2),
        "m.lora_B.d.weight": (torch.randn(2 * count, 9, 14, generator=gen) * 30).bfloat16()[::2, :, ::2],
        "m.lora_embedding_A.d.weight": torch.randn(1, 11, generator=gen).expand(count, 11),
        "m.lora_embedding_B.d.weight": torch.zeros(count, 0, 3),
        "m.bias": torch.randn(count, generator=gen) * 3,
    }
    if count > 2:
        grads["m.lora_A.d.weight"][2, 1, 1] = math.inf
    return grads


@pytest.mark.parametrize("count", [0, 1, 2, 7])
def test_odd_layouts_and_dtypes_match_the_plain_path_in_any_order(
    count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Non-contiguous, broadcast, 1-D, empty and float16 gradients, batches of 0 to 7 examples: every block size
    and the whole-tensor path give the same integers and norms, and permuting the examples changes nothing."""
    grads = _odd_layouts(count)
    groups = make_groups(list(grads), "per_adapter")
    thresholds = {g: 0.3 for g in groups}
    grids = group_grids(groups, {n: g.shape[1:].numel() for n, g in grads.items()}, thresholds)
    want = clip_to_grid_and_sum(grads, groups, thresholds, grids)
    columns = {
        n: g.unsqueeze(1) if g.dim() == 1 else g for n, g in grads.items()
    }  # the plain one wants [B, D]
    plain_units, plain_norms = _plain_clip_to_grid_and_sum(columns, groups, thresholds, grids)
    _assert_identical(want, ({n: u.view(want[0][n].shape) for n, u in plain_units.items()}, plain_norms))
    monkeypatch.setattr(clipping, "_fast_group_sums", lambda mats, clip: None)
    _assert_identical(clip_to_grid_and_sum(grads, groups, thresholds, grids), want)
    monkeypatch.undo()
    for block in (1, 20):
        monkeypatch.setattr(clipping, "_BLOCK_ELEMENTS", block)
        _assert_identical(clip_to_grid_and_sum(grads, groups, thresholds, grids), want)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    permuted, norms = clip_to_grid_and_sum({n: g[order] for n, g in grads.items()}, groups, thresholds, grids)
    for name, units in want[0].items():
        assert torch.equal(permuted[name], units), name
    for group, norm in want[1].items():
        assert torch.equal(norms[group].nan_to_num(0.0), norm[order].nan_to_num(0.0)), group
    if count > 2:
        assert not math.isfinite(want[1]["m"][2]) and want[0]["m.bias"].abs().sum() > 0


@pytest.mark.parametrize("threshold", [1e-300, 0.7, 1e300])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_norms_at_c_and_extreme_thresholds_stay_within_c(threshold: float, p: float) -> None:
    """Examples whose norm is exactly C, C(1 − η) or just above, or all in one coordinate, for thresholds whose
    grids fall outside the streaming path's range (γ < 2^-1000, γ > 1) and inside it: each example's integers
    stay within C/γ (exact arithmetic), float32 or float64. (At the extremes examples may contribute nothing:
    squares overflow to an infinite norm, float32 overflows, and ``clip_factors``' 1e-12 swamps tiny norms.)"""
    d = 16
    g = torch.zeros(5, d, dtype=torch.float64)
    g[0, 0] = threshold  # L1 and L2 norm C
    g[1] = threshold / (4 if p == 2.0 else 16)  # norm exactly C
    g[2] = g[1] * (1 - CLIP_MARGIN)
    g[3] = g[1] * (1 + 2.0**-52)
    g[4] = torch.linspace(-threshold, threshold, d, dtype=torch.float64)
    for grads in ({"w": g}, {"w": g.float()}):
        groups, thresholds = {"all": ["w"]}, {"all": threshold}
        grids = group_grids(groups, {"w": d}, thresholds, p)
        bound = threshold / grids["all"]
        batch, _ = clip_to_grid_and_sum(grads, groups, thresholds, grids, p=p)
        total = torch.zeros_like(batch["w"])
        for i in range(g.shape[0]):
            units, _ = clip_to_grid_and_sum({"w": grads["w"][i : i + 1]}, groups, thresholds, grids, p=p)
            assert _integer_norm_at_most(units["w"], bound, p), i
            assert threshold != 0.7 or units["w"].abs().sum() > 0, i  # nothing dropped at ordinary scales
            total += units["w"]
        assert torch.equal(batch["w"], total)


def test_block_sizes_cover_the_rows_and_never_leave_one_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clipping, "_BLOCK_ELEMENTS", 30)
    for count in range(1, 40):
        for width in (1, 7, 10, 16, 31):
            sizes = clipping._block_sizes(torch.empty(count, width))
            assert sum(sizes) == count
            assert count == 1 or min(sizes) >= 2, (count, width, sizes)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [[], ["--poison", "--clipping", "per_adapter", "--dtype", "bfloat16"]])
def test_clip_speed_benchmark_quick(tmp_path: Path, extra: list[str]) -> None:
    bench = load_benchmark("clip_speed")
    out = tmp_path / "clip_speed.md"
    record = bench.main(["--quick", "--out", str(out), *extra])  # fails unless both agree bit for bit
    assert set(record["run"]["times"]) == {"new", "reference"}
    assert record["speedup_median"] > 0
    assert out.read_text().startswith("# Exact clip-and-sum speed")
