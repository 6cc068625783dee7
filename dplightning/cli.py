"""The ``dplightning`` command: ``fit|validate|test --config X.yaml`` (LightningCLI), ``privacy ...`` and ``audit``.

User errors (unknown config key, missing file, impossible budget, model without LoRA targets) end in one
``error:`` line and exit code 2, never a long traceback.

Hardware defaults of ``fit|validate|test`` (see :mod:`dplightning.hardware`):

- ``trainer.precision`` defaults to ``auto``: ``bf16-mixed`` where bf16 runs in hardware (CPU flags
  ``avx512_bf16``/``amx_bf16``, or a CUDA GPU with bf16), else ``32-true``; DP-ZO strategies always get
  ``32-true``. An explicit value (``32-true``, ``bf16-mixed``, ...) is used as given. The summary after ``fit``
  names the precision the run used.
- Threads: a run uses every core it may run on, unless ``DPLIGHTNING_THREADS`` (threads per process; also
  exported as ``OMP_NUM_THREADS`` so DDP workers keep it) or ``OMP_NUM_THREADS`` is set.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

# No hub access anywhere: everything is local (bundled GGUF, tiny random models, user paths).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dplightning.errors import DPLightningError

if TYPE_CHECKING:
    from dplightning.strategies.protocol import PrivateStrategy

SUBCOMMANDS_OUTSIDE_LIGHTNING = ("privacy", "audit")

HARDWARE_HELP = (
    "trainer.precision defaults to 'auto': bf16-mixed where the CPU has avx512_bf16/amx_bf16 or the GPU supports "
    "bf16, else 32-true (DP-ZO: always 32-true); explicit values are used as given. Threads: all cores, unless "
    "DPLIGHTNING_THREADS or OMP_NUM_THREADS is set."
)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def auto_precision_trainer_class() -> type:
    """A Lightning ``Trainer`` whose ``precision`` accepts (and defaults to) ``"auto"``."""
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    from lightning.pytorch import Trainer

    from dplightning.hardware import resolve_precision

    class AutoPrecisionTrainer(Trainer):
        """Lightning's ``Trainer`` with ``precision="auto"`` resolved by :func:`dplightning.hardware.resolve_precision`.

        Args:
            precision: ``"auto"`` (default): ``"bf16-mixed"`` where bf16 runs in hardware (CPU flags avx512_bf16 or
                amx_bf16, or a CUDA GPU with bf16), else ``"32-true"``; zeroth-order (DP-ZO) strategies always get
                ``"32-true"``. Any other value is Lightning's own (``"32-true"``, ``"bf16-mixed"``, ...).
        """

        def __init__(
            self, *args: Any, precision: _PRECISION_INPUT | Literal["auto"] | None = "auto", **kwargs: Any
        ) -> None:
            self.requested_precision = precision
            resolved = resolve_precision(
                precision, accelerator=kwargs.get("accelerator"), strategy=kwargs.get("strategy")
            )
            super().__init__(*args, precision=resolved, **kwargs)

    # This module's annotations are strings (postponed evaluation) naming a local import; the parser can only
    # validate the value (and reject a typo in one line) against the real type.
    AutoPrecisionTrainer.__init__.__annotations__["precision"] = _PRECISION_INPUT | Literal["auto"] | None
    return AutoPrecisionTrainer


def _lightning_cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    class DPLightningCLI(LightningCLI):
        """LightningCLI over :class:`DPLoRAModule` and :class:`TextDataModule` with a summary after ``fit``."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("model.model_name", "data.tokenizer")

        def before_fit(self) -> None:
            # Held-out perplexity of the model before fine-tuning, for the before/after summary line.
            self._initial_perplexity = None
            if self.trainer.limit_val_batches != 0:
                results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
                if results and "val/perplexity" in results[0]:
                    self._initial_perplexity = float(results[0]["val/perplexity"])
            self._fit_started = time.perf_counter()

        def after_fit(self) -> None:
            trainer = self.trainer
            if not trainer.is_global_zero:
                return
            import torch

            wall = time.perf_counter() - self._fit_started
            metrics = trainer.callback_metrics
            lines = [f"steps: {trainer.global_step}", f"wall time: {wall:.1f} s"]
            if "val/perplexity" in metrics:
                before = self._initial_perplexity
                prefix = (
                    f"val perplexity: {before:.3f} before -> " if before is not None else "val perplexity: "
                )
                lines.append(f"{prefix}{float(metrics['val/perplexity']):.3f} after (final val perplexity)")
            if hasattr(trainer.strategy, "accountant"):
                strategy = cast("PrivateStrategy", trainer.strategy)
                eps = strategy.epsilon()
                target = getattr(strategy, "max_epsilon", None)
                lines.append(
                    f"privacy: ε = {eps:.4f} at δ = {strategy.target_delta:g}"
                    + (f" (budget {target:g})" if target is not None else "")
                    + f", σ_eff = {strategy.effective_noise_multiplier:.4f}, q = {strategy.sample_rate:.4g}"
                )
            else:
                lines.append("privacy: none (non-private run)")
            # Lightning's callback connector sets trainer.callbacks, so its type is not declared on Trainer.
            callbacks: list[Any] = getattr(trainer, "callbacks", [])
            for callback in callbacks:  # e.g. FineTuneReport, DownstreamAccuracy
                lines += getattr(callback, "summary_lines", list)()
            requested = getattr(trainer, "requested_precision", None)
            auto = " (auto)" if isinstance(requested, str) and requested.strip().lower() == "auto" else ""
            lines.append(f"precision: {trainer.precision}{auto}, {torch.get_num_threads()} threads")
            if trainer.logger is not None and trainer.log_dir:
                lines.append(
                    f"TensorBoard logs: {trainer.log_dir}  (view: tensorboard --logdir {trainer.logger.save_dir})"
                )
            print("\n== dplightning summary ==\n" + "\n".join(f"  {line}" for line in lines), flush=True)

    return DPLightningCLI


