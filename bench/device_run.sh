#!/usr/bin/env bash
# The device machine's whole check in one command (issue 11: the 16-core measurement), within
# about 7 minutes: what the machine is, then bench/scale.sh (Apache on N cores natively
# against N-E cores and E engine workers) and bench/op_cost.sh with the engine on a core of
# its own (16 KB recv, MemNet), from what bench/device_pack.sh put in .device/. Writes its
# output and CSVs to $OUT (or bench/results/device).
#
# On the device tool: run bash bench/device_pack.sh here first, then
#   run(command: "bash bench/device_run.sh", carry: [".device"], timeout_s: 540)
# Environment: PARTS (default "probe scale op_cost"), DEVICE_DIR (default .device), and the
#              runs and scale of each part as below.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

device=$(realpath "${DEVICE_DIR:-.device}")
out=${OUT:-bench/results/device}
mkdir -p "$out"
[[ -x $device/bin/apache2 ]] || { echo "device_run: no .device here (bash bench/device_pack.sh)" >&2; exit 1; }
export PATH=$device/bin:$PATH
export APACHE_MODULES=$device/apache2/modules MIME_TYPES=$device/mime.types
id www-data >/dev/null 2>&1 || export APACHE_USER=nobody
parts=${PARTS:-probe scale op_cost}
cores=$(nproc)

for part in $parts; do
    case $part in
    probe)
        {
            echo "== $(date -u +%FT%TZ) $(uname -r), $cores cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
            grep -E 'MemTotal' /proc/meminfo
            for tool in python3 taskset setsid curl ss pgrep wrk; do printf '%s: ' "$tool"; command -v "$tool" || echo missing; done
            apache2 -v | head -1
            "$device/build/engine/tcpsd" --help 2>&1 | head -1
            cat /proc/loadavg
        } 2>&1 | tee "$out/probe.txt"
        ;;
    scale)
        # 12 server cores and 4 for wrk on 16; E = 1, 2, 3, 4 engine workers.
        workers="1 2 3"
        ((cores >= 16)) && workers="1 2 3 4"
        ENGINE_WORKERS=${ENGINE_WORKERS:-$workers} RUNS=${SCALE_RUNS:-2} SCALE=${SCALE_SCALE:-0.6} \
            OUT_DIR=$out bash bench/scale.sh "$device/build" 2>&1 | tee "$out/scale.txt"
        ;;
    op_cost)
        # The application on core 0, the peer on the next to last core, the engine alone on the last.
        PEER_CORE=$((cores > 2 ? cores - 2 : cores - 1)) RUNS=${OP_RUNS:-3} SCALE=${OP_SCALE:-0.3} \
            OPS="send recv async_send async_recv" OUT=$out/op_cost.csv \
            bash bench/op_cost.sh "$device/build" 2>&1 | tee "$out/op_cost.txt"
        ;;
    *) echo "device_run: unknown part $part" >&2 ;;
    esac
done
