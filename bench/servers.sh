#!/usr/bin/env bash
# Real servers (issue 10), native against offloaded: memcached, lighttpd, Node.js, HAProxy and
# PostgreSQL, each under a load generator that keeps it busy, RUNS runs alternating between a
# native and an offloaded instance running side by side. Requests (or operations, or
# transactions) per second, and CPU per request: the server's process tree, the engine, the load
# generator, as bench/conn_rate.sh measures them (bench/web_lib.sh's measured_run).
#
#   memcached   memcached -t 4;            memcaslap -T1 -c32, 1 KB values, 90% gets
#   lighttpd    one process, sendfile;     wrk -t1 -c32, keep-alive, a 16 KB file
#   node        tests/integration/node_server.js (one process, the file from memory); the same
#   node_cluster the same as a cluster: a primary that accepts each connection and passes it
#               with SCM_RIGHTS to one of 2 workers (Node's round-robin); the same load
#   haproxy     nbthread 1, mode http, in front of a native nginx (one process) that serves a
#               5-byte file; wrk -t1 -c32, keep-alive (HAProxy reuses its backend connections)
#   postgresql  fsync off, 32 MB shared buffers, pgbench -i -s 4; pgbench -S -M prepared -c 8
#               -j 1 (select-only transactions: one query round trip each)
#
# Usage: bash bench/servers.sh [BUILD_DIR]   (default: build)
# Environment: RUNS (default 3), SCALE (seconds per run: 5 at SCALE=1, at least 1), SERVERS
#              (default "memcached lighttpd node haproxy postgresql": those installed),
#              OUT_DIR (CSV, default bench/results), PLACEMENT, ENGINE_ARGS, MAX_OTHER_CORES
#              (bench/web_lib.sh, bench/lib.sh), PROFILE_DIR (see below).
#
# PROFILE_DIR=DIR: before the measured runs, one more offloaded run (not measured) under
# `perf record -g` of the server's processes and the engine; DIR/SERVER.data, and in
# DIR/SERVER.txt perf's split of the samples by process and DSO, then by symbol.
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
runs=${RUNS:-3}
scale=${SCALE:-1}
out_dir=${OUT_DIR:-bench/results}
servers=${SERVERS:-memcached lighttpd node haproxy postgresql}
name=servers
# shellcheck source=bench/lib.sh
source bench/lib.sh
# shellcheck source=bench/web_lib.sh
source bench/web_lib.sh

for tool in wrk curl; do command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"; done
seconds=$(scaled 5)
pg_bin=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
    sort -V | tail -n 1)
available() {
    case $1 in
    memcached) command -v memcached && command -v memcaslap ;;
    lighttpd) command -v lighttpd ;;
    node | node_cluster) command -v node ;;
    haproxy) command -v haproxy && command -v nginx ;;
    postgresql) [[ -n $pg_bin && -x $pg_bin/pgbench ]] && ((EUID == 0)) && id postgres ;;
    *) die "unknown server '$1'" ;;
    esac
}

# --- one server of kind $1, native or offloaded ($2), pinned to the server core ---
# Sets server_pid (the root of its process tree) and server_port.

start_memcached() {
    "${taskset[@]}" "${runner[@]}" memcached -l 127.0.0.1 -p "$server_port" -U 0 -t 4 -m 256 \
        -c 4096 -u nobody >"$dir/log" 2>&1 &
    server_pid=$!
    server_roots+=("$server_pid")
    for _ in $(seq 200); do
        python3 -c 'import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"version\r\n")
sys.exit(0 if s.recv(100).startswith(b"VERSION") else 1)' "$server_port" 2>/dev/null && return 0
        sleep 0.05
    done
    die "memcached does not answer"
}

start_lighttpd() {
    cat >"$dir/lighttpd.conf" <<EOF
server.document-root = "$docroot"
server.bind = "127.0.0.1"
server.port = $server_port
server.username = "www-data"
server.groupname = "www-data"
server.errorlog = "$dir/error.log"
server.event-handler = "linux-sysepoll"
server.network-backend = "sendfile"
server.max-keep-alive-requests = 100000
server.max-connections = 4096
mimetype.assign = ("" => "application/octet-stream")
EOF
    chown www-data "$dir"
    "${taskset[@]}" "${runner[@]}" lighttpd -D -f "$dir/lighttpd.conf" >"$dir/log" 2>&1 &
    server_pid=$!
    server_roots+=("$server_pid")
    wait_http "http://127.0.0.1:$server_port/tiny.html"
}

