#!/usr/bin/env bash
# A server outlives its engine: python3 -m http.server (select/poll on its listener) preloaded,
# serving through the engine; the engine is killed (SIGKILL, then SIGTERM with a new server).
# The server must not spin: less than 5% of one CPU over the next second. Its listener reports
# the end once (readable, accept() -> ECONNABORTED, which socketserver ignores) and is quiet
# after; the server stays up.
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
    start_engine
    port=$(free_port)
    "${PRELOAD[@]}" "$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$dir/site" \
        >"$dir/http-$signal.log" 2>&1 &
    server_pid=$!
    track "$server_pid"
    wait_until 10 listening_on "$port" || fail "http.server did not listen on port $port"
    expect_engine_listener "$port" "$server_pid"
    body=$(curl -sS --fail --max-time 10 "http://127.0.0.1:$port/hello.txt") || fail "curl failed"
    [[ $body == hello ]] || fail "curl got '$body'"

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
    stop_pid "$server_pid"
done
log "engine death: http.server stayed up and idle"
