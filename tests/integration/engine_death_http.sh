#!/usr/bin/env bash
# A server outlives its engine: python3 -m http.server (select/poll on its listener) preloaded,
# serving through the engine; the engine is killed (SIGKILL, then SIGTERM with a new server).
# The server must not spin: less than 5% of one CPU over the next second. Its listener reports
# the end once (readable, accept() -> ECONNABORTED, which socketserver ignores), and that
# accept() makes the listener again in the kernel (the server is the only process holding it):
# the server stays up and serves curl again, from a kernel listener of its own (ss). Arguments
# go to tcpsd: engine_death_http_twin (--handoff-load 0) serves curl through the listener's twin
# (engine/twin.cpp), which http.server then holds, and which becomes its kernel listener.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
need_tool curl getconf
[[ -n $PYTHON ]] || skip "python3 is not installed"
dir=$TCPS_TEST_DIR
mkdir -p "$dir/site"
printf 'hello\n' >"$dir/site/hello.txt"

for signal in KILL TERM; do
    start_engine "$@"
    port=$(free_port)
    "${PRELOAD[@]}" "$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$dir/site" \
        >"$dir/http-$signal.log" 2>&1 &
    server_pid=$!
    track "$server_pid"
    wait_until 10 listening_on "$port" || fail "http.server did not listen on port $port"
    expect_engine_listener "$port" "$server_pid"
    body=$(curl -sS --fail --max-time 10 "http://127.0.0.1:$port/hello.txt") || fail "curl failed"
    [[ $body == hello ]] || fail "curl got '$body'"

    # The kernel listeners on the port now (the engine's, and with a twin the twin): their
    # inodes.
    before=$(ss -tlnpeH "( sport = :$port )" | grep -o 'ino:[0-9]*' | sort)
    log "SIG$signal to the engine while http.server waits in select/poll on its listener"
    kill -"$signal" "$ENGINE_PID"
    status=0
    wait_pid "$ENGINE_PID" 10 || status=$?
    ((status != 124)) || fail "the engine did not exit within 10 s of SIG$signal"
    ENGINE_PID=
    percent=$(cpu_percent_over 1 "$server_pid")
    log "http.server after the engine's end: ${percent}% of one CPU over 1 s"
    kill -0 "$server_pid" 2>/dev/null || fail "http.server died with its engine: $(cat "$dir/http-$signal.log")"
    ((${percent%.*} < 5)) || fail "http.server spins after the engine's end: ${percent}% CPU (limit 5%)"
    # shellcheck disable=SC2317  # called by wait_until
    served_again() {
        [[ $(curl -sS --fail --max-time 2 "http://127.0.0.1:$port/hello.txt" 2>/dev/null) == hello ]]
    }
    wait_until 10 served_again || fail "http.server does not serve again after the engine's end"
    lines=$(ss -tlnpH "( sport = :$port )")
    grep -q "pid=$server_pid," <<<"$lines" ||
        fail "the listener on port $port is not http.server's own kernel socket: $lines"
    if (($# > 0)); then
        # The twin it accepted from: the same socket (inode), not a new one bound after.
        now=$(ss -tlnpeH "( sport = :$port )" | grep -o 'ino:[0-9]*' || true)
        grep -qx "$now" <<<"$before" ||
            fail "http.server's listener ($now) is not the twin it held (before: $(tr '\n' ' ' <<<"$before"))"
        log "evidence: the twin ($now) became http.server's kernel listener"
    fi
    log "evidence: http.server serves again, from its own kernel listener on port $port"
    stop_pid "$server_pid"
done
log "engine death: http.server stayed up and idle, and serves again on kernel sockets"
