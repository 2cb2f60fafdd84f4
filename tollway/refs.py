"""Secret references and state locations.

The manifest is a ConfigMap: anyone who can read it must learn nothing secret from it. So every
credential, pepper or DSN in it may be a reference, resolved here, at the moment of use.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path


class UnresolvedReference(Exception):
    """A reference that cannot be resolved; the message names it but never a secret value."""


def state_dir() -> Path:
    """Where the embedded default keeps its SQLite files and pepper (TOLLWAY_STATE_DIR)."""
    return Path(os.environ.get("TOLLWAY_STATE_DIR", ".tollway")).absolute()


def private_files() -> None:
    """Keys, ledger, spool and pepper are nobody else's business: every file Tollway (and an
    Envoy it starts) creates is 0600, every directory 0700, and a state dir made before this
    rule is closed too."""
    os.umask(0o077)
    with contextlib.suppress(FileNotFoundError, PermissionError):
        state_dir().chmod(0o700)


def private_file(path: Path) -> None:
    """Create `path` 0600 if it is missing (a database, a log another process will append
    to), or make an existing one 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    path.chmod(0o600)


def resolve(ref: str) -> str:
    """Resolve `env:NAME` or `file:PATH` (relative paths live in the state dir)."""
    if ref.startswith("env:"):
        name = ref[4:]
        value = os.environ.get(name)
        if not value:
            raise UnresolvedReference(f"environment variable {name} is not set (needed by {ref})")
        return value
    if ref.startswith("file:"):
        path = state_dir() / ref[5:]
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UnresolvedReference(
                f"cannot read {path} (needed by {ref}): {e.strerror}") from None
    return ref


def resolve_dsn(value: str) -> str:
    """A storage DSN, possibly a reference; relative SQLite paths live in the state dir."""
    dsn = resolve(value) if value.startswith(("env:", "file:")) else value
    if dsn.startswith("sqlite:///") and not dsn.startswith("sqlite:////"):
        return f"sqlite:///{state_dir() / dsn[len('sqlite:///'):]}"
    return dsn


def pepper(ref: str, *, create: bool = False) -> bytes:
    """The HMAC pepper. `create` makes a fresh one for the embedded default on first use."""
    if create and ref.startswith("file:"):
        path = state_dir() / ref[5:]
        if not path.exists():
            # written whole beside it, then linked into place: of several processes starting
            # at once, one pepper wins and none ever reads a half-written one
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pepper-")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32))
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                os.unlink(tmp)
    value = resolve(ref)
    if len(value) < 16:
        raise UnresolvedReference(f"the pepper from {ref} is shorter than 16 characters")
    return value.encode()
