"""Mutual TLS for Tollway's gRPC services: who may talk to extauthz, ratelimit and costsink.

Anyone who reaches a service port could otherwise forge money (a fake access-log entry),
hand a key free tokens (Settle) or read any key's spend (Usage). With `services.tls`, every
service requires a client certificate from the configured CA, and Envoy and costsink present
one. The PEM files are read as Kubernetes Secrets and cert-manager mount them, and re-read
when they change: a server checks them on every new handshake (gRPC's certificate fetcher),
a client reopens its channel when they have changed. Envoy reads its copies through
file-based SDS (tollway.render), which watches the directory for the Secret's symlink swap.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import grpc

from tollway.manifest.model import ServiceTls

log = logging.getLogger("tollway.tls")


def _stamp(tls: ServiceTls) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced (a Secret's symlink swap changes the inode)."""
    out = []
    for p in (tls.ca, tls.cert, tls.key):
        st = os.stat(p)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _read(tls: ServiceTls) -> tuple[bytes, bytes, bytes]:
    return Path(tls.ca).read_bytes(), Path(tls.cert).read_bytes(), Path(tls.key).read_bytes()


def server_credentials(tls: ServiceTls) -> grpc.ServerCredentials:
    """Require a client certificate from the CA; pick up rotated files on the next
    handshake, keeping the last good ones if the new ones cannot be read."""
    ca, cert, key = _read(tls)
    state = {"stamp": _stamp(tls)}

    def config(ca: bytes, cert: bytes, key: bytes) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = _stamp(tls)
            if stamp == state["stamp"]:
                return None
            fresh = config(*_read(tls))
        except (OSError, ValueError) as e:
            log.error("cannot read the rotated TLS files, keeping the last good ones: %s", e)
            return None
        state["stamp"] = stamp
        log.info("TLS certificate files changed: new handshakes use them")
        return fresh

    return grpc.dynamic_ssl_server_credentials(config(ca, cert, key), fetch,
                                               require_client_authentication=True)


RECHECK_SECONDS = 1.0  # how often a client looks at its certificate files: not every call


class ServiceChannel:
    """A client channel to one of the services: plaintext without `services.tls`, else mutual
    TLS, reopened when the certificate files change (looked at once a second at most: a sink
    settles every entry through it)."""

    def __init__(self, target: str, tls: ServiceTls | None) -> None:
        self.target, self.tls = target, tls
        self._channel: grpc.aio.Channel | None = None
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._checked = 0.0
        self._retired: list[grpc.aio.Channel] = []  # calls already made on them finish

    def get(self) -> grpc.aio.Channel:
        now = time.monotonic()
        if self._channel is not None and now - self._checked < RECHECK_SECONDS:
            return self._channel
        self._checked = now
        stamp = _stamp(self.tls) if self.tls else None
        if self._channel is None or stamp != self._stamp:
            if self._channel is not None:
                self._retired.append(self._channel)
            self._channel, self._stamp = self._open(), stamp
        return self._channel

    def _open(self) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target)
        ca, cert, key = _read(self.tls)
        return grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert))

    async def close(self) -> None:
        for ch in [*self._retired, *([self._channel] if self._channel else [])]:
            await ch.close()
        self._channel, self._retired = None, []


def blocking_channel(target: str, tls: ServiceTls | None) -> grpc.Channel:
    """For the CLI: one call, one channel, the certificate files as they are now."""
    if tls is None:
        return grpc.insecure_channel(target)
    ca, cert, key = _read(tls)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert))


def target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
