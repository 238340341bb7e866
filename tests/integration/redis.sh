#!/usr/bin/env bash
# redis-server preloaded, driven by a plain redis-benchmark and redis-cli; then redis-benchmark
# and redis-cli preloaded against a plain redis-server; then all of them preloaded. ss proves
# which sockets were tcpsd's.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
need_tool redis-server redis-benchmark redis-cli

start_engine

# Starts redis-server (preloaded if $1 = yes) on a fresh port; sets REDIS_PID and PORT.
start_redis() {
    PORT=$(free_port)
    local runner=()
    if [[ $1 == yes ]]; then runner=("${PRELOAD[@]}"); fi
    mkdir -p "$TCPS_TEST_DIR/redis-$PORT"
    "${runner[@]}" redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize no --dir "$TCPS_TEST_DIR/redis-$PORT" \
        --logfile "$TCPS_TEST_DIR/redis-$PORT.log" &
    REDIS_PID=$!
    track "$REDIS_PID"
    wait_until 10 redis_answers || fail "redis-server on port $PORT does not answer PING"
}
redis_answers() { [[ $(redis-cli -p "$PORT" ping 2>/dev/null) == PONG ]]; }

# SET then GET through redis-cli (preloaded if $1 = yes).
set_get() {
    local runner=() value="tcps-$RANDOM-$RANDOM"
    if [[ $1 == yes ]]; then runner=("${PRELOAD[@]}"); fi
    [[ $("${runner[@]}" redis-cli -p "$PORT" SET tcps:key "$value") == OK ]] || fail "SET failed"
    [[ $("${runner[@]}" redis-cli -p "$PORT" GET tcps:key) == "$value" ]] || fail "GET failed"
    log "  SET/GET round trip ok"
}

# redis-benchmark (preloaded if $1 = yes); sets BENCH_PID while it runs, checks its status.
benchmark() {
    local runner=() out=$TCPS_TEST_DIR/bench-$PORT.txt status=0
    if [[ $1 == yes ]]; then runner=("${PRELOAD[@]}"); fi
    "${runner[@]}" redis-benchmark -p "$PORT" -n 20000 -q -t set,get >"$out" 2>&1 &
    BENCH_PID=$!
    track "$BENCH_PID"
    if [[ $1 == yes ]]; then
        record_connections "$PORT" "$BENCH_PID" 120 "$TCPS_TEST_DIR/bench-ss.txt"
    fi
    wait_pid "$BENCH_PID" 130 || status=$?
    tr '\r' '\n' <"$out" | grep -E '^(SET|GET):' | grep -v 'rps=' | sed 's/^/  /' || true
    ((status == 0)) || fail "redis-benchmark exited with status $status: $(tail -n 5 "$out")"
    grep -q '^GET: .*requests per second' < <(tr '\r' '\n' <"$out") ||
        fail "redis-benchmark printed no GET result"
}

log "case a: redis-server preloaded, redis-benchmark and redis-cli not"
start_redis yes
expect_engine_listener "$PORT" "$REDIS_PID"
hold_connection "$PORT"
expect_engine_server_side "$PORT" "$REDIS_PID"
stop_pid "$HOLD_PID"
benchmark no
set_get no
kill -0 "$REDIS_PID" 2>/dev/null || fail "redis-server died"
stop_pid "$REDIS_PID"

log "case b: redis-server not preloaded, redis-benchmark and redis-cli preloaded"
start_redis no
benchmark yes
lines=$TCPS_TEST_DIR/bench-ss.txt
grep -q "pid=$ENGINE_PID," "$lines" ||
    fail "no connection to port $PORT owned by the engine was seen while redis-benchmark ran"
if grep -q "pid=$BENCH_PID," "$lines"; then
    fail "redis-benchmark (pid $BENCH_PID) held kernel sockets to port $PORT"
fi
grep -m 2 "pid=$ENGINE_PID," "$lines" | sed 's/^/  ss: /'
log "evidence: redis-benchmark's connections to port $PORT belonged to tcpsd"
set_get yes
stop_pid "$REDIS_PID"

log "case c: redis-server, redis-benchmark and redis-cli all preloaded"
start_redis yes
expect_engine_listener "$PORT" "$REDIS_PID"
benchmark yes
lines=$TCPS_TEST_DIR/bench-ss.txt
if grep -q "pid=$BENCH_PID," "$lines"; then
    fail "redis-benchmark (pid $BENCH_PID) held kernel sockets to port $PORT"
fi
if grep -q "pid=$REDIS_PID," "$lines"; then
    fail "redis-server (pid $REDIS_PID) held kernel sockets on port $PORT"
fi
grep -q "pid=$ENGINE_PID," "$lines" ||
    fail "no connection on port $PORT owned by the engine was seen while redis-benchmark ran"
log "evidence: both ends of port $PORT's connections belonged to tcpsd"
set_get yes
kill -0 "$REDIS_PID" 2>/dev/null || fail "redis-server died"
stop_pid "$REDIS_PID"

stop_engine
log "redis: all cases passed"
