#!/usr/bin/env bash
# The engine's end, by SIGTERM and then by SIGKILL, seen by preloaded programs asleep on offloaded
# sockets: a recv(), an accept() and an edge-triggered epoll_wait() all return within 3 s. Then
# recv says ECONNRESET (or 0), send says EPIPE with one SIGPIPE (none with MSG_NOSIGNAL), the dead
# listener reports ECONNABORTED once and is quiet after, that accept() having made it again in the
# kernel on its port (its only holder), where it accepts; a new socket is a kernel socket that
# works (the fallback), and so is one made in a child forked after the end, where the inherited
# socket is dead (ECONNRESET or 0) rather than EBADF. Each program checks its own side and exits
# 0 only if all of it held.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
app=${TCPS_TEST_APP:?TCPS_TEST_APP names tcps_test_app}
dir=$TCPS_TEST_DIR

"$app" echo "$dir/echo.port" 2>"$dir/echo.err" &
track $!
echo_port=$(wait_for_port_file 10 "$dir/echo.port") || fail "the echo peer did not start"

for signal in TERM KILL; do
    start_engine
    rm -f "$dir/accept.port"
    "${PRELOAD[@]}" "$app" victim-recv "$echo_port" >"$dir/recv.out" 2>&1 &
    recv_pid=$!
    "${PRELOAD[@]}" "$app" victim-accept "$dir/accept.port" "$echo_port" >"$dir/accept.out" 2>&1 &
    accept_pid=$!
    "${PRELOAD[@]}" "$app" victim-epoll "$echo_port" >"$dir/epoll.out" 2>&1 &
    epoll_pid=$!
    track "$recv_pid" "$accept_pid" "$epoll_pid"
    for name in recv accept epoll; do
        wait_for_line 10 "$dir/$name.out" 'waiting' ||
            fail "victim-$name did not get ready: $(cat "$dir/$name.out")"
    done
    victims_asleep() {
        all_threads_asleep "$recv_pid" && all_threads_asleep "$accept_pid" &&
            all_threads_asleep "$epoll_pid"
    }
    wait_until 5 victims_asleep || fail "the programs did not go to sleep"

    log "SIG$signal to the engine (pid $ENGINE_PID), three programs asleep on offloaded sockets"
    kill -"$signal" "$ENGINE_PID"
    for name in recv accept epoll; do
        pid_var=${name}_pid
        status=0
        wait_pid "${!pid_var}" 3 || status=$?
        sed 's/^/  /' "$dir/$name.out"
        ((status != 124)) || fail "victim-$name did not return within 3 s of SIG$signal"
        ((status == 0)) || fail "victim-$name: wrong behaviour after SIG$signal (status $status)"
    done
    status=0
    wait_pid "$ENGINE_PID" 10 || status=$?
    if [[ $signal == TERM ]]; then
        ((status == 0)) || fail "the engine exited with status $status after SIGTERM"
    fi
    ENGINE_PID=
    log "SIG$signal: every program returned and fell back to the kernel"
done
log "engine stop: all checks passed for SIGTERM and SIGKILL"
