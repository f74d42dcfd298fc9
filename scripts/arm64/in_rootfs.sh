#!/usr/bin/env bash
# Runs inside the emulated Debian bookworm arm64 system (scripts/arm64_check.sh
# puts it there): install.sh for real (install, re-run as an upgrade, a failed
# upgrade, uninstall, purge), the agent on each int8 bundle over the demo
# video, and edge-agent bench. Everything it measures goes to $OUT.
#
#   in_rootfs.sh SRC CHECK_DIR     (SRC: the checkout; CHECK_DIR: bundles, video, out/)
set -euo pipefail
src=$1
check=$2
OUT=$check/out
mkdir -p "$OUT"
step() { printf '[arm64] %s\n' "$*"; }
fail() { printf '[arm64] FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
record() { printf '%s %s\n' "$1" "$2" >>"$OUT/times.txt"; }

cd /
[ "$(uname -m)" = aarch64 ] || fail "this is $(uname -m), not aarch64"
step "$(. /etc/os-release; echo "$PRETTY_NAME"), $(python3 --version), $(uname -m)"

# --- install.sh: a fresh install -------------------------------------------
t=$(now)
bash "$src/scripts/install.sh" 2>&1 | tee "$OUT/install.log"
record install_s "$(elapsed "$t")"
grep -q "systemd is not running here" "$OUT/install.log" || fail "install.sh did not say that it started nothing in a chroot"
id -nG edge-agent | tr ' ' '\n' | grep -qx video || fail "the user edge-agent is not in the video group"
[ "$(getent passwd edge-agent | cut -d: -f6,7)" = "/var/lib/edge-agent:/usr/sbin/nologin" ] || fail "edge-agent's home/shell: $(getent passwd edge-agent)"
[ -x /opt/edge-agent/venv/bin/edge-agent ] || fail "no /opt/edge-agent/venv/bin/edge-agent"
[ -f /etc/edge-agent/agent.toml ] || fail "no /etc/edge-agent/agent.toml"
[ "$(stat -c '%U:%G %a' /etc/edge-agent/agent.toml)" = "root:edge-agent 640" ] || fail "config owner/mode: $(stat -c '%U:%G %a' /etc/edge-agent/agent.toml)"
[ "$(stat -c '%U %a' /var/lib/edge-agent)" = "edge-agent 750" ] || fail "store owner/mode: $(stat -c '%U %a' /var/lib/edge-agent)"
cmp -s "$src/systemd/edge-agent.service" /etc/systemd/system/edge-agent.service || fail "the unit was not installed"
[ -L /etc/systemd/system/multi-user.target.wants/edge-agent.service ] || fail "the unit is not enabled"
/opt/edge-agent/venv/bin/python -c 'import ai_edge_litert, onnxruntime, cv2' || fail "the runtimes do not import"
du -sm /opt/edge-agent/venv | awk '{print "venv_mb", $1}' >>"$OUT/times.txt"
step "installed: $(edge-agent --version); venv $(du -sh /opt/edge-agent/venv | cut -f1)"

# --- the agent on each bundle, as the service user ----------------------------
runs=()
for bundle in "$check"/bundles/*-int8-*; do
  [ -d "$bundle" ] || continue
  rt=${bundle##*-int8-}
  store=/var/lib/edge-agent/check-$rt
  cfg=$check/run-$rt.toml
  cat >"$cfg" <<EOF
device_id = "arm64-check"
[store]
path = "$store"
[[models]]
name = "mobilenet_v2"
bundle = "$bundle"
threads = 2
[[sources]]
name = "demo"
uri = "$check/demo.avi"
model = "mobilenet_v2"
realtime = false
top_k = 5
log_results = true
EOF
  chmod -R a+rX "$check"
  step "edge-agent run: int8 $rt over the demo video"
  t=$(now)
  rc=0
  runuser -u edge-agent -- edge-agent run --config "$cfg" >"$OUT/run-$rt.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || { tail -n 20 "$OUT/run-$rt.log" >&2; fail "edge-agent run ($rt) exited $rc"; }
  record "run_${rt}_s" "$(elapsed "$t")"
  step "  $(grep -c 'edge_agent.results:' "$OUT/run-$rt.log") frames in $(elapsed "$t") s; frame 0: $(grep -m1 'edge_agent.results:' "$OUT/run-$rt.log" | sed 's/.*ms: //')"
  runs+=("$bundle")
done
[ ${#runs[@]} -gt 0 ] || fail "no int8 bundle in $check/bundles"

step "edge-agent bench (emulated: not the speed of a device)"
t=$(now)
edge-agent bench "$check/bundles/mobilenet_v2-fp32" "${runs[@]}" --threads 2 --rounds 2 --runs 3 --warmup 1 \
  --image "$check/chelsea.jpg" >"$OUT/bench.txt" 2>"$OUT/bench.err" \
  || { cat "$OUT/bench.err" >&2; fail "edge-agent bench failed"; }
record bench_s "$(elapsed "$t")"

# --- install.sh again: an upgrade in place ------------------------------------
printf '\n# kept across upgrades (arm64 check)\n' >>/etc/edge-agent/agent.toml
conf_sum=$(sha256sum /etc/edge-agent/agent.toml)
store_sum=$(find /var/lib/edge-agent -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)
t=$(now)
bash "$src/scripts/install.sh" 2>&1 | tee "$OUT/upgrade.log"
record upgrade_s "$(elapsed "$t")"
grep -q "kept the config" "$OUT/upgrade.log" || fail "the upgrade did not keep the config"
[ "$(sha256sum /etc/edge-agent/agent.toml)" = "$conf_sum" ] || fail "the upgrade changed the config"
[ "$(find /var/lib/edge-agent -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)" = "$store_sum" ] || fail "the upgrade changed the model store"
[ "$(getent passwd edge-agent | wc -l)" = 1 ] || fail "the upgrade made a second user"

# --- an upgrade with no package index: a clear error, the install unharmed ----
set +e
env -u PIP_FIND_LINKS bash "$src/scripts/install.sh" --index-url http://127.0.0.1:9/simple >"$OUT/offline.log" 2>&1
rc=$?
set -e
cat "$OUT/offline.log"
[ "$rc" = 1 ] || fail "install.sh with an unreachable index exited $rc, not 1"
grep -q "no network to the package index" "$OUT/offline.log" || fail "install.sh did not say that the package index is unreachable"
edge-agent --version >/dev/null || fail "the failed upgrade broke the installed agent"

# --- uninstall keeps the store, the config and the user; purge removes them --
bash "$src/scripts/install.sh" --uninstall 2>&1 | tee "$OUT/uninstall.log"
[ ! -e /opt/edge-agent/venv ] || fail "--uninstall left /opt/edge-agent/venv"
[ ! -e /etc/systemd/system/edge-agent.service ] || fail "--uninstall left the unit"
[ ! -e /etc/systemd/system/multi-user.target.wants/edge-agent.service ] || fail "--uninstall left the unit enabled"
[ ! -e /usr/local/bin/edge-agent ] || fail "--uninstall left /usr/local/bin/edge-agent"
[ "$(find /var/lib/edge-agent -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)" = "$store_sum" ] || fail "--uninstall changed the model store"
[ "$(sha256sum /etc/edge-agent/agent.toml)" = "$conf_sum" ] || fail "--uninstall changed the config"
bash "$src/scripts/install.sh" --uninstall --purge 2>&1 | tee "$OUT/purge.log"
for p in /opt/edge-agent /var/lib/edge-agent /etc/edge-agent; do [ ! -e "$p" ] || fail "--purge left $p"; done
! getent passwd edge-agent >/dev/null || fail "--purge left the user edge-agent"
step "install, upgrade, failed upgrade, uninstall, purge: all as expected"
