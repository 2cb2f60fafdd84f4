"""Envoy's file access log: the same facts as the gRPC access-log entry, one JSON line each.

Envoy's gRPC access log is fire-and-forget: while costsink is unreachable, entries are dropped.
So every Envoy also writes each entry to a local file (rendered from FILE_FORMAT), and costsink
reconciles that file into the ledger by request id (costsink/durable_log.py). A line read back
becomes the very HTTPAccessLogEntry the gRPC stream would have carried, so one function
(costsink.entry.to_entry) reads both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import json_format, struct_pb2

from tollway.manifest.model import Gateway
from tollway.metadata import AUTHZ, RATELIMIT, REQUEST, USAGE
from tollway.refs import state_dir

# how often Envoy writes its access-log file buffer out (`--file-flush-interval-msec`, an
# Envoy command-line option, see tollway.up.envoy_args): what a crash of Envoy itself may lose
# from the file
ENVOY_FILE_FLUSH_MS = 1000


def access_log_path(g: Gateway) -> Path:
    p = Path(g.access_log_file)
    return p if p.is_absolute() else state_dir() / p

FILE_FORMAT: dict[str, str] = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "start_time": "%START_TIME(%s.%6f)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "duration_ms": "%DURATION%",
    "upstream_sent": "%UPSTREAM_WIRE_BYTES_SENT%",
    "downstream": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "md_authz": f"%DYNAMIC_METADATA({AUTHZ})%",
    "md_usage": f"%DYNAMIC_METADATA({USAGE})%",
    "md_ratelimit": f"%DYNAMIC_METADATA({RATELIMIT})%",
    "md_request": f"%DYNAMIC_METADATA({REQUEST})%",
}
_NAMESPACES = {"md_authz": AUTHZ, "md_usage": USAGE, "md_ratelimit": RATELIMIT,
               "md_request": REQUEST}


_REQUEST_ID = re.compile(rb'"request_id":"([^"]*)"')


def line_request_id(line: bytes) -> str | None:
    """A line's request id without parsing the rest of it: most lines are skipped."""
    m = _REQUEST_ID.search(line)
    return m.group(1).decode() if m else None


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def entry_from_line(line: str | bytes) -> accesslog_pb2.HTTPAccessLogEntry:
    """One file line → the gRPC access-log entry it stands for (the fields Tollway reads)."""
    doc = json.loads(line)
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_id = doc.get("request_id") or ""
    e.request.request_body_bytes = _int(doc.get("bytes_received"))
    e.response.response_code.value = _int(doc.get("status"))
    common = e.common_properties
    seconds, _, fraction = str(doc.get("start_time") or "").partition(".")
    if seconds.isdigit() and (not fraction or fraction.isdigit()):
        # exactly as the gRPC stream's Timestamp reads (costsink.entry): the ledger's key holds
        # the start time, so the two copies of an entry must agree to the microsecond
        common.start_time.seconds = int(seconds)
        common.start_time.nanos = int(fraction[:6].ljust(6, "0")) * 1000
    common.time_to_last_downstream_tx_byte.FromMilliseconds(_int(doc.get("duration_ms")))
    if _int(doc.get("upstream_sent")) > 0:
        common.time_to_first_upstream_tx_byte.FromMilliseconds(0)
    host, _, port = str(doc.get("downstream") or "").rpartition(":")
    if port.isdigit():
        common.downstream_remote_address.socket_address.address = host.strip("[]")
        common.downstream_remote_address.socket_address.port_value = int(port)
    flags = str(doc.get("flags") or "").split(",")
    common.response_flags.downstream_connection_termination = "DC" in flags
    common.response_flags.downstream_remote_reset = "DR" in flags
    for field, ns in _NAMESPACES.items():
        md = doc.get(field)
        if isinstance(md, dict) and md:
            s = struct_pb2.Struct()
            json_format.ParseDict(md, s)
            common.metadata.filter_metadata[ns].CopyFrom(s)
    return e