start_node() {
    "${taskset[@]}" "${runner[@]}" node tests/integration/node_server.js "$dir/port" "$docroot" \
        ${node_workers:+"$node_workers"} >"$dir/log" 2>&1 &
    server_pid=$!
    server_roots+=("$server_pid")
    wait_file "$dir/port"
    server_port=$(<"$dir/port")
    wait_http "http://127.0.0.1:$server_port/tiny.html"
}

start_node_cluster() { node_workers=2 start_node; }

# The backend of both HAProxies: a native nginx on the load generator's core.
backend_port=
start_backend() {
    [[ -z $backend_port ]] || return 0
    backend_port=$(free_port)
    local conf
    conf=$(nginx_conf "$work/backend" "$backend_port")
    taskset -c "$loadgen_core" nginx -p "$work/backend" -c "$conf" >"$work/backend/log" 2>&1 &
    server_roots+=($!)
    wait_http "http://127.0.0.1:$backend_port/tiny.html"
}

start_haproxy() {
    start_backend
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend web
    bind 127.0.0.1:$server_port
    default_backend nginx
backend nginx
    http-reuse always
    server nginx 127.0.0.1:$backend_port
EOF
    "${taskset[@]}" "${runner[@]}" haproxy -db -f "$dir/haproxy.cfg" >"$dir/log" 2>&1 &
    server_pid=$!
    server_roots+=("$server_pid")
    wait_http "http://127.0.0.1:$server_port/tiny.html"
}

start_postgresql() {
    mkdir -p "$dir/data" "$dir/socket"
    chown postgres: "$dir/data" "$dir/socket"
    chmod 700 "$dir/data"
    local as_postgres=(setpriv --reuid postgres --regid postgres --init-groups --)
    "${as_postgres[@]}" "$pg_bin/initdb" -D "$dir/data" -U postgres -A trust --no-sync \
        >"$dir/initdb.log" 2>&1 || die "initdb failed: $(tail -n 3 "$dir/initdb.log")"
    "${taskset[@]}" "${as_postgres[@]}" "${runner[@]}" "$pg_bin/postgres" -D "$dir/data" \
        -p "$server_port" -c listen_addresses=127.0.0.1 -c unix_socket_directories="$dir/socket" \
        -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB \
        -c max_connections=50 >"$dir/log" 2>&1 &
    server_pid=$!
    server_roots+=("$server_pid")
    for _ in $(seq 400); do
        "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$server_port" -U postgres -d postgres && break
        sleep 0.05
    done
    "$pg_bin/pgbench" -h 127.0.0.1 -p "$server_port" -U postgres -i -s 4 -q postgres \
        >"$dir/init.log" 2>&1 || die "pgbench -i failed: $(tail -n 3 "$dir/init.log")"
}

start_one() {
    local kind=$1 mode=$2
    dir=$work/$kind-$mode
    mkdir -p "$dir"
    chmod 755 "$dir"
    server_port=$(free_port)
    runner=()
    [[ $mode == offloaded ]] && runner=("${preload[@]}")
    taskset=(taskset -c "$server_core")
    "start_$kind"
    [[ $mode == offloaded ]] && expect_engine_listener "$server_port"
    return 0
}

# --- one measured run against port $2 of server $1 (root pid $3); sets run_cpu (measured_run)
# and writes the CSV fields requests,seconds,p50_ms,p99_ms,errors to $work/parsed ---
measure() {
    local kind=$1 port=$2 pid=$3 report=$work/report.txt
    case $kind in
    memcached)
        measured_run "$pid" "$report" $((seconds + 20)) \
            memcaslap -s "127.0.0.1:$port" -T 1 -c 32 -X 1024 -t "${seconds}s"
        python3 -c 'import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)", text)
sys.exit("no result in memcaslap report") if not m else None
print(f"{m.group(2)},{m.group(1)},0,0,0")' "$report" >"$work/parsed"
        ;;
    lighttpd | node | node_cluster | haproxy)
        local path=/file16k.bin
        [[ $kind == haproxy ]] && path=/tiny.html
        measured_run "$pid" "$report" $((seconds + 20)) \
            wrk -t1 -c32 -d"${seconds}s" --latency "http://127.0.0.1:$port$path"
        "${webtool[@]}" wrk "$report" >"$work/parsed"
        ;;
    postgresql)
        measured_run "$pid" "$report" $((seconds + 20)) \
            "$pg_bin/pgbench" -h 127.0.0.1 -p "$port" -U postgres -S -M prepared -c 8 -j 1 -n \
            -T "$seconds" postgres
        python3 -c 'import re, sys
