#!/usr/bin/env bash
# The demo: set up, build the real ImageNet MobileNetV2 and a video of real
# photos (cached in ~/.cache/edge-agent), pack the model into a bundle and run
# the agent on the video. The cat comes first: watch for "Egyptian cat".
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}   # setup.sh creates it; CI points it at a fresh one
scripts/setup.sh demo
cache="$HOME/.cache/edge-agent"   # configs/demo.toml reads from here
EDGE_AGENT_CACHE="$cache" "$VENV/bin/python" -m testassets --only mobilenet_v2 imagenet_labels photos demo_video >/dev/null
bundle="$cache/bundles/mobilenet_v2"
if [ ! -f "$bundle/manifest.json" ]; then
  "$VENV/bin/edge-agent" pack "$cache/models/mobilenet_v2.onnx" --name mobilenet_v2 --version 1 \
    --out "$bundle" --resize crop --crop-fraction 0.875 \
    --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --layout nchw --color rgb \
    --labels testassets/data/imagenet_labels.txt --task classify
fi
exec "$VENV/bin/edge-agent" run --config configs/demo.toml
