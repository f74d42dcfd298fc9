#!/usr/bin/env bash
# Create the TF Serving client environment the gRPC tests use: TF Serving's own
# Python client package (tensorflow-serving-api) beside the ONNX->TFLite
# converter environment (scripts/setup_onnx2tf.sh), which already holds
# TensorFlow and grpcio. The agent never runs or imports anything from here:
# it only proves that a client written against tensorflow_serving.apis talks
# to the agent unchanged.
#
#   scripts/setup_tfserving_client.sh            # create or check the env
#   scripts/setup_tfserving_client.sh --force    # rebuild it
#
# Where:  ${EDGE_AGENT_TFSERVING_VENV:-$HOME/.cache/edge-agent/tfserving-client-venv}
# Reuses: ${EDGE_AGENT_ONNX2TF_VENV:-$HOME/.cache/edge-agent/onnx2tf-venv}
# Exit:   0 ready, 3 the converter env is missing, 1 anything else.
#
# How it stays cheap: a small venv made with the converter env's python, whose
# site-packages reach the converter env's through a .pth file (TensorFlow,
# grpcio and protobuf are not installed twice: a few MB and a few seconds),
# plus tensorflow-serving-api installed with --no-deps (its requirements,
# tensorflow, grpcio and protobuf, are what the converter env pins). Idempotent:
# a stamp records the pin; a second run only checks that the client imports.
set -euo pipefail

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

PIN="tensorflow-serving-api==2.21.0"   # the release matching the converter env's tensorflow 2.21
BASE=${EDGE_AGENT_ONNX2TF_VENV:-$HOME/.cache/edge-agent/onnx2tf-venv}
VENV=${EDGE_AGENT_TFSERVING_VENV:-$HOME/.cache/edge-agent/tfserving-client-venv}
CHECK='import grpc, tensorflow as tf; from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc, model_service_pb2_grpc, get_model_metadata_pb2'

if [ ! -x "$BASE/bin/python" ]; then
  echo "setup_tfserving_client: the converter env is missing ($BASE); create it with scripts/setup_onnx2tf.sh" >&2
  exit 3
fi
stamp="$VENV/.edge-agent-tfserving-$(printf '%s %s' "$PIN" "$BASE" | sha256sum | cut -c1-16)"
if [ "$force" -eq 0 ] && [ -f "$stamp" ] && "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
  echo "setup_tfserving_client: ready ($VENV)"
  exit 0
fi
if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
  echo "setup_tfserving_client: $VENV exists and is not a virtual environment; refusing to replace it" >&2
  exit 1
fi
echo "setup_tfserving_client: creating $VENV ($PIN over $BASE)"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$BASE/bin/python" -m venv "$VENV"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base_site=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# After this venv's own site-packages: its tensorflow_serving wins, the rest comes from the converter env.
echo "$base_site" >"$site/edge-agent-onnx2tf.pth"
"$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps "$PIN"
if ! "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
  echo "setup_tfserving_client: TF Serving's client does not import in $VENV:" >&2
  "$VENV/bin/python" -c "$CHECK" >&2 || true
  exit 1
fi
touch "$stamp"
echo "setup_tfserving_client: ready ($VENV)"