text = open(sys.argv[1]).read()
n = re.search(r"actually processed: (\d+)", text)
tps = re.search(r"tps = ([\d.]+) \(without", text)
lat = re.search(r"latency average = ([\d.]+) ms", text)
failed = re.search(r"number of failed transactions: (\d+)", text)
sys.exit("no result in pgbench report") if not (n and tps) else None
print(f"{n.group(1)},{int(n.group(1)) / float(tps.group(1)):.3f},{lat.group(1)},0,"
      f"{failed.group(1) if failed else 0}")' "$report" >"$work/parsed"
        ;;
    esac
}

# An offloaded run (not measured) under perf record -g: the server's processes and the engine.
profile() {
    local kind=$1 port=$2 pid=$3 data=$PROFILE_DIR/$1.data targets
    command -v perf >/dev/null 2>&1 || die "perf is not installed (linux-perf)"
    mkdir -p "$PROFILE_DIR"
    targets=$(descendants "$pid" | tr '\n' ',')$engine_pid
    perf record -g -o "$data" -p "$targets" -- sleep "$((seconds > 2 ? seconds - 1 : 1))" \
        >"$PROFILE_DIR/$kind.record.log" 2>&1 &
    local perf_pid=$!
    measure "$kind" "$port" "$pid" || die "$kind (profiled): no result"
    wait "$perf_pid" || die "perf record failed: $(tail -n 3 "$PROFILE_DIR/$kind.record.log")"
    {
        echo "# perf record -g -p <$kind's processes>,<tcpsd> during: $(head -c 200 "$work/parsed")"
        perf report -i "$data" --no-children --sort comm,dso --stdio -g none 2>/dev/null |
            grep -v '^$' || true
        perf report -i "$data" --no-children --sort comm,dso,sym --stdio -g none 2>/dev/null |
            grep -v '^$' | head -n 80 || true
    } >"$PROFILE_DIR/$kind.txt"
    wait_quiet "$port"
}

start_engine
mkdir -p "$out_dir"
csv=$out_dir/servers.csv
echo "server,connections,mode,run,requests,seconds,requests_per_s,p50_ms,p99_ms,errors,server_cpu_ns,engine_cpu_ns,loadgen_cpu_ns,wall_ns,other_cpu_ns" >"$csv"
measured=()
for server in $servers; do
    if ! available "$server" >/dev/null 2>&1; then
        echo "$name: $server skipped: not installed (or PostgreSQL without root)" >&2
        continue
    fi
    start_one "$server" native
    native_pid=$server_pid native_port=$server_port
    start_one "$server" offloaded
    offloaded_pid=$server_pid offloaded_port=$server_port
    measured+=("$server")
    # HAProxy's nginx is none of the three measured parties: it counts as "other", so a retry
    # for a busy machine (MAX_OTHER_CORES) would only measure it again.
    max_other_cores=${MAX_OTHER_CORES:-}
    [[ $server == haproxy ]] && max_other_cores=
    if [[ -n ${PROFILE_DIR:-} ]]; then profile "$server" "$offloaded_port" "$offloaded_pid"; fi
    for run in $(seq "$runs"); do
        for mode in native offloaded; do
            if [[ $mode == native ]]; then pid=$native_pid port=$native_port; else pid=$offloaded_pid port=$offloaded_port; fi
            measure "$server" "$port" "$pid" || die "$server ($mode): no result"
            IFS=, read -r requests secs p50 p99 errors <"$work/parsed"
            ((requests > 0)) || die "$server ($mode): no request was served"
            echo "$server,32,$mode,$run,$requests,$secs,$(awk -v r="$requests" -v s="$secs" \
                'BEGIN { printf "%.1f", (s > 0) ? r / s : 0 }'),$p50,$p99,$errors,$run_cpu" >>"$csv"
            [[ $server == memcached || $server == postgresql ]] || wait_quiet "$port"
        done
    done
    stop_servers
    backend_port=
done

check_engine_stats
grep 'worker' "$work/engine.log" | tail -n 1 | sed 's/^/servers: engine: /' >&2
echo "servers: placement $placement: servers on core $server_core, load generators (and" \
    "HAProxy's nginx) on core $loadgen_core, engine (tcpsd --cores $engine_core," \
    "$(engine_mode)) on core $engine_core; $cores cores; ${seconds}s per run; $runs runs each;" \
    "load average at the start: $load_at_start" >&2
echo "Real servers: ${measured[*]}; placement $placement; engine $(engine_mode)" \
    "(p50/p99: wrk's; pgbench's p50 column is its mean latency; memcaslap none)"
"${webtool[@]}" wrk-table "$csv" server
echo "servers: raw results in $csv" >&2
