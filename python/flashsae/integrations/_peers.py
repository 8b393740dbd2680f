"""Importing a client package lazily, with an ImportError that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, *, package: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or an ImportError saying that `purpose` needs `package` and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the {package} package, which is not installed: pip install 'flashsae[{extra}]' "
            f"(or pip install {package}); importing {module!r} failed with: {exc}"
        ) from exc
