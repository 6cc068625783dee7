"""Per-example gradients of trainable parameters from forward/backward hooks (no ``vmap``, no model copy).

For a linear layer ``y = a W^T + b`` applied to ``a`` of shape ``[B, S, in]``, example ``i``'s gradient is
``sum_s g_{i,s} a_{i,s}^T`` where ``g = dL/dy``: one batched matmul on tensors autograd already holds. The
result is computed inside the tensor hook on ``y``'s gradient, so the backprop ``g`` is released at once; only
the per-example gradients (small for LoRA: ``B x r x d``) stay in memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dplightning.errors import DPLightningError

try:  # GPT-2's linear layer stores its weight transposed.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None  # type: ignore[assignment,misc]

LossReduction = Literal["mean", "sum"]
# Rules get the short names of the parameters that need a gradient, so a frozen weight costs no matmul.
_GradRule = Callable[[nn.Module, Tensor, Tensor, frozenset[str]], dict[str, Tensor]]


def _flat(a: Tensor) -> Tensor:
    """``[B, ..., d] -> [B, S, d]``."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _linear_rule(module: nn.Module, a: Tensor, g: Tensor, wanted: frozenset[str]) -> dict[str, Tensor]:
    a3, g3 = _flat(a).to(g.dtype), _flat(g)
    out: dict[str, Tensor] = {}
    if "weight" in wanted:
        out["weight"] = torch.bmm(g3.transpose(1, 2), a3)  # [B, out, in]
    if "bias" in wanted:
        out["bias"] = g3.sum(1)
    return out


def _conv1d_rule(module: nn.Module, a: Tensor, g: Tensor, wanted: frozenset[str]) -> dict[str, Tensor]:
    a3, g3 = _flat(a).to(g.dtype), _flat(g)
    out: dict[str, Tensor] = {}
    if "weight" in wanted:
        out["weight"] = torch.bmm(a3.transpose(1, 2), g3)  # [B, in, out]: Conv1D stores W transposed
    if "bias" in wanted:
        out["bias"] = g3.sum(1)
    return out


def _embedding_rule(module: nn.Module, ids: Tensor, g: Tensor, wanted: frozenset[str]) -> dict[str, Tensor]:
    assert isinstance(module, nn.Embedding)
    g3 = _flat(g)
    idx = ids.reshape(ids.shape[0], -1, 1).expand(-1, -1, g3.shape[-1])
    grad = torch.zeros(ids.shape[0], module.num_embeddings, g3.shape[-1], dtype=g.dtype, device=g.device)
    return {"weight": grad.scatter_add_(1, idx, g3)}


def _layernorm_rule(module: nn.Module, a: Tensor, g: Tensor, wanted: frozenset[str]) -> dict[str, Tensor]:
    assert isinstance(module, nn.LayerNorm)
    out: dict[str, Tensor] = {}
    if "weight" in wanted:
        normed = F.layer_norm(a, module.normalized_shape, eps=module.eps)
        out["weight"] = _flat(g * normed).sum(1)
    if "bias" in wanted:
        out["bias"] = _flat(g).sum(1)
    return out


def _rule_for(module: nn.Module) -> _GradRule | None:
    if isinstance(module, nn.Linear):
        return _linear_rule
    if Conv1D is not None and isinstance(module, Conv1D):
        return _conv1d_rule
    if isinstance(module, nn.Embedding):
        return _embedding_rule
    if isinstance(module, nn.LayerNorm):
        return _layernorm_rule
    return None


def _discard_grad(param: Tensor) -> None:
    param.grad = None


