"""deploy/: every overlay builds with the real kustomize, every object validates offline against
the Kubernetes schemas (kubernetes-validate ships them), the wiring between objects holds, and
the manifest each overlay ships loads and renders an Envoy config the real Envoy accepts.

What this cannot prove here (no cluster on this machine): that the images pull, that the pods
schedule and the probes pass, that the CNI enforces the NetworkPolicies, and the
ServiceMonitor against the Prometheus Operator's own CRD schema (checked for structure only).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tollway.manifest import load
from tollway.render import SAFE_DUMPER, render
from tollway.up import envoy_binary

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "overlays").iterdir())
K8S_VERSION = "1.32"
CUSTOM_KINDS = {"ServiceMonitor"}  # CRDs: no schema in kubernetes-validate


def build(overlay: str) -> list[dict[str, Any]]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for every Deployment and StatefulSet."""
    return [(o, o["spec"]["template"]) for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def shipped_manifest(objects: list[dict[str, Any]]) -> str:
    [cm] = [o for o in objects if o["kind"] == "ConfigMap" and
            o["metadata"]["name"] == "tollway-manifest"]
    text: str = cm["data"]["manifest.yaml"]
    return text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = build(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget",
            "NetworkPolicy"} <= kinds
    for o in objects:
        if o["kind"] in CUSTOM_KINDS:
            continue
        # strict: an unknown or misspelt field is an error, not silently dropped
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    [sts] = [o for o in build("production") if o["kind"] == "StatefulSet"]
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_wiring_between_objects_holds(overlay: str) -> None:
    objects = build(overlay)
    manifest = yaml.safe_load(shipped_manifest(objects))
    health_port = int(manifest["services"]["health"].rsplit(":", 1)[1])
    pods = pod_specs(objects)
    for workload, template in pods:
        labels = template["metadata"]["labels"]
        assert matches(workload["spec"]["selector"]["matchLabels"], labels)
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            # every container bounded: a leaking process is restarted, not the node
            assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
            for mount in c.get("volumeMounts", []):
                # a subPath mount is never updated: hot reload and Secret rotation need dirs
                assert "subPath" not in mount, f"{c['name']} mounts {mount['name']} by subPath"
            for probe in ("readinessProbe", "livenessProbe"):
                if "grpc" in c.get(probe, {}):
                    assert c[probe]["grpc"]["port"] == health_port
        volumes = {v["name"] for v in template["spec"].get("volumes", [])} | {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for c in template["spec"]["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
            if c["name"] == "envoy":  # else a worker thread per core of the node
                assert "--concurrency" in c["args"]

    # each Service selects a pod that has every named target port
    for svc in (o for o in objects if o["kind"] == "Service"):
        selected = [t for _, t in pods if matches(svc["spec"]["selector"],
                                                   t["metadata"]["labels"])]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        names = {p["name"] for t in selected for c in t["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)

    # PDBs and NetworkPolicies apply to pods that exist
    for o in objects:
        if o["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = (o["spec"].get("selector") or o["spec"]["podSelector"])["matchLabels"]
            assert any(matches(selector, t["metadata"]["labels"]) for _, t in pods), o

    # only the gateway pods reach extauthz and ratelimit
    for np in (o for o in objects if o["kind"] == "NetworkPolicy"
               and o["metadata"]["name"] == "tollway-services"):
        service_ports = {50051, 50052, 50054}
        for rule in np["spec"]["ingress"]:
            if service_ports & {p["port"] for p in rule["ports"]}:
                assert rule["from"] == [{"podSelector": {"matchLabels": {
                    "app.kubernetes.io/component": "gateway"}}}]

    for sm in (o for o in objects if o["kind"] == "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        ports = {p["name"] for o in objects if o["kind"] == "Service"
                 and matches(sm["spec"]["selector"]["matchLabels"], o["metadata"]["labels"])
                 for p in o["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports


def pods_env(monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
    """What the overlays' pods set from their Secrets, for their manifest to load here."""
    for name in ("TOLLWAY_KEYS_DSN", "TOLLWAY_LEDGER_DSN"):
        monkeypatch.setenv(name, "postgresql://tollway@postgres/tollway")
    monkeypatch.setenv("TOLLWAY_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(state))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_shipped_manifest_renders_a_config_envoy_accepts(
        overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pods_env(monkeypatch, tmp_path)
    doc = yaml.safe_load(shipped_manifest(build(overlay)))
    # the pod's volume path does not exist here; Envoy opens the file when it validates
    doc["gateway"]["access_log_file"] = str(tmp_path / "envoy-access.jsonl")
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(render(load(path))))
    out = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


CONFIGMAP_LIMIT = 1 << 20  # the API server refuses a ConfigMap whose values hold more bytes


def test_ten_thousand_projects_fit_a_configmap_gzipped(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest of 10,000 projects written as operators write them (a name, a cost centre,
    an rpm, a budget with alerts) is more YAML than a ConfigMap holds. Compressed with gzip
    it is under a tenth of that: an overlay of the production one that generates the ConfigMap from
    the .gz file gets its bytes as binaryData, which the pods mount as the same file
    manifest.yaml, and Tollway reads it as it reads YAML (docs/kubernetes.md)."""
    import base64
    import gzip
    import os

    pods_env(monkeypatch, tmp_path)
    doc = yaml.safe_load(shipped_manifest(build("production")))
    shipped_projects = sum(len(o["projects"]) for o in doc["organizations"])
    doc["organizations"] += [{"id": f"org-{o:03d}", "name": f"Business unit {o}", "projects": [
        {"id": f"team-{p:03d}", "name": f"Team {p} of business unit {o}",
         "metadata": {"cost_center": f"cc-{o:03d}-{p:03d}"},
         "quotas": [{"name": "team", "rpm": 600},
                    {"name": "budget", "spend_per_month": 2500, "alerts": [0.8, 1.0]}]}
        for p in range(100)]} for o in range(100)]
    text = yaml.dump(doc, Dumper=SAFE_DUMPER)
    packed = gzip.compress(text.encode(), mtime=0)
    print(f"\n{len(text.encode()):,} bytes of YAML, {len(packed):,} gzipped")
    assert len(text.encode()) > CONFIGMAP_LIMIT > 8 * len(packed)

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "manifest.yaml.gz").write_bytes(packed)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "deploy" / "overlays" / "production", overlay)],
        "configMapGenerator": [{"name": "tollway-manifest", "behavior": "replace",
                                "files": ["manifest.yaml=manifest.yaml.gz"],
                                "options": {"disableNameSuffixHash": True}}]}))
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                         text=True, timeout=60, check=True)
    [cm] = [o for o in yaml.safe_load_all(out.stdout) if o and o["kind"] == "ConfigMap"
            and o["metadata"]["name"] == "tollway-manifest"]
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    assert "data" not in cm and set(cm["binaryData"]) == {"manifest.yaml"}
    mounted = base64.b64decode(cm["binaryData"]["manifest.yaml"])
    assert mounted == packed and len(mounted) <= CONFIGMAP_LIMIT
    path = tmp_path / "manifest.yaml"  # the file the pods' volume holds
    path.write_bytes(mounted)
    assert sum(len(o.projects) for o in load(path).organizations) == 10_000 + shipped_projects


def test_compose_runs_the_manifest_it_ships(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """compose.yaml cannot run here (no Docker daemon): its wiring is checked instead."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("TOLLWAY_KEYS_DSN", "TOLLWAY_LEDGER_DSN"):
        monkeypatch.setenv(name, "postgresql://postgres:tollway@postgres:5432/tollway")
    monkeypatch.setenv("TOLLWAY_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("TOLLWAY_PEPPER", "p" * 32)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path))
    m = load(ROOT / "deploy" / "compose" / "manifest.yaml")
    for name in ("extauthz", "ratelimit", "costsink", "admin"):
        host, port = m.services.dial(name)
        assert host in services, f"Envoy dials {host}, which compose does not run"
        assert m.services.bind(name) == ("0.0.0.0", port)
        assert f"--services {name}" in services[name]["command"][-1]
    envoy = services["envoy"]
    config = envoy["command"][envoy["command"].index("-c") + 1]
    renderer = services["renderer"]["command"][-1]
    assert f"--dir {Path(config).parent}" in renderer and "--watch" in renderer
    shared = {v.split(":")[0] for v in envoy["volumes"]} & \
        {v.split(":")[0] for v in services["renderer"]["volumes"]}
    assert any(Path(config).parent.as_posix() in v for v in services["renderer"]["volumes"]
               if v.split(":")[0] in shared)
    log_dir = str(Path(str(m.gateway.access_log_file)).parent)
    assert any(v.endswith(f":{log_dir}") for v in envoy["volumes"])
    assert any(v.endswith(f":{log_dir}") for v in services["costsink"]["volumes"])
