"""The contract between strategies and the callbacks that drive them: the private-strategy protocols, the
shared settings checks, the sibling strategies, and ``StrategyController``'s one-time setup checks. Controllers
in a real fit touch nothing of the strategy outside the protocol."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from dplightning.callbacks import (
    AutomaticClipping,
    NoiseSchedule,
    PrivacyBudget,
    QuantileClipping,
    RLDPController,
)
from dplightning.callbacks._controller import StrategyController
from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.strategies import DDPDPSGDStrategy, DPSGDStrategy, DPZOStrategy, PrivacySettings
from dplightning.strategies.base import PrivateStrategyMixin
from dplightning.strategies.dpsgd import DPSGDMixin
from dplightning.strategies.protocol import PerExampleClippingStrategy, PrivateStrategy

# (class, name in its errors, arguments besides the privacy settings)
STRATEGIES: list[tuple[type, str, dict[str, Any]]] = [
    (DPSGDStrategy, "DPSGDStrategy", {"device": "cpu"}),
    (DDPDPSGDStrategy, "DPSGDStrategy", {}),
    (DPZOStrategy, "DPZOStrategy", {"device": "cpu"}),
]


def _members(protocol: type) -> set[str]:
    """Names a protocol declares (attributes, properties, methods), its bases' included."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls in (object,) or not getattr(cls, "_is_protocol", False):
            continue
        names |= set(getattr(cls, "__annotations__", {}))
        names |= {
            n
            for n, v in vars(cls).items()
            if not n.startswith("_") and (callable(v) or isinstance(v, property))
        }
    return names


# ------------------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize(("cls", "_", "extra"), STRATEGIES, ids=lambda v: getattr(v, "__name__", ""))
def test_every_strategy_satisfies_the_private_protocol(cls: type, _: str, extra: dict[str, Any]) -> None:
    strategy = cls(noise_multiplier=1.0, **extra)
    assert isinstance(strategy, PrivateStrategy)
    assert isinstance(strategy, PerExampleClippingStrategy) == isinstance(strategy, DPSGDMixin)


def test_protocols_name_what_controllers_use() -> None:
    private = _members(PrivateStrategy)
    assert {
        "accountant",
        "sample_rate",
        "expected_batch_size",
        "effective_noise_multiplier",
        "within_budget",
        "set_clip_thresholds",
        "set_noise_multiplier",
        "set_noise_multipliers",
        "group_names",
        "clip_thresholds",
        "secure_rng",
        "seed",
        "max_epsilon",
        "target_delta",
    } <= private
    assert _members(PerExampleClippingStrategy) - private == {
        "private_step_norms",
        "last_noisy_grad_norms",
        "normalization_stability",
    }


def test_strategies_are_siblings_on_one_base() -> None:
    assert issubclass(DPSGDStrategy, PrivateStrategyMixin) and issubclass(DPZOStrategy, PrivateStrategyMixin)
    assert issubclass(DDPDPSGDStrategy, DPSGDMixin)
    assert not issubclass(DPZOStrategy, DPSGDMixin)
    assert not issubclass(DPZOStrategy, DPSGDStrategy)


@pytest.mark.parametrize("cls", [DPSGDStrategy, DDPDPSGDStrategy, DPZOStrategy])
def test_constructors_take_keywords_only(cls: type) -> None:
    params = [p for p in inspect.signature(cls).parameters.values()]
    assert params and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    with pytest.raises(TypeError):
        cls(1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, DPLightningError, "X needs noise_multiplier or target_epsilon"),
        ({"noise_multiplier": -1.0}, DPLightningError, "noise_multiplier must be >= 0"),
        ({"target_epsilon": 0.0}, PrivacyBudgetError, "target_epsilon must be > 0"),
        (
            {"noise_multiplier": 1.0, "target_delta": 1.0},
            DPLightningError,
            r"target_delta must be in \(0, 1\)",
        ),
    ],
)
def test_shared_settings_are_checked_in_one_place(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PrivacySettings(**kwargs).validate("X")
    for cls, name, extra in STRATEGIES:  # every strategy reports the same problem the same way
        with pytest.raises(error, match=match.replace("X", name)):
            cls(**kwargs, **extra)


def test_settings_are_frozen() -> None:
    settings = PrivacySettings(noise_multiplier=1.0)
    with pytest.raises(AttributeError):
        settings.seed = 3  # type: ignore[misc]
    assert settings.validate("X") is settings


# ------------------------------------------------------------------------------------------- controllers
def test_controllers_declare_their_requirements() -> None:
    declared = {
        cls.__name__: (cls.requires_dpsgd, cls.requires_single_device, cls.requires_gaussian_noise)
        for cls in (AutomaticClipping, QuantileClipping, RLDPController, NoiseSchedule)
    }
    assert declared == {
        "AutomaticClipping": (True, False, False),
        "QuantileClipping": (True, True, True),
        "RLDPController": (True, True, True),
        "NoiseSchedule": (False, False, True),
    }
    assert all(
        issubclass(cls, StrategyController)
        for cls in (AutomaticClipping, QuantileClipping, RLDPController, NoiseSchedule)
    )


class _Probe(StrategyController[PrivateStrategy]):
    requires_dpsgd = False
    requires_gaussian_noise = True

    def __init__(self) -> None:
        super().__init__()
        self.attached: list[Any] = []

    def attach(self, trainer: Any, pl_module: Any, strategy: PrivateStrategy) -> None:
        assert self.strategy is None  # kept only once attach accepted it
        self.attached.append(strategy)


def _trainer(strategy: Any) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, callbacks=[], datamodule=None)


