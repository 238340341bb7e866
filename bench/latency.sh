#!/usr/bin/env bash
# Experiment 2: round-trip latency of 64 B and 1 KB messages over one TCP connection, native
# (client and server both native) against offloaded (client and server both preloaded, one
# engine). Our own pingpong (client/server), then sockperf ping-pong if it is installed. Native
# and offloaded runs alternate in the same invocation; each configuration runs RUNS times and
# the table shows medians with [min-max].
#
# CPU per round trip comes from the kernel's accounting: the client's CLOCK_PROCESS_CPUTIME_ID
# around its loop, the server's /proc/PID/task/*/schedstat, and the engine's likewise.
#
# Usage: bash bench/latency.sh [BUILD_DIR]   (default: build)
# Environment: RUNS (default 5), SCALE (multiplies round trips and sockperf's seconds; may be
#              fractional, default 1), OUT (CSV, default bench/results/latency.csv).
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
runs=${RUNS:-5}
scale=${SCALE:-1}
out=${OUT:-bench/results/latency.csv}
name=latency
# shellcheck source=bench/lib.sh
source bench/lib.sh

start_engine
taskset -c "$other_core" "$pingpong" --server "$work/native.port" &
pids+=($!)
native_server=$!
taskset -c "$other_core" "${preload[@]}" "$pingpong" --server "$work/offloaded.port" &
pids+=($!)
offloaded_server=$!
wait_file "$work/native.port"
wait_file "$work/offloaded.port"
native_port=$(cat "$work/native.port")
offloaded_port=$(cat "$work/offloaded.port")
expect_engine_listener "$offloaded_port"

echo "latency: client on core $app_core; server and engine (tcpsd --cores $other_core," \
    "spin-then-sleep, --spin-us 50) on core $other_core; $cores cores; $runs runs each" >&2
mkdir -p "$(dirname "$out")"
echo "tool,size,mode,run,p50_us,p99_us,client_cpu_ns_per_rt,server_cpu_ns_per_rt,engine_cpu_ns_per_rt" >"$out"

# One pingpong run: $1 mode, $2 size, $3 round trips, $4 run number.
pingpong_run() {
    local mode=$1 size=$2 count=$3 run=$4 port server runner=() line
    local server0 engine0 server_ns engine_ns
    if [[ $mode == native ]]; then
        port=$native_port server=$native_server
    else
        port=$offloaded_port server=$offloaded_server runner=("${preload[@]}")
    fi
    server0=$(cpu_ns "$server")
    engine0=$(cpu_ns "$engine_pid")
    line=$(taskset -c "$app_core" "${runner[@]}" "$pingpong" --client "$port" "$size" "$count") ||
        die "pingpong $mode $size failed"
    # The client's warm-up round trips (count/10 + 1) ran inside this window too.
    local total=$((count + count / 10 + 1))
    server_ns=$(awk -v a="$server0" -v b="$(cpu_ns "$server")" -v n="$total" 'BEGIN { printf "%.1f", (b - a) / n }')
    engine_ns=0
    if [[ $mode == offloaded ]]; then
        engine_ns=$(awk -v a="$engine0" -v b="$(cpu_ns "$engine_pid")" -v n="$total" 'BEGIN { printf "%.1f", (b - a) / n }')
    fi
    echo "pingpong,$size,$mode,$run,$(field p50_us "$line"),$(field p99_us "$line"),$(field cpu_ns_per_rt "$line"),$server_ns,$engine_ns" >>"$out"
}

for size in 64 1024; do
    count=$(scaled 20000 10)
    for run in $(seq "$runs"); do
        pingpong_run native "$size" "$count" "$run"
        pingpong_run offloaded "$size" "$count" "$run"
    done
done

