"""Next-token loss per position that never holds the whole ``[B, T, V]`` batch in fp32.

The plain form (``F.cross_entropy(logits[:, :-1].float(), ...)``) keeps an fp32 copy of the logits and the
fp32 log-softmax that backward needs: with a 49k vocabulary, 128 examples of 32 tokens that is 0.8 GB each,
and backward adds two more fp32 tensors of that size. All of it is alive at the start of backward, when every
layer's activations are too, so it sets the peak memory of a step. Here examples go through the fp32 part a
few at a time, backward keeps only the logits as they came (bf16 under autocast) and recomputes the
log-softmax of each chunk.

Every value and gradient is bit for bit the one of the plain form: each chunk runs the same kernels
(``log_softmax`` along the vocabulary, ``nll_loss``, their backward) on the same rows, and those kernels
compute each row on its own. The tests compare the two forms exactly; the DP-SGD tests compare released
gradients exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# fp32 rows (positions) per chunk: 64 rows of a 49k vocabulary is 12.6 MB per temporary. Measured on one CPU
# thread (B = 128, T = 32, V = 49152, forward and backward): 64 rows 0.86 s, 256 rows 2.8 s, unchunked 2.4 s;
# small chunks stay in cache.
_CHUNK_ROWS = 64

Block = tuple[int, int, int, int]  # examples b0:b1, positions t0:t1 of the shifted [B, T - 1] grid


def _blocks(batch: int, length: int) -> list[Block]:
    """Whole examples a few at a time, or, for long sequences, one example in windows of positions."""
    if length <= _CHUNK_ROWS:
        per = _CHUNK_ROWS // max(1, length)
        return [(b, min(b + per, batch), 0, length) for b in range(0, batch, per)]
    return [
        (b, b + 1, t, min(t + _CHUNK_ROWS, length))
        for b in range(batch)
        for t in range(0, length, _CHUNK_ROWS)
    ]


def _log_probs(logits: Tensor, block: Block) -> Tensor:
    """fp32 log-softmax of one block of the shifted logits (positions ``:-1``), as ``[rows, V]``."""
    b0, b1, t0, t1 = block
    shifted = logits[b0:b1, t0:t1, :].float()
    return torch.log_softmax(shifted.reshape(-1, shifted.size(-1)), dim=1)


class _ShiftedTokenNLL(torch.autograd.Function):
    """``-log softmax(logits[:, t])[targets[:, t]]`` for ``t < T - 1``: shape ``[B, T - 1]``, fp32."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:
        batch, length = targets.shape
        nll = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
        for block in _blocks(batch, length):
            b0, b1, t0, t1 = block
            rows = targets[b0:b1, t0:t1].reshape(-1)
            nll[b0:b1, t0:t1] = F.nll_loss(_log_probs(logits, block), rows, reduction="none").view(
                b1 - b0, t1 - t0
            )
        ctx.save_for_backward(logits, targets)
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        batch, length = targets.shape
        # The last position is cut off by the shift: its gradient is zero, as slicing's backward makes it.
        grad_logits = torch.zeros_like(logits)
        for block in _blocks(batch, length):
            b0, b1, t0, t1 = block
            log_probs = _log_probs(logits, block)
            rows = targets[b0:b1, t0:t1].reshape(-1, 1)
            # nll_loss's backward without weights: minus the incoming gradient at each target, zero elsewhere.
            grad_log_probs = torch.zeros_like(log_probs).scatter_(
                1, rows, -grad_nll[b0:b1, t0:t1].reshape(-1, 1)
            )
            grad_shifted = torch._log_softmax_backward_data(grad_log_probs, log_probs, 1, torch.float32)
            # `.float()`'s backward casts back to the logits' dtype.
            grad_logits[b0:b1, t0:t1, :] = grad_shifted.view(b1 - b0, t1 - t0, logits.size(-1)).to(
                logits.dtype
            )
        return grad_logits, None


def shifted_token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token NLL summed per example ``[B]`` and the count of scored tokens ``[B]``.

    ``logits`` ``[B, T, V]`` (any float dtype; the loss is computed in fp32); ``labels`` ``[B, T]`` use
    ``-100`` for positions that are not scored (padding).
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    nll = _ShiftedTokenNLL.apply(logits, shift_labels.clamp(min=0))
    nll = nll * mask
    return nll.sum(dim=1), mask.sum(dim=1)
