"""The privacy ledger: an append-only file, beside a run's checkpoints, of every step the run has released.

A checkpoint holds the accountant as of the step it was written. The run goes on after it and releases more
steps (weights, logs, noisy statistics), and may then die or be resumed from that older checkpoint: the
accountant restored from it does not know those steps, so without a record of them ε would be spent twice
and reported once. The ledger is that record. It starts with the history at the first checkpoint and gets
one line per step, written and flushed to disk before the step's update is used; a resume charges whatever
the ledger holds beyond the checkpoint's history.

Each line is one entry of an accountant's ``state_dict()["history"]`` (an event and its count): the ledger
holds the σ and q of each step, which ε covers (they are public settings or post-processing of releases).
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dplightning.errors import DPLightningError
from dplightning.privacy.accounting.events import StepEvent

__all__ = ["PrivacyLedger", "ResumeVerdict", "read_ledgers", "unrecorded_steps"]

LEDGER_PREFIX = "privacy_ledger-"


class PrivacyLedger:
    """An append-only JSON-lines file of released steps. Create one with :meth:`start`; reopen one by path."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tail_checked = False

    @classmethod
    def start(cls, directory: str | os.PathLike[str], entries: Iterable[dict[str, Any]]) -> PrivacyLedger:
        """A new ledger in ``directory`` (a fresh name, so runs sharing a folder never share a ledger) holding
        ``entries`` (the history so far); written to a temporary name and renamed, so it is whole or absent."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        ledger = cls(folder / f"{LEDGER_PREFIX}{uuid.uuid4().hex[:12]}.jsonl")
        temporary = ledger.path.with_name(f".{ledger.path.name}.tmp")
        with temporary.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in entries)
            f.flush()
            os.fsync(f.fileno())
        temporary.replace(ledger.path)
        # the rename itself must survive a crash, or a checkpoint would name a lost ledger
        _sync_folder(folder)
        return ledger

    def append(self, entry: dict[str, Any]) -> None:
        """Add one entry and flush it to disk before returning (the step it records may then be released)."""
        if not self._tail_checked:
            self._drop_torn_tail()
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _drop_torn_tail(self) -> None:
        """Cut a torn last line (a process died while writing it) so the next entry starts on a line of its own."""
        with self.path.open("rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())
        self._tail_checked = True

    def entries(self) -> list[dict[str, Any]]:
        """Every entry. A torn last line (the process died while writing it, so its step was never released) is
        dropped; a malformed line before it means the file was edited or damaged, and is refused."""
        lines = self.path.read_text(encoding="utf-8").splitlines()
        out: list[dict[str, Any]] = []
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise DPLightningError(
                    f"privacy ledger {self.path} is damaged at line {number}; restore it, or resume from a "
                    "checkpoint of a run that never went past it"
                ) from None
            out.append(entry)
        return out


def unrecorded_steps(accountant: Any, entries: list[dict[str, Any]]) -> list[tuple[StepEvent, int]]:
    """The steps ``entries`` (a ledger) record beyond ``accountant``'s history: for each event, the ledger's
    count minus the accountant's, where positive. Events are compared as the accountant records them (its own
    canonical form, read through a fresh accountant of the same kind and settings)."""
    ledger = type(accountant)()
    ledger.load_state_dict({**accountant.state_dict(), "history": entries})
    have = dict(accountant.history)
    return [
        (event, count - have.get(event, 0)) for event, count in ledger.history if count > have.get(event, 0)
    ]


@dataclass(frozen=True)
class ResumeVerdict:
    """What a checkpoint's ledgers say about a resume from it (see :func:`read_ledgers`)."""

    orphans: list[tuple[StepEvent, int]] = field(default_factory=list)  # steps released after the checkpoint
    writable: list[str] = field(default_factory=list)  # copies the resumed run appends to
    found: bool = False  # whether any copy was found
    error: str | None = None  # a damaged ledger's message


def read_ledgers(accountant: Any, paths: list[str], checkpoint_dir: str | None) -> ResumeVerdict:
    """What a checkpoint's ledgers (``paths``, as the checkpoint names them) say about a resume from it.

    Each is looked for beside the checkpoint (a moved or copied run folder) and where it was written; every copy
    found counts. The orphans are the steps beyond ``accountant``'s history (per event, the largest excess of any
    copy); a read-only copy is warned about (later steps are not recorded there). A damaged ledger is reported
    in the verdict, not raised, so that every rank of a distributed run can raise it."""
    found: dict[str, str] = {}  # real path -> path as found
    for path in paths:
        beside = os.path.join(checkpoint_dir, os.path.basename(path)) if checkpoint_dir else None
        for candidate in (beside, path):
            if candidate and os.path.isfile(candidate):
                found.setdefault(os.path.realpath(candidate), os.path.abspath(candidate))
    excess: dict[StepEvent, int] = {}
    try:
        for path in found.values():
            for event, count in unrecorded_steps(accountant, PrivacyLedger(path).entries()):
                excess[event] = max(excess.get(event, 0), count)
    except DPLightningError as error:
        return ResumeVerdict(error=str(error))
    writable = [path for path in found.values() if os.access(path, os.W_OK)]
    for path in found.values():
        if path not in writable:
            warnings.warn(
                f"privacy ledger {path} is read-only: this run's steps are not recorded there, so a later resume "
                "from the checkpoints beside it will not charge them",
                stacklevel=2,
            )
    return ResumeVerdict(list(excess.items()), writable, bool(found))


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): the rename is as durable as they make it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
