"""Organizations compiled by the warm reader and shipped to the serving process, pickled.

The reader (tollway.manifest.reading, serve()) used to send each organization it read as its
document, and the serving process compiled it, on a thread whose every step the requests in
flight waited for (the GIL): 1.5 ms for an edited organization of 100 projects, most of the
serving process's part of a reload, and 0.14 s for the 10,000 projects of a manifest read
whole (a JSON one, or a first reload). The reader now compiles them itself, off the serving
process, and sends each compiled organization pickled: unpickling one of 100 projects takes
0.26 ms, in C. Compiled from the document as the YAML gave it (a date is a date, as at a
serving process's start), where JSON would have written it as its text.

Pickle runs what the bytes say, so it is read only from the reader, a child of this process
that runs its code. An organization with a problem is not shipped: the answer is a refusal
listing the problems of every organization read (the checks across the manifest come once
those are fixed).
"""

from __future__ import annotations

import base64
import copyreg
import io
import pickle
from types import MappingProxyType
from typing import Any

from .model import Organization
from .orgs import compile_org


def _mapping_proxy(d: dict[str, Any]) -> MappingProxyType[str, Any]:
    return MappingProxyType(d)


class _Pickler(pickle.Pickler):
    # a mappingproxy (an organization's metadata) has no pickling of its own
    dispatch_table = {**copyreg.dispatch_table,
                      MappingProxyType: lambda m: (_mapping_proxy, (dict(m),))}


def ship(answer: dict[str, Any]) -> dict[str, Any]:
    """The reader's answer (reading.read()'s) with each organization sent whole compiled:
    `{"fingerprint", "compiled"}` in place of `{"fingerprint", "document"}`; or a refusal
    (`{"problems"}`) where one of them has a problem. A document that is no mapping stays, for
    parse to refuse in its place."""
    items = answer.get("organizations")
    if not items:
        return answer
    problems: list[str] = []
    for index, item in enumerate(items):
        document = item.get("document")
        if not isinstance(document, dict):
            continue
        org, errors = compile_org(document, index)
        problems += errors
        if not errors:
            out = io.BytesIO()
            _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(org)
            del item["document"]
            item["compiled"] = base64.b64encode(out.getvalue()).decode("ascii")
    return {"problems": problems} if problems else answer


def received(item: dict[str, Any]) -> Organization:
    """An organization ship() compiled, from the reader's answer."""
    org = pickle.loads(base64.b64decode(item["compiled"]))
    assert isinstance(org, Organization)
    return org
