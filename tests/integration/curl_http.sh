#!/usr/bin/env bash
# curl and python3 -m http.server: bodies of 0 B, 1 B, 16 KB and 100 MB (random, sha256 checked)
# with (a) the server preloaded, (b) curl preloaded, (c) both; each case proves with ss that
# the preloaded side's sockets belonged to tcpsd.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
need_tool curl sha256sum
[[ -n $PYTHON ]] || skip "python3 is not installed"

site=$TCPS_TEST_DIR/site
mkdir -p "$site"
: >"$site/empty.bin"
printf 'x' >"$site/one.bin"
head -c 16384 /dev/urandom >"$site/16k.bin"
head -c $((100 << 20)) /dev/urandom >"$site/100m.bin"
# Read slowly (curl --limit-rate) so curl's connection is still open while ss looks at it.
head -c $((4 << 20)) /dev/urandom >"$site/slow.bin"
declare -A expected
for file in empty one 16k 100m slow; do expected[$file]=$(sha256_of "$site/$file.bin"); done

start_engine

# Starts the server (preloaded if $1 = yes) on a fresh port; sets SERVER_PID and PORT.
start_server() {
    PORT=$(free_port)
    local runner=()
    if [[ $1 == yes ]]; then runner=("${PRELOAD[@]}"); fi
    "${runner[@]}" "$PYTHON" -m http.server "$PORT" --bind 127.0.0.1 --directory "$site" \
        >"$TCPS_TEST_DIR/http-$PORT.log" 2>&1 &
    SERVER_PID=$!
    track "$SERVER_PID"
    wait_until 10 listening_on "$PORT" || fail "http.server did not listen on port $PORT"
    wait_until 10 curl -s -o /dev/null "http://127.0.0.1:$PORT/empty.bin" ||
        fail "http.server on port $PORT does not answer"
}

# Fetches every body with curl (preloaded if $1 = yes) and checks its length and checksum.
fetch_all() {
    local runner=() file out
    if [[ $1 == yes ]]; then runner=("${PRELOAD[@]}"); fi
    for file in empty one 16k 100m; do
        out=$TCPS_TEST_DIR/got-$file.bin
        rm -f "$out"
        "${runner[@]}" curl -sS --fail --max-time 120 -o "$out" "http://127.0.0.1:$PORT/$file.bin" ||
            fail "curl of $file.bin failed (status $?)"
        [[ $(sha256_of "$out") == "${expected[$file]}" ]] ||
            fail "$file.bin: checksum mismatch ($(stat -c %s "$out") bytes received)"
        log "  $file.bin: $(stat -c %s "$out") bytes, sha256 ok"
    done
}

# A rate-limited download that keeps one connection open for ~2 s; sets SLOW_PID.
start_slow_fetch() {
    local runner=()
    if [[ $1 == yes ]]; then runner=("${PRELOAD[@]}"); fi
    "${runner[@]}" curl -sS --fail --max-time 60 --limit-rate 2M \
        -o "$TCPS_TEST_DIR/got-slow.bin" "http://127.0.0.1:$PORT/slow.bin" &
    SLOW_PID=$!
    track "$SLOW_PID"
}

finish_slow_fetch() {
    local status=0
    wait_pid "$SLOW_PID" 60 || status=$?
    ((status == 0)) || fail "the rate-limited curl failed (status $status)"
    [[ $(sha256_of "$TCPS_TEST_DIR/got-slow.bin") == "${expected[slow]}" ]] ||
        fail "slow.bin: checksum mismatch"
}

run_case() {
    local name=$1 server_preloaded=$2 curl_preloaded=$3
    log "case $name: server preloaded=$server_preloaded, curl preloaded=$curl_preloaded"
    start_server "$server_preloaded"
    if [[ $server_preloaded == yes ]]; then expect_engine_listener "$PORT" "$SERVER_PID"; fi
    fetch_all "$curl_preloaded"
    if [[ $server_preloaded == yes ]]; then
        hold_connection "$PORT"
        expect_engine_server_side "$PORT" "$SERVER_PID"
        stop_pid "$HOLD_PID"
    fi
    if [[ $curl_preloaded == yes ]]; then
        start_slow_fetch "$curl_preloaded"
        expect_engine_client "$PORT" "$SLOW_PID"
        finish_slow_fetch
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || fail "http.server died"
    stop_pid "$SERVER_PID"
    log "case $name: ok"
}

run_case a yes no
run_case b no yes
run_case c yes yes
stop_engine
log "curl + http.server: all cases passed"
