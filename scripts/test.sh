#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite (unit, engine, shim,
# semantics, integration). .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/build.sh
meson test -C build --print-errorlogs "$@"
