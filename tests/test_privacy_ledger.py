"""The privacy ledger: a resume from an older checkpoint charges the steps its run released after it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer
from test_dpsgd_strategy import Linear, _data
from test_dpzo import Quadratic, _points
from torch.utils.data import DataLoader

from dplightning.errors import DPLightningError
from dplightning.privacy.accounting import make_accountant
from dplightning.privacy.accounting.base import history_entry
from dplightning.privacy.accounting.events import StepEvent
from dplightning.privacy.ledger import PrivacyLedger, unrecorded_steps
from dplightning.strategies import DPSGDStrategy, DPZOStrategy

STEPS = 6


def _loader() -> DataLoader:
    return DataLoader(_data(40), batch_size=8)


def _first_run(tmp_path: Path, **strategy_kwargs: object) -> Path:
    """A run of STEPS steps with a checkpoint every 2; returns its step-2 checkpoint."""
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    strategy = DPSGDStrategy(max_grad_norm=1.0, **strategy_kwargs)  # type: ignore[arg-type]
    quiet_trainer(strategy, [checkpoints], max_steps=STEPS, checkpoints=True).fit(Linear(), _loader())
    assert strategy.accountant.steps == STEPS
    return next(tmp_path.glob("*step=2.ckpt"))


def _ledger_steps(tmp_path: Path) -> int:
    (path,) = tmp_path.glob("privacy_ledger-*.jsonl")
    return sum(entry["count"] for entry in PrivacyLedger(path).entries())


def test_resume_from_an_older_checkpoint_charges_the_steps_released_after_it(tmp_path: Path) -> None:
    ckpt = _first_run(tmp_path, noise_multiplier=1.0)
    assert _ledger_steps(tmp_path) == STEPS
    resumed = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0)
    trainer = quiet_trainer(resumed, max_steps=STEPS)
    with pytest.warns(UserWarning, match="released 4 more steps"):
        trainer.fit(Linear(), _loader(), ckpt_path=str(ckpt))
    released = STEPS + (trainer.global_step - 2)  # the first run's, then the resumed run's
    assert trainer.global_step == STEPS
    assert resumed.accountant.steps == released == 10
    assert _ledger_steps(tmp_path) == released  # the resumed run appends to the same ledger


def test_a_budgeted_resume_stops_where_the_budget_is_already_spent(tmp_path: Path) -> None:
    ckpt = _first_run(tmp_path, target_epsilon=2.0)
    resumed = DPSGDStrategy(target_epsilon=2.0, max_grad_norm=1.0)
    trainer = quiet_trainer(resumed, max_steps=STEPS)
    with pytest.warns(UserWarning, match="released 4 more steps"):
        trainer.fit(Linear(), _loader(), ckpt_path=str(ckpt))
    assert resumed.accountant.steps == STEPS  # nothing more released: the first run spent the budget
    assert trainer.should_stop and resumed.budget_exhausted
    assert resumed.epsilon() <= 2.0


def test_a_seeded_resume_from_an_older_checkpoint_is_refused_unless_secure(tmp_path: Path) -> None:
    ckpt = _first_run(tmp_path, noise_multiplier=1.0, seed=3)
    with pytest.raises(DPLightningError, match=r"4 steps behind.*last step.*secure_rng: true"):
        quiet_trainer(DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3), max_steps=STEPS).fit(
            Linear(), _loader(), ckpt_path=str(ckpt)
        )
    secure = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3, secure_rng=True)
    with pytest.warns(UserWarning, match="released 4 more steps"):
        quiet_trainer(secure, max_steps=STEPS).fit(Linear(), _loader(), ckpt_path=str(ckpt))
    assert secure.accountant.steps == 10


def test_resume_from_the_latest_checkpoint_charges_nothing_more(tmp_path: Path) -> None:
    _first_run(tmp_path, noise_multiplier=1.0, seed=3)
    resumed = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3)
    quiet_trainer(resumed, max_steps=STEPS + 1).fit(
        Linear(), _loader(), ckpt_path=str(next(tmp_path.glob(f"*step={STEPS}.ckpt")))
    )
    assert resumed.accountant.steps == STEPS + 1


def test_a_missing_ledger_is_a_warning(tmp_path: Path) -> None:
    ckpt = _first_run(tmp_path, noise_multiplier=1.0)
    next(tmp_path.glob("privacy_ledger-*.jsonl")).unlink()
    resumed = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="neither beside it nor where it was written"):
        quiet_trainer(resumed, max_steps=STEPS).fit(Linear(), _loader(), ckpt_path=str(ckpt))
    assert resumed.accountant.steps == STEPS  # only what the checkpoint knew, then 4 more


def test_a_moved_run_folder_keeps_its_ledger(tmp_path: Path) -> None:
    ckpt = _first_run(tmp_path / "run", noise_multiplier=1.0)
    shutil.move(tmp_path / "run", tmp_path / "archive")
    resumed = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="released 4 more steps"):
        quiet_trainer(resumed, max_steps=STEPS).fit(
            Linear(), _loader(), ckpt_path=str(tmp_path / "archive" / ckpt.name)
        )
    assert resumed.accountant.steps == 10


def test_a_seeded_resume_without_its_ledger_is_refused(tmp_path: Path) -> None:
    ckpt = _first_run(tmp_path, noise_multiplier=1.0, seed=3)
    next(tmp_path.glob("privacy_ledger-*.jsonl")).unlink()
    with pytest.raises(DPLightningError, match="neither beside it nor where it was written"):
        quiet_trainer(DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3), max_steps=STEPS).fit(
            Linear(), _loader(), ckpt_path=str(ckpt)
        )


def test_a_resumed_run_checkpointing_elsewhere_starts_a_ledger_there(tmp_path: Path) -> None:
    _first_run(tmp_path / "a", noise_multiplier=1.0)  # steps 1-6, checkpoints at 2, 4, 6
    later = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=2, save_top_k=-1)
    resumed = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0)
    quiet_trainer(resumed, [later], max_steps=10, checkpoints=True).fit(
        Linear(), _loader(), ckpt_path=str(next((tmp_path / "a").glob("*step=6.ckpt")))
    )
    assert resumed.accountant.steps == 10
    assert _ledger_steps(tmp_path / "a") == _ledger_steps(tmp_path / "b") == 10  # both go on
    shutil.rmtree(tmp_path / "a")  # the first folder is gone: b's own ledger knows steps 9 and 10
    again = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="released 2 more steps"):
        quiet_trainer(again, max_steps=10).fit(
            Linear(), _loader(), ckpt_path=str(next((tmp_path / "b").glob("*step=8.ckpt")))
        )
    assert again.accountant.steps == 12


class _FailingAppend:
    def __call__(self, *args: Any) -> None:
        raise OSError("disk full")


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
def test_a_step_the_ledger_cannot_record_never_moves_the_weights(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "dpsgd":
        model, loader, make = (
            Linear(),
            _loader(),
            lambda: DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0),
        )
    else:
        model, loader = Quadratic(), DataLoader(_points(64, 6), batch_size=8)
        make = lambda: DPZOStrategy(noise_multiplier=1.0, max_loss_diff=2.0, device="cpu")  # noqa: E731
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    quiet_trainer(make(), [checkpoints], max_steps=2, checkpoints=True).fit(model, loader)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(PrivacyLedger, "append", _FailingAppend())
    with pytest.raises(OSError, match="disk full"):
        quiet_trainer(make(), max_steps=4).fit(
            model, loader, ckpt_path=str(next(tmp_path.glob("*step=2.ckpt")))
        )
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # nothing released that the ledger does not hold


@pytest.mark.parametrize("seeded", [True, False])
def test_a_checkpoint_naming_no_ledger_is_treated_as_one_without_its_ledger(
    tmp_path: Path, seeded: bool
) -> None:
    """An older version's checkpoint (or one written to a remote path) says nothing about later steps."""
    kwargs: dict[str, Any] = {"seed": 3} if seeded else {}
    ckpt = _first_run(tmp_path, noise_multiplier=1.0, **kwargs)
    state = torch.load(ckpt, weights_only=False)
    del state["dplightning"]["ledgers"]
    torch.save(state, ckpt)
    fit = quiet_trainer(DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, **kwargs), max_steps=STEPS).fit
    if seeded:
        with pytest.raises(DPLightningError, match="names no privacy ledger"):
            fit(Linear(), _loader(), ckpt_path=str(ckpt))
    else:
        with pytest.warns(UserWarning, match="names no privacy ledger"):
            fit(Linear(), _loader(), ckpt_path=str(ckpt))


