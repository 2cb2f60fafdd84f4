#!/usr/bin/env bash
# Regenerate the Python stubs of Tollway's own APIs (committed, so installs need no protoc).
# They belong to no one service (ratelimit serves Settle and KeyUsage, costsink calls Settle,
# the CLI and the admin API call KeyUsage): all in tollway/_proto. The include mapping makes
# the generated imports `tollway._proto...` while the wire packages stay `tollway.ratelimit.v1`,
# `tollway.usage.v1` and `tollway.admin.v1`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Itollway/_proto=proto/tollway/ratelimit/v1 \
  --python_out=. --grpc_python_out=. --pyi_out=. proto/tollway/ratelimit/v1/settle.proto
python -m grpc_tools.protoc -Itollway/_proto=proto/tollway/usage/v1 \
  --python_out=. --grpc_python_out=. --pyi_out=. proto/tollway/usage/v1/usage.proto

# The admin API imports google/api/{annotations,http,httpbody}.proto, whose compiled forms ship
# in xds-protos: protoc reads them from a descriptor set built from those modules, so no
# third-party .proto file is vendored. The descriptor set written with --include_imports is
# what Envoy's grpc_json_transcoder loads (tollway/admin/admin.pb).
deps=$(mktemp)
python - "$deps" <<'PY'
import sys
from google.api import annotations_pb2, http_pb2, httpbody_pb2
from google.protobuf import any_pb2, descriptor_pb2, struct_pb2

files = descriptor_pb2.FileDescriptorSet()
for module in (descriptor_pb2, any_pb2, struct_pb2, http_pb2, annotations_pb2, httpbody_pb2):
    module.DESCRIPTOR.CopyToProto(files.file.add())
open(sys.argv[1], "wb").write(files.SerializeToString())
PY
python -m grpc_tools.protoc --descriptor_set_in="$deps" -Itollway/_proto=proto/tollway/admin/v1 \
  --python_out=. --grpc_python_out=. --pyi_out=. proto/tollway/admin/v1/admin.proto
python -m grpc_tools.protoc --descriptor_set_in="$deps" -Iproto \
  --include_imports --descriptor_set_out=tollway/admin/admin.pb proto/tollway/admin/v1/admin.proto
rm -f "$deps"