# sockperf ping-pong (TCP, epoll server): its own timing and percentiles. sockperf prints half
# the round trip; the CSV and the table hold full round trips (doubled).
if command -v sockperf >/dev/null 2>&1; then
    seconds=$(awk -v s="$scale" 'BEGIN { n = int(2 * s + 0.5); print (n < 1) ? 1 : n }')
    free_port() { python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
    native_sp=$(free_port)
    offloaded_sp=$(free_port)
    taskset -c "$other_core" sockperf server --tcp -i 127.0.0.1 -p "$native_sp" >"$work/sp-native.log" 2>&1 &
    pids+=($!)
    native_sp_pid=$!
    taskset -c "$other_core" "${preload[@]}" sockperf server --tcp -i 127.0.0.1 -p "$offloaded_sp" \
        >"$work/sp-offloaded.log" 2>&1 &
    pids+=($!)
    offloaded_sp_pid=$!
    for _ in $(seq 100); do
        (($(ss -tlnH "( sport = :$native_sp or sport = :$offloaded_sp )" | wc -l) == 2)) && break
        sleep 0.05
    done
    expect_engine_listener "$offloaded_sp"

    sockperf_run() {  # $1 mode, $2 size, $3 run
        local mode=$1 size=$2 run=$3 port server runner=() server0 engine0 client_file
        if [[ $mode == native ]]; then
            port=$native_sp server=$native_sp_pid
        else
            port=$offloaded_sp server=$offloaded_sp_pid runner=("${preload[@]}")
        fi
        client_file=$work/sp-client-cpu
        server0=$(cpu_ns "$server")
        engine0=$(cpu_ns "$engine_pid")
        taskset -c "$app_core" "$pingpong" --measure "$client_file" -- "${runner[@]}" \
            sockperf ping-pong --tcp -i 127.0.0.1 -p "$port" -m "$size" -t "$seconds" \
            >"$work/sp.out" 2>&1 || die "sockperf ping-pong $mode $size failed: $(tail -5 "$work/sp.out")"
        python3 - "$work/sp.out" "$mode" "$size" "$run" "$client_file" "$server0" "$(cpu_ns "$server")" \
            "$engine0" "$(cpu_ns "$engine_pid")" >>"$out" <<'PY' || die "cannot parse sockperf's output"
import re, sys
text = open(sys.argv[1]).read()
mode, size, run = sys.argv[2:5]
client_ns = int(open(sys.argv[5]).read())
server_ns = int(sys.argv[7]) - int(sys.argv[6])
engine_ns = int(sys.argv[9]) - int(sys.argv[8]) if mode == "offloaded" else 0
def half_rtt(label):
    m = re.search(r"percentile " + label + r" =\s*([0-9.]+)", text)
    if not m:
        sys.exit("no percentile " + label)
    return float(m.group(1))
# "[Valid Duration] RunTime=1.000 sec; SentMessages=N; ReceivedMessages=N"
m = re.search(r"Valid Duration\].*?ReceivedMessages=(\d+)", text)
if not m or int(m.group(1)) == 0:
    sys.exit("no round trips reported")
# sockperf's count covers its valid window only; CPU covers the whole run (warm-up included),
# so CPU per round trip is an upper bound.
trips = int(m.group(1))
print(f"sockperf,{size},{mode},{run},{2 * half_rtt('50.000'):.2f},{2 * half_rtt('99.000'):.2f},"
      f"{client_ns / trips:.1f},{server_ns / trips:.1f},{engine_ns / trips:.1f}")
PY
    }
    for size in 64 1024; do
        for run in $(seq "$runs"); do
            sockperf_run native "$size" "$run"
            sockperf_run offloaded "$size" "$run"
        done
    done
else
    echo "latency: sockperf is not installed: skipping its runs (apt-get install sockperf)" >&2
fi

check_engine_stats

python3 - "$out" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def series(tool, size, mode, key):
    return [float(r[key]) for r in rows if r["tool"] == tool and r["size"] == size and r["mode"] == mode]
def fmt(values, digits=1):
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"
print("round trip (µs), median [min-max] of runs")
print(f"{'tool':8} {'size':>5}  {'native p50':>20} {'offloaded p50':>20} {'ratio':>5}  "
      f"{'native p99':>20} {'offloaded p99':>20}")
for tool in ("pingpong", "sockperf"):
    for size in ("64", "1024"):
        n50, o50 = series(tool, size, "native", "p50_us"), series(tool, size, "offloaded", "p50_us")
        if not n50 or not o50:
            continue
        n99, o99 = series(tool, size, "native", "p99_us"), series(tool, size, "offloaded", "p99_us")
        print(f"{tool:8} {size:>5}  {fmt(n50):>20} {fmt(o50):>20} "
              f"{statistics.median(o50) / statistics.median(n50):5.2f}  {fmt(n99):>20} {fmt(o99):>20}")
print()
print("CPU per round trip (ns), medians: client + server = apps; engine (offloaded only)")
print(f"{'tool':8} {'size':>5}  {'native apps':>11} {'offl. apps':>11} {'engine':>8} "
      f"{'offl. total':>11} {'total ratio':>11}")
for tool in ("pingpong", "sockperf"):
    for size in ("64", "1024"):
        def apps(mode):
            c = series(tool, size, mode, "client_cpu_ns_per_rt")
            s = series(tool, size, mode, "server_cpu_ns_per_rt")
            return statistics.median([a + b for a, b in zip(c, s)]) if c else None
        native, off = apps("native"), apps("offloaded")
        if native is None or off is None:
            continue
        engine = statistics.median(series(tool, size, "offloaded", "engine_cpu_ns_per_rt"))
        print(f"{tool:8} {size:>5}  {native:11.0f} {off:11.0f} {engine:8.0f} {off + engine:11.0f} "
              f"{(off + engine) / native:11.2f}")
PY
echo "latency: raw results in $out" >&2
