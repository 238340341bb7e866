#!/usr/bin/env bash
# Measures the cross-host path (tcps-relay -> tcpsd --fabric-listen) against the kernel: round
# trips with sockperf ping-pong (64 B and 1 KiB) and bulk throughput with iperf3, the client
# on the "client host", the server on the "engine host".
#
#   relay_bench.sh BUILD_DIR [netns|loopback]     (default: netns when root, else loopback)
#
#   native:  the client talks TCP to the server (over the veth pair in netns mode).
#   local:   the client runs preloaded with the same tcpsd as its engine, through shared memory
#            (a control socket is a file: it reaches across network namespaces). Its socket is
#            tcpsd's, next to the server, as with the relay: the baseline without the fabric.
#   relay:   the client runs preloaded with tcps-relay as its engine; its socket is tcpsd's on
#            the engine host, where the TCP hop to the server is local; the client's bytes
#            cross between the hosts over the fabric (tcp;ofi_rxm) instead.
# Then redis-server on the client host (native, or preloaded through the relay) and a plain
# redis-benchmark on the engine host.
# Environment: RUNS (default 3), SECONDS_PING (default 3), SECONDS_IPERF (default 5),
# ENGINE_ARGS and RELAY_ARGS (more arguments for tcpsd and tcps-relay, e.g. --busy-poll). Prints one line per measurement. Not a test: nothing here passes or fails.
set -euo pipefail
build=$(cd "${1:?usage: relay_bench.sh BUILD_DIR [netns|loopback]}" && pwd)
mode=${2:-$([[ $(id -u) == 0 ]] && echo netns || echo loopback)}
runs=${RUNS:-3}
iperf_seconds=${SECONDS_IPERF:-5}
read -r -a engine_args <<<"${ENGINE_ARGS:-}"
read -r -a relay_args <<<"${RELAY_ARGS:-}"
export TCPSD=$build/engine/tcpsd LIBTCPS=$build/preload/libtcps.so
relay=$build/engine/tcps-relay
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/../integration/lib.sh"
need_tool iperf3 sockperf

suffix=$$
ns_e=tcps-bench-e-$suffix
ns_c=tcps-bench-c-$suffix
in_e=()
in_c=()
addr_e=127.0.0.1
addr_c=127.0.0.1
netns_cleanup() {
    [[ $mode == netns ]] || return 0
    local pid
    for pid in "${TCPS_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns_c" 2>/dev/null || true
    ip netns del "$ns_e" 2>/dev/null || true
}
# errexit off first: `(exit $status)` would otherwise end the trap before cleanup when failing.
trap 'status=$?; set +e; netns_cleanup; (exit $status); cleanup' EXIT
if [[ $mode == netns ]]; then
    ip netns add "$ns_e" && ip netns add "$ns_c" || fail "ip netns add"
    ip link add tbe$suffix type veth peer name tbc$suffix || fail "veth"
    ip link set tbe$suffix netns "$ns_e" && ip link set tbc$suffix netns "$ns_c"
    # IPv4 from TEST-NET-1 (RFC 5737, never routed): sockperf 3.7 has no IPv6. Nothing leaves
    # the veth pair either way.
    addr_e=192.0.2.2
    addr_c=192.0.2.1
    ip -n "$ns_e" addr add "$addr_e/24" dev tbe$suffix
    ip -n "$ns_c" addr add "$addr_c/24" dev tbc$suffix
    for ns in "$ns_e" "$ns_c"; do ip -n "$ns" link set lo up; done
    ip -n "$ns_e" link set tbe$suffix up && ip -n "$ns_c" link set tbc$suffix up
    sleep 1
    in_e=(ip netns exec "$ns_e")
    in_c=(ip netns exec "$ns_c")
fi
if [[ $addr_e == *:* ]]; then fabric_at="[$addr_e]:17990"; else fabric_at="$addr_e:17990"; fi
ready_seen() { grep -q ready "$1" 2>/dev/null; }

: >"$TCPS_TEST_DIR/engine.ready"
"${in_e[@]}" "$TCPSD" --socket "$TCPS_TEST_DIR/engine.sock" --fabric-listen "$fabric_at" \
    "${engine_args[@]}" --ready-fd 3 3>"$TCPS_TEST_DIR/engine.ready" >>"$TCPS_TEST_DIR/engine.log" 2>&1 &
