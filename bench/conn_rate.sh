#!/usr/bin/env bash
# Experiment 5: connections per second. HTTP/1.0, one request per connection, a 5-byte file;
# wrk at fixed concurrency sends each request as "GET ... HTTP/1.0" (bench/http10.lua), so the
# server closes every connection after its reply and wrk opens a new one: requests/s is
# connections/s. Native against offloaded (one engine), each server pair running side by side,
# RUNS runs alternating. CPU as in bench/apache.sh: the server's process tree from /proc, the
# engine, the load generator's rusage.
#
# Usage: bash bench/conn_rate.sh [BUILD_DIR]   (default: build)
# Environment: RUNS (default 3), SCALE (seconds per run: 5 at SCALE=1, at least 1),
#              SERVERS (default "nginx apache"), CONNECTIONS (wrk -c, default 16),
#              OUT_DIR (CSV, default bench/results), and PLACEMENT, NGINX_MODE, APACHE_MODE,
#              ENGINE_ARGS (bench/web_lib.sh, bench/lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
runs=${RUNS:-3}
scale=${SCALE:-1}
out_dir=${OUT_DIR:-bench/results}
servers=${SERVERS:-nginx apache}
connections=${CONNECTIONS:-16}
name=conn_rate
# shellcheck source=bench/lib.sh
source bench/lib.sh
# shellcheck source=bench/web_lib.sh
source bench/web_lib.sh

for tool in wrk curl $servers; do
    [[ $tool == apache ]] && tool=apache2
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (bash scripts/setup.sh)"
done
seconds=$(scaled 5)

start_engine
mkdir -p "$out_dir"
csv=$out_dir/conn_rate.csv
echo "server,connections,mode,run,requests,seconds,requests_per_s,p50_ms,p99_ms,errors,server_cpu_ns,engine_cpu_ns,loadgen_cpu_ns,wall_ns,other_cpu_ns" >"$csv"
descriptions=()
for server in $servers; do
    start_server "$server" native
    native_pid=$server_pid native_port=$server_port
    start_server "$server" offloaded
    offloaded_pid=$server_pid offloaded_port=$server_port
    [[ $server == nginx ]] && descriptions+=("$(nginx_description)")
    [[ $server == apache ]] && descriptions+=("$(apache_description)")
    for run in $(seq "$runs"); do
        for mode in native offloaded; do
            if [[ $mode == native ]]; then pid=$native_pid port=$native_port; else pid=$offloaded_pid port=$offloaded_port; fi
            measured_run "$pid" "$work/wrk.txt" $((seconds + 20)) \
                wrk -t1 -c"$connections" -d"${seconds}s" --latency -s bench/http10.lua \
                "http://127.0.0.1:$port/tiny.html"
            fields=$(wrk_fields "$server, $mode") || exit 1
            echo "$server,$connections,$mode,$run,$fields,$run_cpu" >>"$csv"
            wait_quiet "$port"
        done
    done
    stop_servers
done

check_engine_stats
grep 'worker' "$work/engine.log" | tail -n 1 | sed 's/^/conn_rate: engine: /' >&2
echo "conn_rate: placement $placement: servers on core $server_core, wrk on core $loadgen_core," \
    "engine (tcpsd --cores $engine_core, $(engine_mode)) on core $engine_core; $cores cores;" \
    "${seconds}s per run; $runs runs each; load average at the start: $load_at_start" >&2

IFS=';'
echo "Experiment 5: connections/s, HTTP/1.0 (one request per connection), 5-byte file," \
    "wrk -t1 -c$connections; ${descriptions[*]}; placement $placement; engine $(engine_mode)"
unset IFS
"${webtool[@]}" wrk-table "$csv" server
echo "conn_rate: raw results in $csv" >&2
