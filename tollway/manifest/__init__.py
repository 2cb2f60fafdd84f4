"""The manifest: one YAML document that configures the whole gateway.

The names below are imported when first used, not with the package: a reload's child process
(tollway.manifest.reading) imports only the reading of the text, and the model's classes
and the compiler would be most of its start (tens of ms of a core per reload, taken from the
requests in flight on a small node)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loader import load, loads, parse
    from .model import (
        Dialect,
        Enforcement,
        KeyBinding,
        KeyStatus,
        Manifest,
        Provider,
        Quota,
        Route,
    )
    from .reading import ManifestError

_HOMES = {
    "load": "loader", "loads": "loader", "parse": "loader", "ManifestError": "reading",
    **{name: "model" for name in ("Dialect", "Enforcement", "KeyBinding", "KeyStatus",
                                  "Manifest", "Provider", "Quota", "Route")},
}

__all__ = ["Dialect", "Enforcement", "KeyBinding", "KeyStatus", "Manifest", "ManifestError",
           "Provider", "Quota", "Route", "load", "loads", "parse"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value  # once: later lookups find it without this call
    return value
