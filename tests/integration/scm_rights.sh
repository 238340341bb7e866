#!/usr/bin/env bash
# A preloaded process A passes an offloaded TCP socket (one it connected, one it accepted) over
# an AF_UNIX socketpair with SCM_RIGHTS to a process B and closes its own copy; B streams 1 MiB
# through it against a plain echo peer, checks every byte and the peer's FIN. B is a forked child,
# then an exec'd child with LD_PRELOAD kept, then one with LD_PRELOAD removed. ss proves that
# A's sockets belonged to tcpsd until A passed them; passing hands a socket back to the kernel
# (docs/architecture.md), so from then on only A, the Bs and tcpsd may hold it. A B with tcps
# offloads the socket it receives again at its first use (then its descriptor is a
# placeholder), and before passing
# it A leaves at least 32 KiB received and unread: B must read them first, byte for byte, which
# only works if A's engine parked them and B's served them first (the engine's counters must
# show both). At the end the engine holds nothing. With "2-workers" the engine runs two workers
# (--cores 0,1), and the adopted sockets must be spread over both. Last, connections reset by
# their peer before A passes them: the receiver is told of the reset as on Linux.
#
# Development knob: TCPS_NATIVE=1 (kernel TCP, see servers_lib.sh).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

app=${SCM_RIGHTS:?SCM_RIGHTS names the scm_rights program}
if [[ ${1:-} == 2-workers ]]; then
    (($(nproc) >= 2)) || skip "this machine has one CPU: no two engine workers"
    ENGINE_CORES=0,1
    ENGINE_EXTRA=()
fi
need_tool ss
dir=$TCPS_TEST_DIR

start_offload
"$app" peer-echo "$dir/echo.port" >"$dir/echo.out" 2>&1 &
track $!
echo_port=$(wait_for_port_file 10 "$dir/echo.port") || fail "the echo peer did not start"

"${OFFLOAD[@]}" "$app" sender "$echo_port" "$dir/port" >"$dir/sender.out" 2>&1 &
sender_pid=$!
track "$sender_pid"
port=$(wait_for_port_file 10 "$dir/port") ||
    fail "A did not announce its port: $(cat "$dir/sender.out")"
log "A (pid $sender_pid) listens on port $port; the echo peer is on port $echo_port"
wait_until 5 listening_on "$port" || fail "nothing listens on port $port: $(cat "$dir/sender.out")"
if offloaded; then expect_engine_listener "$port" "$sender_pid"; fi
"$app" peer-connect "$port" 3 >"$dir/connect.out" 2>&1 &
connect_pid=$!
track "$connect_pid"
at_hold "$dir/sender.out" connected
if offloaded; then expect_engine_client "$echo_port" "$sender_pid"; fi
release_hold connected
at_hold "$dir/sender.out" accepted
if offloaded; then expect_engine_server_side "$port" "$sender_pid"; fi
release_hold accepted
record_sockets "( sport = :$port or dport = :$echo_port )" "$sender_pid" 100 "$dir/ss.txt"
status=0
wait_pid "$sender_pid" 100 || status=$?
grep -v '^holding' "$dir/sender.out" | sed 's/^/  /'
((status != 124)) || fail "A did not finish within 100 s"
((status == 0)) || fail "A failed (status $status)"
status=0
wait_pid "$connect_pid" 10 || status=$?
((status == 0)) || fail "the connecting peer failed (status $status): $(cat "$dir/connect.out")"
# A passed socket is a kernel socket, held by A until it closes its copy and then by B.
receivers=$(sed -n 's/.*receiver pid \([0-9]*\) (.*).*/\1/p' "$dir/sender.out")
# shellcheck disable=SC2086  # one pid per word
expect_no_strangers "$dir/ss.txt" "$port and $echo_port" "$sender_pid" $receivers
expect_engine_empty 20 "$port"
if offloaded; then
    # The Bs with tcps hold placeholders once they used their sockets (offloaded again).
    adopted_here=$(grep -c 'B (pid [0-9]*): after use, fd [0-9]* is /dev/null' "$dir/sender.out" || true)
    ((adopted_here == 4)) || fail "$adopted_here of the 4 Bs with tcps offloaded the socket"
    first=$(grep -c 'greeting bytes A left unread came first, intact' "$dir/sender.out" || true)
    ((first == 4)) || fail "$first of the 4 Bs with tcps read what A left unread first"
    field() { sed -n "s/.*$1 \([0-9]*\).*/\1/p" <<<"$LAST_STATS" | awk '{ s += $1 } END { print s + 0 }'; }
    parked=$(field "bytes parked")
    adopted=$(field "adopted sockets")
    served=$(field "adopted sockets [0-9]* served")
    ((adopted == 4)) || fail "the engine adopted $adopted sockets, not the 4 the Bs with tcps got"
    ((parked >= 4 * 32768)) || fail "the engine parked only $parked unread bytes"
    ((served == parked)) || fail "the engine parked $parked unread bytes and served $served"
    log "evidence: the engine parked $parked bytes A left unread and served them first to the Bs"
    if [[ -n ${ENGINE_CORES:-} ]]; then
        for worker in 0 1; do
            mine=$(sed -n "s/.*worker $worker: .*adopted sockets \([0-9]*\).*/\1/p" <<<"$LAST_STATS")
            ((${mine:-0} > 0)) || fail "worker $worker adopted none of the sockets: $LAST_STATS"
        done
        log "evidence: the adopted sockets are spread over both workers"
    fi
    # Connections reset by their peer before they are passed on (scm_rights.cpp, pass-reset):
    # the receiver's calls must say what Linux's say, the reset too (A's engine took it from
    # the kernel socket and parks it for the receiver) and the bytes before it.
    "$app" pass-reset >"$dir/reset.native" 2>&1 || fail "pass-reset natively: $(cat "$dir/reset.native")"
    "${OFFLOAD[@]}" "$app" pass-reset --expect-offload >"$dir/reset.offloaded" 2>&1 ||
        fail "pass-reset offloaded: $(cat "$dir/reset.offloaded")"
    diff -u "$dir/reset.native" "$dir/reset.offloaded" || fail "pass-reset: not what Linux says"
    sed 's/^/  pass-reset: /' "$dir/reset.offloaded"
    log "a reset connection passed on: the receiver's calls say what Linux's say"
    stop_engine
fi
log "scm_rights: all checks passed"