def test_controller_setup_checks_then_attaches_then_keeps_the_strategy() -> None:
    probe = _Probe()
    zo = DPZOStrategy(noise_multiplier=1.0, device="cpu")
    for stage in ("validate", "test", "predict"):
        probe.setup(_trainer(zo), pl.LightningModule(), stage)
    assert probe.attached == [] and probe.strategy is None
    probe.setup(_trainer(zo), pl.LightningModule(), "fit")  # any private strategy, as declared
    assert probe.attached == [zo] and probe.strategy is zo


@pytest.mark.parametrize(
    ("strategy", "match"),
    [
        (SimpleNamespace(accountant=None, set_noise_multiplier=None), "drives DPSGDStrategy's σ"),
        (DPZOStrategy(noise="laplace", noise_multiplier=1.0, device="cpu"), "noise='laplace'"),
    ],
)
def test_a_refused_strategy_is_neither_attached_nor_kept(strategy: Any, match: str) -> None:
    probe = _Probe()
    with pytest.raises(DPLightningError, match=match):
        probe.setup(_trainer(strategy), pl.LightningModule(), "fit")
    assert probe.attached == [] and probe.strategy is None


def test_requirements_are_checked_in_the_declared_order() -> None:
    """DP-SGD first, then single device, then Gaussian noise: a strategy failing several gets the first."""
    strategy = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    strategy.noise = "lmo"
    strategy.world_size = 2  # type: ignore[attr-defined]
    with pytest.raises(DPLightningError, match="without DDP"):
        QuantileClipping().setup(_trainer(strategy), pl.LightningModule(), "fit")
    with pytest.raises(DPLightningError, match="DPZOStrategy"):
        QuantileClipping().setup(
            _trainer(DPZOStrategy(noise_multiplier=1.0, device="cpu")), pl.LightningModule(), "fit"
        )


# ------------------------------------------------------------------------ only the protocol, in a real fit
class _Recorder:
    """Stands in for a strategy inside a callback: forwards everything, records the names used."""

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "used", set())

    def __getattr__(self, name: str) -> Any:
        self.used.add(name)
        return getattr(self._target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.used.add(name)
        setattr(self._target, name, value)


class _Swap(pl.Callback):
    """After the callbacks' setup, hands each watched callback a recorder instead of the strategy."""

    def __init__(self, watched: list[tuple[pl.Callback, str]]) -> None:
        self.watched = watched
        self.recorders: list[_Recorder] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback, attribute in self.watched:
            recorder = _Recorder(getattr(callback, attribute))
            setattr(callback, attribute, recorder)
            self.recorders.append(recorder)


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 3)

    def per_example_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.fc(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(
    strategy: Any,
    callbacks: list[pl.Callback],
    watched: list[tuple[pl.Callback, str]],
    *,
    max_steps: int = 4,
    model: pl.LightningModule | None = None,
    datamodule: pl.LightningDataModule | None = None,
) -> set[str]:
    """Fit with ``callbacks``; returns the strategy members the ``watched`` (callback, attribute) pairs used."""
    swap = _Swap(watched)
    trainer = pl.Trainer(
        strategy=strategy,
        callbacks=[*callbacks, swap],
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    if datamodule is not None:
        trainer.fit(model, datamodule=datamodule)
    else:
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen))
        trainer.fit(_Linear(), DataLoader(data, batch_size=8))
    assert len(swap.recorders) == len(watched)
    return set().union(*(r.used for r in swap.recorders))


def test_clipping_controllers_use_only_the_protocol() -> None:
    strategy = DPSGDStrategy(target_epsilon=8.0, clipping="per_layer", accountant="rdp", device="cpu")
    budget, quantile = PrivacyBudget(), QuantileClipping(count_noise_std=4.0)
    automatic = AutomaticClipping()
    used = _fit(
        strategy,
        [budget, quantile, automatic],
        [(budget, "strategy"), (quantile, "strategy"), (automatic, "strategy")],
    )
    assert {"private_step_norms", "normalization_stability", "within_budget", "set_clip_thresholds"} <= used
    assert used <= _members(PerExampleClippingStrategy)
    assert strategy.normalization_stability is None  # AutomaticClipping's teardown went through the recorder


@pytest.mark.parametrize("strategy_cls", [DPSGDStrategy, DPZOStrategy])
def test_noise_schedule_and_budget_use_only_the_protocol(strategy_cls: type) -> None:
    strategy = strategy_cls(target_epsilon=8.0, accountant="rdp", device="cpu")
    budget, schedule = PrivacyBudget(), NoiseSchedule(final_ratio=0.8)
    used = _fit(strategy, [schedule, budget], [(budget, "strategy"), (schedule, "strategy")])
    assert {"set_noise_multiplier", "accountant", "sample_rate"} <= used
    assert used <= _members(PrivateStrategy)


def test_rldp_controller_uses_only_the_protocol(tmp_path: Path) -> None:
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule

    model = DPLoRAModule(model_name="tiny-llama", lora_rank=2, learning_rate=0.01, seed=0)
    data = TextDataModule(
        tokenizer="tiny-llama", num_records=160, max_length=32, batch_size=8, public_fraction=0.1
    )
    strategy = DPSGDStrategy(
        target_epsilon=8.0, target_delta=1e-4, clipping="per_adapter", accountant="rdp", device="cpu"
    )
    controller = RLDPController(rl_interval=2, warmup_steps=2, batch_size=4, learning_starts=1)
    used = _fit(strategy, [controller], [(controller, "strategy")], max_steps=6, model=model, datamodule=data)
    assert controller.decisions >= 1
    assert {"last_noisy_grad_norms", "private_step_norms", "set_clip_thresholds", "planned_steps"} <= used
    assert used <= _members(PerExampleClippingStrategy)