def one_line_error_parser_class() -> type:
    """A LightningCLI parser whose config errors are one line naming the problem and the fix (no usage dump)."""
    from lightning.pytorch.cli import LightningArgumentParser

    class OneLineErrorParser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None) -> Any:  # type: ignore[override]
            # jsonargparse nests the cause below a "Parser key ...:" header: keep the whole chain on one line.
            parts = [p.strip(" -") for p in str(message or "invalid arguments").splitlines() if p.strip(" -")]
            first = " ".join(parts)
            if len(first) > 400:
                first = first[:397] + "..."
            hint = (
                "check the path"
                if "does not exist" in first
                else "check the keys against `dplightning fit --help`"
            )
            raise DPLightningError(f"{first}; {hint}")

    return OneLineErrorParser


def run_lightning(argv: Sequence[str] | None) -> int:
    """Run LightningCLI on ``argv`` (``None``: the process's own command line), with the hardware defaults of
    the module docstring: ``trainer.precision: auto`` and the thread policy."""
    from dplightning.data import TextDataModule
    from dplightning.hardware import apply_thread_policy
    from dplightning.module import DPLoRAModule

    apply_thread_policy()
    OneLineErrorParser = one_line_error_parser_class()

    cli_cls = _lightning_cli_class()
    cli_cls(
        DPLoRAModule,
        TextDataModule,
        trainer_class=auto_precision_trainer_class(),
        args=None if argv is None else list(argv),
        parser_class=OneLineErrorParser,
        parser_kwargs={
            "description": f"dplightning: differentially private LoRA fine-tuning. {HARDWARE_HELP}",
            **{
                sub: {"description": f"Runs the {sub} stage. {HARDWARE_HELP}"}
                for sub in ("fit", "validate", "test")
            },
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    # dp-accounting's RDP code logs one absl WARNING per order it drops at small σ (dropping an order can only
    # raise ε, so the result stays an upper bound); hundreds of them would bury the run's own output.
    logging.getLogger("absl").setLevel(logging.ERROR)
    # Deprecation notices from inside Lightning/transformers that users can do nothing about.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    # bf16-mixed keeps float32 weights, so the summary's "using 32 bits instead" is the right size anyway.
    warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary.*")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["privacy"]:
            from dplightning.privacy.cli import privacy_main

            return privacy_main(args[1:])
        if args[:1] == ["audit"]:
            from dplightning.auditing.cli import audit_main
            from dplightning.hardware import apply_thread_policy

            apply_thread_policy()

            return audit_main(args[1:])
        return run_lightning(None if argv is None else args)
    except DPLightningError as exc:
        return _fail(str(exc))
    except FileNotFoundError as exc:
        return _fail(f"file not found: {exc.filename or exc}; check the path")


if __name__ == "__main__":
    raise SystemExit(main())
