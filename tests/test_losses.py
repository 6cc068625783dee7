"""The chunked next-token loss is bit for bit the plain cross-entropy, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dplightning import losses
from dplightning.losses import shifted_token_nll


def _plain(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1).clamp(min=0),
        reduction="none",
    ).view_as(shift_labels)
    nll = nll * mask
    return nll.sum(dim=1), mask.sum(dim=1)


def _case(
    batch: int, length: int, vocab: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[:, -3:] = -100  # padding at the end of every example
    labels[0, 1:] = -100  # one example with nothing scored
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 7, 11, 64, 100_000])
def test_values_and_gradients_are_bit_identical_to_the_plain_form(
    dtype: torch.dtype, chunk_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(losses, "_CHUNK_ROWS", chunk_rows)
    logits, labels = _case(batch=9, length=12, vocab=1031, dtype=dtype, seed=chunk_rows)
    weights = torch.rand(9, generator=torch.Generator().manual_seed(1))  # a different weight per example

    results = []
    for fn in (_plain, shifted_token_nll):
        x = logits.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            nll_sum, count = fn(x, labels)
        ((nll_sum / count.clamp(min=1)) * weights).sum().backward()
        assert x.grad is not None
        results.append((nll_sum.detach(), count, x.grad))

    (v0, c0, g0), (v1, c1, g1) = results
    assert v1.dtype == torch.float32 and g1.dtype == dtype
    assert torch.equal(c0, c1)
    assert torch.equal(v0, v1)
    assert torch.equal(g0, g1)
    assert g1[:, -1].abs().sum() == 0 and g1[0].abs().sum() == 0  # unscored positions get no gradient
    assert g1.abs().sum() > 0


def test_large_vocabulary_rows_match_and_no_grad_works() -> None:
    logits, labels = _case(batch=5, length=9, vocab=49152, dtype=torch.bfloat16, seed=3)
    with torch.no_grad():
        assert torch.equal(_plain(logits, labels)[0], shifted_token_nll(logits, labels)[0])


def test_a_changed_row_changes_only_its_example() -> None:
    # The chunks must not mix examples: perturbing one example's logits moves its loss and no other.
    logits, labels = _case(batch=6, length=8, vocab=97, dtype=torch.float32, seed=5)
    before = shifted_token_nll(logits, labels)[0]
    logits[4, 2, 0] += 5.0  # one entry: a shift of the whole row would leave the log-softmax as it was
    after = shifted_token_nll(logits, labels)[0]
    assert torch.equal(before != after, torch.tensor([False, False, False, False, True, False]))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_a_private_fit_is_bit_for_bit_the_one_with_the_plain_loss(precision: str) -> None:
    from conftest import quiet_trainer

    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule
    from dplightning.strategies import DPSGDStrategy

    class _PlainLoss(DPLoRAModule):
        @staticmethod
        def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _plain(logits, labels)

    def trained(module_cls: type[DPLoRAModule]) -> dict[str, torch.Tensor]:
        model = module_cls(model_name="tiny-llama", lora_rank=2, seed=0, optimizer="sgd", learning_rate=0.5)
        data = TextDataModule(tokenizer="tiny-llama", num_records=60, max_length=24, batch_size=12)
        strategy = DPSGDStrategy(noise_multiplier=1.0, seed=3, device="cpu")
        quiet_trainer(strategy, max_steps=3, precision=precision, limit_val_batches=0).fit(
            model, datamodule=data
        )
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    chunked, plain = trained(DPLoRAModule), trained(_PlainLoss)
    assert chunked.keys() == plain.keys() and chunked
    for name in chunked:
        assert torch.equal(chunked[name], plain[name]), name


def test_one_token_examples_have_no_loss_and_a_zero_gradient() -> None:
    logits = torch.randn(3, 1, 11, requires_grad=True)
    nll_sum, count = shifted_token_nll(logits, torch.zeros(3, 1, dtype=torch.long))
    nll_sum.sum().backward()
    assert torch.equal(nll_sum, torch.zeros(3)) and torch.equal(count, torch.zeros(3, dtype=torch.long))
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))
