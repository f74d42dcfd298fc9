#!/usr/bin/env bash
# Install, upgrade or remove edge-agent as a systemd service on a device
# (Raspberry Pi OS bookworm, Debian 12+, Ubuntu 22.04+ / JetPack 6). Run it
# as root from a checkout:
#
#   sudo scripts/install.sh                 # install, or upgrade in place
#   sudo scripts/install.sh --uninstall     # remove; keep models and config
#   sudo scripts/install.sh --uninstall --purge
#
# What it sets up (docs/deployment.md):
#   user edge-agent (system user, group video, home /var/lib/edge-agent, nologin)
#   /opt/edge-agent/venv                    the package and its runtimes
#   /etc/edge-agent/agent.toml              from configs/agent.example.toml, never overwritten
#   /var/lib/edge-agent                     the model store, kept across upgrades
#   /etc/systemd/system/edge-agent.service  enabled; started only when systemd runs
#
# Exit status: 0 done, 1 failed (the message says what to do), 2 bad usage.
set -euo pipefail

readonly NAME=edge-agent
readonly PREFIX=/opt/edge-agent
readonly VENV=$PREFIX/venv
readonly CONF_DIR=/etc/edge-agent
readonly CONF=$CONF_DIR/agent.toml
readonly STATE_DIR=/var/lib/edge-agent
readonly UNIT_DIR=/etc/systemd/system
readonly UNIT=$UNIT_DIR/edge-agent.service
readonly LOG=/var/log/edge-agent-install.log
# Measured: the venv takes ~330 MB on arm64 and x86_64 (onnxruntime, OpenCV,
# numpy, LiteRT); pip needs about as much again while it unpacks and builds.
readonly NEED_VENV_MB=450
readonly NEED_TMP_MB=250

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
usage: sudo $0 [options]
       sudo $0 --uninstall [--purge]

Installs edge-agent as a systemd service, or upgrades it in place.

options:
  --wheel PATH          install this wheel instead of building the checkout
                        (the unit and example config still come from the checkout)
  --extras LIST         package extras, comma separated (default: tflite where
                        ai-edge-litert has a wheel for this machine, else none);
                        --extras "" installs none
  --index-url URL       package index for pip (an offline mirror); PIP_* variables
                        (PIP_INDEX_URL, PIP_FIND_LINKS, ...) pass through as well
  --extra-index-url URL an additional index for pip
  --find-links PATH     a folder of wheels for pip (offline installs)
  --no-start            install and enable, but neither start nor restart
  --uninstall           stop and remove the service and the venv; keep the
                        model store ($STATE_DIR), the config and the user
  --purge               with --uninstall: also remove $STATE_DIR,
                        $CONF_DIR, $PREFIX and the user
  -h, --help            this text

Environment: PYTHON (the interpreter, default: the newest python3.1x >= 3.10 found).
EOF
}

say() { printf 'install: %s\n' "$*"; }
warn() { printf 'install: warning: %s\n' "$*" >&2; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }
bad_usage() { printf 'install: %s\n' "$*" >&2; usage >&2; exit 2; }

# --- arguments ---------------------------------------------------------------
action=install
purge=0
start=1
wheel=
extras=auto
pip_opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --uninstall) action=uninstall ;;
    --purge) purge=1 ;;
    --no-start) start=0 ;;
    --wheel|--extras|--index-url|--extra-index-url|--find-links)
      [ $# -ge 2 ] || bad_usage "$1 needs a value"
      case "$1" in
        --wheel) wheel=$2 ;;
        --extras) extras=$2 ;;
        *) pip_opts+=("$1" "$2") ;;
      esac
      shift ;;
    --wheel=*) wheel=${1#*=} ;;
    --extras=*) extras=${1#*=} ;;
    --index-url=*|--extra-index-url=*|--find-links=*) pip_opts+=("$1") ;;
    *) bad_usage "unknown argument: $1" ;;
  esac
  shift
