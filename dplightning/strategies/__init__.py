"""Lightning strategies that compute private updates.

Pass one to the ``Trainer`` as an object (``Trainer(strategy=DPSGDStrategy(target_epsilon=8))``) or, from YAML,
by class (``trainer.strategy.class_path: dplightning.strategies.DPSGDStrategy`` with ``init_args``). They are not
in Lightning's strategy registry: a registered name carries no privacy budget, and a private strategy cannot run
without one.
"""

from dplightning.strategies.base import PrivateStrategyMixin
from dplightning.strategies.ddp_dpsgd import DDPDPSGDStrategy
from dplightning.strategies.dpsgd import DPSGDStrategy
from dplightning.strategies.dpzo import DPZOStrategy
from dplightning.strategies.protocol import PerExampleClippingStrategy, PrivateStrategy
from dplightning.strategies.settings import PrivacySettings

__all__ = [
    "DDPDPSGDStrategy",
    "DPSGDStrategy",
    "DPZOStrategy",
    "PerExampleClippingStrategy",
    "PrivacySettings",
    "PrivateStrategy",
    "PrivateStrategyMixin",
]
