"""The ``dplightning`` command: ``fit|validate|test --config X.yaml`` (LightningCLI), ``privacy ...`` and ``audit``.

User errors (unknown config key, missing file, impossible budget, model without LoRA targets) end in one
``error:`` line and exit code 2, never a long traceback.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

# No hub access anywhere: everything is local (bundled GGUF, tiny random models, user paths).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dplightning.errors import DPLightningError

SUBCOMMANDS_OUTSIDE_LIGHTNING = ("privacy", "audit")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


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
            wall = time.perf_counter() - self._fit_started
            metrics = trainer.callback_metrics
            lines = [f"steps: {trainer.global_step}", f"wall time: {wall:.1f} s"]
            if "val/perplexity" in metrics:
                before = self._initial_perplexity
                prefix = f"val perplexity: {before:.3f} before -> " if before is not None else "val perplexity: "
                lines.append(f"{prefix}{float(metrics['val/perplexity']):.3f} after (final val perplexity)")
            strategy = trainer.strategy
            if hasattr(strategy, "accountant"):
                eps = strategy.epsilon()
                target = getattr(strategy, "max_epsilon", None)
                lines.append(
                    f"privacy: ε = {eps:.4f} at δ = {strategy.target_delta:g}"
                    + (f" (budget {target:g})" if target is not None else "")
                    + f", σ_eff = {strategy.effective_noise_multiplier:.4f}, q = {strategy.sample_rate:.4g}"
                )
            else:
                lines.append("privacy: none (non-private run)")
            if trainer.logger is not None and trainer.log_dir:
                lines.append(f"TensorBoard logs: {trainer.log_dir}  (view: tensorboard --logdir {trainer.logger.save_dir})")
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
            hint = "check the path" if "does not exist" in first else "check the keys against `dplightning fit --help`"
            raise DPLightningError(f"{first}; {hint}")

    return OneLineErrorParser


def run_lightning(argv: Sequence[str] | None) -> int:
    """Run LightningCLI on ``argv`` (``None``: the process's own command line)."""
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule

    OneLineErrorParser = one_line_error_parser_class()

    cli_cls = _lightning_cli_class()
    cli_cls(
        DPLoRAModule,
        TextDataModule,
        args=None if argv is None else list(argv),
        parser_class=OneLineErrorParser,
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
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["privacy"]:
            from dplightning.privacy.cli import privacy_main

            return privacy_main(args[1:])
        if args[:1] == ["audit"]:
            from dplightning.auditing.cli import audit_main

            return audit_main(args[1:])
        return run_lightning(None if argv is None else args)
    except DPLightningError as exc:
        return _fail(str(exc))
    except FileNotFoundError as exc:
        return _fail(f"file not found: {exc.filename or exc}; check the path")


if __name__ == "__main__":
    raise SystemExit(main())
