#!/usr/bin/env bash
# tcps-run: exit statuses, environment, signal forwarding, reuse of a running engine, and a
# real server run through it with a private engine that is cleaned up afterwards.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
[[ -n ${TCPS_RUN:-} && -x ${TCPS_RUN:-} ]] || skip "TCPS_RUN is not set (tcps-run is not built)"
need_tool curl
[[ -n $PYTHON ]] || skip "python3 is not installed"

# tcps-run makes its private engine's directory under $TMPDIR: keep them inside ours to check
# that each one is removed. No engine answers on the --socket path given here.
export TMPDIR=$TCPS_TEST_DIR/tmp
mkdir -p "$TMPDIR"
nowhere=$TCPS_TEST_DIR/no-engine.sock
run=("$TCPS_RUN" --socket "$nowhere" --engine "$TCPSD" --lib "$LIBTCPS" --)

leftovers() { find "$TMPDIR" -mindepth 1 -maxdepth 1 -name 'tcps-run.*' | wc -l; }
expect_status() {
    local want=$1 status=0
    shift
    "$@" >/dev/null 2>&1 || status=$?
    ((status == want)) || fail "expected status $want, got $status from: $*"
}

log "exit statuses"
expect_status 0 "${run[@]}" true
expect_status 7 "${run[@]}" sh -c 'exit 7'
expect_status 137 "${run[@]}" sh -c 'kill -KILL $$'
expect_status 127 "${run[@]}" "$TCPS_TEST_DIR/no-such-program"
expect_status 125 "$TCPS_RUN" --socket "$nowhere" --engine "$TCPS_TEST_DIR/no-such-engine" -- true
((!$(leftovers))) || fail "tcps-run left its temporary directory behind"

log "environment: LD_PRELOAD prepended, TCPS_ENGINE_SOCKET names the private engine"
env_line=$(LD_PRELOAD=libm.so.6 "${run[@]}" sh -c 'echo "$LD_PRELOAD|$TCPS_ENGINE_SOCKET"')
[[ ${env_line%%|*} == "$(realpath "$LIBTCPS"):libm.so.6" ]] || fail "LD_PRELOAD was: ${env_line%%|*}"
[[ ${env_line#*|} == "$TMPDIR"/tcps-run.*/engine.sock ]] || fail "TCPS_ENGINE_SOCKET was: ${env_line#*|}"
((!$(leftovers))) || fail "tcps-run left its temporary directory behind"

log "signals: SIGTERM, SIGINT and SIGHUP are forwarded to the program"
for signal in TERM INT HUP; do
    "${run[@]}" sleep 30 &
    runner=$!
    track "$runner"
    # Once sleep runs (a child of tcps-run other than tcpsd), signal tcps-run.
    program_started() { [[ -n $(pgrep -P "$runner" -x sleep) ]]; }
    wait_until 10 program_started || fail "the program did not start under tcps-run"
    kill -"$signal" "$runner"
    status=0
    wait_pid "$runner" 10 || status=$?
    want=$((128 + $(kill -l "$signal")))
    ((status == want)) || fail "SIG$signal: tcps-run returned $status, expected $want"
done
((!$(leftovers))) || fail "tcps-run left its temporary directory behind"

log "a running engine is used, not a private one"
start_engine
got=$(TCPS_ENGINE_SOCKET=$ENGINE_SOCK "$TCPS_RUN" --engine "$TCPSD" --lib "$LIBTCPS" -- \
    sh -c 'echo "$TCPS_ENGINE_SOCKET"')
[[ $got == "$ENGINE_SOCK" ]] || fail "with an engine at $ENGINE_SOCK the program got $got"
got=$("$TCPS_RUN" --socket "$ENGINE_SOCK" --engine "$TCPSD" --lib "$LIBTCPS" -- \
    sh -c 'echo "$TCPS_ENGINE_SOCKET"')
[[ $got == "$ENGINE_SOCK" ]] || fail "with --socket $ENGINE_SOCK the program got $got"
((!$(leftovers))) || fail "tcps-run started a private engine although one was running"
stop_engine

log "a server run through tcps-run is offloaded to its private engine"
port=$(free_port)
mkdir -p "$TCPS_TEST_DIR/site"
head -c 16384 /dev/urandom >"$TCPS_TEST_DIR/site/page.bin"
"${run[@]}" "$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$TCPS_TEST_DIR/site" \
    >"$TCPS_TEST_DIR/http.log" 2>&1 &
runner=$!
track "$runner"
wait_until 10 listening_on "$port" || fail "the server did not listen on port $port"
ENGINE_PID=$(pgrep -P "$runner" -x tcpsd) || fail "no tcpsd child of tcps-run"
server_pid=$(pgrep -P "$runner" -f http.server) || fail "no server child of tcps-run"
expect_engine_listener "$port" "$server_pid"
curl -sS --fail --max-time 30 -o "$TCPS_TEST_DIR/got.bin" "http://127.0.0.1:$port/page.bin" ||
    fail "curl through the offloaded server failed"
cmp -s "$TCPS_TEST_DIR/got.bin" "$TCPS_TEST_DIR/site/page.bin" || fail "the body differs"
engine=$ENGINE_PID
ENGINE_PID=  # tcps-run owns this engine: it must stop it
kill -TERM "$runner"
status=0
wait_pid "$runner" 20 || status=$?
((status == 143)) || fail "tcps-run returned $status after SIGTERM, expected 143"
gone "$engine" || fail "tcps-run left its engine (pid $engine) running"
((!$(leftovers))) || fail "tcps-run left its temporary directory behind"
log "tcps-run: all checks passed"
