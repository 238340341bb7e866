#!/usr/bin/env bash
# The device machine's check is run rarely and in one try (bench/device_run.sh, issue 11's
# 16-core measurement), so this keeps it working: bench/device_pack.sh packs the build and the
# tools into a temporary folder, and bench/device_run.sh runs from it (the probe and a one-run
# scale.sh). The carried programs must be the ones that ran: the probe names the carried
# wrk, curl, ss and pgrep, and a wrapper that cannot find its libraries fails the run.
# Usage: bash tests/bench/device_scripts.sh BUILD_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
build=$(realpath "${1:-build}")
for tool in apache2 wrk curl ss pgrep strip; do
    command -v "$tool" >/dev/null 2>&1 || { echo "device_scripts: $tool is missing: skipped" >&2; exit 77; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/tcps-device.XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "device_scripts: FAIL: $*" >&2; exit 1; }

bash bench/device_pack.sh "$build" "$work/device"
for program in bin/apache2 bin/wrk bin/curl bin/ss bin/pgrep build/engine/tcpsd build/bench/pingpong \
    build/preload/libtcps.so apache2/modules/mod_mpm_event.so mime.types; do
    [[ -e $work/device/$program ]] || fail "$program was not packed"
done
# Every library the carried programs load, glibc's aside, is a carried one (the device machine
# has none of Debian's).
for program in "$work"/device/real/* "$work"/device/apache2/modules/*.so "$work"/device/build/preload/*.so; do
    outside=$(LD_LIBRARY_PATH=$work/device/lib ldd "$program" | awk -v lib="$work/device/lib/" \
        '$2 == "=>" && index($3, lib) != 1 && $1 !~ /^(libc|libm|libpthread|libdl|librt|libresolv|libutil|libanl)\.so/ { print $1 }')
    [[ -z $outside ]] || fail "$(basename "$program") loads libraries that were not packed: $outside"
done
# The wrappers run their program from wherever the folder is.
# (wrk --version and tcpsd --help exit 1.)
said=$(LD_LIBRARY_PATH=/nonexistent "$work/device/bin/wrk" --version 2>&1 || true)
grep -q '^wrk' <<<"$said" || fail "the packed wrk does not run: $said"
said=$("$work/device/build/engine/tcpsd" --help 2>&1 || true)
grep -q '^usage: tcpsd' <<<"$said" || fail "the packed tcpsd does not run: $said"

DEVICE_DIR=$work/device OUT=$work/out PARTS="probe scale" SCALE_RUNS=1 SCALE_SCALE=0.2 \
    ENGINE_WORKERS=1 WORKLOADS=keepalive bash bench/device_run.sh >"$work/run.txt" 2>&1 ||
    { cat "$work/run.txt"; fail "device_run.sh failed"; }
for tool in wrk curl ss pgrep; do
    grep -q "^$tool: $work/device/bin/$tool" "$work/out/probe.txt" || fail "the probe did not find the packed $tool"
done
grep -qE '^ +1 +[0-9]+ \[' "$work/out/scale.txt" || { cat "$work/run.txt"; fail "scale.sh printed no table"; }
# The offloaded runs went through the engine: its statistics counted accepts.
grep -qE 'E=1 engine: worker 0: accepts [1-9]' "$work/out/scale.txt" ||
    { cat "$work/run.txt"; fail "the engine accepted nothing"; }
echo "device_scripts: packed $(du -sh "$work/device" | cut -f1), ran the probe and scale.sh from it"