done
[ "$purge" -eq 0 ] || [ "$action" = uninstall ] || bad_usage "--purge goes with --uninstall"
if [ "$action" = uninstall ] && { [ -n "$wheel" ] || [ "$extras" != auto ] || [ ${#pip_opts[@]} -gt 0 ]; }; then
  bad_usage "--uninstall takes only --purge"
fi
if [ "$extras" != auto ] && ! [[ "$extras" =~ ^([A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*)?$ ]]; then
  bad_usage "--extras: a comma-separated list of names, e.g. tflite"
fi
if [ -n "$wheel" ]; then
  [ -f "$wheel" ] && [[ "$wheel" == *.whl ]] || bad_usage "--wheel: no such wheel file: $wheel"
  wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
fi

[ "$(id -u)" -eq 0 ] || die "this must run as root: run with sudo: sudo $0 $*"

# One run at a time (two installs into one venv would break it).
if command -v flock >/dev/null 2>&1; then
  mkdir -p /run/lock 2>/dev/null || true
  exec 9>/run/lock/edge-agent-install.lock
  flock -n 9 || die "another install.sh is running (lock /run/lock/edge-agent-install.lock); wait for it to finish"
fi

# systemd manages services only when it is PID 1 of this system, not in a
# chroot or a container without it (sd_booted(), plus a chroot check).
systemd_running() {
  [ -d /run/systemd/system ] || return 1
  local root1
  root1=$(stat -Lc '%d:%i' /proc/1/root/ 2>/dev/null) || return 1
  [ "$root1" = "$(stat -Lc '%d:%i' /)" ] || return 1
  [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]
}
have_systemctl() { command -v systemctl >/dev/null 2>&1; }

# --- uninstall ---------------------------------------------------------------
if [ "$action" = uninstall ]; then
  if have_systemctl; then
    if systemd_running; then
      systemctl disable --now "$NAME.service" >/dev/null 2>&1 || true
    elif [ -e "$UNIT" ]; then
      systemctl disable "$NAME.service" >/dev/null 2>&1 || true
    fi
  fi
  rm -f "$UNIT"
  rm -rf "$UNIT_DIR/$NAME.service.d"
  if have_systemctl && systemd_running; then
    systemctl daemon-reload
    systemctl reset-failed "$NAME.service" >/dev/null 2>&1 || true
  fi
  [ "$(readlink /usr/local/bin/edge-agent 2>/dev/null)" != "$VENV/bin/edge-agent" ] || rm -f /usr/local/bin/edge-agent
  rm -rf "$VENV"
  say "removed the service and $VENV"
  if [ "$purge" -eq 1 ]; then
    rm -rf "$PREFIX" "$STATE_DIR" "$CONF_DIR"
    if getent passwd "$NAME" >/dev/null; then
      userdel "$NAME" >/dev/null 2>&1 || warn "could not remove the user $NAME (userdel failed); remove it with: userdel $NAME"
    fi
    getent group "$NAME" >/dev/null && { groupdel "$NAME" >/dev/null 2>&1 || true; }
    say "purged $PREFIX, $STATE_DIR, $CONF_DIR and the user $NAME"
  else
    rmdir "$PREFIX" 2>/dev/null || [ ! -e "$PREFIX" ] || say "kept $PREFIX: it holds files that were not installed by this script ($(ls -A "$PREFIX" | tr '\n' ' '))"
    say "kept the model store $STATE_DIR, the config $CONF_DIR and the user $NAME (--uninstall --purge removes them)"
  fi
  exit 0
fi

# --- checks ------------------------------------------------------------------
for f in pyproject.toml systemd/edge-agent.service configs/agent.example.toml; do
  [ -f "$SRC/$f" ] || die "$SRC/$f is missing: run this script from an edge-agent checkout (git clone, or an unpacked release)"
done

arch=$(uname -m)
case "$arch" in
  x86_64|aarch64|arm64) ;;
  armv7l|armv6l|armhf|arm*)
    die "32-bit ARM ($arch) is not supported: onnxruntime publishes no wheel for it. Install the 64-bit OS (Raspberry Pi OS 64-bit runs on a Pi 3, 4, 5 and Zero 2 W); see docs/deployment.md" ;;
  *) warn "untested machine type $arch: pip needs onnxruntime and OpenCV wheels for it" ;;
esac

. /etc/os-release 2>/dev/null || true
os_like=" ${ID:-} ${ID_LIKE:-} "
[[ "$os_like" == *" debian "* || "$os_like" == *" ubuntu "* ]] \
  || warn "untested system ${PRETTY_NAME:-unknown}: this script is made for Debian, Raspberry Pi OS and Ubuntu"

apt_install() {  # package names...
  command -v apt-get >/dev/null 2>&1 || die "$* missing and there is no apt-get: install $* with your system's package manager, then run this again"
  say "installing Debian packages: $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$LOG" 2>&1; then
    apt-get update -qq >>"$LOG" 2>&1 \
      || die "apt-get update failed: no network to the Debian/Ubuntu package mirror? Connect the device, or install $* yourself (log: $LOG)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$LOG" 2>&1 \
      || die "apt-get install $* failed (log: $LOG): fix apt (apt-get -f install), then run this again"
  fi
}

# Python >= 3.10: $PYTHON, else python3, else the newest python3.1x.
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; }
python=
for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11 python3.10; do
  if command -v "$candidate" >/dev/null 2>&1 && py_ok "$candidate"; then python=$(command -v "$candidate"); break; fi
