"""The dynamic-metadata namespaces that carry a request's facts from filter to filter.

They are the contract between the rendered Envoy config, the services and the access log:
json_to_metadata writes REQUEST, ext_authz answers into AUTHZ, the rate limiter into RATELIMIT,
the Lua filter (envoy/lua/usage.lua, which spells its namespace itself) into USAGE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module: protobuf only where entries are read
    from google.protobuf import struct_pb2

REQUEST = "tollway.request"  # model, stream, max_tokens, body_error: from the request body
# identity, model, route, and reserve_tokens when a request or token limit applies
AUTHZ = "envoy.filters.http.ext_authz"
RATELIMIT = "envoy.filters.http.ratelimit"  # reserved_tokens, charged_at_ms, denied_quota
USAGE = "tollway.usage"  # the provider's reported token usage
# Who answers a request's rate limit travels with the request, so that the Check and the
# rate-limit filter's call agree whatever manifest each service holds during a reload: each
# route tells ext_authz (a context extension of this name) the services.rate_limit its listener
# was rendered for, "check" when it has no rate-limit filter; a Check that answered the rate
# limit says so under this name in AUTHZ, which the filter's call, if the listener still has
# the filter, carries as a descriptor ("filter" when absent).
RATE_LIMITED_BY = "rate_limited_by"


def to_struct(values: dict[str, Any]) -> struct_pb2.Struct:
    """A namespace from Python, as a service answers it; None values are left out. Every
    allowed Check answers one: scalars are set on the map directly, at 0.4x the cost of
    Struct.update's generic conversion, which is left to nested values."""
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    fields = s.fields
    for k, v in values.items():
        kind = type(v)
        if kind is str:
            fields[k].string_value = v
        elif kind is bool:
            fields[k].bool_value = v
        elif kind is int or kind is float:
            fields[k].number_value = v
        elif v is not None:
            s.update({k: v})
    return s


_SCALARS = frozenset(("string_value", "number_value", "bool_value"))


def struct_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """A namespace as Python, as json_format.MessageToDict gives it (numbers as floats), at a
    third of its cost: every Check reads one, every access-log entry three."""
    out: dict[str, Any] = {}
    fields = s.fields  # by key: the map's items() is the generic Mapping one, slower
    for k in fields:
        v = fields[k]
        kind = v.WhichOneof("kind")
        # almost every value: a scalar, read here without a call per value
        out[k] = getattr(v, kind) if kind in _SCALARS else _value(v)
    return out


def _value(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind in _SCALARS:  # almost every value
        return getattr(v, kind)
    if kind == "struct_value":
        return struct_dict(v.struct_value)
    if kind == "list_value":
        return [_value(x) for x in v.list_value.values]
    if kind == "null_value" or kind is None:
        return None
    return getattr(v, kind)
