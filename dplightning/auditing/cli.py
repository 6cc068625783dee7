"""``dplightning audit``: membership inference and canary audits of a trained checkpoint or adapter.

::

    dplightning audit --ckpt runs/tiny/version_0/checkpoints/last.ckpt --config configs/tiny.yaml [--json]

The config rebuilds the model and data exactly as trained (LightningCLI parsing, nothing is trained); the
checkpoint supplies the LoRA weights, the accountant's state (ε) and the ``CanaryAudit`` state (which canaries
were inserted). ``--ckpt`` may also be a peft adapter directory (``DPLoRAModule.save_adapter``); then ε and the
inserted canaries come from the config alone (the canary draw is seeded). Prints a table of metric / value, or
one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from dplightning.errors import DPLightningError

PROG = "dplightning audit"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise DPLightningError(f"{message}; see `{PROG} --help`")


def _build(config: str) -> Any:
    """Instantiate model, data module and trainer (with its callbacks) from a fit config, without running."""
    from dplightning.cli import _lightning_cli_class, one_line_error_parser_class
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule

    if not Path(config).exists():
        raise DPLightningError(f"config '{config}' does not exist; pass the YAML the model was trained with")
    return _lightning_cli_class()(
        DPLoRAModule,
        TextDataModule,
        args=["--config", config, "--trainer.logger=false"],
        run=False,
        parser_class=one_line_error_parser_class(),
        save_config_callback=None,
        auto_configure_optimizers=False,
    )


def _load_weights(model: Any, ckpt: Path) -> dict[str, Any]:
    """Load the trained LoRA weights into ``model``; returns the checkpoint dict ({} for an adapter dir)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if ckpt.is_dir():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = ckpt / "adapter_model.safetensors"
        if not weights.exists():
            raise DPLightningError(
                f"'{ckpt}' is a directory without adapter_model.safetensors; pass a .ckpt or a saved adapter"
            )
        try:
            result = set_peft_model_state_dict(model.model, load_file(str(weights)))
        except RuntimeError as exc:  # shape mismatch: another rank / model
            raise DPLightningError(
                f"adapter '{ckpt}' does not fit this model ({str(exc).splitlines()[-1].strip()[:160]}); "
                "pass the config it was trained with"
            ) from None
        if any("lora" in k for k in getattr(result, "unexpected_keys", [])):
            raise DPLightningError(
                f"adapter '{ckpt}' does not fit this model; pass the config it was trained with"
            )
        return {}
    if not ckpt.exists():
        raise DPLightningError(f"checkpoint '{ckpt}' does not exist; check the path")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    missing = trainable - set(state)
    if missing:
        raise DPLightningError(
            f"checkpoint '{ckpt}' lacks {len(missing)} of the model's {len(trainable)} LoRA tensors (e.g. "
            f"{sorted(missing)[0]}); pass the config the checkpoint was trained with"
        )
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in trainable}, strict=False)
    except RuntimeError as exc:
        raise DPLightningError(
            f"checkpoint '{ckpt}' does not fit this model ({str(exc).splitlines()[-1].strip()[:160]}); "
            "pass the config it was trained with"
        ) from None
    return checkpoint


def _callback(callbacks: Sequence[Any], name: str) -> Any:
    return next((cb for cb in callbacks if type(cb).__name__ == name), None)


def run_audit(ckpt: str, config: str, max_examples: int | None = None) -> dict[str, float]:
    """All audit figures of a checkpoint as ``{metric: value}``."""
    from dplightning.callbacks import CanaryAudit, MembershipInferenceAudit
    from dplightning.privacy.accounting import make_accountant

    cli = _build(config)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    checkpoint = _load_weights(model, Path(ckpt))
    strategy = trainer.strategy
    delta = float(getattr(strategy, "target_delta", 1e-5))
    out: dict[str, float] = {}
    eps: float | None = None
    dp_state = checkpoint.get("dplightning")
    if dp_state is not None:
        acc = make_accountant(dp_state["accountant"]["kind"])
        acc.load_state_dict(dp_state["accountant"])
        eps = acc.epsilon(delta)
        out["privacy/epsilon"] = eps
        out["privacy/delta"] = delta
        out["privacy/steps"] = float(acc.steps)
    mia = _callback(trainer.callbacks, "MembershipInferenceAudit") or MembershipInferenceAudit()
    if max_examples is not None:
        mia.max_examples = max_examples
    from dplightning.auditing.membership import membership_audit
    from dplightning.callbacks.membership_inference_audit import audit_loaders

    members, nonmembers = audit_loaders(
        datamodule, mia.max_examples, mia.batch_size, mia.seed, mia.nonmembers
    )
    for result in membership_audit(model, members, nonmembers, mia.min_k_fraction).values():
        out.update(result.metrics())
    canary = _callback(trainer.callbacks, "CanaryAudit")
    saved = next(
        (v for k, v in checkpoint.get("callbacks", {}).items() if str(k).startswith("CanaryAudit")), None
    )
    if saved is not None:
        canary = canary or CanaryAudit()
        canary.load_state_dict(saved)
    if canary is not None:
        out.update(canary.run(model, datamodule.tokenizer, delta, eps))
    return out


def _format(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"


def audit_main(argv: Sequence[str]) -> int:
    parser = _Parser(prog=PROG, description="Membership-inference and canary audits of a trained checkpoint.")
    parser.add_argument(
        "--ckpt", required=True, help="Lightning .ckpt of the run, or a saved peft adapter directory"
    )
    parser.add_argument("--config", required=True, help="the YAML config the run was trained with")
    parser.add_argument(
        "--max-examples", type=int, default=None, help="members / non-members audited at most"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(list(argv))
    figures = run_audit(args.ckpt, args.config, args.max_examples)
    if args.json:
        print(json.dumps(figures, sort_keys=True))
        return 0
    width = max(len(k) for k in figures)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{k:<{width}}  {_format(v)}" for k, v in sorted(figures.items())]
    print("\n".join(lines))
    sys.stdout.flush()
    return 0
