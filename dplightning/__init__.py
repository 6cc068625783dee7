"""dplightning: differentially private LoRA fine-tuning of language models on PyTorch Lightning.

The main classes are importable from the package itself (``dplightning.DPLoRAModule``,
``dplightning.DPSGDStrategy``, ...), but each is imported on first use (PEP 562 module ``__getattr__``):
``import dplightning`` loads nothing but this file, so a script that only wants the accountant or the version
does not pay for torch, Lightning, transformers or stable-baselines3.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module it is imported from on first access. The targets are the documented homes
# (``dplightning.callbacks`` rather than its private submodules), which are themselves lazy.
_EXPORTS: dict[str, str] = {
    "DPLoRAModule": "dplightning.module",
    "TextDataModule": "dplightning.data",
    "DPSGDStrategy": "dplightning.strategies",
    "DDPDPSGDStrategy": "dplightning.strategies",
    "DPZOStrategy": "dplightning.strategies",
    "PrivacyBudget": "dplightning.callbacks",
    "RLDPController": "dplightning.callbacks",
    "QuantileClipping": "dplightning.callbacks",
    "AutomaticClipping": "dplightning.callbacks",
    "NoiseSchedule": "dplightning.callbacks",
    "MembershipInferenceAudit": "dplightning.callbacks",
    "CanaryAudit": "dplightning.callbacks",
    "DownstreamAccuracy": "dplightning.callbacks",
    "DPTrainingEnv": "dplightning.envs",
    "LMOMechanism": "dplightning.privacy",
    "DPLightningError": "dplightning.errors",
    "PrivacyBudgetError": "dplightning.errors",
}

# Subpackages reachable as attributes after a bare ``import dplightning`` (``dplightning.privacy.compute_epsilon``),
# also imported on first access only.
_SUBMODULES = frozenset(
    {"auditing", "callbacks", "checkpoint_io", "cli", "data", "envs", "errors", "evaluation", "models", "module",
     "privacy", "strategies"}
)

# Spelled out (not derived from _EXPORTS) so that linters and IDEs see the re-exports; a test keeps the two
# in step.
__all__ = [
    "AutomaticClipping",
    "CanaryAudit",
    "DDPDPSGDStrategy",
    "DPLightningError",
    "DPLoRAModule",
    "DPSGDStrategy",
    "DPTrainingEnv",
    "DPZOStrategy",
    "DownstreamAccuracy",
    "LMOMechanism",
    "MembershipInferenceAudit",
    "NoiseSchedule",
    "PrivacyBudget",
    "PrivacyBudgetError",
    "QuantileClipping",
    "RLDPController",
    "TextDataModule",
    "__version__",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real objects; nothing is imported at run time
    from dplightning.callbacks import (
        AutomaticClipping,
        CanaryAudit,
        DownstreamAccuracy,
        MembershipInferenceAudit,
        NoiseSchedule,
        PrivacyBudget,
        QuantileClipping,
        RLDPController,
    )
    from dplightning.data import TextDataModule
    from dplightning.envs import DPTrainingEnv
    from dplightning.errors import DPLightningError, PrivacyBudgetError
    from dplightning.module import DPLoRAModule
    from dplightning.privacy import LMOMechanism
    from dplightning.strategies import DDPDPSGDStrategy, DPSGDStrategy, DPZOStrategy


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        # AttributeError (not ImportError) so that hasattr() and `from dplightning import <submodule>` keep working.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
