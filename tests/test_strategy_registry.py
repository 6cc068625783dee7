"""Strategies are chosen by class, not by registry name.

Lightning's ``StrategyRegistry`` maps a name to a class plus fixed ``__init__`` arguments, and ``Trainer`` /
LightningCLI take the name as a bare string: there is no way to hand a privacy budget along with it. A private
strategy cannot run without one (``noise_multiplier`` or ``target_epsilon``), so dplightning registers no names;
``Trainer(strategy=DPSGDStrategy(...))`` and, in YAML, ``class_path`` + ``init_args`` are the ways in. A user
who wants a name registers a preset with its own budget, which works because the constructors take keywords.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.strategies import StrategyRegistry

from dplightning.cli import main
from dplightning.errors import DPLightningError
from dplightning.strategies import DDPDPSGDStrategy, DPSGDStrategy, DPZOStrategy

STRATEGIES = (DPSGDStrategy, DDPDPSGDStrategy, DPZOStrategy)


@pytest.fixture
def registry_name() -> Iterator[str]:
    name = "test_dplightning_preset"
    yield name
    if name in StrategyRegistry:
        StrategyRegistry.remove(name)


def test_importing_the_strategies_registers_no_names() -> None:
    ours = [name for name, entry in StrategyRegistry.items() if entry["strategy"] in STRATEGIES]
    assert ours == []
    for cls in STRATEGIES:  # no name of their own: what they report is their Lightning base's
        assert "strategy_name" not in vars(cls)


def test_a_name_without_a_budget_cannot_make_a_private_strategy(registry_name: str) -> None:
    StrategyRegistry.register(registry_name, DPSGDStrategy)
    with pytest.raises(DPLightningError, match="noise_multiplier or target_epsilon"):
        pl.Trainer(strategy=registry_name, logger=False)


@pytest.mark.parametrize(
    ("cls", "init_params"),
    [
        (DPSGDStrategy, {"target_epsilon": 3.0, "clipping": "per_layer", "device": "cpu"}),
        (DPZOStrategy, {"target_epsilon": 2.0, "noise": "laplace", "device": "cpu"}),
    ],
)
def test_a_user_preset_with_its_budget_works(
    registry_name: str, cls: type, init_params: dict[str, object]
) -> None:
    StrategyRegistry.register(registry_name, cls, description="a preset with its own budget", **init_params)
    trainer = pl.Trainer(strategy=registry_name, accelerator="cpu", logger=False, enable_progress_bar=False)
    assert type(trainer.strategy) is cls
    for key, value in init_params.items():
        if key != "device":
            assert getattr(trainer.strategy, key) == value


def test_yaml_selects_a_strategy_by_class_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "dpzo.yaml"
    cfg.write_text(
        "model:\n  model_name: tiny-llama\ntrainer:\n  logger: false\n  strategy:\n"
        "    class_path: dplightning.strategies.DPZOStrategy\n"
        "    init_args:\n      target_epsilon: 2.0\n      num_directions: 2\n      device: cpu\n"
    )
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(cfg), "--print_config"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: dplightning.strategies.DPZOStrategy" in out
    assert "num_directions: 2" in out and "mu: 0.001" in out  # keyword-only arguments are all listed
