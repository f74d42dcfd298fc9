#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need
# (Debian's mosquitto and photos, the Python environment, the cached real
# models) and runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/python -m testassets >/dev/null
exec .venv/bin/python -m pytest "$@"
