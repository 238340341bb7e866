#!/usr/bin/env bash
# Experiment 1 (MemNet's Figure 5): CPU cost of one send() and one recv() on the application's
# side, native against offloaded, for 64 B, 1 KB, 4 KB and 16 KB, to a peer that drains or
# streams. Native and offloaded runs alternate in the same invocation; each configuration runs
# RUNS times and the table shows medians with [min-max].
#
# CPU comes from the kernel's accounting: the calling thread's CLOCK_THREAD_CPUTIME_ID for the
# application, and the sum of /proc/PID/task/*/schedstat (ns on CPU) for the engine.
#
# With OPS="send_direct recv_direct async_send async_recv" the same for the MemNet API (preload/
# tcps_memnet.h) from a registered buffer: natively it is the kernel's send()/recv(), offloaded
# the engine sends from and receives into the buffer itself.
#
# Usage: bash bench/op_cost.sh [BUILD_DIR]   (default: build)
# Environment: RUNS (default 5), SCALE (multiplies the call counts, may be fractional, default 1),
#              OUT (CSV file, default bench/results/op_cost.csv), OPS (default "send recv"),
#              PEER_CORE and ENGINE_CORE (default both the last core; on a machine with cores to
#              spare, two different ones give the engine a core of its own), ENGINE_ARGS (more
#              tcpsd options, e.g. --busy-poll; default spin-then-sleep, --spin-us 50).
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
runs=${RUNS:-5}
scale=${SCALE:-1}
out=${OUT:-bench/results/op_cost.csv}
op_cost=$(realpath "$build/bench/op_cost")
tcpsd=$(realpath "$build/engine/tcpsd")
libtcps=$(realpath "$build/preload/libtcps.so")

work=$(mktemp -d "${TMPDIR:-/tmp}/tcps-opcost.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Placement: the application on core 0; the peer and the engine on the last core. With one
# core, everything shares it (said in the output).
cores=$(nproc)
app_core=0
other_core=$((cores - 1))
peer_core=${PEER_CORE:-$other_core}
engine_core=${ENGINE_CORE:-$other_core}
read -r -a engine_args <<<"${ENGINE_ARGS:-}"

wait_file() {  # $1: file that must appear (5 s at most)
    for _ in $(seq 100); do [[ -s $1 ]] && return 0; sleep 0.05; done
    echo "op_cost: $1 did not appear" >&2
    exit 1
}

taskset -c "$peer_core" "$op_cost" --peer "$work/port" &
pids+=($!)
wait_file "$work/port"
port=$(cat "$work/port")

taskset -c "$engine_core" "$tcpsd" --socket "$work/engine.sock" --cores "$engine_core" \
    "${engine_args[@]}" --ready-fd 3 \
    3>"$work/ready" 2>"$work/engine.log" &
engine_pid=$!
pids+=("$engine_pid")
wait_file "$work/ready"

engine_cpu_ns() {
    local total=0 t
    for t in /proc/"$engine_pid"/task/*/schedstat; do
        total=$((total + $(cut -d' ' -f1 "$t")))
    done
    echo "$total"
}

echo "op_cost: application on core $app_core; peer on core $peer_core; engine (tcpsd --cores" \
    "$engine_core ${engine_args[*]:-spin-then-sleep, --spin-us 50}) on core $engine_core; $cores cores;" \
    "$runs runs each" >&2
mkdir -p "$(dirname "$out")"
echo "op,size,mode,run,app_cpu_ns_per_call,engine_cpu_ns_per_call,wall_ns_per_call,post_ns_per_call" >"$out"

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; }

ops=${OPS:-send recv}
for op in $ops; do
    for size in 64 1024 4096 16384; do
        case $size in
        64 | 1024) count=200000 ;;
        4096) count=100000 ;;
        *) count=40000 ;;
        esac
        count=$(awk -v c="$count" -v s="$scale" 'BEGIN { n = int(c * s); print (n < 1) ? 1 : n }')
        for run in $(seq "$runs"); do
            line=$(taskset -c "$app_core" "$op_cost" "--${op//_/-}" "$port" "$size" "$count")
            echo "$op,$size,native,$run,$(field cpu_ns_per_call "$line"),0,$(field wall_ns_per_call "$line"),$(field post_ns_per_call "$line")" >>"$out"

            before=$(engine_cpu_ns)
            line=$(LD_PRELOAD=$libtcps TCPS_ENGINE_SOCKET=$work/engine.sock \
                taskset -c "$app_core" "$op_cost" "--${op//_/-}" "$port" "$size" "$count")
            after=$(engine_cpu_ns)
            engine=$(awk -v a="$before" -v b="$after" -v n="$count" 'BEGIN { printf "%.1f", (b - a) / n }')
            echo "$op,$size,offloaded,$run,$(field cpu_ns_per_call "$line"),$engine,$(field wall_ns_per_call "$line"),$(field post_ns_per_call "$line")" >>"$out"
        done
    done
done

# The offloaded runs must really have gone through the engine: it counted their bytes.
kill -USR1 "$engine_pid"
sleep 0.2
if ! grep -q "bytes" "$work/engine.log"; then
    echo "op_cost: the engine logged no statistics; cannot confirm offload" >&2
fi

python3 - "$out" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def series(op, size, mode, key):
    return [float(r[key]) for r in rows if r["op"] == op and r["size"] == size and r["mode"] == mode]
def fmt(values):
    return f"{statistics.median(values):8.0f} [{min(values):.0f}-{max(values):.0f}]"
print(f"{'op':11} {'size':>6}  {'native app ns/call':>24}  {'offloaded app ns/call':>24}  "
      f"{'app ratio':>9}  {'engine ns/call':>14}  {'total ratio':>11}")
for op in dict.fromkeys(r["op"] for r in rows):
    for size in ("64", "1024", "4096", "16384"):
        native = series(op, size, "native", "app_cpu_ns_per_call")
        off = series(op, size, "offloaded", "app_cpu_ns_per_call")
        engine = series(op, size, "offloaded", "engine_cpu_ns_per_call")
        if not native or not off:
            continue
        n, o, e = statistics.median(native), statistics.median(off), statistics.median(engine)
        print(f"{op:11} {size:>6}  {fmt(native):>24}  {fmt(off):>24}  {o / n:9.2f}  "
              f"{e:14.0f}  {(o + e) / n:11.2f}")
# async_send/async_recv: their app CPU includes waiting for the jobs (job_wait); the posting
# alone (wall time inside memnet_async_*, the MemNet paper's "cost of send") is shown apart,
# against the native send()/recv() of the same size.
for op, base in (("async_send", "send"), ("async_recv", "recv")):
    for size in ("64", "1024", "4096", "16384"):
        posts = series(op, size, "offloaded", "post_ns_per_call")
        native = series(op, size, "native", "app_cpu_ns_per_call")
        if not posts or not native:
            continue
        post = statistics.median(posts)
        print(f"{op} {size:>6}: posting alone {post:.0f} ns per call, "
              f"{post / statistics.median(native):.3f}x native {base}'s CPU")
EOF
echo "op_cost: raw results in $out" >&2
