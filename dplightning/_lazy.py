"""PEP 562 lazy exports, shared by the package ``__init__`` modules.

A package lists ``{public name: submodule}``; the submodule is imported the first time the name is read, and
the value is then cached in the package namespace. Importing a package therefore costs nothing until a member
is used (``from dplightning.callbacks import PrivacyBudget`` does not import stable-baselines3).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], submodules: Collection[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the submodule (relative to the
    package) that defines it; ``submodules`` are subpackages reachable as attributes."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            # AttributeError lets `from package import <submodule>` fall back to a submodule import.
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports, *submodules})

    return __getattr__, __dir__
