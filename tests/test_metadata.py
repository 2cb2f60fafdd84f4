"""The metadata namespaces' conversions, against protobuf's own: to_struct sets scalars on the
map itself and struct_dict reads them back, each faster than the generic path it stands for."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from tollway.manifest import Dialect
from tollway.metadata import Namespace, struct_dict, to_struct

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


def test_a_namespace_read_value_by_value_agrees_with_struct_dict() -> None:
    """costsink reads each value as the kind its writer gives it; one of another kind is
    converted, never taken for 0 or empty; an absent one is None, 0 or False."""
    s = to_struct({**VALUES, "reserve_tokens": "89", "zero": 0, "blank": "",
                   "text_flag": "false", "number_text": 5})
    ns = Namespace(s)
    read = struct_dict(s)
    for name in VALUES:
        assert ns.value(name) == read.get(name)
    assert ns.text("org") == "acme" and ns.text("blank") == "" and ns.text("absent") is None
    assert ns.text("number_text") == "5.0"  # as struct_dict reads it, as text
    assert ns.number("max_tokens") == 10 and ns.number("big") == 10**15
    assert ns.number("zero") == 0 and ns.number("absent") == 0
    assert ns.number("reserve_tokens") == 89  # ext_authz writes it as a string
    assert Namespace(to_struct({"hold": str(2**60 + 1)})).number("hold") == 2**60 + 1  # exact
    assert ns.flag("fail_closed") and not ns.flag("stream") and not ns.flag("absent")
    assert not ns.flag("text_flag") and not ns.flag("org")  # only a bool true is set
    assert "org" in ns and "absent" not in ns
    empty = Namespace(None)
    assert (empty.text("org"), empty.number("n"), empty.flag("f"), empty.value("v")) == \
        (None, 0, False, None)
