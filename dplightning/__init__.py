"""dplightning: differentially private LoRA fine-tuning of language models on PyTorch Lightning."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
