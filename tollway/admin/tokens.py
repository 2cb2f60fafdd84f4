"""Admin tokens: who may use the admin API, and over what.

A token is `<token_id>.<secret>` like a key, kept as an HMAC under the same pepper in the key
store (document kind `admin_token`), so a leaked table alone cannot be used. Its scope is the
whole gateway (`*`), one org (`org:ORG`) or one project (`project:ORG/PROJECT`); a project
admin can touch only its project's clients and keys, and sees only their audit entries.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from tollway.keys import KeyEvent, KeyStore, hash_secret, split_key

KIND = "admin_token"
_ID = r"[A-Za-z0-9_-]{1,64}"
SCOPE_RE = re.compile(rf"^(\*|org:{_ID}|project:{_ID}/{_ID})$")


@dataclass(frozen=True)
class Admin:
    token_id: str
    scope: str

    @property
    def actor(self) -> str:
        return f"admin:{self.token_id}"

    def covers(self, org: str, project: str | None = None) -> bool:
        """May this admin act on `org` (and `project`)? A project admin never covers a whole
        org, so org-wide reads need an org or gateway token."""
        if self.scope == "*":
            return True
        kind, _, target = self.scope.partition(":")
        if kind == "org":
            return target == org
        return project is not None and target == f"{org}/{project}"


def check_scope(scope: str) -> str:
    if not SCOPE_RE.match(scope):
        raise ValueError(f"scope {scope!r}: use '*', 'org:ORG' or 'project:ORG/PROJECT'")
    return scope


async def issue(store: KeyStore, pepper: bytes, token_id: str, scope: str, actor: str
                ) -> str:
    """A new token; returns `<token_id>.<secret>`, shown once."""
    check_scope(scope)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    doc = {"scope": scope, "status": "active",
           "hash": hash_secret(pepper, secret).hex()}
    public = {"scope": scope, "status": "active"}  # what the audit log may show
    await store.put_object(KIND, token_id, json.dumps(doc), KeyEvent(
        token_id, "issue", datetime.now(UTC), actor, "", kind=KIND,
        after=json.dumps(public), source="cli"), create=True)
    return f"{token_id}.{secret}"


async def revoke(store: KeyStore, token_id: str, actor: str) -> None:
    current = await store.get_object(KIND, token_id)
    if current is None:
        from tollway.keys import KeyNotFound

        raise KeyNotFound(token_id)
    doc = json.loads(current.doc)
    doc["status"] = "revoked"
    await store.put_object(KIND, token_id, json.dumps(doc), KeyEvent(
        token_id, "revoke", datetime.now(UTC), actor, "", kind=KIND,
        before=json.dumps({"scope": doc["scope"], "status": "active"}),
        after=json.dumps({"scope": doc["scope"], "status": "revoked"}), source="cli"),
        create=False)


async def verify(store: KeyStore, pepper: bytes, presented: str) -> Admin | None:
    parts = split_key(presented)
    if parts is None:
        return None
    token_id, secret = parts
    found = await store.get_object(KIND, token_id)
    if found is None:
        hash_secret(pepper, secret)  # the same work whether or not the id exists
        return None
    doc = json.loads(found.doc)
    ok = hmac.compare_digest(hash_secret(pepper, secret), bytes.fromhex(doc["hash"]))
    if not ok or doc.get("status") != "active":
        return None
    return Admin(token_id, doc["scope"])