done
if [ -z "$python" ]; then
  have="no python3"
  command -v python3 >/dev/null 2>&1 && have=$(python3 --version 2>&1 | head -n 1)
  die "Python >= 3.10 is needed ($have found). Debian 12 / Raspberry Pi OS bookworm: apt-get install python3 python3-venv; Ubuntu 22.04 / JetPack 6: apt-get install python3 python3-venv; Ubuntu 20.04 / JetPack 5 ships 3.8: apt-get install python3.10 python3.10-venv (deadsnakes PPA) and run with PYTHON=python3.10, or upgrade to JetPack 6"
fi
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  if [ "$(command -v python3 || true)" = "$python" ]; then pkg=python3-venv; else pkg=python$pyver-venv; fi
  apt_install "$pkg"
  "$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || die "$python still has no venv/ensurepip after installing $pkg; install python$pyver-venv, then run this again"
fi
[ -s /etc/ssl/certs/ca-certificates.crt ] || apt_install ca-certificates

free_mb() {  # the free space of the filesystem holding $1 (or its nearest existing parent)
  local d=$1
  while [ ! -e "$d" ]; do d=$(dirname "$d"); done
  df -Pm "$d" | awk 'NR==2 {print $4}'
}
fs_of() { local d=$1; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; df -P "$d" | awk 'NR==2 {print $1}'; }
tmp=${TMPDIR:-/tmp}
need_venv=$NEED_VENV_MB
[ -x "$VENV/bin/python" ] && need_venv=$((NEED_VENV_MB / 3))  # an upgrade replaces what is there
if [ "$(fs_of "$PREFIX")" = "$(fs_of "$tmp")" ]; then
  need=$((need_venv + NEED_TMP_MB)); have=$(free_mb "$PREFIX")
  [ "$have" -ge "$need" ] || die "not enough disk space: $need MB needed on the filesystem of $PREFIX and $tmp, $have MB free. Free some space (apt-get clean; journalctl --vacuum-size=50M) or point TMPDIR at another disk, then run this again"
else
  have=$(free_mb "$PREFIX")
  [ "$have" -ge "$need_venv" ] || die "not enough disk space: $need_venv MB needed for $VENV, $have MB free on its filesystem. Free some space (apt-get clean; journalctl --vacuum-size=50M), then run this again"
  have=$(free_mb "$tmp")
  [ "$have" -ge "$NEED_TMP_MB" ] || die "not enough disk space: pip needs $NEED_TMP_MB MB in $tmp while it installs, $have MB free there. Run with TMPDIR set to a folder on a disk with space"
fi

# --- the virtual environment and the package --------------------------------
mkdir -p "$(dirname "$LOG")"
: >>"$LOG"
printf '\n=== %s install.sh from %s\n' "$(date -Is)" "$SRC" >>"$LOG"
work=$(mktemp -d)
created_venv=0
cleanup() {
  rm -rf "$work"
}
trap cleanup EXIT

pip() { PIP_PROGRESS_BAR=off "$VENV/bin/python" -m pip --disable-pip-version-check --no-input "$@"; }

