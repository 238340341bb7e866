#!/usr/bin/env bash
# Node.js (libuv: epoll, accept4, read, writev) under the shim, with the engine on its own core:
# node_server.js, a small HTTP server of ours on an ephemeral port, serves files from memory and
# streamed from disk and echoes POST bodies. Clients check every byte: http_check (plain:
# HTTP/1.0, keep-alive, 10 MB bodies), then node_client.js (GETs of 0 B to 10 MB and POSTs of
# 0 B to 2 MB echoed back with their SHA-256; keep-alive and a connection per request), plain
# and preloaded. ss proves that the listener and both ends of the connections were tcpsd's; after
# SIGTERM node exits 0 and the engine holds nothing. Then the same server as a cluster (a
# primary that accepts and passes each connection to one of 2 workers, Node's default), whose
# workers must get every byte of every request.
#
# Development knob: TCPS_NATIVE=1 (kernel TCP, see servers_lib.sh).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

HTTP_CHECK=${HTTP_CHECK:?HTTP_CHECK names the http_check client}
need_tool node ss timeout
[[ -n $PYTHON ]] || skip "python3 is not installed"
here=$(cd "$(dirname "$0")" && pwd)

dir=$TCPS_TEST_DIR
site=$dir/site
mkdir -p "$site"
head -c 16384 /dev/urandom >"$site/f16k"
head -c $((10 << 20)) /dev/urandom >"$site/f10m"
for size in 0 1 65535 65536 65537 1000000 3000000; do
    head -c "$size" /dev/urandom >"$site/s$size"
done

start_offload
log "node $(node --version) (libuv $(node -p process.versions.uv))"
"${OFFLOAD[@]}" node "$here/node_server.js" "$dir/port" "$site" >"$dir/server.log" 2>&1 &
server_pid=$!
track "$server_pid"
port=$(wait_for_port_file 20 "$dir/port") ||
    fail "node_server.js did not start listening: $(tail -n 5 "$dir/server.log")"
log "node_server.js (pid $server_pid) on port $port"
if offloaded; then expect_engine_listener "$port" "$server_pid"; fi
run_standard_loads "$port" "$site" "$server_pid" "streamed from disk"

# node_client.js under runner $1 (plain or preloaded), keep-alive $2, recording both ends of
# port $port's connections; every byte checked.
node_client() {
    local runner=() status=0 pid out=$dir/client-$1-$2.out
    if [[ $1 == preloaded ]]; then runner=("${OFFLOAD[@]}"); fi
    "${runner[@]}" node "$here/node_client.js" --port "$port" --site "$site" --gets 200 \
        --posts 40 --concurrency 8 --keep-alive "$2" >"$out" 2>&1 &
    pid=$!
    track "$pid"
    record_sockets "( sport = :$port or dport = :$port )" "$pid" 120 "$dir/ss-client-$1-$2.txt"
    wait_pid "$pid" 120 || status=$?
    sed 's/^/  /' "$out"
    ((status == 0)) || fail "node_client.js ($1, keep-alive $2) failed (status $status)"
    if offloaded; then
        local allowed=()
        if [[ $1 == plain ]]; then allowed=("$pid"); fi
        expect_no_strangers "$dir/ss-client-$1-$2.txt" "$port" "${allowed[@]}"
        grep -q "pid=$ENGINE_PID," "$dir/ss-client-$1-$2.txt" ||
            fail "no connection of tcpsd's on port $port was seen while node_client.js ran"
    fi
}
for runner in plain preloaded; do
    for keep_alive in yes no; do
        log "node_client.js, ${runner/plain/not preloaded}, keep-alive $keep_alive:" \
            "200 GETs and 40 POSTs, 8 at a time"
        node_client "$runner" "$keep_alive"
    done
done

stats=$(curl -sS --max-time 5 "http://127.0.0.1:$port/stats") || fail "GET /stats failed"
log "node_server.js counted $stats"
requests=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])["requests"])' "$stats")
# run_standard_loads' 4,020 requests and node_client.js's 4 x 240
((requests >= 4020 + 960)) || fail "node_server.js answered only $requests requests"

kill -TERM "$server_pid"
status=0
wait_pid "$server_pid" 10 || status=$?
((status == 0)) || fail "node_server.js exited with status $status after SIGTERM"
expect_engine_empty 20 "$port"
if offloaded; then
    # Every connection node saw is one the engine accepted for it (this engine served no other).
    connections=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])["connections"])' \
        "$stats")
    accepts=$(sed -n 's/.* accepts \([0-9]*\),.*/\1/p' <<<"$LAST_STATS")
    [[ $accepts == "$connections" ]] ||
        fail "the engine accepted ${accepts:-?} connections, node_server.js saw $connections"
    log "evidence: the engine accepted all $accepts connections node_server.js saw"
fi

# Node's cluster, round-robin (its default on Linux): the primary accepts each connection and
# passes it to a worker with SCM_RIGHTS before anything has read it, so the connection goes
# back to the kernel (docs/architecture.md, "fd passing") with the request that had already
# arrived, which the engine only peeked: the workers must get every byte.
log "cluster: a primary and 2 workers; the primary accepts and passes each connection on"
"${OFFLOAD[@]}" node "$here/node_server.js" "$dir/cluster.port" "$site" 2 \
    >"$dir/cluster.log" 2>&1 &
primary_pid=$!
track "$primary_pid"
port=$(wait_for_port_file 20 "$dir/cluster.port") ||
    fail "the cluster did not start listening: $(tail -n 5 "$dir/cluster.log")"
workers=$(pgrep -P "$primary_pid" | tr '\n' ' ')
log "  primary $primary_pid, workers $workers, port $port"
if offloaded; then expect_engine_listener "$port" "$primary_pid"; fi
check=(--port "$port" --expect "$site/f16k" --path /f16k --concurrency 8)
http_load cluster10 60 "${check[@]}" --mode 10 --requests 1000
http_load cluster11 60 "${check[@]}" --mode 11 --per-conn 10 --requests 1000
for keep_alive in yes no; do
    log "node_client.js, preloaded, keep-alive $keep_alive, through the cluster"
    "${OFFLOAD[@]}" node "$here/node_client.js" --port "$port" --site "$site" --gets 200 \
        --posts 40 --concurrency 8 --keep-alive "$keep_alive" >"$dir/cluster-client.out" 2>&1 ||
        fail "node_client.js through the cluster failed: $(tail -n 5 "$dir/cluster-client.out")"
    sed 's/^/  /' "$dir/cluster-client.out"
done
if grep -q 'lost' "$dir/cluster.log"; then
    grep 'lost' "$dir/cluster.log" | head -n 3 >&2
    fail "bytes were lost passing connections to the workers"
fi
kill -TERM "$primary_pid"
status=0
wait_pid "$primary_pid" 10 || status=$?
((status == 0)) || fail "the cluster's primary exited with status $status after SIGTERM"
expect_engine_empty 20 "$port"
if offloaded; then stop_engine; fi
log "node: all checks passed"
