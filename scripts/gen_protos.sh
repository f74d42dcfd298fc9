#!/usr/bin/env bash
# Regenerate the gRPC modules of TF Serving's API (edge_agent/grpc/protos/*_pb2.py,
# prediction_service_pb2_grpc.py, model_service_pb2_grpc.py) from the .proto files
# beside them. The generated modules are committed: a device installs grpcio and
# protobuf only, never grpcio-tools.
#
#   scripts/gen_protos.sh
#
# The generator is pinned: grpcio-tools 1.66.2 writes protobuf 5.27.2 gencode and
# grpc 1.66.2 stubs, which is what the `grpc` extra's lower bounds in
# pyproject.toml (protobuf>=5.27.2, grpcio>=1.66.2) promise. A newer generator
# raises those bounds: change both together. Needs python3 with venv; makes a
# throwaway environment in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${GRPCIO_TOOLS_SPEC:-grpcio-tools==1.66.2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip --disable-pip-version-check -q install "$TOOLS"
out=edge_agent/grpc/protos
rm -f "$out"/*_pb2.py "$out"/*_pb2_grpc.py
# -I . : the files import each other as edge_agent/grpc/protos/*.proto, so the
# generated modules import each other as edge_agent.grpc.protos.*; the proto
# packages inside stay TF Serving's (tensorflow, tensorflow.serving, tensorflow.error).
"$tmp/venv/bin/python" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. "$out"/*.proto
# Only the two files with services need gRPC stubs.
for f in "$out"/*_pb2_grpc.py; do
  case "$f" in */prediction_service_pb2_grpc.py|*/model_service_pb2_grpc.py) ;; *) rm -f "$f" ;; esac
done
echo "gen_protos: regenerated $(ls "$out"/*_pb2*.py | wc -l) modules in $out with $TOOLS"