ENGINE_PID=$!
track "$ENGINE_PID"
wait_until 10 ready_seen "$TCPS_TEST_DIR/engine.ready" || fail "tcpsd did not start"
: >"$TCPS_TEST_DIR/relay.ready"
"${in_c[@]}" "$relay" --socket "$TCPS_TEST_DIR/relay.sock" --engine "$fabric_at" \
    "${relay_args[@]}" --ready-fd 3 3>"$TCPS_TEST_DIR/relay.ready" >>"$TCPS_TEST_DIR/relay.log" 2>&1 &
track $!
wait_until 10 ready_seen "$TCPS_TEST_DIR/relay.ready" || fail "tcps-relay did not start"
preload=(env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$TCPS_TEST_DIR/relay.sock")
local_engine=(env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$TCPS_TEST_DIR/engine.sock")

# Round trips: sockperf ping-pong (TCP), whose server binds the engine host's address, so
# that the native client reaches it over the link. sockperf prints half round trips.
"${in_e[@]}" sockperf server --tcp -i "$addr_e" -p 5298 >"$TCPS_TEST_DIR/sp-server.log" 2>&1 &
track $!
sleep 0.5
echo "mode $mode; engine host $addr_e; tcpsd ${ENGINE_ARGS:-(defaults)}; relay ${RELAY_ARGS:-(defaults)};" \
    "$(nproc) CPUs shared with everything else running"
round_trip() {  # $@: runner; prints "p50 p99" of the round trip in microseconds
    "${in_c[@]}" "$@" sockperf ping-pong --tcp -i "$addr_e" -p 5298 -m "$size" \
        -t "$ping_seconds" 2>&1 | awk '
        /percentile 50.000/ { p50 = 2 * $NF } /percentile 99.000/ { p99 = 2 * $NF }
        END { printf "p50 %.1f us, p99 %.1f us (round trip)", p50, p99 }'
}
ping_seconds=${SECONDS_PING:-3}
for size in 64 1024; do
    for run in $(seq 1 "$runs"); do
        echo "native sockperf size=$size run=$run: $(round_trip)"
        echo "local  sockperf size=$size run=$run: $(round_trip "${local_engine[@]}")"
        echo "relay  sockperf size=$size run=$run: $(round_trip "${preload[@]}")"
    done
done

"${in_e[@]}" iperf3 -s -p 5299 >"$TCPS_TEST_DIR/iperf-server.log" 2>&1 &
track $!
sleep 0.5
for run in $(seq 1 "$runs"); do
    native=$("${in_c[@]}" iperf3 -c "$addr_e" -p 5299 -t "$iperf_seconds" -f m | grep receiver)
    echo "native iperf3 run=$run: $native"
    local_run=$("${in_c[@]}" "${local_engine[@]}" iperf3 -c "$addr_e" -p 5299 -t "$iperf_seconds" \
        -f m | grep receiver)
    echo "local  iperf3 run=$run: $local_run"
    relayed=$("${in_c[@]}" "${preload[@]}" iperf3 -c "$addr_e" -p 5299 -t "$iperf_seconds" -f m |
        grep receiver)
    echo "relay  iperf3 run=$run: $relayed"
done

if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
    redis_port=5300
    for run in $(seq 1 "$runs"); do
        for how in native relay; do
            # native: redis-server on the client host, reached over the link; relay: its
            # listener is tcpsd's on the engine host, where redis-benchmark runs.
            runner=()
            at=$addr_c
            if [[ $how == relay ]]; then
                runner=("${preload[@]}")
                at=$addr_e
            fi
            "${in_c[@]}" "${runner[@]}" redis-server --port "$redis_port" --bind "$at" \
                --protected-mode no --save '' --appendonly no --daemonize no \
                --dir "$TCPS_TEST_DIR" --logfile "$TCPS_TEST_DIR/redis.log" &
            redis_pid=$!
            track "$redis_pid"
            up() { [[ $("${in_e[@]}" redis-cli -h "$at" -p "$redis_port" ping 2>/dev/null) == PONG ]]; }
            wait_until 10 up || fail "redis-server ($how) does not answer"
            for clients in 1 50; do
                line=$("${in_e[@]}" redis-benchmark -h "$at" -p "$redis_port" -n 20000 \
                    -c "$clients" -q -t get 2>/dev/null | tr '\r' '\n' | grep 'requests per second')
                printf '%-6s redis GET -c %-2s run=%s: %s\n' "$how" "$clients" "$run" "$line"
            done
            stop_pid "$redis_pid"
            redis_port=$((redis_port + 1))
        done
    done
fi
