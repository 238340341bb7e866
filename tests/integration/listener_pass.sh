#!/usr/bin/env bash
# A listener passed on with SCM_RIGHTS while connections wait in it (HAProxy's reload passes
# its listeners to the new process so). A preloaded sender listens; 4 clients connect and send
# a line, and the engine accepts them ahead (its counters) into the sender's accept ring, where
# nobody takes them. The sender then passes the listener, twice in one message, to a preloaded
# receiver (another process, its own session) and closes its own. On Linux the 4 would wait in
# the listener's queue for the receiver; through the engine they were already accepted, so
# they must be parked and not reset (engine/parked.hpp, ParkedConnections): the receiver's first
# use of each descriptor offers the listener to the engine, which serves it with one slot for
# both descriptors and publishes the 4 first. The receiver accepts them through the second
# descriptor and one more client that comes after the pass, and echoes each line: every client
# must get its echo. Both descriptors and every accepted connection are offloaded (placeholders),
# ss shows tcpsd owning the listener and the accepted connections, and the counters show 4
# parked, 4 unparked and one listener adopted. Arguments go to tcpsd (listener_pass_2_workers:
# --cores 0,1, so the accepted connections are spread over two workers and the second one's
# are parked through the family's home). Last, a thread asleep in accept() while another
# passes the listener on must go on with the kernel's accept() and get the next connection.
# listener_pass_twin (--handoff-load 0: the engine always saturated) has the 4 wait in the
# listener's twin (engine/twin.cpp) instead, where the engine accepted none of them: the
# hand-back parks them all the same, and the receiver gets them (as kernel sockets, which a
# saturated engine leaves to the application).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
need_tool "$PYTHON" ss
helper=$(dirname "$0")/listener_pass.py
dir=$TCPS_TEST_DIR
waiting=4

start_engine "$@"
workers=1
[[ ${1:-} == --cores ]] && workers=$(tr ',' '\n' <<<"$2" | wc -l)
twin=0
[[ ${1:-} == --handoff-load ]] && twin=1

# The workers' statistics lines, freshly logged (SIGUSR1), into STATS.
# shellcheck disable=SC2317  # called by wait_until
fresh_stats() {
    local before
    before=$(grep -c 'worker [0-9]*: sessions' "$dir/engine.log" || true)
    kill -USR1 "$ENGINE_PID"
    # shellcheck disable=SC2317
    logged() { (($(grep -c 'worker [0-9]*: sessions' "$dir/engine.log" || true) >= before + workers)); }
    wait_until 5 logged || fail "the engine logged no statistics"
    STATS=$(grep 'worker [0-9]*: sessions' "$dir/engine.log" | tail -n "$workers")
}
stat_sum() { sed -n "s/.* $1 \([0-9]*\)[ ,].*/\1/p" <<<"$STATS" | awk '{ t += $1 } END { print t + 0 }'; }
# shellcheck disable=SC2317  # called by wait_until
all_accepted() {
    fresh_stats
    (($(stat_sum accepts) >= waiting))
}

mkfifo "$dir/receiver.in" "$dir/sender.in"
"${PRELOAD[@]}" "$PYTHON" "$helper" receiver "$dir/pass.sock" $((waiting + 1)) \
    <"$dir/receiver.in" >"$dir/receiver.out" 2>&1 &
receiver_pid=$!
track "$receiver_pid"
exec 7>"$dir/receiver.in"
wait_for_line 10 "$dir/receiver.out" '^ready' || fail "the receiver did not start: $(cat "$dir/receiver.out")"

"${PRELOAD[@]}" "$PYTHON" "$helper" sender "$dir/port" "$dir/pass.sock" \
    <"$dir/sender.in" >"$dir/sender.out" 2>&1 &
sender_pid=$!
track "$sender_pid"
exec 8>"$dir/sender.in"
port=$(wait_for_port_file 10 "$dir/port") || fail "the sender did not listen: $(cat "$dir/sender.out")"
expect_engine_listener "$port" "$sender_pid"

