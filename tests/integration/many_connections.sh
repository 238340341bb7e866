#!/usr/bin/env bash
# 100,000 connections in one offloaded process (many_connections.cpp), with the engine's
# sockets counted by ss while they are open, and the engine holding none afterwards.
# N from $MANY_N (default 100000). Root only (RLIMIT_NOFILE past the hard limit).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

((EUID == 0)) || skip "needs root (raises RLIMIT_NOFILE for $((2 * ${MANY_N:-100000})) sockets)"
need_engine
[[ -x ${MANY_CONNECTIONS:-} ]] || skip "MANY_CONNECTIONS is not set (not built)"
n=${MANY_N:-100000}
# The process needs 2N descriptors, and so does the engine. Where root may not raise its hard
# limit (no CAP_SYS_RESOURCE, as in some containers), N is what that limit allows, and we say
# so: the count still spans several chunks, far past the old 3,072 accepted connections.
hard=$(ulimit -Hn)
if [[ $hard != unlimited ]] && ! (ulimit -Hn $((2 * n + 512)) 2>/dev/null); then
    n=$(((hard - 512) / 2))
    log "RLIMIT_NOFILE's hard limit is $hard and cannot be raised here: N = $n"
fi
start_engine
out=$TCPS_TEST_DIR/many.out
go=$TCPS_TEST_DIR/go
"${PRELOAD[@]}" "$MANY_CONNECTIONS" "$n" --expect-offload "$go" >"$out" 2>&1 &
app=$!
track "$app"
wait_for_line 300 "$out" "^connected" || fail "no connections: $(cat "$out")"
cat "$out"
# While they are open: the engine holds all 2N of them, the program none.
engine_sockets=$(ss -tanpH state established "( sport >= :1 )" | grep -c "pid=$ENGINE_PID," || true)
app_sockets=$(ss -tanpH | grep -c "pid=$app," || true)
log "ss: $engine_sockets established sockets are tcpsd's, $app_sockets the program's"
((engine_sockets >= 2 * n)) || fail "the engine holds $engine_sockets of $((2 * n)) sockets"
((app_sockets == 0)) || fail "the program holds $app_sockets kernel sockets"
: >"$go"  # the program goes on: numbers through every connection, then closes
status=0
wait_pid "$app" 300 || status=$?
cat "$out"
((status == 0)) || fail "many_connections exited with status $status"
grep -q "^PASS" "$out" || fail "no PASS line"
# shellcheck disable=SC2317  # called by wait_until
engine_empty() { [[ $(ss -tanpH | grep -c "pid=$ENGINE_PID," || true) == 0 ]]; }
wait_until 60 engine_empty || fail "the engine still holds sockets after the program exited"
stop_engine
log "many_connections: $n connections in one process, all through the engine"
