#!/usr/bin/env bash
# Issue 11's scaling question: Apache (mpm_event) on N cores natively, against Apache on N-E of
# those cores with E engine workers (tcpsd --cores) on the other E: the same N cores for the
# server side in both, the load generator (wrk) on cores of its own. Two workloads: wrk at
# fixed concurrency (HTTP/1.1 keep-alive, 16 KB file) and connections/s (HTTP/1.0, one request
# per connection, 5-byte file: bench/http10.lua). For each E, native and offloaded runs
# alternate, RUNS times each; one engine per E, its statistics line printed after its runs
# (accepts per worker: one family served by all of them).
#
# Made for a machine with many cores (the 16-core device machine: 12 server cores, 4 for wrk);
# on fewer it still runs, with the engine on the application's cores where N-E < 1 (said).
#
# Usage: bash bench/scale.sh [BUILD_DIR]   (default: build)
# Environment: RUNS (default 3), SCALE (seconds per run: 5 at SCALE=1, at least 1),
#              SERVER_CORES (a list, default all but the last quarter of the cores),
#              LOADGEN_CORES (a list, default the last quarter, at least one core; wrk gets one
#              thread on each), ENGINE_WORKERS (the values of E, default "1 2 3" as far as
#              they leave a core for Apache), WRK_CONNECTIONS (default 32 per wrk thread),
#              WORKLOADS (default "keepalive connections"), OUT_DIR (CSVs, default
#              bench/results), ENGINE_ARGS (bench/lib.sh), APACHE_MODE (bench/web_lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
runs=${RUNS:-3}
scale=${SCALE:-1}
out_dir=${OUT_DIR:-bench/results}
workloads=${WORKLOADS:-keepalive connections}
name=scale
# shellcheck source=bench/lib.sh
source bench/lib.sh
# shellcheck source=bench/web_lib.sh
source bench/web_lib.sh

for tool in apache2 wrk curl ss; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (bash scripts/setup.sh)"
done
seconds=$(scaled 5)

# "a,b,c" from a --cores style list (ranges expanded), for slicing.
expand_cores() {
    local part out=() a b
    IFS=, read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ $part == *-* ]]; then
            a=${part%-*} b=${part#*-}
            for ((c = a; c <= b; c++)); do out+=("$c"); done
        else
            out+=("$part")
        fi
    done
    (IFS=,; echo "${out[*]}")
}
loadgen_count=$((cores >= 4 ? cores / 4 : 1))
if ((cores > loadgen_count)); then
    default_server="0-$((cores - loadgen_count - 1))"
else
    default_server=0
