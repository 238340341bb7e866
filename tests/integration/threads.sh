#!/usr/bin/env bash
# Threads on offloaded sockets, against plain (not preloaded) peers:
#  (a) 8 threads, a connection each, 5,000 request/response round trips each, every byte checked;
#  (b) 4 threads send() 2,000 whole 1,000-byte records each on ONE blocking socket: the receiver
#      sees every record whole (no interleaving within a send) and in per-thread order;
#  (c) 4 threads blocked in accept() on one listener: each of 200 connections accepted once;
#  (d) no lost wake-ups: 2 threads ping-pong 10,000 messages through two offloaded sockets with
#      nobody spinning (engine --spin-us 0, TCPS_SPIN_US=0): every message is a sleep and a wake.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
need_tool timeout
app=${TCPS_TEST_APP:?TCPS_TEST_APP names tcps_test_app}
dir=$TCPS_TEST_DIR

# Runs a preloaded `tcps_test_app MODE ARGS...` with a time limit; fails with its output.
run_app() {
    local name=$1 limit=$2 status=0
    shift 2
    "${PRELOAD[@]}" timeout "$limit" "$app" "$@" >"$dir/$name.out" 2>&1 || status=$?
    sed 's/^/  /' "$dir/$name.out"
    ((status != 124)) || fail "$name did not finish within $limit s"
    ((status == 0)) || fail "$name failed (status $status)"
}

start_engine
"$app" echo "$dir/echo.port" 2>"$dir/echo.err" &
track $!
echo_port=$(wait_for_port_file 10 "$dir/echo.port") || fail "the echo peer did not start"

log "(a) 8 threads x 5,000 round trips, a connection each"
run_app mt-echo 120 mt-echo "$echo_port" 8 5000

log "(b) 4 threads x 2,000 records of 1,000 bytes on one socket"
"$app" records-recv "$dir/records.port" 4 2000 >"$dir/records.out" 2>&1 &
records_pid=$!
track "$records_pid"
records_port=$(wait_for_port_file 10 "$dir/records.port") || fail "the record receiver did not start"
run_app mt-send 120 mt-send "$records_port" 4 2000
status=0
wait_pid "$records_pid" 30 || status=$?
sed 's/^/  /' "$dir/records.out"
((status == 0)) || fail "the receiver found a broken record (status $status)"

log "(c) 4 threads in accept() on one listener, 200 connections"
"${PRELOAD[@]}" timeout 120 "$app" mt-accept "$dir/accept.port" 4 200 >"$dir/accept.out" 2>&1 &
accept_pid=$!
track "$accept_pid"
accept_port=$(wait_for_port_file 10 "$dir/accept.port") || fail "the acceptor did not start"
timeout 60 "$app" connect-many "$accept_port" 200 4 >"$dir/connect.out" 2>&1 ||
    fail "connect-many failed: $(cat "$dir/connect.out")"
status=0
wait_pid "$accept_pid" 60 || status=$?
sed 's/^/  /' "$dir/accept.out"
((status == 0)) || fail "the acceptors failed (status $status)"
stop_engine

log "(d) ping-pong of 10,000 messages, engine and threads sleeping between them"
start_engine --spin-us 0
TCPS_SPIN_US=0 run_app pingpong 180 pingpong 10000
stop_engine
log "threads: all four cases passed"
