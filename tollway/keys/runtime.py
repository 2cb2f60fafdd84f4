"""Clients and keys created at runtime (the admin API), bound into the manifest's projects.

A runtime client or key is written in the manifest's own schema and validated by the
manifest's own parser, so it behaves exactly like a manifest one: allowlists, plans, role rules,
Cedar policies (the client's `user` is the principal's), rate limits and budgets all read the
same `KeyBinding`. The manifest stays the source of orgs, projects, plans and providers: a
runtime key whose project leaves the manifest has no binding and is refused (401, like an
unknown key) until the project returns; nothing is deleted.

Stored documents (JSON):
  client object: {"org": ORG, "project": PROJECT, "client": <manifest client, no keys>}
  key spec:      {"org": ORG, "project": PROJECT, "client": CLIENT_ID, "key": <manifest key>}
"""

from __future__ import annotations

import json
from typing import Any

from tollway.manifest import KeyBinding, Manifest, ManifestError
from tollway.manifest.model import Client, Key, Organization, Project
from tollway.manifest.node import Node
from tollway.manifest.orgs import allowed_models, check_models, read_client, read_key

CLIENT = "client"
ADMIN_TOKEN = "admin_token"


class FieldError(ValueError):
    """A document that does not validate; `problems` name each field (`key.quotas[0].rpm`)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_client(doc: Any) -> Client:
    errors: list[str] = []
    if not isinstance(doc, dict):
        raise FieldError(["client: must be an object"])
    if "keys" in doc:
        raise FieldError(["client.keys: create keys on their own (POST .../keys)"])
    client = read_client(Node(doc, "client", errors))
    if errors:
        raise FieldError(errors)
    return client


def parse_key(doc: Any) -> Key:
    errors: list[str] = []
    if not isinstance(doc, dict):
        raise FieldError(["key: must be an object"])
    key = read_key(Node(doc, "key", errors))
    if errors:
        raise FieldError(errors)
    return key


def find_project(m: Manifest, org_id: str, project_id: str
                 ) -> tuple[Organization, Project] | None:
    for org in m.organizations:
        if org.id == org_id:
            for project in org.projects:
                if project.id == project_id:
                    return org, project
    return None


def check_in_manifest(m: Manifest, key: Key, org: str, project: str) -> list[str]:
    """What the manifest's own validation would say of this key in that project."""
    problems: list[str] = []
    catalogue = {model.name for p in m.providers for model in p.models}
    check_models(problems, "key.models", key.models, catalogue)
    for i, quota in enumerate(key.quotas):
        check_models(problems, f"key.quotas[{i}].models", quota.models, catalogue)
    if key.plan and key.plan not in {p.name for p in m.plans}:
        problems.append(f"key.plan: unknown plan '{key.plan}'")
    if find_project(m, org, project) is None:
        problems.append(f"project: no project '{org}/{project}' in the manifest")
    return problems


def place_of(client_doc: str) -> tuple[str, str]:
    """The org and project a stored runtime client belongs to."""
    data = json.loads(client_doc)
    return data["org"], data["project"]


def client_of(spec: str) -> str:
    client: str = json.loads(spec)["client"]
    return client


def binding(m: Manifest, client_doc: str | None, spec: str) -> KeyBinding | None:
    """The binding of a runtime key, or None while its project or client is missing."""
    data = json.loads(spec)
    found = find_project(m, data["org"], data["project"])
    if found is None or client_doc is None:
        return None
    client_data = json.loads(client_doc)
    if (client_data["org"], client_data["project"]) != (data["org"], data["project"]):
        return None
    org, project = found
    try:
        client = parse_client(client_data["client"])
        key = parse_key(data["key"])
    except (FieldError, ManifestError):
        return None  # validated when written; a later schema change must not crash a Check
    allowed = allowed_models({p.name: p for p in m.plans}, project, key)
    return KeyBinding(org=org, project=project, client=client, key=key,
                      allowed_models=None if allowed is None else frozenset(allowed))
