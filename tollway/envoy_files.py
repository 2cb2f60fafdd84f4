"""Envoy's configuration as files it watches: manifest edits reach a running Envoy.

`tollway render --dir DIR` writes a bootstrap (`envoy.yaml`) that names no listener, route or
cluster itself, and three discovery documents beside it: `lds.yaml` (the listener and its
filter chain), `rds.yaml` (the routes) and `cds.yaml` (the service and provider clusters), plus
the SDS documents with services.tls. Envoy subscribes to each file and watches the directory
for moves. Every file is replaced by an atomic rename, and only when its content changed:

* a route edit rewrites `rds.yaml` alone; the listener stays, so no connection is drained and
  no request in flight is touched;
* a provider edit rewrites `cds.yaml`; Envoy replaces only the clusters that changed;
* a filter-chain change (rare: the Lua filter, the local replies) replaces the listener, and
  Envoy drains the old one gracefully, finishing the requests it holds.

`--watch` (the Envoy pod's sidecar; `tollway up` runs the same loop in-process) re-renders when
the manifest changes. A manifest that fails to load changes nothing. What the bootstrap holds
(the admin address, the node) takes an Envoy restart.

Why files rather than an xDS gRPC server in `tollway serve`: Envoy's filesystem subscription is
the same xDS state machine, needs no extra port, no ordering between Envoy and the services at
start, and keeps serving the last good config if Tollway is down; a directory is also what a
Kubernetes ConfigMap or emptyDir gives.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from tollway.access_log import access_log_path
from tollway.background import yield_to_requests
from tollway.manifest import Manifest
from tollway.reload import Live, ManifestWatcher
from tollway.render import clusters, listener, render_sds, route_config, skeleton, to_yaml

log = logging.getLogger("tollway.envoy_files")

BOOTSTRAP = "envoy.yaml"
LDS, RDS, CDS = "lds.yaml", "rds.yaml", "cds.yaml"
_ANY = "type.googleapis.com/envoy.config."


def _source(directory: Path, name: str) -> dict[str, Any]:
    return {"path_config_source": {"path": str(directory / name),
                                   "watched_directory": {"path": str(directory)}},
            "resource_api_version": "V3"}


def bootstrap(m: Manifest, directory: Path) -> dict[str, Any]:
    doc = skeleton(m)
    del doc["static_resources"]
    doc["dynamic_resources"] = {"lds_config": _source(directory, LDS),
                                "cds_config": _source(directory, CDS)}
    return doc


def resources(m: Manifest, directory: Path) -> dict[str, dict[str, Any]]:
    """Every watched document by file name (the bootstrap excluded)."""
    rds = {"rds": {"route_config_name": "tollway", "config_source": _source(directory, RDS)}}
    docs: dict[str, dict[str, Any]] = {
        LDS: {"resources": [{"@type": _ANY + "listener.v3.Listener", **listener(m, rds)}]},
        RDS: {"resources": [{"@type": _ANY + "route.v3.RouteConfiguration",
                             **route_config(m)}]},
        CDS: {"resources": [{"@type": _ANY + "cluster.v3.Cluster", **c}
                            for c in clusters(m, str(directory))]},
    }
    if m.services.tls:
        docs.update(render_sds(m.services.tls))
    return docs


def _dump(doc: dict[str, Any]) -> str:
    return to_yaml(doc)


def _replace(path: Path, text: str) -> bool:
    """Write `text` to `path` by rename (Envoy reloads on moves only) if it differs."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def write_resources(directory: Path, docs: dict[str, dict[str, Any]]) -> list[Path]:
    """The changed documents, clusters first: a new route may name a new cluster, and a route
    to a cluster Envoy does not know yet would answer 503 in between."""
    order = [CDS, *(n for n in docs if n not in (CDS, LDS, RDS)), LDS, RDS]
    return [directory / name for name in order
            if name in docs and _replace(directory / name, _dump(docs[name]))]


def write_dynamic(m: Manifest, directory: Path) -> Path:
    """The whole layout; returns the bootstrap's path (Envoy's `-c`)."""
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    # Envoy opens its access-log file when it takes the listener, but makes no directory
    access_log_path(m.gateway).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_resources(directory, resources(m, directory))
    path = directory / BOOTSTRAP
    _replace(path, f"# Rendered by `tollway render --dir` from {m.source or 'a manifest'}; "
                   f"the other files here are watched by Envoy.\n" + _dump(bootstrap(m, directory)))
    return path


def follow(manifest_path: Path, m: Manifest, directory: Path, stop: threading.Event,
           interval: float = 0.25) -> None:
    """Re-render into `directory` whenever the manifest changes, until `stop` is set."""
    yield_to_requests()
    directory = directory.absolute()
    # it serves no request: a changed manifest is read here, without a child's Python start
    watcher = ManifestWatcher(manifest_path, m, interval=interval, serving=False)
    rendered = watcher.subscribe(Live(lambda new: resources(new, directory), m))
    written = rendered.value  # what write_dynamic wrote from `m`
    while not stop.wait(interval):
        if watcher.check():
            # most edits (a quota, a key, a budget) leave Envoy's config as it was: comparing
            # the documents spares writing them out as YAML (7 of 76 ms for 10,000 projects)
            changed = (write_resources(directory, rendered.value)
                       if rendered.value != written else [])
            written = rendered.value
            log.info("Envoy config updated: %s",
                     ", ".join(p.name for p in changed) or "nothing changed")
