"""The architecture registry: the name each SAE class is created and loaded by.

It sits below both ``flashsae.modules`` (whose classes register themselves here when they are
defined) and ``flashsae.io`` (whose readers look classes up here to build an SAE from a file), so
neither package imports the other for it. Registering needs only the class attributes
``architecture`` and ``config_class``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: Architecture name -> SAE class (filled by ``@register`` as flashsae.modules is imported).
REGISTRY: dict[str, Any] = {}


def register(cls: type) -> type:
    """Class decorator: makes `cls` available to create() and load() under cls.architecture."""
    if not cls.architecture:
        raise ValueError(f"{cls.__name__}: set the class attribute `architecture` before registering")
    if cls.architecture in REGISTRY and REGISTRY[cls.architecture] is not cls:
        owner = REGISTRY[cls.architecture].__name__
        raise ValueError(f"architecture {cls.architecture!r} is already registered by {owner}")
    REGISTRY[cls.architecture] = cls
    return cls


def architecture_class(name: object, argument: str = "name") -> Any:
    """The class registered as `name`; ValueError naming `argument` and the known names otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"{argument}: unknown architecture {name!r}; expected one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def config_fields(architecture: str) -> set[str]:
    """The field names of the config dataclass of the registered `architecture`."""
    return {field.name for field in dataclasses.fields(REGISTRY[architecture].config_class)}
