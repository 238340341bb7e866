#!/usr/bin/env bash
# Idle costs nothing: a preloaded program asleep in epoll_wait() on an offloaded listener and a
# kernel pipe, another asleep in recv(), and the engine use less than 2% of one CPU together
# over a second (utime + stime from /proc/PID/stat). Then a write to the pipe, a connection to
# the listener and the peer's close each wake their sleeper within 2 s.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
need_tool getconf mkfifo timeout
app=${TCPS_TEST_APP:?TCPS_TEST_APP names tcps_test_app}
dir=$TCPS_TEST_DIR

start_engine
"$app" echo "$dir/echo.port" 2>"$dir/echo.err" &
echo_pid=$!
track "$echo_pid"
echo_port=$(wait_for_port_file 10 "$dir/echo.port") || fail "the echo peer did not start"

mkfifo "$dir/wake.fifo"
"${PRELOAD[@]}" "$app" idle-epoll "$dir/listener.port" "$dir/wake.fifo" >"$dir/epoll.out" 2>&1 &
epoll_pid=$!
track "$epoll_pid"
"${PRELOAD[@]}" "$app" idle-recv "$echo_port" >"$dir/recv.out" 2>&1 &
recv_pid=$!
track "$recv_pid"
wait_for_line 10 "$dir/epoll.out" 'idle-epoll: waiting' || fail "idle-epoll did not start: $(cat "$dir/epoll.out")"
wait_for_line 10 "$dir/recv.out" 'idle-recv: waiting' || fail "idle-recv did not start: $(cat "$dir/recv.out")"
listener_port=$(cat "$dir/listener.port")

everyone_asleep() {
    all_threads_asleep "$epoll_pid" && all_threads_asleep "$recv_pid" &&
        all_threads_asleep "$ENGINE_PID"
}
wait_until 5 everyone_asleep || fail "a thread of the programs or of the engine never went to sleep"
percent=$(cpu_percent_over 1 "$epoll_pid" "$recv_pid" "$ENGINE_PID")
log "idle for 1 s: the two programs and the engine used ${percent}% of one CPU"
((${percent%.*} < 2)) || fail "idle programs and engine used ${percent}% CPU (limit 2%)"

log "a write to the pipe wakes epoll_wait"
# shellcheck disable=SC2016  # $1 is the inner shell's
timeout 5 bash -c 'printf x >"$1"' _ "$dir/wake.fifo" || fail "could not write to the FIFO"
wait_for_line 2 "$dir/epoll.out" 'woke for the pipe' || fail "epoll_wait did not wake for the pipe within 2 s"

log "a connection to the offloaded listener wakes epoll_wait"
timeout 10 "$app" connect-many "$listener_port" 1 0 >/dev/null || fail "could not connect to the listener"
wait_for_line 2 "$dir/epoll.out" 'woke for a connection' ||
    fail "epoll_wait did not wake for the connection within 2 s: $(cat "$dir/epoll.out")"

log "the peer's close wakes recv"
stop_pid "$echo_pid"
wait_for_line 2 "$dir/recv.out" "woke for the peer's EOF" ||
    fail "recv did not wake for the peer's EOF within 2 s: $(cat "$dir/recv.out")"

for pid in "$epoll_pid" "$recv_pid"; do
    status=0
    wait_pid "$pid" 5 || status=$?
    ((status == 0)) || fail "a program exited with status $status: $(cat "$dir/epoll.out" "$dir/recv.out")"
done
stop_engine
log "idle: ${percent}% CPU asleep, every sleeper woke promptly"