# What pip prints when it cannot reach the index (it then also says "No matching distribution").
NET_ERRORS='Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|Network is unreachable|Connection (refused|reset|timed out)|Read timed out|ConnectTimeoutError|ProxyError|SSLError|CERTIFICATE_VERIFY_FAILED|No route to host|Could not fetch URL'

# pip failed: say why in one line from its output, and what to do.
pip_failed() {  # what, output file
  local what=$1 out=$2 reason
  cat "$out" >>"$LOG"
  if grep -qiE 'No space left on device' "$out"; then
    reason="the disk is full: free some space (apt-get clean; journalctl --vacuum-size=50M), then run this again"
  elif grep -qiE "$NET_ERRORS" "$out"; then
    reason="no network to the package index ($(grep -oiE -m1 "$NET_ERRORS" "$out" | head -n 1)): connect the device (check DNS, proxy, clock, CA certificates), or use a mirror: --index-url URL, or wheels in a folder: --find-links DIR"
  elif grep -qiE 'No matching distribution found|Could not find a version that satisfies' "$out"; then
    reason="no wheel for this machine ($arch, Python $pyver): $(grep -iE -m1 'No matching distribution found|Could not find a version' "$out" | sed 's/^ERROR: //'); or the index/mirror could not be reached"
  else
    reason="see the log"
  fi
  [ "$created_venv" -eq 0 ] || rm -rf "$VENV"
  printf 'install: pip output (last lines):\n' >&2
  tail -n 15 "$out" | sed 's/^/  | /' >&2
  die "$what failed: $reason (log: $LOG)"
}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
  if [ -e "$VENV" ]; then
    warn "$VENV does not work with $python; creating it again"
    rm -rf "$VENV"
  fi
  say "creating $VENV (Python $pyver)"
  mkdir -p "$PREFIX"
  "$python" -m venv "$VENV" >>"$LOG" 2>&1 || die "$python -m venv $VENV failed (log: $LOG)"
  created_venv=1
  upgrade=0
else
  upgrade=1
fi

if [ "$extras" = auto ]; then
  # LiteRT ships wheels for a few platforms only; the agent runs ONNX without it.
  if pip download --no-deps --only-binary=:all: --dest "$work/probe" "${pip_opts[@]}" 'ai-edge-litert>=1.0' >"$work/probe.log" 2>&1; then
    extras=tflite
  elif grep -qiE 'No matching distribution found|Could not find a version that satisfies' "$work/probe.log" \
      && ! grep -qiE "$NET_ERRORS" "$work/probe.log"; then
    extras=
    warn "ai-edge-litert has no wheel for $arch / Python $pyver: installing without TFLite (ONNX models only)"
  else
    pip_failed "looking up ai-edge-litert" "$work/probe.log"
  fi
fi

if [ -n "$wheel" ]; then
  pkg=$wheel
else
  # Build from a copy, so that the checkout gets no build/ or *.egg-info.
  say "building the package from $SRC"
  mkdir -p "$work/src"
  tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache -cf - . | tar -C "$work/src" -xf -
  pip wheel --no-deps --wheel-dir "$work/dist" "${pip_opts[@]}" "$work/src" >"$work/build.log" 2>&1 \
    || pip_failed "building the edge-agent wheel" "$work/build.log"
  cat "$work/build.log" >>"$LOG"
  pkg=$(ls "$work"/dist/edge_agent-*.whl)
fi
spec=$pkg
[ -z "$extras" ] || spec="$pkg[$extras]"
say "installing $(basename "$pkg")${extras:+ with [$extras]} into $VENV"
pip install "${pip_opts[@]}" "$spec" >"$work/pip.log" 2>&1 || pip_failed "pip install" "$work/pip.log"
cat "$work/pip.log" >>"$LOG"
# The same version number again (a checkout between releases): replace the code anyway.
pip install --force-reinstall --no-deps "$pkg" >"$work/pip2.log" 2>&1 || pip_failed "pip install" "$work/pip2.log"
cat "$work/pip2.log" >>"$LOG"

