#!/usr/bin/env bash
# Experiment 3: bulk throughput with iperf3 over 1 and 8 connections (-P 8), native (server and
# client native) against offloaded (server and client both preloaded, one engine). Native and
# offloaded runs alternate in the same invocation; each configuration runs RUNS times and the
# table shows medians with [min-max].
#
# Gbit/s is what the iperf3 client reports as received. CPU comes from the kernel's accounting:
# the server's /proc/PID/task/*/schedstat (it serves one test after another), the client's
# rusage (user + system, through `pingpong --measure`), the engine's schedstat.
#
# Usage: bash bench/throughput.sh [BUILD_DIR]   (default: build)
# Environment: RUNS (default 5), SCALE (multiplies the seconds per run, 5 s at SCALE=1; may be
#              fractional, at least 1 s), OUT (CSV, default bench/results/throughput.csv).
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
runs=${RUNS:-5}
scale=${SCALE:-1}
out=${OUT:-bench/results/throughput.csv}
name=throughput
# shellcheck source=bench/lib.sh
source bench/lib.sh

command -v iperf3 >/dev/null 2>&1 || die "iperf3 is not installed (apt-get install iperf3)"
seconds=$(scaled 5)

free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
listening() { ss -tlnH "( sport = :$1 )" | grep -q .; }

start_engine
# The servers are the applications (core 0); the iperf3 clients generate the load (core 1).
native_port=$(free_port)
taskset -c "$app_core" iperf3 -s -B 127.0.0.1 -p "$native_port" >"$work/server-native.log" 2>&1 &
pids+=($!)
native_server=$!
offloaded_port=$(free_port)
taskset -c "$app_core" "${preload[@]}" iperf3 -s -B 127.0.0.1 -p "$offloaded_port" \
    >"$work/server-offloaded.log" 2>&1 &
pids+=($!)
offloaded_server=$!
for port in "$native_port" "$offloaded_port"; do
    for _ in $(seq 100); do listening "$port" && break; sleep 0.05; done
    listening "$port" || die "iperf3 -s did not listen on port $port"
done
expect_engine_listener "$offloaded_port"

echo "throughput: iperf3 server on core $app_core; iperf3 client and engine (tcpsd --cores" \
    "$other_core, spin-then-sleep, --spin-us 50) on core $other_core; $cores cores;" \
    "${seconds}s per run; $runs runs each" >&2
mkdir -p "$(dirname "$out")"
echo "streams,mode,run,gbit_per_s,bytes,server_cpu_ns,client_cpu_ns,engine_cpu_ns" >"$out"

# One iperf3 test: $1 mode, $2 parallel streams, $3 run number.
iperf_run() {
    local mode=$1 streams=$2 run=$3 port server runner=() server0 engine0 engine_ns
    if [[ $mode == native ]]; then
        port=$native_port server=$native_server
    else
        port=$offloaded_port server=$offloaded_server runner=("${preload[@]}")
    fi
    server0=$(cpu_ns "$server")
    engine0=$(cpu_ns "$engine_pid")
    # iperf3 ends its test on its own; timeout bounds a hang (a fault under test).
    taskset -c "$other_core" "$pingpong" --measure "$work/client-cpu" -- \
        timeout $((seconds + 30)) "${runner[@]}" iperf3 -c 127.0.0.1 -p "$port" \
        -t "$seconds" -P "$streams" -J >"$work/client.json" 2>"$work/client.err" ||
        die "iperf3 -c ($mode, -P $streams) failed: $(tail -c 400 "$work/client.json") $(cat "$work/client.err")"
    # The server finishes its side of the test just after the client; wait for it to go idle so
    # its CPU for this test is all counted.
    sleep 0.2
    engine_ns=0
    [[ $mode == offloaded ]] && engine_ns=$(($(cpu_ns "$engine_pid") - engine0))
    python3 - "$work/client.json" "$streams" "$mode" "$run" "$(($(cpu_ns "$server") - server0))" \
        "$(cat "$work/client-cpu")" "$engine_ns" >>"$out" <<'PY' || die "bad iperf3 report ($mode, -P $streams)"
import json, sys
report = json.load(open(sys.argv[1]))
if "error" in report:
    sys.exit("iperf3 reported: " + report["error"])
received = report["end"]["sum_received"]
if int(received["bytes"]) <= 0:
    sys.exit("no bytes received")
streams, mode, run, server_ns, client_ns, engine_ns = sys.argv[2:8]
print(f"{streams},{mode},{run},{received['bits_per_second'] / 1e9:.3f},{int(received['bytes'])},"
      f"{server_ns},{client_ns},{engine_ns}")
PY
}

for streams in 1 8; do
    for run in $(seq "$runs"); do
        iperf_run native "$streams" "$run"
        iperf_run offloaded "$streams" "$run"
    done
done

check_engine_stats

python3 - "$out" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def runs(streams, mode):
    return [r for r in rows if r["streams"] == streams and r["mode"] == mode]
def fmt(values, digits=2):
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"
def per_gb(rs, key):  # CPU seconds per GB moved
    return [float(r[key]) / float(r["bytes"]) for r in rs]
print("iperf3 throughput (Gbit/s), median [min-max] of runs; CPU in CPU-seconds per GB received")
print(f"{'streams':>7}  {'native Gbit/s':>20} {'offloaded Gbit/s':>20} {'ratio':>5}  "
      f"{'native apps':>11} {'offl. apps':>10} {'engine':>6} {'offl. total':>11} {'total ratio':>11}")
for streams in ("1", "8"):
    native, off = runs(streams, "native"), runs(streams, "offloaded")
    if not native or not off:
        continue
    n_gbps = [float(r["gbit_per_s"]) for r in native]
    o_gbps = [float(r["gbit_per_s"]) for r in off]
    def apps(rs):
        return statistics.median([a + b for a, b in zip(per_gb(rs, "server_cpu_ns"), per_gb(rs, "client_cpu_ns"))])
    n_apps, o_apps = apps(native), apps(off)
    engine = statistics.median(per_gb(off, "engine_cpu_ns"))
    print(f"{streams:>7}  {fmt(n_gbps):>20} {fmt(o_gbps):>20} "
          f"{statistics.median(o_gbps) / statistics.median(n_gbps):5.2f}  {n_apps:11.2f} "
          f"{o_apps:10.2f} {engine:6.2f} {o_apps + engine:11.2f} {(o_apps + engine) / n_apps:11.2f}")
PY
echo "throughput: raw results in $out" >&2
