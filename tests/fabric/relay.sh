#!/usr/bin/env bash
# The cross-host path end to end: redis-server runs preloaded with tcps-relay as its engine,
# and its TCP sockets live in a tcpsd --fabric-listen elsewhere, reached over tcp;ofi_rxm.
#
#   relay.sh netns     two network namespaces joined by a veth pair (fd00:7463:7073::/64): the
#                      engine's and the client's. redis-server binds the engine namespace's
#                      address, which does not exist where redis-server runs: the bind only
#                      works because the socket is tcpsd's, over there. A plain redis-benchmark
#                      in the client namespace reaches it over the veth. Needs root (exit 77).
#   relay.sh loopback  both on 127.0.0.1, where namespaces are not available.
#
# Checks: every benchmark request succeeded; the listener and the connections were tcpsd's
# (ss -p in the engine's namespace) and redis-server had no TCP socket at all; redis-server's
# exit ends its remote session (its listener goes); the engine's death leaves redis-server and
# the relay running, and the relay answers the next client with "no engine" (kernel TCP).
#
# Environment: TCPSD, LIBTCPS, TCPS_RELAY (meson sets them).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/../integration/lib.sh"

mode=${1:?usage: relay.sh netns|loopback}
need_engine
[[ -n ${TCPS_RELAY:-} && -x ${TCPS_RELAY:-} ]] || skip "TCPS_RELAY is not built"
need_tool redis-server redis-benchmark redis-cli

suffix=$$
ns_e=tcps-rly-e-$suffix  # the engine's host
ns_c=tcps-rly-c-$suffix  # the client's host: tcps-relay and redis-server
in_e=()
in_c=()
cli_host=127.0.0.1
addr_e=127.0.0.1
fabric_port=$(free_port)

netns_cleanup() {
    [[ $mode == netns ]] || return 0
    # The namespaces' processes first (lib.sh's cleanup stops them too, but the namespaces
    # must outlive them), then the namespaces, which takes the veth pair with them.
    local pid
    for pid in "${TCPS_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns_c" 2>/dev/null || true
    ip netns del "$ns_e" 2>/dev/null || true
}
# errexit off first: `(exit $status)` would otherwise end the trap before cleanup when failing.
trap 'status=$?; set +e; netns_cleanup; (exit $status); cleanup' EXIT

if [[ $mode == netns ]]; then
    [[ $(id -u) == 0 ]] || skip "needs root for ip netns"
    need_tool ip
    ip netns add "$ns_e" 2>/dev/null || skip "ip netns add is not permitted here"
    ip netns add "$ns_c" || fail "ip netns add $ns_c"
    veth_e=tre$suffix
    veth_c=trc$suffix
    ip link add "$veth_e" type veth peer name "$veth_c" 2>/dev/null || skip "cannot create a veth pair"
    ip link set "$veth_e" netns "$ns_e" && ip link set "$veth_c" netns "$ns_c" || fail "move veths"
    addr_e=fd00:7463:7073::2
    addr_c=fd00:7463:7073::1
    ip -n "$ns_e" addr add "$addr_e/64" dev "$veth_e" nodad || fail "address E"
    ip -n "$ns_c" addr add "$addr_c/64" dev "$veth_c" nodad || fail "address C"
    for ns in "$ns_e" "$ns_c"; do ip -n "$ns" link set lo up || fail "lo up in $ns"; done
    ip -n "$ns_e" link set "$veth_e" up && ip -n "$ns_c" link set "$veth_c" up || fail "veths up"
    link_up() {
        ip -n "$ns_e" link show "$veth_e" | grep -q 'state UP' &&
            ip -n "$ns_c" link show "$veth_c" | grep -q 'state UP'
    }
    wait_until 5 link_up || fail "the veth pair did not come up"
    in_e=(ip netns exec "$ns_e")
    in_c=(ip netns exec "$ns_c")
    cli_host=$addr_e
    fabric_port=17960
fi
if [[ $addr_e == *:* ]]; then fabric_at="[$addr_e]:$fabric_port"; else fabric_at="$addr_e:$fabric_port"; fi

ready_seen() { grep -q ready "$1" 2>/dev/null; }

