#!/usr/bin/env bash
# arm64 proven: install and run edge-agent in an emulated Debian bookworm
# arm64 system (the base of 64-bit Raspberry Pi OS, Python 3.11) and check its
# results against this machine's.
#
#   sudo scripts/arm64_check.sh [--rebuild] [--keep] [--cpu=pi4|pi5]
#
#   1. the int8 MobileNetV2 bundles (ONNX and, with the onnx2tf env, TFLite),
#      made here by `edge-agent quantize` from the demo model, and the x86
#      reference: `edge-agent run` over the demo video, every frame's top-1;
#   2. a bookworm arm64 root filesystem (debootstrap, run by qemu-user-static
#      through binfmt_misc), built once and cached;
#   3. inside it, on a throw-away overlay: scripts/install.sh for real
#      (install, upgrade, a failed upgrade, uninstall, purge; scripts/arm64/in_rootfs.sh),
#      `edge-agent run` on each int8 bundle over the same video, `edge-agent bench`;
#   4. every frame's top-1 on arm64 compared with x86.
#
# Cache: ${EDGE_AGENT_CACHE:-~/.cache/edge-agent}/arm64/ (rootfs/, pip/ for the
# aarch64 wheels, models/). --rebuild makes the root filesystem again; --keep
# leaves the run's overlay and logs in the cache for a look; --cpu emulates a
# Raspberry Pi 4's Cortex-A72 (default) or a Pi 5's Cortex-A76 (dot product).
# Needs root (chroot, mounts), debootstrap, qemu-user-static, and the checkout's
# .venv (scripts/setup.sh dev). Mirror: $DEBIAN_MIRROR, else the Debian mirror
# of this machine's apt sources, else debootstrap's default.
#
# Exit status: 0 passed, 1 failed, 77 this machine cannot emulate arm64 (why: on stderr).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${EDGE_AGENT_CACHE:-$HOME/.cache/edge-agent}
A64=$CACHE/arm64
SUITE=bookworm
# What the rootfs holds beyond minbase: what Raspberry Pi OS Lite has that
# install.sh relies on (python3 with venv, systemctl, runuser, CA certificates).
PACKAGES=python3,python3-venv,ca-certificates,systemd,util-linux,passwd,procps
ROOTFS_KEY="$SUITE minbase $PACKAGES v1"
STRIDE=10  # of the demo video's 300 frames, every STRIDE-th is classified on both machines

rebuild=0
keep=0
cpu=cortex-a72
for arg in "$@"; do
  case "$arg" in
    --rebuild) rebuild=1 ;;
    --keep) keep=1 ;;
    --cpu=pi4) cpu=cortex-a72 ;;
    --cpu=pi5) cpu=cortex-a76 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "arm64_check: unknown argument: $arg (usage: $0 [--rebuild] [--keep] [--cpu=pi4|pi5])" >&2; exit 2 ;;
  esac
done