"$PYTHON" "$helper" clients "$port" 0 "$waiting" >"$dir/clients.out" 2>&1 &
clients_pid=$!
track "$clients_pid"
# shellcheck disable=SC2317  # called by wait_until
all_in_twin() {
    (($(ss -tanH state established "( sport = :$port )" | wc -l) >= waiting))
}
if ((twin)); then
    wait_for_line 10 "$dir/clients.out" "^connected $waiting" || fail "the clients did not connect"
    wait_until 10 all_in_twin || fail "the $waiting clients are not all waiting"
    fresh_stats
    (($(stat_sum accepts) == 0)) || fail "the saturated engine accepted $(stat_sum accepts) connections"
    log "the $waiting clients wait in the listener's twin; the sender took none"
else
    wait_until 10 all_accepted || fail "the engine accepted only $(stat_sum accepts) of $waiting connections"
    log "the engine accepted the $waiting clients ahead; the sender took none"
fi

echo go >&8
wait_for_line 10 "$dir/sender.out" '^passed' || fail "the sender did not pass: $(cat "$dir/sender.out")"
wait_for_line 10 "$dir/receiver.out" '^second descriptor' ||
    fail "the receiver did not use the listener: $(cat "$dir/receiver.out")"
"$PYTHON" "$helper" clients "$port" "$waiting" 1 >"$dir/late.out" 2>&1 &
late_pid=$!
track "$late_pid"
wait_for_line 30 "$dir/receiver.out" '^done' || fail "the receiver did not get every connection: $(cat "$dir/receiver.out")"
sed 's/^/  sender: /' "$dir/sender.out"
sed 's/^/  receiver: /' "$dir/receiver.out"

status=0
wait_pid "$clients_pid" 40 || status=$?
sed 's/^/  clients: /' "$dir/clients.out"
((status == 0)) || fail "clients that waited in the passed listener lost their connection (status $status)"
status=0
wait_pid "$late_pid" 40 || status=$?
sed 's/^/  late client: /' "$dir/late.out"
((status == 0)) || fail "the client after the pass got no echo (status $status)"

grep -q '^first descriptor: offloaded' "$dir/receiver.out" || fail "the receiver's first descriptor stayed a kernel socket"
grep -q '^second descriptor: offloaded' "$dir/receiver.out" || fail "the receiver's second descriptor stayed a kernel socket"
# A saturated engine leaves what it accepts to the application's kernel.
want_kind=offloaded
((twin)) && want_kind=kernel
accepted=$(grep -c "^connection 'hello [0-9]*': $want_kind" "$dir/receiver.out" || true)
((accepted == waiting + 1)) || fail "only $accepted of $((waiting + 1)) accepted connections were $want_kind"
expect_engine_listener "$port" "$receiver_pid"

fresh_stats
log "engine: $STATS"
parked=$(stat_sum "untaken connections parked")
unparked=$(stat_sum "untaken connections parked [0-9]* unparked")
adopted=$(stat_sum "listeners adopted")
((parked == waiting)) || fail "the engine parked $parked untaken connections, not $waiting"
((unparked == waiting)) || fail "the receiver's listener served $unparked parked connections, not $waiting"
((adopted == 1)) || fail "the engine adopted $adopted listeners, not 1 (one slot for both descriptors)"
if ((twin)); then
    from_twin=$(stat_sum "listener twins [0-9]* steered to [0-9]* ready [0-9]* parked")
    ((from_twin == waiting)) || fail "$from_twin of the parked connections came from the twin, not $waiting"
fi
if ((workers == 2)); then
    second=$(sed -n 's/.*worker 1: .*untaken connections parked \([0-9]*\).*/\1/p' <<<"$STATS")
    ((second > 0)) || fail "the second worker parked none of the untaken connections"
fi

echo >&7
echo >&8
exec 7>&- 8>&-
wait_pid "$receiver_pid" 10 || true
wait_pid "$sender_pid" 10 || true

# A thread asleep in accept() on the listener while another thread passes it on: as on Linux,
# the sleeper goes on waiting, now in the kernel's accept(), and gets the next connection.
status=0
"${PRELOAD[@]}" timeout 60 "$PYTHON" "$helper" blocked-accept >"$dir/blocked.out" 2>&1 || status=$?
sed 's/^/  blocked accept: /' "$dir/blocked.out"
((status == 0)) || fail "a thread asleep in accept() lost the listener passed on under it (status $status)"
stop_engine
log "ok: $waiting connections waiting in a passed listener reached the receiver, through the engine"