# The runtimes import (a missing system library shows here, not at the first frame).
check='import numpy, cv2, onnxruntime'
[[ ",$extras," == *",tflite,"* ]] && check="$check; from ai_edge_litert.interpreter import Interpreter"
if ! "$VENV/bin/python" -c "$check" >"$work/import.log" 2>&1; then
  cat "$work/import.log" >>"$LOG"
  tail -n 5 "$work/import.log" | sed 's/^/  | /' >&2
  die "the installed runtimes do not import ($check): a system library is missing; see the lines above (log: $LOG)"
fi
version=$("$VENV/bin/edge-agent" --version)
if [ "$upgrade" -eq 1 ]; then done_verb=upgraded; else done_verb=installed; fi
ln -sfn "$VENV/bin/edge-agent" /usr/local/bin/edge-agent

# --- user, directories, config ----------------------------------------------
getent group video >/dev/null || groupadd --system video
if getent passwd "$NAME" >/dev/null; then
  id -nG "$NAME" | tr ' ' '\n' | grep -qx video || usermod -a -G video "$NAME"
else
  nologin=/usr/sbin/nologin; [ -x "$nologin" ] || nologin=/sbin/nologin
  useradd --system --user-group --groups video --home-dir "$STATE_DIR" --no-create-home \
    --shell "$nologin" --comment "edge-agent inference service" "$NAME"
  say "created the system user $NAME (group video)"
fi
install -d -m 0750 -o "$NAME" -g "$NAME" "$STATE_DIR"
# A kept store whose owner was removed (or re-created with another uid).
if [ -n "$(find "$STATE_DIR" -xdev \( -nouser -o -nogroup \) -print -quit 2>/dev/null)" ]; then
  chown -R "$NAME:$NAME" "$STATE_DIR"
fi

new_config=0
if [ -e "$CONF" ]; then
  say "kept the config $CONF"
else
  install -d -m 0755 "$CONF_DIR"
  install -m 0640 -o root -g "$NAME" "$SRC/configs/agent.example.toml" "$CONF"
  new_config=1
  say "wrote the example config $CONF: edit it (models, sources, broker)"
fi

# --- the service -------------------------------------------------------------
install -m 0644 "$SRC/systemd/edge-agent.service" "$UNIT"
if ! have_systemctl; then
  warn "systemctl not found: installed $UNIT, but nothing enabled it; start the agent with: $VENV/bin/edge-agent run --config $CONF"
  say "installed $version"
  exit 0
fi
if systemd_running; then
  systemctl daemon-reload
  systemctl enable "$NAME.service" >/dev/null 2>&1 || die "systemctl enable $NAME failed: systemctl status $NAME"
else
  # A chroot or an image being built: enable works on the files alone.
  systemctl enable "$NAME.service" >/dev/null 2>&1 || die "systemctl enable $NAME failed in this chroot"
fi

config_ok=1
"$VENV/bin/edge-agent" validate-config --config "$CONF" >"$work/validate.log" 2>&1 || config_ok=0
if [ "$config_ok" -eq 0 ] && [ "$new_config" -eq 0 ]; then
  sed 's/^/  | /' "$work/validate.log" >&2
  warn "$CONF has the problems above: fix them, then check with: sudo edge-agent validate-config"
fi

if ! systemd_running; then
  say "$done_verb $version; systemd is not running here (chroot or container): the service is enabled and starts at the next boot; nothing was started"
elif [ "$start" -eq 0 ]; then
  say "$done_verb $version; enabled, not started (--no-start): systemctl restart $NAME"
elif [ "$new_config" -eq 1 ]; then
  say "installed $version; enabled, not started yet: edit $CONF, check it with: sudo edge-agent validate-config; then: systemctl start $NAME"
elif [ "$config_ok" -eq 0 ]; then
  say "$done_verb $version; the service was not (re)started because of the config's problems"
else
  systemctl restart "$NAME.service" || die "systemctl restart $NAME failed: see journalctl -u $NAME -n 50"
  if [ "$upgrade" -eq 1 ]; then say "upgraded to $version and restarted: journalctl -u $NAME -f"; else say "installed $version and started: journalctl -u $NAME -f"; fi
fi
exit 0