say() { printf '[arm64-check] %s\n' "$*"; }
cannot() { printf 'arm64_check: cannot emulate arm64 here: %s\n' "$*" >&2; exit 77; }
die() { printf 'arm64_check: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }
T0=$(now)

# --- can this machine emulate arm64? ------------------------------------------
[ "$(id -u)" -eq 0 ] || cannot "needs root (debootstrap, chroot, mounts); run it with sudo"
[ "$(uname -m)" = x86_64 ] || cannot "the reference run is made on x86_64, this is $(uname -m)"
for tool in debootstrap chroot unshare mount; do
  command -v "$tool" >/dev/null 2>&1 || cannot "$tool is missing (apt-get install debootstrap util-linux)"
done
command -v qemu-aarch64-static >/dev/null 2>&1 || cannot "qemu-aarch64-static is missing (apt-get install qemu-user-static)"
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/status" ]; then
  mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null || cannot "binfmt_misc is not mounted and cannot be mounted here (mount -t binfmt_misc binfmt_misc $BINFMT failed; a container without that privilege?)"
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
  # Debian's qemu-user-static rule (F: the interpreter is opened now, so it works inside a chroot).
  rule=$(cat /usr/lib/binfmt.d/qemu-aarch64.conf 2>/dev/null || true)
  [ -n "$rule" ] || rule=':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F'
  printf '%s' "$rule" >"$BINFMT/register" 2>/dev/null || cannot "cannot register qemu-aarch64 with binfmt_misc (writing $BINFMT/register failed)"
  say "registered qemu-aarch64 with binfmt_misc"
fi
grep -qx enabled "$BINFMT/status" || cannot "binfmt_misc is disabled ($BINFMT/status)"
grep -qx enabled "$BINFMT/qemu-aarch64" || { echo 1 >"$BINFMT/qemu-aarch64" 2>/dev/null || cannot "the qemu-aarch64 binfmt rule is disabled and cannot be enabled"; }
grep -q '^flags:.*F' "$BINFMT/qemu-aarch64" || say "note: the qemu-aarch64 rule has no F flag; the rootfs gets its own copy of qemu-aarch64-static"

[ -x "$REPO/.venv/bin/edge-agent" ] || die "no $REPO/.venv: run scripts/setup.sh dev first"
PY=$REPO/.venv/bin/python
EA=$REPO/.venv/bin/edge-agent
mkdir -p "$A64/pip" "$A64/models"

# --- models: the demo's MobileNetV2, int8 ONNX and int8 TFLite ----------------
t=$(now)
(cd "$REPO" && EDGE_AGENT_CACHE=$CACHE "$PY" -m testassets --only mobilenet_v2 imagenet_labels photos demo_video >/dev/null) \
  || die "building the demo model and video failed (python -m testassets)"
fp32=$CACHE/models/mobilenet_v2.onnx
video=$CACHE/videos/demo.avi
key=$(cat "$fp32" "$video" | sha256sum | cut -c1-16)-$("$EA" --version | tr -c 'A-Za-z0-9.\n' _ | tr -d '\n')
models=$A64/models/$key
tflite_note=
if [ ! -f "$models/.done" ]; then
  say "quantizing the demo MobileNetV2 to int8 (cached in $models)"
  rm -rf "$models"; mkdir -p "$models"
  "$EA" pack "$fp32" --name mobilenet_v2 --version 1 --out "$models/mobilenet_v2-fp32" \
    --resize crop --crop-fraction 0.875 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \
    --layout nchw --color rgb --labels "$REPO/testassets/data/imagenet_labels.txt" --task classify >/dev/null
  # The gate is not what is checked here (tests/test_quantize*.py are): agreement x86 vs arm64 is.
  q=(quantize "$models/mobilenet_v2-fp32" --calibration "$CACHE/photos" --min-agreement 0 --no-mixed-precision)
  if ! "$EA" "${q[@]}" --out "$models/q" >"$models/quantize.log" 2>&1; then
    if grep -q "converter environment is missing\|onnx2tf" "$models/quantize.log"; then
      tflite_note="int8 TFLite not built: $(grep -m1 -i "environment is missing\|onnx2tf" "$models/quantize.log")"
      rm -rf "$models/q"
      "$EA" "${q[@]}" --target onnx --out "$models/q" >>"$models/quantize.log" 2>&1 || { tail -n 20 "$models/quantize.log" >&2; die "edge-agent quantize failed"; }
      echo "$tflite_note" >"$models/tflite-skipped"
    else
      tail -n 20 "$models/quantize.log" >&2; die "edge-agent quantize failed"
    fi
  fi
  touch "$models/.done"
fi
[ -f "$models/tflite-skipped" ] && tflite_note=$(cat "$models/tflite-skipped")
# Every 10th frame of the demo video (3 of each of its 10 photos), as an MJPG
# video like the demo's: emulated inference takes about a second a frame, the
# full 300 frames twice would take ten minutes. Both machines read this file.
clip=$models/demo-every-$STRIDE.avi
if [ ! -f "$clip" ]; then
  "$PY" - "$video" "$clip" "$STRIDE" <<'PYEOF' || die "cutting the demo video failed"
import sys, cv2
src, dst, stride = sys.argv[1], sys.argv[2], int(sys.argv[3])
cap = cv2.VideoCapture(src)
ok, frame = cap.read()
out = cv2.VideoWriter(dst + ".tmp.avi", cv2.VideoWriter_fourcc(*"MJPG"), 3, (frame.shape[1], frame.shape[0]))
i = 0
while ok:
    if i % stride == 0:
        out.write(frame)
    ok, frame = cap.read()
    i += 1
out.release()
import os; os.replace(dst + ".tmp.avi", dst)
PYEOF
fi
bundles=("$models"/q/mobilenet_v2-v*-int8-*)
[ -d "${bundles[0]}" ] || die "no int8 bundle in $models/q"
T_MODELS=$(since "$t")

# --- the x86 reference -------------------------------------------------------
t=$(now)
ref=$(mktemp -d)
trap 'rm -rf "$ref"' EXIT
for b in "${bundles[@]}"; do
  rt=${b##*-int8-}
  cat >"$ref/run-$rt.toml" <<EOF
device_id = "x86-reference"
[store]
path = "$ref/store-$rt"
[[models]]
name = "mobilenet_v2"
bundle = "$b"
threads = 2
[[sources]]
name = "demo"
uri = "$clip"
model = "mobilenet_v2"
realtime = false
top_k = 5
log_results = true
EOF
  "$EA" run --config "$ref/run-$rt.toml" >"$ref/run-$rt.log" 2>&1 || { tail -n 20 "$ref/run-$rt.log" >&2; die "the x86 reference run ($rt) failed"; }
done
"$EA" bench "$models/mobilenet_v2-fp32" "${bundles[@]}" --threads 2 --rounds 2 --runs 3 --warmup 1 \
  --image "$CACHE/photos/chelsea.jpg" >"$ref/bench.txt" 2>/dev/null || die "edge-agent bench on x86 failed"
T_REF=$(since "$t")

# --- the arm64 root filesystem (cached) --------------------------------------
rootfs=$A64/rootfs
t=$(now)
if [ "$rebuild" -eq 1 ] || [ "$(cat "$rootfs/.edge-agent-rootfs" 2>/dev/null)" != "$ROOTFS_KEY" ]; then
  mirror=${DEBIAN_MIRROR:-}
  if [ -z "$mirror" ]; then  # the Debian mirror this machine's apt uses (deb822 or one-line sources)
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep -E '/debian/?$' | head -n 1 || true)
    [ -n "$mirror" ] || mirror=$(grep -hsE '^deb [^#]*/debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | head -n 1 || true)
  fi
  say "building the $SUITE arm64 root filesystem (${mirror:-debootstrap default mirror}); a few minutes, once"
  rm -rf "$rootfs" "$rootfs.new"
  mkdir -p "$rootfs.new"
  debootstrap --foreign --arch=arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs.new" ${mirror:+"$mirror"} >"$A64/debootstrap.log" 2>&1 \
    || { tail -n 15 "$A64/debootstrap.log" >&2; die "debootstrap (first stage) failed; log: $A64/debootstrap.log (no network to the Debian mirror? set DEBIAN_MIRROR)"; }
  install -m 755 "$(command -v qemu-aarch64-static)" "$rootfs.new/usr/bin/qemu-aarch64-static"
  chroot "$rootfs.new" /bin/true 2>"$A64/exec.err" \
    || cannot "an arm64 program does not run here through binfmt_misc + qemu-aarch64-static: $(cat "$A64/exec.err")"
  chroot "$rootfs.new" /debootstrap/debootstrap --second-stage >>"$A64/debootstrap.log" 2>&1 \
    || { tail -n 15 "$A64/debootstrap.log" >&2; die "debootstrap (second stage, emulated) failed; log: $A64/debootstrap.log"; }
  chroot "$rootfs.new" apt-get clean
  echo "$ROOTFS_KEY" >"$rootfs.new/.edge-agent-rootfs"
  mv "$rootfs.new" "$rootfs"
  T_ROOTFS=$(since "$t")
  say "root filesystem ready in ${T_ROOTFS} s ($(du -sh --exclude=proc "$rootfs" | cut -f1))"
else
  T_ROOTFS=0
  say "using the cached root filesystem $rootfs"
  chroot "$rootfs" /bin/true 2>"$A64/exec.err" \
    || cannot "an arm64 program does not run here through binfmt_misc + qemu-aarch64-static: $(cat "$A64/exec.err")"
fi

# --- the aarch64 wheels, fetched here at native speed (cached) ---------------
# pip inside the emulated system is pointed at this folder (PIP_FIND_LINKS,
# an option install.sh passes through): it still asks the index for the
# versions, but takes wheels from here when they are the newest.
t=$(now)
wheels=$A64/wheels
mkdir -p "$wheels"
platforms=(--platform linux_aarch64 --platform manylinux2014_aarch64)
for m in $(seq 17 36); do platforms+=(--platform "manylinux_2_${m}_aarch64"); done  # bookworm: glibc 2.36
mapfile -t reqs < <("$PY" -c '
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["tflite"] + ["setuptools>=68", "wheel"]))' "$REPO/pyproject.toml")
if ! PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$PY" -m pip download --disable-pip-version-check --progress-bar off \
    --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none "${platforms[@]}" \
    -d "$wheels" "${reqs[@]}" >"$A64/wheels.log" 2>&1; then
  tail -n 5 "$A64/wheels.log" >&2
  say "warning: fetching the aarch64 wheels here failed (log: $A64/wheels.log); pip inside downloads them itself"
fi
T_WHEELS=$(since "$t")

# --- inside the emulated system ----------------------------------------------
run=$(mktemp -d "$A64/run.XXXXXX")
[ "$keep" -eq 1 ] || trap 'rm -rf "$ref" "$run"' EXIT
mkdir -p "$run/upper" "$run/work" "$run/root" "$run/check/bundles"
cp -r "$models/mobilenet_v2-fp32" "${bundles[@]}" "$run/check/bundles/"
cp "$clip" "$run/check/demo.avi"
cp "$CACHE/photos/chelsea.jpg" "$run/check/"
# The emulated CPU is a Raspberry Pi's, both in what qemu executes (QEMU_CPU)
# and in the /proc/cpuinfo the runtimes read: qemu 7.2 shows the host's x86
# one, which onnxruntime's cpuinfo cannot parse on arm64. (qemu's default
# CPU, "max", has every newer extension, and XNNPACK's int8 kernels for those
# compute garbage under qemu 7.2: "bucket" on every frame.)
case "$cpu" in
  cortex-a72) features="fp asimd evtstrm crc32 cpuid"; variant=0x0; part=0xd08; revision=3; model="Raspberry Pi 4 Model B Rev 1.1" ;;
  cortex-a76) features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
              variant=0x4; part=0xd0b; revision=1; model="Raspberry Pi 5 Model B Rev 1.0" ;;
