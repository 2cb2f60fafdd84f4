#!/usr/bin/env bash
# Regenerate the Python stubs of Tollway's own APIs (committed, so installs need no protoc).
# The include mapping makes the generated imports `ratelimit._proto...` while the wire
# packages stay `tollway.ratelimit.v1` and `tollway.usage.v1`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iratelimit/_proto=proto/tollway/ratelimit/v1 \
  --python_out=. --grpc_python_out=. --pyi_out=. proto/tollway/ratelimit/v1/settle.proto
python -m grpc_tools.protoc -Iratelimit/_proto=proto/tollway/usage/v1 \
  --python_out=. --grpc_python_out=. --pyi_out=. proto/tollway/usage/v1/usage.proto
