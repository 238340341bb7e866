#!/usr/bin/env bash
# Runs every benchmark in turn and prints all their tables: op_cost.sh (experiment 1: CPU per
# send/recv), latency.sh (experiment 2: round trips), throughput.sh (experiment 3: iperf3),
# web_demo.sh (the web server demo), apache.sh (experiment 4: Apache under httperf and wrk) and
# conn_rate.sh (experiment 5: connections/s, nginx and Apache) and scale.sh (experiment 6:
# Apache on N cores against N-E cores and E engine workers; with 4 cores or more, and in
# --smoke). Each compares native and offloaded in the same run. Then plot.sh draws the web
# experiments' plots.
#
# Usage: bash bench/run.sh [--short|--full|--smoke] [BUILD_DIR]   (default: --short build)
#   --short  RUNS=3, small counts: under 5 minutes on a 2-core machine
#   --full   RUNS=10, larger counts and longer runs: for publication
#   --smoke  RUNS=1, tiny counts: only checks that every run works and every table appears
#            (tests/bench runs it); its numbers mean nothing
# RUNS in the environment overrides the mode's. Raw CSVs and the plots (SVG) go to
# bench/results/ (RESULTS_DIR in the environment: elsewhere). PLACEMENT, APACHE_MODE, NGINX_MODE and ENGINE_ARGS pass through to the web
# experiments (bench/web_lib.sh).
# Fails if a script fails or its table is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=short
build=build
for arg in "$@"; do
    case $arg in
    --short) mode=short ;;
    --full) mode=full ;;
    --smoke) mode=smoke ;;
    -*)
        echo "usage: bash bench/run.sh [--short|--full|--smoke] [BUILD_DIR]" >&2
        exit 2
        ;;
    *) build=$arg ;;
    esac
done

# Per mode: runs; op_cost's, latency's and throughput's SCALE
# (fractional: 1 means 20,000 round trips and 2 s of sockperf, and 5 s per iperf3 run); the web
# demo's seconds per run; the web experiments' runs, SCALE (1 means 5 s per load point or run)
# and offered loads (httperf: HTTP/1.0 connections/s, HTTP/1.1 requests/s).
case $mode in
smoke)
    runs=1 op_scale=0.05 latency_scale=0.05 throughput_scale=0.2 web_seconds=1
    web_runs=1 web_scale=0.2
    http10_loads="500 2000" http11_loads="1200 6000"
    ;;
short)
    runs=3 op_scale=1 latency_scale=0.25 throughput_scale=0.4 web_seconds=3
    web_runs=3 web_scale=0.2
    http10_loads="1000 3000 5000 7000 9000 11000" http11_loads="3000 6000 12000 18000 24000"
    ;;
full)
    runs=10 op_scale=2 latency_scale=2 throughput_scale=2 web_seconds=10
    web_runs=5 web_scale=1
    http10_loads="1000 2000 3000 4000 5000 6000 7000 8000 9000 10000 12000"
    http11_loads="3000 6000 9000 12000 15000 18000 21000 24000 30000"
    ;;
esac
runs=${RUNS:-$runs}
web_runs=${RUNS:-$web_runs}

# The smoke run is a test: what the host lacks makes it skip (exit 77, meson's SKIP), not fail.
missing_exit=1
[[ $mode == smoke ]] && missing_exit=77
for needed in engine/tcpsd preload/libtcps.so bench/op_cost bench/pingpong; do
    [[ -e $build/$needed ]] ||
        { echo "run.sh: $build/$needed is missing: build it first (ninja -C $build)" >&2; exit $missing_exit; }
done
for tool in python3 taskset ss iperf3 curl httperf wrk apache2 nginx gnuplot; do
    command -v "$tool" >/dev/null 2>&1 ||
        { echo "run.sh: $tool is not installed (bash scripts/setup.sh)" >&2; exit $missing_exit; }
done

results=$(mktemp -d "${TMPDIR:-/tmp}/tcps-bench.XXXXXX")
trap 'rm -rf "$results"' EXIT
# The smoke run's numbers mean nothing: keep its CSVs out of bench/results/.
csv_dir=${RESULTS_DIR:-bench/results}
[[ $mode == smoke ]] && csv_dir=$results
mkdir -p "$csv_dir"