fi
default_loadgen="$((cores - loadgen_count))-$((cores - 1))"
IFS=, read -r -a server_list <<<"$(expand_cores "${SERVER_CORES:-$default_server}")"
IFS=, read -r -a loadgen_list <<<"$(expand_cores "${LOADGEN_CORES:-$default_loadgen}")"
n=${#server_list[@]}
threads=${#loadgen_list[@]}
wrk_connections=${WRK_CONNECTIONS:-$((32 * threads))}
loadgen_core=$(IFS=,; echo "${loadgen_list[*]}")
all_server=$(IFS=,; echo "${server_list[*]}")
if [[ -n ${ENGINE_WORKERS:-} ]]; then
    read -r -a engine_counts <<<"$ENGINE_WORKERS"
else
    engine_counts=()
    for e in 1 2 3; do ((e < n)) && engine_counts+=("$e"); done
    ((${#engine_counts[@]})) || engine_counts=(1)
fi

mkdir -p "$out_dir"
wrk_csv=$out_dir/scale_keepalive.csv
conn_csv=$out_dir/scale_connections.csv
header="engine_workers,connections,mode,run,requests,seconds,requests_per_s,p50_ms,p99_ms,errors,server_cpu_ns,engine_cpu_ns,loadgen_cpu_ns,wall_ns,other_cpu_ns"
echo "$header" >"$wrk_csv"
echo "$header" >"$conn_csv"

echo "scale: $(apache_description); native Apache on cores $all_server ($n); wrk -t$threads" \
    "-c$wrk_connections on cores $loadgen_core; E engine workers for E in ${engine_counts[*]};" \
    "${seconds}s per run, $runs runs each; load average at the start: $load_at_start" >&2

server_core=$all_server
start_server apache native
native_pid=$server_pid native_port=$server_port
check_body "http://127.0.0.1:$native_port/file16k.bin" "$docroot/file16k.bin"

# One measured wrk run: $1 workload, $2 E, $3 mode, $4 run, $5 server pid, $6 port.
wrk_run() {
    local workload=$1 e=$2 mode=$3 run=$4 pid=$5 port=$6 csv url extra=()
    if [[ $workload == keepalive ]]; then
        csv=$wrk_csv url="http://127.0.0.1:$port/file16k.bin"
    else
        csv=$conn_csv url="http://127.0.0.1:$port/tiny.html" extra=(-s bench/http10.lua)
    fi
    measured_run "$pid" "$work/wrk.txt" $((seconds + 20)) \
        wrk -t"$threads" -c"$wrk_connections" -d"${seconds}s" --latency "${extra[@]}" "$url"
    local fields
    fields=$(wrk_fields "$workload, E=$e, $mode") || exit 1
    echo "$e,$wrk_connections,$mode,$run,$fields,$run_cpu" >>"$csv"
    wait_quiet "$port"
}

for e in "${engine_counts[@]}"; do
    if ((e < n)); then
        app_cores=$(IFS=,; echo "${server_list[*]:0:n-e}")
        engine_core=$(IFS=,; echo "${server_list[*]:n-e:e}")
    else
        # Fewer cores than the comparison needs: the engine shares the application's.
        app_cores=$all_server
        engine_core=$(IFS=,; echo "${server_list[*]:0:e}")
        echo "scale: E=$e leaves no core for Apache: the engine shares its cores" >&2
    fi
    rm -f "$work/ready" "$work/engine.sock"
    : >"$work/engine.log"
    start_engine
    server_core=$app_cores
    start_server apache offloaded
    offloaded_pid=$server_pid offloaded_port=$server_port
    check_body "http://127.0.0.1:$offloaded_port/file16k.bin" "$docroot/file16k.bin"
    echo "scale: E=$e: offloaded Apache on cores $app_cores, tcpsd --cores $engine_core" >&2
    for run in $(seq "$runs"); do
        for workload in $workloads; do
            wrk_run "$workload" "$e" native "$run" "$native_pid" "$native_port"
            wrk_run "$workload" "$e" offloaded "$run" "$offloaded_pid" "$offloaded_port"
        done
    done
    check_engine_stats
    echo "scale: E=$e engine: $(grep -a 'worker' "$work/engine.log" | grep -a accepts |
        sed -E 's/.*(worker [0-9]+).*(accepts [0-9]+).*(busy [0-9]+%).*/\1: \2, \3/' | paste -sd';')"
    stop_server "$offloaded_pid"
    kill -TERM "$engine_pid"
    wait "$engine_pid" 2>/dev/null || true
done

for workload in $workloads; do
    csv=$wrk_csv
    [[ $workload == connections ]] && csv=$conn_csv
    echo
    if [[ $workload == keepalive ]]; then
        echo "Keep-alive (HTTP/1.1), 16 KB file, wrk -t$threads -c$wrk_connections; native Apache on $n cores;" \
            "offloaded on N-E cores and E engine workers"
    else
        echo "Connections/s (HTTP/1.0, one request each), 5-byte file, wrk -t$threads -c$wrk_connections;" \
            "native Apache on $n cores; offloaded on N-E cores and E engine workers"
    fi
    "${webtool[@]}" wrk-table "$csv" engine_workers
done
echo "scale: raw results in $wrk_csv and $conn_csv" >&2