esac
for ((i = 0; i < $(nproc); i++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
    "$i" "$features" "$variant" "$part" "$revision"
done >"$run/cpuinfo"
printf 'Model\t\t: %s\n' "$model" >>"$run/cpuinfo"
# The source as a release would ship it: no .git, no .venv.
mkdir -p "$run/src"
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache -cf - . | tar -C "$run/src" -xf -

# pip inside gets the proxy and a non-local index from here, never this machine's file:// wheel folders.
envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb PIP_DEFAULT_TIMEOUT=60
      PIP_FIND_LINKS=/var/cache/edge-agent-wheels QEMU_CPU="$cpu")
# The emulated system trusts what this machine trusts (a TLS-inspecting proxy's CA in CI).
host_ca=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
if [ -s "$host_ca" ]; then
  cp "$host_ca" "$run/check/host-ca.crt"
  envs+=(PIP_CERT=/srv/edge-agent-check/host-ca.crt)
fi
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
  val=${!v:-}
  [ -n "$val" ] && [[ "$val" != *file:* ]] && envs+=("$v=$val")
done

say "installing and running edge-agent in the emulated arm64 system, CPU $cpu (install.sh, run, bench, upgrade, uninstall)"
t=$(now)
set +e
# A private mount namespace: every mount below vanishes with it, whatever happens.
unshare --mount --propagation private bash -euo pipefail -c '
  rootfs=$1; run=$2; pip=$3; wheels=$4; shift 4
  mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$run/upper,workdir=$run/work" "$run/root"
  r=$run/root
  mount -t proc proc "$r/proc"
  mount --bind "$run/cpuinfo" "$r/proc/cpuinfo"
  mount -t sysfs sysfs "$r/sys"
  mount --rbind /dev "$r/dev"
  mount -t tmpfs tmpfs "$r/tmp"
  mkdir -p "$r/root/.cache/pip" "$r/srv/edge-agent-check" "$r/usr/src/edge-agent"
  mount --bind "$pip" "$r/root/.cache/pip"
  mkdir -p "$r/var/cache/edge-agent-wheels"
  mount --bind -o ro "$wheels" "$r/var/cache/edge-agent-wheels"
  mount --bind "$run/check" "$r/srv/edge-agent-check"
  mount --bind "$run/src" "$r/usr/src/edge-agent"
  cp -L /etc/resolv.conf "$r/etc/resolv.conf"
  exec chroot "$r" /usr/bin/env -i "$@" bash /usr/src/edge-agent/scripts/arm64/in_rootfs.sh /usr/src/edge-agent /srv/edge-agent-check
' arm64-check "$rootfs" "$run" "$A64/pip" "$wheels" "${envs[@]}" 2>&1 | tee "$run/in_rootfs.log"
rc=${PIPESTATUS[0]}
set -e
T_ARM=$(since "$t")
[ "$rc" -eq 0 ] || die "the emulated arm64 run failed (exit $rc); see above$([ "$keep" -eq 1 ] && echo "; files in $run")"
out=$run/check/out

# --- verdict -----------------------------------------------------------------
say "top-1 per frame (frame k: the demo video's frame $STRIDE*k), x86 (this machine) against arm64 (emulated):"
status=0
for b in "${bundles[@]}"; do
  rt=${b##*-int8-}
  python3 "$REPO/scripts/arm64/top1.py" compare "$ref/run-$rt.log" "$out/run-$rt.log" "int8 $rt" || status=1
done
[ -z "$tflite_note" ] || say "$tflite_note"
say "edge-agent bench on x86 (this machine, $(nproc) CPUs):"
cat "$ref/bench.txt"
say "edge-agent bench on arm64 UNDER EMULATION (qemu user mode: not the speed of any device):"
cat "$out/bench.txt"
read_time() { awk -v k="$1" '$1 == k {print $2}' "$out/times.txt"; }
say "times: root filesystem $T_ROOTFS s$([ "$T_ROOTFS" = 0 ] && echo ' (cached)'), models $T_MODELS s, x86 reference $T_REF s, aarch64 wheels $T_WHEELS s, emulated $T_ARM s" \
    "(install.sh $(read_time install_s) s, upgrade $(read_time upgrade_s) s, runs $(read_time run_onnx_s)/$(read_time run_tflite_s) s onnx/tflite, bench $(read_time bench_s) s; venv $(read_time venv_mb) MB); total $(since "$T0") s"
if [ "$status" -ne 0 ]; then die "arm64 and x86 disagree on some frames (listed above)"; fi
say "PASSED: install.sh, the agent and its results on arm64 match x86"
