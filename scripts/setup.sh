#!/usr/bin/env bash
# Set up edge-agent on a fresh Debian / Ubuntu / Raspberry Pi OS machine:
# the Debian packages it needs, a virtual environment in .venv, and the
# package itself. Idempotent: a second run only checks.
#
#   scripts/setup.sh demo   # what the demo needs (agent + model export tools)
#   scripts/setup.sh dev    # + test tools and a mosquitto broker binary
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-demo}
case "$mode" in demo|dev) ;; *) echo "usage: $0 demo|dev" >&2; exit 2 ;; esac

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# torch only exports the demo/test model; the agent never imports it.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

apt_missing=()
prometheus_server_new=0
# systemd is running when this directory exists (sd_booted(3)); tests point it elsewhere.
SYSTEMD_RUN_DIR=${SYSTEMD_RUN_DIR:-/run/systemd/system}
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || apt_missing+=(python3-venv)
[ -f /usr/share/darknet/data/dog.jpg ] || apt_missing+=(darknet)
if [ "$mode" = dev ]; then
  [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || apt_missing+=(mosquitto)
  command -v mosquitto_pub >/dev/null || apt_missing+=(mosquitto-clients)
  [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || apt_missing+=(dataset-fashion-mnist)
  # The pipe source's tests run real camera programs on the demo video.
  command -v ffmpeg >/dev/null || apt_missing+=(ffmpeg)
  command -v npm >/dev/null || apt_missing+=(npm)   # testassets fetch npm tarballs with `npm pack`
  command -v gst-launch-1.0 >/dev/null || apt_missing+=(gstreamer1.0-tools)
  # promtool lints a live agent's /metrics. Debian and Ubuntu ship it only in
  # the prometheus package, which also starts and enables a Prometheus server
  # (port 9090): a server setup installs is stopped and disabled below.
  if ! command -v promtool >/dev/null; then
    apt_missing+=(prometheus)
    dpkg -s prometheus >/dev/null 2>&1 || prometheus_server_new=1
  fi
  dpkg -s gstreamer1.0-plugins-good >/dev/null 2>&1 || apt_missing+=(gstreamer1.0-plugins-base gstreamer1.0-plugins-good)
  # systemd-analyze verifies the unit; debootstrap and qemu-user-static build
  # and run the emulated arm64 system of scripts/arm64_check.sh.
  command -v systemd-analyze >/dev/null || apt_missing+=(systemd)
  command -v debootstrap >/dev/null || apt_missing+=(debootstrap)
  command -v qemu-aarch64-static >/dev/null || apt_missing+=(qemu-user-static)
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${apt_missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi
if [ "$prometheus_server_new" = 1 ]; then
  # Only promtool was wanted: the server the package started is stopped and
  # not started at boot (a Prometheus that was installed before is left alone).
  if [ -d "$SYSTEMD_RUN_DIR" ]; then
    "${sudo_cmd[@]}" systemctl disable --now --quiet prometheus.service \
      || echo "setup: warning: could not stop the Prometheus server the prometheus package started (systemctl disable --now prometheus)" >&2
  elif [ -x /etc/init.d/prometheus ]; then
    "${sudo_cmd[@]}" invoke-rc.d prometheus stop >/dev/null 2>&1 || true
    "${sudo_cmd[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
  echo "setup: promtool installed (Debian's prometheus package); its Prometheus server is stopped and disabled"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# demo: torch.onnx.export needs the onnx package (the quantize extra).
extras=tflite,quantize
[ "$mode" = dev ] && extras=dev,tflite
stamp="$VENV/.edge-agent-setup-$mode"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing edge-agent[$extras] and $TORCH_SPEC into $VENV"
  "${pip[@]}" install --upgrade pip >/dev/null
  # torch first and alone, so no other requirement can pull a CUDA build.
  "$VENV/bin/python" -c 'import torch' 2>/dev/null || "${pip[@]}" install "$TORCH_SPEC"
  "${pip[@]}" install -e ".[$extras]" scikit-image scikit-learn
  touch "$stamp"
fi
echo "setup: ready ($("$VENV/bin/edge-agent" --version))"
# dev: the ONNX -> int8 TFLite converter env (Python >= 3.12, onnx2tf, TensorFlow); optional, its tests skip without it.
if [ "$mode" = dev ]; then scripts/setup_onnx2tf.sh || echo "setup: warning: the onnx2tf converter env was not created (exit $?); int8 TFLite builds and tests are skipped until scripts/setup_onnx2tf.sh succeeds" >&2; fi
# dev: TF Serving's own Python client beside it (the gRPC tests' real client); needs the converter env.
if [ "$mode" = dev ] && [ -x "${EDGE_AGENT_ONNX2TF_VENV:-$HOME/.cache/edge-agent/onnx2tf-venv}/bin/python" ]; then
  scripts/setup_tfserving_client.sh || echo "setup: warning: the TF Serving client env was not created (exit $?); the gRPC test with TF Serving's client fails until scripts/setup_tfserving_client.sh succeeds" >&2
fi
