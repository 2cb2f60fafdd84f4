"""The metadata namespaces' conversions, against protobuf's own: to_struct sets scalars on the
map itself and struct_dict reads them back, each faster than the generic path it stands for."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from tollway.manifest import Dialect
from tollway.metadata import struct_dict, to_struct

VALUES: dict[str, Any] = {
    "org": "acme", "stream": False, "fail_closed": True, "max_tokens": 10, "ratio": 0.25,
    "big": 10**15, "dialect": Dialect.ANTHROPIC, "absent": None,
    "nested": {"a": [1, "x", None, True], "b": {"c": "d"}}, "empty": {}, "list": [],
}


def test_to_struct_is_struct_update_without_the_none_values() -> None:
    expected = struct_pb2.Struct()
    expected.update({k: v for k, v in VALUES.items() if v is not None})
    got = to_struct(VALUES)
    assert got == expected
    assert "absent" not in got.fields
    # a bool stays a bool and an int a number, as Envoy's descriptors and the Lua read them
    assert got.fields["stream"].WhichOneof("kind") == "bool_value"
    assert got.fields["max_tokens"].WhichOneof("kind") == "number_value"
    assert got.fields["dialect"].string_value == "anthropic"


def test_struct_dict_reads_what_message_to_dict_reads() -> None:
    s = to_struct(VALUES)
    assert struct_dict(s) == json_format.MessageToDict(s)
