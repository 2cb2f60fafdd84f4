"""The admin API's OpenAPI 3 description, generated from admin.proto's descriptors and HTTP
rules, so the REST contract and the gRPC one cannot drift apart.

    python -m tollway.admin.openapi > docs/admin-openapi.json   (a test keeps it current)
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.api import annotations_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from tollway._proto import admin_pb2

_SCALARS = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    # proto3 JSON writes 64-bit integers as strings; it reads either
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
}
_ERROR = {"type": "object", "description": "google.rpc.Status; the x-tollway-error header "
          "carries Tollway's code", "properties": {"code": {"type": "integer"},
                                                  "message": {"type": "string"}}}


def _schema(field: FieldDescriptor) -> dict[str, Any]:
    if field.message_type is not None:
        name = field.message_type.full_name
        one: dict[str, Any] = ({"type": "object", "additionalProperties": True,
                                "description": "a JSON object"}
                               if name == "google.protobuf.Struct"
                               else {"$ref": f"#/components/schemas/{field.message_type.name}"})
    else:
        one = dict(_SCALARS[field.type])
    if field.is_repeated:
        return {"type": "array", "items": one}
    return one


def _message(d: Descriptor, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {"type": "object", "properties": {
        f.name: _schema(f) for f in d.fields if f.name not in skip}}


def openapi() -> dict[str, Any]:
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {"Error": _ERROR}
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        path: str = getattr(rule, verb)
        in_path = re.findall(r"{(\w+)}", path)
        request = method.input_type
        op: dict[str, Any] = {"operationId": method.name, "parameters": [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in in_path]}
        if rule.body == "*":
            body_schema = _message(request, frozenset(in_path))
        elif rule.body:
            body_schema = _schema(request.fields_by_name[rule.body])
        else:
            body_schema = None
            op["parameters"] += [{"name": f.name, "in": "query", "schema": _schema(f)}
                                 for f in request.fields if f.name not in in_path]
        if body_schema is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": body_schema}}}
        output = method.output_type
        if output.full_name == "google.api.HttpBody":
            ok: dict[str, Any] = {"type": "object", "description": "the provider's own shape"}
        else:
            ok = {"$ref": f"#/components/schemas/{output.name}"}
            schemas[output.name] = _message(output)
        for f in output.fields:  # messages nested in the answer
            if f.message_type is not None and f.message_type.full_name.startswith(
                    "tollway."):
                schemas[f.message_type.name] = _message(f.message_type)
        op["responses"] = {"200": {"description": "OK",
                                   "content": {"application/json": {"schema": ok}}}}
        for status, what in (("400", "an invalid field, named"), ("401", "no or a wrong token"),
                             ("403", "out of the token's scope"), ("404", "unknown id"),
                             ("409", "the id is taken")):
            op["responses"][status] = {"description": what, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Error"}}}}
        if method.name != "ListModels":
            op["security"] = [{"adminToken": []}]
        paths.setdefault(path, {})[verb] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Tollway admin API", "version": "v1",
                 "description": "Clients and keys at runtime, inside the orgs and projects "
                                "the manifest declares; the audit log; a key's models."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(schemas.items())), "securitySchemes": {
            "adminToken": {"type": "http", "scheme": "bearer",
                           "description": "`tollway admin-tokens issue ID --scope ...`"}}},
    }


if __name__ == "__main__":
    print(json.dumps(openapi(), indent=2))
