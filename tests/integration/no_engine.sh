#!/usr/bin/env bash
# No engine at start: with TCPS_ENGINE_SOCKET naming nothing, the shim is inert. The semantics
# program's output under the shim equals its native output, line for line, and curl fetches
# from python3 -m http.server with both preloaded; their sockets are their own kernel sockets.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

[[ -n ${LIBTCPS:-} && -f ${LIBTCPS:-} ]] || skip "LIBTCPS is not set (the shim is not built yet)"
semantics=${TCPS_SEMANTICS:-}
[[ -n $semantics && -x $semantics ]] || skip "TCPS_SEMANTICS is not set (tests/semantics not built)"
need_tool curl ss sha256sum timeout
[[ -n $PYTHON ]] || skip "python3 is not installed"
dir=$TCPS_TEST_DIR
nothing=$dir/no-engine-here.sock
INERT=(env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$nothing")

log "the semantics program, natively and under the shim without an engine"
status=0
timeout 150 "$semantics" >"$dir/native.txt" 2>"$dir/native.err" || status=$?
((status == 0)) || fail "the native run exited with status $status: $(cat "$dir/native.err")"
status=0
"${INERT[@]}" timeout 150 "$semantics" >"$dir/inert.txt" 2>"$dir/inert.err" || status=$?
if ! diff -u "$dir/native.txt" "$dir/inert.txt" >"$dir/inert.diff"; then
    echo "--- native vs preloaded without an engine (- native, + preloaded):"
    cat "$dir/inert.diff"
    fail "without an engine the shim changed $(grep -c '^+[^+]' "$dir/inert.diff") observations"
fi
((status == 0)) || fail "the preloaded run exited with status $status: $(cat "$dir/inert.err")"
log "identical: $(wc -l <"$dir/native.txt") observations"

log "curl and http.server, both preloaded, no engine"
mkdir -p "$dir/site"
head -c 1048576 /dev/urandom >"$dir/site/1m.bin"
port=$(free_port)
"${INERT[@]}" "$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$dir/site" \
    >"$dir/http.log" 2>&1 &
server_pid=$!
track "$server_pid"
wait_until 10 listening_on "$port" || fail "http.server did not listen on port $port"
lines=$(ss -tlnpH "( sport = :$port )")
printf '  ss: %s\n' "$lines"
grep -q "pid=$server_pid," <<<"$lines" || fail "the listener is not http.server's own kernel socket"
"${INERT[@]}" curl -sS --fail --max-time 30 -o "$dir/got.bin" "http://127.0.0.1:$port/1m.bin" ||
    fail "curl failed"
[[ $(sha256_of "$dir/got.bin") == $(sha256_of "$dir/site/1m.bin") ]] || fail "checksum mismatch"
kill -0 "$server_pid" 2>/dev/null || fail "http.server died"
stop_pid "$server_pid"
log "no engine: the shim stayed out of the way"
