"""The manifest: one YAML document that configures the whole gateway."""

from .loader import ManifestError, load, loads, parse
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

__all__ = [
    "Dialect",
    "Enforcement",
    "KeyBinding",
    "KeyStatus",
    "Manifest",
    "ManifestError",
    "Provider",
    "Quota",
    "Route",
    "load",
    "loads",
    "parse",
]