class _Evaluated(Linear):
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.training_step(batch, batch_idx)


def test_evaluating_an_older_checkpoint_is_not_a_resume(tmp_path: Path) -> None:
    ckpt = _first_run(tmp_path, noise_multiplier=1.0, seed=3)
    strategy = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3)
    trainer = quiet_trainer(strategy, max_steps=STEPS)
    # no refusal: evaluation releases no step
    trainer.validate(_Evaluated(), _loader(), ckpt_path=str(ckpt), verbose=False)
    assert _ledger_steps(tmp_path) == STEPS


def test_a_seeded_run_ending_after_its_last_checkpoint_says_how_to_go_on(tmp_path: Path) -> None:
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    strategy = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3)
    trainer = quiet_trainer(strategy, [checkpoints], max_steps=5, checkpoints=True)
    with pytest.warns(UserWarning, match="last 1 steps of this seeded run are in no checkpoint"):
        trainer.fit(Linear(), _loader())
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    resumed = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3)
    quiet_trainer(resumed, max_steps=6).fit(Linear(), _loader(), ckpt_path=str(tmp_path / "end.ckpt"))
    assert resumed.accountant.steps == 6


def test_an_append_after_a_torn_line_starts_on_a_line_of_its_own(tmp_path: Path) -> None:
    event = StepEvent(1.0, 0.1)
    ledger = PrivacyLedger.start(tmp_path, [history_entry(event, 3)])
    with ledger.path.open("a") as f:
        f.write('{"noise_multiplier": 1.0, "sam')  # died mid-write
    reopened = PrivacyLedger(ledger.path)
    reopened.append(history_entry(event, 1))
    reopened.append(history_entry(event, 1))
    assert [e["count"] for e in reopened.entries()] == [3, 1, 1]


