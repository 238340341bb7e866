#!/usr/bin/env bash
# Seed 003's handoff at accept: a saturated engine leaves the connections it accepts to the
# kernel, in the application. With `tcpsd --handoff-load 0` (always saturated) a preloaded
# Python echo server's accept() returns kernel sockets (ss: the server owns them, the listener
# stays tcpsd's), every byte is echoed, and the engine read none of them (its counters); with
# the default (never saturated) the same server gets offloaded sockets that tcpsd owns.
# With "2-workers" the engine runs two workers (--cores 0,1): the connections alternate between
# them, so the second worker's are handed back through the family's home (issue 11).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

cores=()
workers=1
if [[ ${1:-} == 2-workers ]]; then
    (($(nproc) >= 2)) || skip "this machine has one CPU: no two engine workers"
    cores=(--cores "0,1")
    workers=2
fi

need_engine
need_tool "$PYTHON" ss
server=$(dirname "$0")/handoff_server.py
dir=$TCPS_TEST_DIR
connections=3

# Sends 100,000 bytes to port $1 and checks they come back, and nothing more: the connection
# stays open until the server closes it.
echo_once() {
    "$PYTHON" -c 'import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
payload = bytes((i * 7 + int(sys.argv[2])) % 251 for i in range(100000))
s.sendall(payload)
got = b""
while len(got) < len(payload):
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
ok = got == payload
while s.recv(65536):  # open until the server closes: the test looks at it meanwhile
    ok = False
sys.exit(0 if ok else 1)' "$1" "$2"
}

# $1: a phase name; $2: "kernel" or "offloaded", what accept() must give; the engine's options
# follow.
run_phase() {
    local name=$1 want=$2
    shift 2
    : >"$dir/engine.log"
    start_engine "${cores[@]}" "$@"
    rm -f "$dir/$name.port"
    mkfifo "$dir/$name.in"
    "${PRELOAD[@]}" "$PYTHON" "$server" "$connections" "$dir/$name.port" <"$dir/$name.in" \
        >"$dir/$name.out" 2>&1 &
    local server_pid=$!
    track "$server_pid"
    exec 7>"$dir/$name.in"
    local port
    port=$(wait_for_port_file 10 "$dir/$name.port") || fail "$name: the server did not start"
    expect_engine_listener "$port" "$server_pid"
    for k in $(seq 0 $((connections - 1))); do
        echo_once "$port" "$k" &
        local client=$!
        wait_for_line 10 "$dir/$name.out" "connection $k:" ||
            fail "$name: connection $k was not echoed: $(cat "$dir/$name.out")"
        # The accepted end, while it is open: whose socket is it?
        local lines
        lines=$(ss -tanpH state established "( sport = :$port )")
        echo "$lines" | sed 's/^/  ss: /'
        if [[ $want == kernel ]]; then
            grep -q "pid=$server_pid," <<<"$lines" ||
                fail "$name: connection $k is not the server's own kernel socket"
            ! grep -q "pid=$ENGINE_PID," <<<"$lines" ||
                fail "$name: the engine still holds connection $k"
        else
            grep -q "pid=$ENGINE_PID," <<<"$lines" || fail "$name: connection $k is not tcpsd's"
        fi
        echo >&7
        wait "$client" || fail "$name: connection $k did not get its bytes back"
    done
    exec 7>&-
    wait "$server_pid" || fail "$name: the server failed: $(cat "$dir/$name.out")"
    cat "$dir/$name.out"
    [[ $(grep -c "$want socket, 100000 bytes echoed" "$dir/$name.out") == "$connections" ]] ||
        fail "$name: accept() did not give $want sockets"
    kill -USR1 "$ENGINE_PID"
    # shellcheck disable=SC2317  # called by wait_until
    stats_logged() { (($(grep -c "kernel-served" "$dir/engine.log") >= workers)); }
    wait_until 10 stats_logged || fail "$name: no statistics"
    STATS=$(grep "kernel-served" "$dir/engine.log" | tail -n "$workers")
    sed "s/^/  $name: /" <<<"$STATS"
    stop_engine
}

# Every worker's count after "$1 " in STATS, added up.
stat_sum() { sed -n "s/.* $1 \([0-9]*\)[ ,].*/\1/p" <<<"$STATS" | awk '{ t += $1 } END { print t + 0 }'; }

run_phase saturated kernel --handoff-load 0
served=$(stat_sum kernel-served)
bytes_in=$(stat_sum "bytes in")
if ((workers == 2)); then
    second=$(sed -n 's/.*worker 1: .* kernel-served \([0-9]*\),.*/\1/p' <<<"$STATS")
    ((second > 0)) || fail "the second worker left no connection to the kernel"
fi
((served == connections)) || fail "the engine left $served connections to the kernel, not $connections"
((bytes_in == 0)) || fail "the engine read $bytes_in bytes of connections it left to the kernel"
grep -q '(saturated)' <<<"$STATS" || fail "the statistics do not say the worker is saturated"
log "saturated: $connections connections accepted by tcpsd, served by the application's kernel"

run_phase default offloaded
served=$(stat_sum kernel-served)
((served == 0)) || fail "the engine left $served connections to the kernel while not saturated"
log "handoff: pass"
