#!/usr/bin/env bash
# Experiment 4: Apache 2.4 serving a 16 KB file on loopback, native against offloaded, as in the
# TCP Servers paper (Figures 9-12):
#   * httperf, HTTP/1.0, one request per connection, at offered rates from low to past
#     saturation (connections/s);
#   * httperf, HTTP/1.1 sessions of 6 requests on one connection sent in bursts of 3
#     (--wsess=N,6,0 --burst-length=3), offered load in requests/s (6 per session);
#   * wrk at fixed concurrency (HTTP/1.1 keep-alive).
# Two Apache instances run side by side from the start, one native and one preloaded on one
# engine; each load point runs RUNS times, native and offloaded alternating.
#
# Replies/s are httperf's 2xx replies over its test duration. httperf is stopped (SIGINT: it
# still prints its report) just before its generation period ends, so what is in flight then
# (latency x rate: a few connections below saturation) is not waited for. Otherwise, past saturation,
# the connections that wait out --timeout at the end would stretch a 1-second test by a whole
# second and halve replies/s and CPU used. httperf holds at most 1024 connections open
# (FD_SETSIZE): past saturation it reports fd-unavail errors, which count in the errors column.
# It runs without --hog: with it, httperf binds every client port itself and, once earlier
# runs have left tens of thousands of TIME-WAIT sockets on loopback, stalls looking for a free
# one (runs took 60 s and ignored SIGINT); the kernel's choice (tcp_tw_reuse) does not stall.
#
# CPU comes from /proc/PID/stat of the whole Apache process tree (user + system, with the
# children it has reaped), of the engine, and from the load generator's rusage.
#
# Usage: bash bench/apache.sh [BUILD_DIR]   (default: build)
# Environment: RUNS (default 3), SCALE (seconds per point: 5 at SCALE=1, at least 1),
#              HTTP10_LOADS (offered connections/s, default "1000 3000 5000 7000 9000 11000"),
#              HTTP11_LOADS (offered requests/s, default "3000 6000 12000 18000 24000"),
#              HTTPERF_TIMEOUT (seconds, default 1), WRK_CONNECTIONS (default "32"),
#              OUT_DIR (CSVs, default bench/results), and PLACEMENT, APACHE_MODE, ENGINE_ARGS
#              (bench/web_lib.sh, bench/lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
runs=${RUNS:-3}
scale=${SCALE:-1}
out_dir=${OUT_DIR:-bench/results}
http10_loads=${HTTP10_LOADS:-1000 3000 5000 7000 9000 11000}
http11_loads=${HTTP11_LOADS:-3000 6000 12000 18000 24000}
httperf_timeout=${HTTPERF_TIMEOUT:-1}
wrk_connections=${WRK_CONNECTIONS:-32}
name=apache
# shellcheck source=bench/lib.sh
source bench/lib.sh
# shellcheck source=bench/web_lib.sh
source bench/web_lib.sh

for tool in apache2 httperf wrk curl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (bash scripts/setup.sh)"
done
seconds=$(scaled 5)

start_engine
start_server apache native
native_pid=$server_pid native_port=$server_port
start_server apache offloaded
offloaded_pid=$server_pid offloaded_port=$server_port
for port in "$native_port" "$offloaded_port"; do
    check_body "http://127.0.0.1:$port/file16k.bin" "$docroot/file16k.bin"
done

echo "apache: $(apache_description); placement $placement: Apache on core $server_core," \
    "httperf/wrk on core $loadgen_core, engine (tcpsd --cores $engine_core, $(engine_mode))" \
    "on core $engine_core; $cores cores; ${seconds}s per point; $runs runs each;" \
    "httperf --timeout $httperf_timeout; load average at the start: $load_at_start" >&2
mkdir -p "$out_dir"
sweep_csv=$out_dir/apache_httperf.csv
wrk_csv=$out_dir/apache_wrk.csv
echo "workload,offered,mode,run,replies,seconds,replies_per_s,reply_ms,connection_ms,errors,client_timeouts,resets,fd_unavail,server_cpu_ns,engine_cpu_ns,loadgen_cpu_ns,wall_ns,other_cpu_ns" >"$sweep_csv"
echo "server,connections,mode,run,requests,seconds,requests_per_s,p50_ms,p99_ms,errors,server_cpu_ns,engine_cpu_ns,loadgen_cpu_ns,wall_ns,other_cpu_ns" >"$wrk_csv"