def test_ledger_drops_a_torn_last_line_and_refuses_a_damaged_one(tmp_path: Path) -> None:
    event = StepEvent(1.0, 0.1)
    ledger = PrivacyLedger.start(tmp_path, [history_entry(event, 3)])
    ledger.append(history_entry(event, 1))
    with ledger.path.open("a") as f:
        f.write('{"noise_multiplier": 1.0, "sam')  # the process died mid-write: that step was never released
    assert [e["count"] for e in ledger.entries()] == [3, 1]
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(DPLightningError, match="damaged at line 2"):
        ledger.entries()


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_unrecorded_steps_compare_events_as_the_accountant_records_them(kind: str) -> None:
    accountant = make_accountant(kind)
    accountant.record(StepEvent(1.0, 0.1), 2)
    # σ just above a grid point is recorded on it: the ledger's raw σ must match the accountant's rounded one
    entries = [history_entry(StepEvent(1.0, 0.1), 2), history_entry(StepEvent(1.0000001, 0.1), 3)]
    entries.append(json.loads(json.dumps(history_entry(StepEvent(2.0, 0.05), 1))))
    orphans = unrecorded_steps(accountant, entries)
    assert sorted((e.noise_multiplier, e.sample_rate, c) for e, c in orphans) == [
        (pytest.approx(1.0, rel=1e-3), 0.1, 3),
        (pytest.approx(2.0, rel=1e-3), 0.05, 1),  # on the accountant's σ grid, just below 2
    ]
    assert accountant.steps == 2  # reading the ledger leaves the accountant alone