# The engine host: tcpsd serving relays. Its own control socket is one nobody uses here.
start_remote_engine() {
    : >"$TCPS_TEST_DIR/engine.ready"
    "${in_e[@]}" "$TCPSD" --socket "$TCPS_TEST_DIR/engine.sock" --fabric-listen "$fabric_at" \
        --verbose --ready-fd 3 3>"$TCPS_TEST_DIR/engine.ready" >>"$TCPS_TEST_DIR/engine.log" 2>&1 &
    ENGINE_PID=$!
    track "$ENGINE_PID"
    wait_until 10 ready_seen "$TCPS_TEST_DIR/engine.ready" || fail "tcpsd did not start"
    log "tcpsd pid $ENGINE_PID serves relays on $fabric_at${in_e:+ (namespace $ns_e)}"
}

# The client host: the relay, the engine the shim sees there.
RELAY_SOCK=$TCPS_TEST_DIR/relay.sock
start_relay() {
    : >"$TCPS_TEST_DIR/relay.ready"
    "${in_c[@]}" "$TCPS_RELAY" --socket "$RELAY_SOCK" --engine "$fabric_at" --verbose \
        --ready-fd 3 3>"$TCPS_TEST_DIR/relay.ready" >>"$TCPS_TEST_DIR/relay.log" 2>&1 &
    RELAY_PID=$!
    track "$RELAY_PID"
    wait_until 10 ready_seen "$TCPS_TEST_DIR/relay.ready" ||
        fail "tcps-relay did not start: $(tail -n 3 "$TCPS_TEST_DIR/relay.log")"
    log "tcps-relay pid $RELAY_PID on $RELAY_SOCK${in_c:+ (namespace $ns_c)}"
}
start_remote_engine
start_relay
PRELOAD=(env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$RELAY_SOCK" TCPS_DEBUG=1)

fail_with_logs() {
    echo "--- relay log:" >&2
    tail -n 20 "$TCPS_TEST_DIR/relay.log" >&2
    fail "$@"
}

PORT=$(free_port)
redis_answers() {
    [[ $("${in_c[@]}" redis-cli -h "$cli_host" -p "$PORT" ping 2>/dev/null) == PONG ]]
}
start_redis() {
    mkdir -p "$TCPS_TEST_DIR/redis"
    "${in_c[@]}" "${PRELOAD[@]}" redis-server --port "$PORT" --bind "$addr_e" --save '' --protected-mode no \
        --appendonly no --daemonize no --dir "$TCPS_TEST_DIR/redis" \
        --logfile "$TCPS_TEST_DIR/redis.log" 2>>"$TCPS_TEST_DIR/redis.stderr" &
    REDIS_PID=$!
    track "$REDIS_PID"
    wait_until 15 redis_answers ||
        fail_with_logs "redis-server does not answer PING: $(tail -n 3 "$TCPS_TEST_DIR/redis.log")"
    grep -q "TCP offloaded" "$TCPS_TEST_DIR/redis.stderr" ||
        fail_with_logs "redis-server did not get a session from the relay"
}

engine_ss() { "${in_e[@]}" ss "$@"; }
client_ss() { "${in_c[@]}" ss "$@"; }

log "redis-server preloaded with the relay as its engine, listening on [$addr_e]:$PORT"
start_redis
lines=$(engine_ss -tlnpH "( sport = :$PORT )")
echo "$lines" | sed 's/^/  ss (engine host): /'
grep -q "pid=$ENGINE_PID," <<<"$lines" || fail "the listener on port $PORT is not tcpsd's"
if client_ss -tanpH | grep -q "pid=$REDIS_PID,"; then
    fail "redis-server holds a kernel TCP socket on its own host"
fi
log "evidence: the listener is tcpsd's (pid $ENGINE_PID) on the engine's host"

log "redis-benchmark (plain) against it: -n 2000, SET and GET"
out=$TCPS_TEST_DIR/bench.txt
"${in_c[@]}" redis-benchmark -h "$cli_host" -p "$PORT" -n 2000 -q -t set,get >"$out" 2>&1 &
BENCH_PID=$!
track "$BENCH_PID"
: >"$TCPS_TEST_DIR/ss.txt"
deadline=$((SECONDS + 120))
while kill -0 "$BENCH_PID" 2>/dev/null && ((SECONDS < deadline)); do
    engine_ss -tanpH state established "( sport = :$PORT )" >>"$TCPS_TEST_DIR/ss.txt" 2>/dev/null || true
    sleep 0.02
done
status=0
wait_pid "$BENCH_PID" 10 || status=$?
results=$(tr '\r' '\n' <"$out" | grep -E '^(SET|GET): .*requests per second' || true)
echo "$results" | sed 's/^/  /'
((status == 0)) || fail_with_logs "redis-benchmark exited with $status: $(tail -n 3 "$out")"
[[ $(grep -c 'requests per second' <<<"$results") == 2 ]] ||
    fail_with_logs "redis-benchmark did not complete SET and GET"
if grep -qiE 'error|refused|reset' "$out"; then
    fail_with_logs "redis-benchmark reported errors: $(grep -iE 'error|refused|reset' "$out" | head -n 3)"
fi
grep -q "pid=$ENGINE_PID," "$TCPS_TEST_DIR/ss.txt" ||
    fail "no connection on port $PORT owned by tcpsd was seen while redis-benchmark ran"
grep -m 2 "pid=$ENGINE_PID," "$TCPS_TEST_DIR/ss.txt" | sed 's/^/  ss (engine host): /'
log "evidence: redis-benchmark's connections were accepted by tcpsd on the engine's host"
value="tcps-$RANDOM-$RANDOM"
[[ $("${in_c[@]}" redis-cli -h "$cli_host" -p "$PORT" SET tcps:key "$value") == OK ]] || fail "SET"
[[ $("${in_c[@]}" redis-cli -h "$cli_host" -p "$PORT" GET tcps:key) == "$value" ]] || fail "GET"
log "SET/GET round trip ok"

log "redis-server exits: its remote session ends and the listener goes"
stop_pid "$REDIS_PID"
listener_gone() { [[ -z $(engine_ss -tlnH "( sport = :$PORT )") ]]; }
wait_until 10 listener_gone || fail "the listener on port $PORT outlived redis-server"
kill -0 "$RELAY_PID" 2>/dev/null || fail_with_logs "the relay died"

log "the relay dies under a busy redis-server: the engine ends that session, and serves the next relay"
start_redis
"${in_c[@]}" timeout 20 redis-benchmark -h "$cli_host" -p "$PORT" -n 1000000 -c 10 -q -t get \
    >/dev/null 2>&1 &
BENCH_PID=$!
track "$BENCH_PID"
sleep 1  # mid-benchmark: the measurement of nothing, just traffic in flight
kill -KILL "$RELAY_PID"
wait_pid "$RELAY_PID" 5 || true
# redis-server, its engine gone, makes its listener again in its own host's kernel where that
# host has the address (loopback; docs/architecture.md, "Failure handling"): only tcpsd's counts.
engine_listener_gone() { ! grep -q "pid=$ENGINE_PID," <<<"$(engine_ss -tlnpH "( sport = :$PORT )")"; }
wait_until 10 engine_listener_gone || fail "tcpsd kept the dead relay's listener on port $PORT"
engine_freed() { grep -q "session [0-9]* (pid $REDIS_PID): freed" "$TCPS_TEST_DIR/engine.log"; }
wait_until 10 engine_freed || fail "tcpsd did not free the dead relay's session"
kill -0 "$ENGINE_PID" 2>/dev/null || fail "tcpsd died with the relay"
stop_pid "$BENCH_PID"
stop_pid "$REDIS_PID"
start_relay
PORT=$(free_port)
start_redis
[[ $("${in_c[@]}" redis-cli -h "$cli_host" -p "$PORT" ping) == PONG ]] || fail "no PING after the relay's restart"
stop_pid "$REDIS_PID"
log "the next relay's clients are served"

log "the engine dies under a served redis-server"
start_redis
kill -KILL "$ENGINE_PID"
wait_pid "$ENGINE_PID" 5 || true
ENGINE_PID=
relay_saw_it() { grep -q "the engine closed the link\|fabric link failed" "$TCPS_TEST_DIR/relay.log"; }
wait_until 10 relay_saw_it || fail_with_logs "the relay did not notice the engine's death"
sleep 0.5  # give a crash in redis-server or the relay the time to happen, if it is to
kill -0 "$REDIS_PID" 2>/dev/null || fail "redis-server died with the remote engine"
kill -0 "$RELAY_PID" 2>/dev/null || fail_with_logs "the relay died with the remote engine"
# A new client of the relay: no engine behind it, so the shim keeps TCP in the kernel.
fallback=$("${in_c[@]}" "${PRELOAD[@]}" redis-cli -h "$cli_host" -p "$PORT" ping 2>&1 || true)
grep -q "no engine" <<<"$fallback" || fail_with_logs "the shim did not fall back: $fallback"
log "redis-server and the relay survived; a new client fell back to the kernel"
stop_pid "$REDIS_PID"
stop_pid "$RELAY_PID"
log "relay ($mode): all checks passed"