echo "bench/run.sh --$mode: RUNS=$runs (web experiments: $web_runs), build $build, $(nproc) cores, $(uname -r)"
echo "placement: application on core 0; peer or load generator and the engine on core $(($(nproc) - 1))," \
    "in native and offloaded runs alike"
[[ ${PLACEMENT:-split} == shared ]] &&
    echo "placement of experiments 4 and 5 (PLACEMENT=shared): server and engine on core 0, load generator on core $(($(nproc) - 1))"

failed=()
# $1: title, $2: a regular expression for the table's last row, then the command (environment
# first).
experiment() {
    local title=$1 table_mark=$2 log
    shift 2
    log=$results/$(tr -c 'a-z0-9' '_' <<<"$title").txt
    printf '\n== %s\n' "$title"
    local started=$SECONDS status=0
    env "$@" >"$log" 2>"$log.err" || status=$?
    cat "$log"
    sed 's/^/   /' "$log.err" >&2
    if ((status != 0)); then
        echo "run.sh: $title failed with status $status" >&2
        failed+=("$title")
    elif ! grep -qE -- "$table_mark" "$log"; then
        echo "run.sh: $title printed no table ('$table_mark' is missing)" >&2
        failed+=("$title")
    fi
    echo "($((SECONDS - started)) s)"
}

experiment "experiment 1: CPU per send/recv (op_cost.sh)" '^recv +16384 +[0-9]' \
    OUT="$csv_dir/op_cost.csv" RUNS="$runs" SCALE="$op_scale" bash bench/op_cost.sh "$build"
experiment "experiment 1b: the MemNet API, CPU per call (op_cost.sh)" '^async_send +16384 +[0-9]' \
    OUT="$csv_dir/op_cost_memnet.csv" RUNS="$runs" SCALE="$(awk -v s="$op_scale" 'BEGIN { print s / 4 }')" \
    OPS="send send_direct async_send recv recv_direct async_recv" bash bench/op_cost.sh "$build"
experiment "experiment 2: round-trip latency (latency.sh)" '^pingpong +1024 +[0-9]' \
    OUT="$csv_dir/latency.csv" RUNS="$runs" SCALE="$latency_scale" bash bench/latency.sh "$build"
experiment "experiment 3: bulk throughput, iperf3 (throughput.sh)" '^ +8 +[0-9]' \
    OUT="$csv_dir/throughput.csv" RUNS="$runs" SCALE="$throughput_scale" bash bench/throughput.sh "$build"
experiment "web demo: Apache (mpm_event) under wrk (web_demo.sh)" 'ratio offloaded / native +[0-9]' \
    DURATION="$web_seconds" bash bench/web_demo.sh "$build"
experiment "experiment 4: Apache, 16 KB file, httperf and wrk (apache.sh)" '^ +32 +[0-9]+ \[' \
    OUT_DIR="$csv_dir" RUNS="$web_runs" SCALE="$web_scale" HTTP10_LOADS="$http10_loads" \
    HTTP11_LOADS="$http11_loads" bash bench/apache.sh "$build"
experiment "experiment 5: connections/s, HTTP/1.0 (conn_rate.sh)" '^ +apache +[0-9]+ \[' \
    OUT_DIR="$csv_dir" RUNS="$web_runs" SCALE="$web_scale" bash bench/conn_rate.sh "$build"
# On fewer than 4 cores the engine can only share Apache's core, which scale.sh measures in
# --smoke (that it works) and nowhere else.
if [[ $mode == smoke ]] || (($(nproc) >= 4)); then
    experiment "experiment 6: Apache over N cores, native and offloaded (scale.sh)" '^ +1 +[0-9]+ \[' \
        OUT_DIR="$csv_dir" RUNS="$web_runs" SCALE="$web_scale" bash bench/scale.sh "$build"
else
    printf '\n== experiment 6 (scale.sh): left out, %s cores (it needs 4 or more)\n' "$(nproc)"
fi
experiment "plots of experiments 4 and 5 (plot.sh)" 'cpu-per-request.svg' \
    bash bench/plot.sh "$csv_dir"

if ((${#failed[@]} > 0)); then
    printf '\nrun.sh: failed: %s\n' "${failed[*]}" >&2
    exit 1
fi
printf '\nrun.sh: all tables printed (raw CSVs in %s)\n' "$csv_dir"
