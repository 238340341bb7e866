#!/usr/bin/env bash
# Configures build/ (once) and builds everything in it. Quiet unless something fails.
# Usage: bash scripts/build.sh [BUILD_DIR] [extra meson setup options...]
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${1:-build}
shift || true

if [[ ! -f $build_dir/build.ninja ]]; then
    log=$(mktemp)
    if ! meson setup "$build_dir" "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "build.sh: meson setup $build_dir failed" >&2
        exit 1
    fi
    rm -f "$log"
fi
ninja -C "$build_dir" --quiet
