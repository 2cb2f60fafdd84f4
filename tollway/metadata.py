"""The dynamic-metadata namespaces that carry a request's facts from filter to filter.

They are the contract between the rendered Envoy config, the services and the access log:
json_to_metadata writes REQUEST, ext_authz answers into AUTHZ, the rate limiter into RATELIMIT,
the Lua filter (envoy/lua/usage.lua, which spells its namespace itself) into USAGE.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def to_struct(values: dict[str, Any],
              into: struct_pb2.Struct | None = None) -> struct_pb2.Struct:
    """A namespace from Python, as a service answers it; None values are left out. Every
    allowed Check answers one: scalars are set on the map directly, at 0.4x the cost of
    Struct.update's generic conversion, which is left to nested values. `into`: the Struct
    to fill (the response's own field: a Struct passed to a constructor is copied)."""
    from google.protobuf import struct_pb2

    s = into if into is not None else struct_pb2.Struct()
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


_NO_FIELDS: Mapping[str, Any] = {}


class Namespace:
    """One namespace read a value at a time, each as the kind its writer gives it: what
    costsink reads of every access-log entry. struct_dict pays about 0.7 us a value on upb (the
    map lookup, which kind, then the value); this asks for the expected kind at once, and reads
    only the values asked for. A value of another kind is read as struct_dict reads it and
    converted, never taken for 0 or empty."""

    __slots__ = ("_fields",)

    def __init__(self, s: struct_pb2.Struct | None) -> None:
        self._fields: Mapping[str, struct_pb2.Value] = s.fields if s is not None else _NO_FIELDS

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def value(self, name: str) -> Any:
        """As struct_dict has it (None when absent)."""
        return _value(self._fields[name]) if name in self._fields else None

    def text(self, name: str) -> str | None:
        if name not in self._fields:
            return None
        v = self._fields[name]
        s = v.string_value
        if s or v.HasField("string_value"):
            return s
        other = _value(v)
        return None if other is None else str(other)

    def number(self, name: str) -> float:
        """0 when absent; a string of digits (ext_authz writes reserve_tokens and budget_hold
        as one) is read as its number, exactly: a hold in units may pass 2**53."""
        if name not in self._fields:
            return 0
        v = self._fields[name]
        x = v.number_value
        if x or v.HasField("number_value"):
            return x
        other = _value(v)
        if isinstance(other, str) and other.lstrip("-").isdigit():
            return int(other)
        return float(other) if other is not None else 0

    def flag(self, name: str) -> bool:
        """True only for a bool that is true: a string "false" is not a flag set."""
        return name in self._fields and self._fields[name].bool_value