class PerExampleGradients:
    """Hooks every layer that owns trainable parameters and collects per-example gradients.

    Usage per micro-batch: set :attr:`expected_batch_size`, run forward + backward with grad enabled, then
    :meth:`pop` returns ``{param_name: Tensor[B, *param.shape]}``. With ``loss_reduction="mean"`` the loss is
    taken to be the mean of per-example losses over the realised batch, so hooks rescale by ``B`` to recover each
    example's own gradient.

    Names are those of ``model.named_parameters()``: a parameter shared by several modules (tied embedding and
    output head) appears once, under its first name, and its per-example gradient sums every module's share.
    Only parameters with ``requires_grad`` get gradients, so a layer may train its weight and freeze its bias.

    Attributes:
        expected_batch_size: the realised number of examples in the coming micro-batch (not the expected
            ``qN`` of Poisson sampling). When set, every hooked layer must see exactly that many rows; when
            ``None``, layers need only agree with each other.

    Raises:
        DPLightningError: a trainable parameter lives in a layer type without a per-example rule, a module has
            batch norm (which mixes examples), nothing is trainable, or a layer's leading dimension is not the
            batch.
    """

    def __init__(self, model: nn.Module, loss_reduction: LossReduction = "mean") -> None:
        self.loss_reduction = loss_reduction
        # Layers agreeing with each other is not enough: a model that flattens [B, S, d] to [B*S, d] before a
        # layer makes every token an "example", and one real example would then be clipped several times.
        self.expected_batch_size: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grads: dict[str, Tensor] = {}
        self._batch_size: int | None = None
        # named_parameters() lists a tied parameter once, under its first name; callers key by these names.
        canonical = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        reject_example_mixing(model)
        for mod_name, module in model.named_modules():
            full = {n: canonical[id(p)] for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if full:
                rule = _checked_rule(mod_name, module)
                self._handles.append(module.register_forward_hook(self._make_hook(mod_name, rule, full)))
        self.param_names: list[str] = list(canonical.values())
        # Autograd would also accumulate the raw batch gradient into p.grad, where Lightning's on_after_backward
        # hooks, gradient-watching loggers and anything else could read it before the private release replaces
        # it. Drop it as soon as it is accumulated: the release only uses the per-example gradients above.
        for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
            self._handles.append(p.register_post_accumulate_grad_hook(_discard_grad))
        if not self.param_names:
            raise DPLightningError(
                "the model has no trainable parameters; unfreeze some (e.g. add LoRA adapters)"
            )

    def _make_hook(self, mod_name: str, rule: _GradRule, full: dict[str, str]) -> Callable[..., None]:
        wanted = frozenset(full)

        def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
                return
            activation = inputs[0].detach()
            # Read once: the backward of this call must be checked against the batch it was run on.
            expected = self.expected_batch_size
            if expected is not None:
                _check_expected(mod_name, "input", activation.shape[0], expected)

            def backward_hook(grad: Tensor) -> None:
                batch = grad.shape[0]
                if expected is not None:
                    _check_expected(mod_name, "output gradient", batch, expected)
                else:
                    self._check_consistent(batch)
                factor = batch if self.loss_reduction == "mean" else 1
                if factor != 1:
                    grad = grad * factor
                for short, value in rule(module, activation, grad, wanted).items():
                    self._add(full[short], value)

            output.register_hook(backward_hook)

        return forward_hook

    def _check_consistent(self, batch: int) -> None:
        if self._batch_size is None:
            self._batch_size = batch
        elif self._batch_size != batch:
            raise DPLightningError(
                f"layer outputs disagree on the batch dimension ({self._batch_size} vs {batch}); "
                "per-example privacy needs the batch as the first dimension of every layer input"
            )

    def _add(self, name: str, value: Tensor) -> None:
        # Summing covers a module called twice and a parameter tied across modules alike.
        prev = self._grads.get(name)
        self._grads[name] = value if prev is None else prev + value

    def pop(self) -> dict[str, Tensor]:
        """Per-example gradients of the last backward, ``{name: [B, *shape]}``; resets the store."""
        grads, self._grads, self._batch_size = self._grads, {}, None
        return grads

    def remove(self) -> None:
        """Detach all hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grads.clear()


def reject_example_mixing(model: nn.Module, alternative: str = "") -> None:
    """Refuse layers whose train-mode forward makes one example's output depend on the other examples of the
    batch (batch norm, dropout with p > 0): one record would then change the others' clipped contributions.
    ``alternative`` ends each message with another fix than changing the layer (e.g. DP-ZO's eval-mode forwards)."""
    for mod_name, module in model.named_modules():
        _reject_batch_norm(mod_name, module, alternative)
        reject_dropout(mod_name, module, alternative)


def _reject_batch_norm(mod_name: str, module: nn.Module, alternative: str = "") -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise DPLightningError(
            f"module '{mod_name}' is batch norm, which mixes examples and breaks per-example privacy; "
            f"replace it with GroupNorm or LayerNorm{alternative}"
        )


# Attribute names through which Hugging Face layers apply dropout functionally, with no nn.Dropout module
# (Llama's attention_dropout, Bloom's and Falcon's hidden_dropout, ...).
_DROPOUT_NAME = re.compile(r"dropout|pdrop", re.IGNORECASE)


def reject_dropout(mod_name: str, module: nn.Module, alternative: str = "") -> None:
    """Refuse dropout with ``p > 0``: its masks come from the global generator (seeded by the public
    ``seed_everything``), and the mask an example gets depends on its row in the batch, so adding or removing one
    record changes the *other* examples' clipped gradients and the step's sensitivity exceeds ``C``."""
    rates = [getattr(module, "p", 0.0)] if isinstance(module, nn.modules.dropout._DropoutNd) else []
    rates += [value for name, value in vars(module).items() if _DROPOUT_NAME.search(name)]
    rate = max(
        (float(r) for r in rates if isinstance(r, int | float) and not isinstance(r, bool)), default=0.0
    )
    if rate > 0:
        raise DPLightningError(
            f"module '{mod_name}' applies dropout (p={rate:g}), which breaks per-example privacy: which mask an "
            "example gets depends on the other examples in the batch, so one record changes the others' "
            f"contributions; set it to 0 (model.lora_dropout: 0, or the model config's *_dropout / *_pdrop: 0)"
            f"{alternative}"
        )


def _checked_rule(mod_name: str, module: nn.Module) -> _GradRule:
    rule = _rule_for(module)
    if rule is None:
        raise DPLightningError(
            f"trainable parameters of '{mod_name}' ({type(module).__name__}) have no per-example gradient "
            "rule; freeze them or use Linear/Embedding/LayerNorm layers"
        )
    return rule


def _check_expected(mod_name: str, what: str, rows: int, expected: int) -> None:
    if rows != expected:
        raise DPLightningError(
            f"layer '{mod_name or '<model>'}' has {rows} rows in its {what} but the micro-batch has {expected} "
            "examples; per-example gradients need the batch as the first dimension of every layer input, so "
            "keep inputs as [B, ..., d] instead of flattening the batch into other dimensions (e.g. [B*S, d])"
        )
