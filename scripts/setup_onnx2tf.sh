#!/usr/bin/env bash
# Create the ONNX -> TFLite converter environment used by `edge-agent quantize`
# for its int8 TFLite artifacts (quantize/tflite/; its worker, quantize/tflite/worker.py, runs here).
#
# onnx2tf 2.x needs Python >= 3.12 and hard-pins numpy, onnxruntime, psutil and
# a non-headless OpenCV that clash with the agent's own environment, so it
# lives in a virtual environment of its own; the agent only ever runs its
# python in a subprocess and never imports TensorFlow or onnx2tf itself.
#
#   scripts/setup_onnx2tf.sh            # create or check the env
#   scripts/setup_onnx2tf.sh --force    # rebuild it from scratch
#
# Where:  ${EDGE_AGENT_ONNX2TF_VENV:-$HOME/.cache/edge-agent/onnx2tf-venv}
# Python: $EDGE_AGENT_ONNX2TF_PYTHON, else python3.12 / python3.13 on PATH,
#         else pyenv's $(pyenv root)/versions/3.12* / 3.13*.
# Exit:   0 ready, 3 no Python >= 3.12 found, 1 anything else.
#
# Idempotent: a stamp file inside the env records the pins it was built with;
# a second run with the same pins only checks that its python starts (< 1 s).
#
# Why `tensorflow` and not `tensorflow-cpu`: onnx2tf 2.6.9 imports `tf_keras`
# for every TensorFlow-backed path (SavedModel export, the TF converter), and
# `tf-keras` requires the distribution named `tensorflow`; with
# `tensorflow-cpu` `pip check` reports it broken. The Linux x86_64
# `tensorflow` wheel runs on the CPU and pulls no CUDA packages (those sit in
# its `and-cuda` extra). The pins below are exactly what
# `onnx2tf[tensorflow]==2.6.9` resolves to, `pip check` clean.
set -euo pipefail

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

VENV=${EDGE_AGENT_ONNX2TF_VENV:-$HOME/.cache/edge-agent/onnx2tf-venv}

# What the converter needs, pinned (top level first, then what they pull in).
REQUIREMENTS=(
  "onnx2tf[tensorflow]==2.6.9"
  "tensorflow==2.21.0"
  "tf-keras==2.21.0"
  "keras==3.15.0"
  "onnxsim==0.6.5"
  "onnx==1.20.1"
  "onnxruntime==1.26.0"
  "numpy==2.2.6"
)
CONSTRAINTS="absl-py==2.5.1
ai-edge-litert==2.1.2
astunparse==1.6.3
backports.strenum==1.2.8
flatbuffers==25.12.19
gast==0.7.0
google-pasta==0.2.0
grpcio==1.85.1
h5py==3.14.0
keras==3.15.0
libclang==18.1.1
ml-dtypes==0.5.4
namex==0.1.0
numpy==2.2.6
onnx==1.20.1
onnx-ir==1.1.0
onnx2tf==2.6.9
onnxoptimizer==0.4.2
onnxruntime==1.26.0
onnxscript==0.6.2
onnxsim==0.6.5
opencv-python==4.13.0.92
opt-einsum==3.4.0
optree==0.20.0
protobuf==7.35.1
psutil==5.9.5
sne4onnx==2.0.1
sng4onnx==2.0.1
tensorflow==2.21.0
tf-keras==2.21.0
tqdm==4.67.1"

pins_hash=$(printf '%s\n' "${REQUIREMENTS[@]}" "$CONSTRAINTS" | sha256sum | cut -c1-16)
stamp="$VENV/.edge-agent-onnx2tf-$pins_hash"

if [ "$force" -eq 0 ] && [ -f "$stamp" ] && "$VENV/bin/python" -c 'import onnx2tf, onnxsim' >/dev/null 2>&1; then
  echo "setup_onnx2tf: ready ($VENV)"
  exit 0
fi

if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
  echo "setup_onnx2tf: $VENV exists and is not a virtual environment; refusing to replace it (set EDGE_AGENT_ONNX2TF_VENV)" >&2
  exit 1
fi

# A Python >= 3.12 that can make a venv. pyenv shims on PATH exist even when
# the version is not selected, so every candidate is actually run.
usable() {
  [ -n "$1" ] && "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}
candidates=()
[ -n "${EDGE_AGENT_ONNX2TF_PYTHON:-}" ] && candidates+=("$EDGE_AGENT_ONNX2TF_PYTHON")
for name in python3.12 python3.13; do
  exe=$(command -v "$name" 2>/dev/null || true)
  [ -n "$exe" ] && candidates+=("$exe")
done
pyenv_root=${PYENV_ROOT:-}
if [ -z "$pyenv_root" ] && command -v pyenv >/dev/null 2>&1; then
  pyenv_root=$(pyenv root 2>/dev/null || true)
fi
[ -z "$pyenv_root" ] && [ -d "$HOME/.pyenv" ] && pyenv_root="$HOME/.pyenv"
if [ -n "$pyenv_root" ]; then
  for dir in "$pyenv_root"/versions/3.12* "$pyenv_root"/versions/3.13*; do
    for exe in "$dir"/bin/python3.1[23]; do
      [ -x "$exe" ] && candidates+=("$exe")
    done
  done
fi
python=""
for exe in "${candidates[@]}"; do
  if usable "$exe"; then python=$exe; break; fi
done
if [ -z "$python" ]; then
  echo "setup_onnx2tf: no Python >= 3.12 found (tried python3.12, python3.13 on PATH and pyenv versions 3.12*/3.13*); install one (e.g. 'pyenv install 3.12') or set EDGE_AGENT_ONNX2TF_PYTHON" >&2
  exit 3
fi

echo "setup_onnx2tf: creating $VENV with $("$python" -c 'import sys; print(sys.version.split()[0])') ($python); about two minutes, ~3 GB of disk"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$python" -m venv "$VENV"
constraints_file=$(mktemp)
trap 'rm -f "$constraints_file"' EXIT
printf '%s\n' "$CONSTRAINTS" >"$constraints_file"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null
"${pip[@]}" install -c "$constraints_file" "${REQUIREMENTS[@]}"
if ! check=$("${pip[@]}" check 2>&1); then
  echo "setup_onnx2tf: pip check failed in $VENV:" >&2
  echo "$check" >&2
  exit 1
fi
"$VENV/bin/python" -c 'import onnx2tf, onnxsim, tensorflow, tf_keras' >/dev/null 2>&1 || {
  echo "setup_onnx2tf: the converter packages do not import in $VENV" >&2
  exit 1
}
touch "$stamp"
echo "setup_onnx2tf: ready ($VENV)"
