#!/usr/bin/env bash
# iperf3 -t 3: server preloaded with a plain client, a preloaded client against a plain server,
# then both preloaded. Both ends must exit 0 and the JSON report must show bytes moved; ss
# proves which sockets were tcpsd's.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
need_tool iperf3
[[ -n $PYTHON ]] || skip "python3 is not installed"

start_engine

# Prints the bytes received according to an iperf3 -J report; fails on an error report.
received_bytes() {
    "$PYTHON" - "$1" <<'PY'
import json, sys
with open(sys.argv[1]) as f:
    report = json.load(f)
if "error" in report:
    sys.exit("iperf3 reported: " + report["error"])
end = report["end"]
print(int(end["sum_received"]["bytes"]))
PY
}

run_case() {
    local name=$1 server_preloaded=$2 client_preloaded=$3
    local port server_runner=() client_runner=() status=0 bytes
    log "case $name: server preloaded=$server_preloaded, client preloaded=$client_preloaded"
    if [[ $server_preloaded == yes ]]; then server_runner=("${PRELOAD[@]}"); fi
    if [[ $client_preloaded == yes ]]; then client_runner=("${PRELOAD[@]}"); fi
    port=$(free_port)
    "${server_runner[@]}" iperf3 -s -1 -B 127.0.0.1 -p "$port" -J \
        >"$TCPS_TEST_DIR/server-$name.json" 2>&1 &
    local server_pid=$!
    track "$server_pid"
    wait_until 10 listening_on "$port" || fail "iperf3 -s did not listen on port $port"
    if [[ $server_preloaded == yes ]]; then expect_engine_listener "$port" "$server_pid"; fi

    "${client_runner[@]}" iperf3 -c 127.0.0.1 -p "$port" -t 3 -J \
        >"$TCPS_TEST_DIR/client-$name.json" 2>"$TCPS_TEST_DIR/client-$name.err" &
    local client_pid=$!
    track "$client_pid"
    if [[ $client_preloaded == yes ]]; then expect_engine_client "$port" "$client_pid"; fi
    if [[ $server_preloaded == yes ]]; then expect_engine_server_side "$port" "$server_pid"; fi

    wait_pid "$client_pid" 70 || status=$?
    ((status == 0)) || fail "iperf3 client exited with status $status: $(tail -c 600 "$TCPS_TEST_DIR/client-$name.json") $(cat "$TCPS_TEST_DIR/client-$name.err")"
    status=0
    wait_pid "$server_pid" 20 || status=$?
    ((status == 0)) || fail "iperf3 server exited with status $status: $(tail -c 600 "$TCPS_TEST_DIR/server-$name.json")"

    bytes=$(received_bytes "$TCPS_TEST_DIR/client-$name.json") || fail "client report: $bytes"
    ((bytes > 0)) || fail "the client's report shows no bytes received"
    log "  client report: $bytes bytes received in 3 s ($((bytes / 3 / 1000000)) MB/s)"
    bytes=$(received_bytes "$TCPS_TEST_DIR/server-$name.json") || fail "server report: $bytes"
    ((bytes > 0)) || fail "the server's report shows no bytes received"
    log "case $name: ok"
}

run_case a yes no
run_case b no yes
run_case c yes yes
stop_engine
log "iperf3: all cases passed"
