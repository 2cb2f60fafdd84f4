"""Tollway: shared code for the gateway's services (manifest, stores, CLI)."""

__version__ = "0.1.0"
