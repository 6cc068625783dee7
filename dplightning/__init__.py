"""dplightning: differentially private LoRA fine-tuning of language models on PyTorch Lightning.

The main classes are importable from the package itself (``dplightning.DPLoRAModule``,
``dplightning.DPSGDStrategy``, ...), but each is imported on first use (PEP 562 module ``__getattr__``):
``import dplightning`` loads nothing but this file, so a script that only wants the accountant or the version
does not pay for torch, Lightning, transformers or stable-baselines3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dplightning._lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the module it is imported from on first access. The targets are the documented homes
# (``dplightning.callbacks`` rather than its private submodules), which are themselves lazy.
_EXPORTS: dict[str, str] = {
    "DPLoRAModule": "module",
    "TextDataModule": "data",
    "DPSGDStrategy": "strategies",
    "DDPDPSGDStrategy": "strategies",
    "DPZOStrategy": "strategies",
    "PrivacyBudget": "callbacks",
    "RLDPController": "callbacks",
    "QuantileClipping": "callbacks",
    "AutomaticClipping": "callbacks",
    "NoiseSchedule": "callbacks",
    "MembershipInferenceAudit": "callbacks",
    "CanaryAudit": "callbacks",
    "DownstreamAccuracy": "callbacks",
    "DPTrainingEnv": "envs",
    "LMOMechanism": "privacy",
    "DPLightningError": "errors",
    "PrivacyBudgetError": "errors",
}

# Subpackages reachable as attributes after a bare ``import dplightning`` (``dplightning.privacy.compute_epsilon``),
# also imported on first access only.
_SUBMODULES = frozenset(
    {
        "auditing",
        "callbacks",
        "checkpoint_io",
        "cli",
        "data",
        "envs",
        "errors",
        "evaluation",
        "models",
        "module",
        "privacy",
        "strategies",
    }
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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES)
