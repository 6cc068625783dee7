"""The privacy core, without Lightning: accounting, mechanisms, clipping, integer grids, noise.

Every name in ``accounting.__all__`` is re-exported here, with :class:`~dplightning.privacy.mechanisms.LMOMechanism`,
and imported on first access (PEP 562). The submodules (``discretization``, ``noise_addition``, ...) import this
package first and must not pay for ``dp_accounting`` and scipy each time, so even the list of accounting names is
read from ``accounting`` only when one of them (or ``__all__``) is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dplightning.privacy import accounting
    from dplightning.privacy.accounting import *  # noqa: F403
    from dplightning.privacy.mechanisms import LMOMechanism

    __all__ = ["LMOMechanism"]
    __all__ += accounting.__all__

# Names re-exported from submodules other than ``accounting``: name -> submodule.
_OWN_EXPORTS = {"LMOMechanism": "mechanisms"}


def _exports() -> dict[str, str]:
    """Public name -> submodule that defines it: ``accounting.__all__``, then this package's own."""
    accounting = importlib.import_module(f"{__name__}.accounting")
    return {**dict.fromkeys(accounting.__all__, "accounting"), **_OWN_EXPORTS}


def _is_submodule(name: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{name}") is not None


def __getattr__(name: str) -> Any:
    if name in ("_EXPORTS", "__all__"):
        exports = _exports()
        value: Any = exports if name == "_EXPORTS" else list(exports)
    else:
        # dunders (tools probe for them) and submodules (`from dplightning.privacy import <submodule>` imports
        # it after an AttributeError) are never exports: no need to import accounting to say so
        probe = name.startswith("__") or _is_submodule(name)
        module = None if probe else _OWN_EXPORTS.get(name) or _exports().get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_exports()})