pick() {  # sets port and pid for mode $1
    if [[ $1 == native ]]; then port=$native_port pid=$native_pid; else port=$offloaded_port pid=$offloaded_pid; fi
}

# One httperf run: $1 workload (http1.0 or http1.1), $2 offered load, $3 mode, $4 run number.
httperf_run() {
    local workload=$1 offered=$2 mode=$3 run=$4 port pid args parsed replies sessions
    pick "$mode"
    if [[ $workload == http1.0 ]]; then
        args=(--http-version=1.0 --rate "$offered" --num-conns $((offered * seconds)))
    else  # sessions of 6 requests: offered/6 sessions per second
        sessions=$(awk -v o="$offered" -v s="$seconds" 'BEGIN { printf "%d", o * s / 6 + 0.5 }')
        args=(--rate "$(awk -v o="$offered" 'BEGIN { printf "%.3f", o / 6 }')"
            "--wsess=$sessions,6,0" --burst-length=3)
    fi
    # SIGINT 50 ms before the generation period ends: httperf reports what completed by then.
    # Not at its end: a SIGINT that lands while httperf prints its own report makes it print a
    # second report into the first.
    measured_run "$pid" "$work/httperf.txt" "$(awk -v s="$seconds" 'BEGIN { print s - 0.05 }')" \
        httperf --server 127.0.0.1 --port "$port" --uri /file16k.bin \
        --timeout "$httperf_timeout" "${args[@]}"
    parsed=$("${webtool[@]}" httperf "$work/httperf.txt") ||
        die "cannot parse httperf's report ($workload, $offered, $mode): $(cat "$work/httperf.txt")"
    replies=${parsed%%,*}
    ((replies > 0)) || die "no reply at all ($workload, offered $offered, $mode): $(cat "$work/httperf.txt")"
    IFS=, read -r replies secs reply_ms connection_ms errors timeouts resets fd_unavail <<<"$parsed"
    echo "$workload,$offered,$mode,$run,$replies,$secs,$(awk -v r="$replies" -v s="$secs" \
        'BEGIN { printf "%.1f", (s > 0) ? r / s : 0 }'),$reply_ms,$connection_ms,$errors,$timeouts,$resets,$fd_unavail,$run_cpu" >>"$sweep_csv"
    wait_quiet "$port"
}

# One wrk run: $1 connections, $2 mode, $3 run number.
wrk_run() {
    local connections=$1 mode=$2 run=$3 port pid fields
    pick "$mode"
    measured_run "$pid" "$work/wrk.txt" $((seconds + 20)) \
        wrk -t1 -c"$connections" -d"${seconds}s" --latency "http://127.0.0.1:$port/file16k.bin"
    fields=$(wrk_fields "$mode") || exit 1
    echo "apache,$connections,$mode,$run,$fields,$run_cpu" >>"$wrk_csv"
    wait_quiet "$port"
}

for workload in http1.0 http1.1; do
    loads=$http10_loads
    [[ $workload == http1.1 ]] && loads=$http11_loads
    for offered in $loads; do
        for run in $(seq "$runs"); do
            httperf_run "$workload" "$offered" native "$run"
            httperf_run "$workload" "$offered" offloaded "$run"
        done
    done
done
for connections in $wrk_connections; do
    for run in $(seq "$runs"); do
        wrk_run "$connections" native "$run"
        wrk_run "$connections" offloaded "$run"
    done
done

check_engine_stats
grep 'worker' "$work/engine.log" | tail -n 1 | sed 's/^/apache: engine: /' >&2

echo "Experiment 4: $(apache_description), 16 KB file; placement $placement; engine $(engine_mode)"
"${webtool[@]}" sweep-table "$sweep_csv"
echo
echo "wrk -t1 at fixed concurrency (HTTP/1.1 keep-alive), 16 KB file, ${seconds}s per run"
"${webtool[@]}" wrk-table "$wrk_csv" connections
echo "apache: raw results in $sweep_csv and $wrk_csv" >&2
