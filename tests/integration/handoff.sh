#!/usr/bin/env bash
# Seed 003's handoff at accept: a saturated engine leaves new connections to the kernel, in the
# application. With `tcpsd --handoff-load 0` (always saturated) a preloaded Python echo
# server's accept() returns kernel sockets (ss: the server owns them, the listener stays
# tcpsd's), every byte is echoed, and the engine read none of them (its counters). They reach
# the server through the listener's twin (engine/twin.cpp: the engine accepted none of them),
# whether the server sleeps in accept() or waits in epoll; a listener with SO_REUSEPORT of the
# application's own has no twin, and the engine hands each connection over after accepting it.
# With the default (never saturated) the same server gets offloaded sockets that tcpsd owns.
# Then (one worker) connections left to the kernel under real load are offloaded again once it
# falls.
# With "2-workers" the engine runs two workers (--cores 0,1): the connections alternate between
# them, so the second worker's are handed back through the family's home (issue 11); and with
# one worker saturated by another family's stream, the family's new connections all go to the
# other one, offloaded.
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
    [[ -z ${PHASE_START:-} ]] || "$PHASE_START" "$name"
    rm -f "$dir/$name.port"
    mkfifo "$dir/$name.in"
    env "${SERVER_ENV[@]}" "${PRELOAD[@]}" "$PYTHON" "$server" "$connections" "$dir/$name.port" \
        <"$dir/$name.in" >"$dir/$name.out" 2>&1 &
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
    [[ -z ${PHASE_END:-} ]] || "$PHASE_END" "$name"
    stop_engine
}

# Every worker's count after "$1 " in STATS, added up.
stat_sum() { sed -n "s/.* $1 \([0-9]*\)[ ,].*/\1/p" <<<"$STATS" | awk '{ t += $1 } END { print t + 0 }'; }

SERVER_ENV=()
# Through the twin: the server asleep in accept(), then waiting in epoll.
for server_env in HANDOFF_EPOLL=0 HANDOFF_EPOLL=1; do
    SERVER_ENV=("$server_env")
    run_phase "saturated-${server_env,,}" kernel --handoff-load 0
    ((workers == 1)) || grep -q '(saturated)' <<<"$STATS" || fail "a worker is not saturated"
    (($(stat_sum accepts) == 0)) || fail "$server_env: the engine accepted $(stat_sum accepts) connections"
    (($(stat_sum kernel-served) == 0)) || fail "$server_env: handed over one by one, not through the twin"
    (($(stat_sum "listener twins") == 1)) || fail "$server_env: $(stat_sum "listener twins") twins, not 1"
    (($(stat_sum "steered to") == 1)) || fail "$server_env: the twin was not steered to"
    (($(stat_sum ready) >= 1)) || fail "$server_env: the engine never saw the twin readable"
    (($(stat_sum "bytes in") == 0)) || fail "$server_env: the engine read $(stat_sum "bytes in") bytes"
    log "saturated ($server_env): $connections connections through the listener's twin, none accepted by tcpsd"
done

# A listener with a twin looks like Linux's: getsockopt(SO_REUSEPORT) says 0, its close
# resets what waits in it (here, in the twin), a listener shut down (SHUT_RD) and listening
# again accepts (through a new twin), and the port can be bound again at once without
# SO_REUSEADDR (and that listener gets a twin of its own). The same script natively first:
# its output is what Linux says.
twin_close() {
    "$PYTHON" -c 'import socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(4)
port = l.getsockname()[1]
print("SO_REUSEPORT", l.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
first = socket.create_connection(("127.0.0.1", port))
conn, _ = l.accept()  # through the twin: this process holds it from now on
conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
conn.close()  # reset: no TIME_WAIT on the port
first.close()
second = socket.create_connection(("127.0.0.1", port))
second.settimeout(10)
l.close()
try:
    print("waiting connection got", second.recv(1))
except ConnectionResetError:
    print("waiting connection reset")
again = socket.socket()
again.bind(("127.0.0.1", port))
again.listen(1)
print("bound again")
again.shutdown(socket.SHUT_RD)  # disconnected: listen() may be called again, and accepts
again.listen(1)
third = socket.create_connection(("127.0.0.1", port))
again.settimeout(10)
conn, _ = again.accept()
third.sendall(b"3")
print("listening again, accepted", conn.recv(1))'
}
native_close=$(twin_close)
: >"$dir/engine.log"
start_engine "${cores[@]}" --handoff-load 0
offloaded_close=$("${PRELOAD[@]}" bash -c "$(declare -f twin_close); PYTHON=$PYTHON twin_close")
kill -USR1 "$ENGINE_PID"
# shellcheck disable=SC2317  # called by wait_until
twin_stats() { grep -q "listener twins" "$dir/engine.log"; }
wait_until 10 twin_stats || fail "twin close: no statistics"
grep -q "listener twins 3 steered to 3 ready [1-9]" "$dir/engine.log" ||
    fail "twin close: the connections did not go through a twin: $(grep "listener twins" "$dir/engine.log")"
stop_engine
sed 's/^/  native: /' <<<"$native_close"
sed 's/^/  offloaded: /' <<<"$offloaded_close"
[[ $offloaded_close == "$native_close" ]] || fail "a listener with a twin differs from Linux's"
log "twin close: as Linux: $(tr '\n' ' ' <<<"$native_close")"

# The application's own SO_REUSEPORT: no twin; each connection accepted, then handed over.
SERVER_ENV=(HANDOFF_REUSEPORT=1)
run_phase saturated-reuseport kernel --handoff-load 0
SERVER_ENV=()
served=$(stat_sum kernel-served)
bytes_in=$(stat_sum "bytes in")
if ((workers == 2)); then
    second=$(sed -n 's/.*worker 1: .* kernel-served \([0-9]*\),.*/\1/p' <<<"$STATS")
    ((second > 0)) || fail "the second worker left no connection to the kernel"
fi
(($(stat_sum "listener twins") == 0)) || fail "a listener with SO_REUSEPORT of its own got a twin"
((served == connections)) || fail "the engine left $served connections to the kernel, not $connections"
((bytes_in == 0)) || fail "the engine read $bytes_in bytes of connections it left to the kernel"
grep -q '(saturated)' <<<"$STATS" || fail "the statistics do not say the worker is saturated"
log "saturated: $connections connections accepted by tcpsd, served by the application's kernel"

run_phase default offloaded
served=$(stat_sum kernel-served)
((served == 0)) || fail "the engine left $served connections to the kernel while not saturated"

# Offloaded again when the load falls. A stream through the engine (tcps_test_app) keeps its
# worker busy past --handoff-load 21 (saturated from 21% busy, no longer below 1%); the
# server accepts its connections meanwhile (kernel sockets) and puts them in an epoll, the
# stream ends, and the server offers each to the engine again by calls on it (a getsockopt,
# repeated until the engine has room and takes it, bounded: taking one can make the engine
# refuse the next for a window) before its event loop reads. Each moves with its epoll
# registrations (adopt.cpp): the event loop sees every byte the clients sent while they were
# the kernel's, and ss shows tcpsd owning them.
# Every worker's statistics line, freshly asked for: waits until the engine's main thread has
# logged them (at its next poll round).
# shellcheck disable=SC2317  # called by wait_until
stats_now() {
    local before
    before=$(grep -c "kernel-served" "$dir/engine.log" || true)
    kill -USR1 "$ENGINE_PID"
    # shellcheck disable=SC2317
    logged() { (($(grep -c "kernel-served" "$dir/engine.log") >= before + workers)); }
    wait_until 5 logged || fail "no statistics within 5 s"
    grep "kernel-served" "$dir/engine.log" | tail -n "$workers"
}
# shellcheck disable=SC2317
saturated() { stats_now | grep -q '(saturated)'; }
# shellcheck disable=SC2317
has_room() { ! stats_now | grep -q '(saturated)'; }

# A fresh engine with --handoff-load 21, kept saturated by a stream through it (LOAD_PID;
# `end_load` stops it and waits until the engine has room again). $1 names the phase.
start_saturated() {
    : >"$dir/engine.log"
    start_engine --handoff-load 21
    "${PRELOAD[@]}" timeout 120 "$TCPS_TEST_APP" stream 100000 >"$dir/load.out" 2>&1 &
    LOAD_PID=$!
    track "$LOAD_PID"
    wait_until 30 saturated || fail "$1: a stream through the engine never made it 21% busy: $(stats_now)"
}
end_load() {
    kill -TERM "$LOAD_PID"  # timeout passes it on to the stream
    wait "$LOAD_PID" || true
    wait_until 10 has_room || fail "$1: the engine stayed saturated: $(stats_now)"
}

reoffload() {
    start_saturated reoffload
    log "reoffload: $(stats_now)"
    rm -f "$dir/later.port"
    mkfifo "$dir/later.in"
    "${PRELOAD[@]}" "$PYTHON" "$server" "$connections" "$dir/later.port" later \
        <"$dir/later.in" >"$dir/later.out" 2>&1 &
    local server_pid=$!
    track "$server_pid"
    exec 7>"$dir/later.in"
    local port clients=()
    port=$(wait_for_port_file 10 "$dir/later.port") || fail "reoffload: the server did not start"
    for k in $(seq 0 $((connections - 1))); do
        echo_once "$port" "$k" &
        clients+=($!)
        wait_for_line 10 "$dir/later.out" "connection $k accepted:" ||
            fail "reoffload: connection $k was not accepted: $(cat "$dir/later.out")"
    done
    end_load reoffload
    log "reoffload: the load is gone: $(stats_now)"
    echo >&7
    wait_for_line 30 "$dir/later.out" "connection $((connections - 1)): " ||
        fail "reoffload: the connections were not echoed: $(cat "$dir/later.out")"
    local lines
    lines=$(ss -tanpH state established "( sport = :$port )")
    echo "$lines" | sed 's/^/  ss: /'
    (($(grep -c "pid=$ENGINE_PID," <<<"$lines") == connections)) ||
        fail "reoffload: tcpsd does not hold the $connections connections"
    ! grep -q "pid=$server_pid," <<<"$lines" || fail "reoffload: the server still holds one"
    echo >&7
    exec 7>&-
    for client in "${clients[@]}"; do
        wait "$client" || fail "reoffload: a connection did not get its bytes back"
    done
    wait "$server_pid" || fail "reoffload: the server failed: $(cat "$dir/later.out")"
    cat "$dir/later.out"
    (($(grep -c "accepted: kernel socket" "$dir/later.out") == connections)) ||
        fail "reoffload: the saturated engine did not leave the connections to the kernel"
    (($(grep -c "100000 bytes echoed, now offloaded" "$dir/later.out") == connections)) ||
        fail "reoffload: the connections were not offloaded again"
    STATS=$(stats_now)
    sed "s/^/  reoffload: /" <<<"$STATS"
    (($(stat_sum "adopted sockets") == connections)) ||
        fail "reoffload: the engine adopted $(stat_sum "adopted sockets") sockets"
    stop_engine
    log "reoffload: $connections connections left to the kernel under load, offloaded again after"
}

# Talks to port $1 in rounds until file $2 exists: 1,000 bytes out (a pattern of the round
# number), the same 1,000 back, checked; a pause of 10 ms between rounds keeps its own load on
# the engine small. Exits 0 if every byte came back in order; says how many rounds.
echo_rounds() {
    "$PYTHON" -c 'import os, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(30)
rounds = 0
while not os.path.exists(sys.argv[2]):
    payload = bytes((rounds * 13 + i) % 251 for i in range(1000))
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"closed after {rounds} rounds")
        got += chunk
    if got != payload:
        sys.exit(f"round {rounds}: the echo differs")
    rounds += 1
    time.sleep(0.01)
s.close()
print(f"{rounds} rounds echoed")' "$1" "$2"
}

# How many of the server's established connections (on the caller's $port) process $1 holds,
# per ss; whether the caller's $server_pid, or the engine, holds all of them.
held_by() {
    ss -tanpH state established "( sport = :$port )" | grep -c "pid=$1," || true
}
# shellcheck disable=SC2317  # called by wait_until
server_holds_all() { (($(held_by "$server_pid") == connections)); }
# shellcheck disable=SC2317
engine_holds_all() { (($(held_by "$ENGINE_PID") == connections)); }

# Starts handoff_server.py in mode $2 (files $dir/$1.*) and $connections echo_rounds clients;
# accept() must give each a socket of kind $3 (offloaded or kernel). Sets the caller's
# server_pid, port and clients. echo_finish $1 then ends the rounds and checks every client
# got all its bytes back in order.
echo_start() {
    rm -f "$dir/$1.port" "$dir/$1.stop"
    "${PRELOAD[@]}" "$PYTHON" "$server" "$connections" "$dir/$1.port" "$2" >"$dir/$1.out" 2>&1 &
    server_pid=$!
    track "$server_pid"
    port=$(wait_for_port_file 10 "$dir/$1.port") || fail "$1: the server did not start"
    clients=()
    for k in $(seq 0 $((connections - 1))); do
        echo_rounds "$port" "$dir/$1.stop" >"$dir/$1.client$k" 2>&1 &
        clients+=($!)
        wait_for_line 10 "$dir/$1.out" "connection $k accepted: $3" ||
            fail "$1: connection $k was not $3 at accept: $(cat "$dir/$1.out")"
    done
}
echo_finish() {
    touch "$dir/$1.stop"
    for k in $(seq 0 $((connections - 1))); do
        wait "${clients[$k]}" || fail "$1: connection $k lost or mixed bytes: $(cat "$dir/$1.client$k")"
        sed "s/^/  client $k: /" "$dir/$1.client$k"
    done
    wait "$server_pid" || fail "$1: the server failed: $(cat "$dir/$1.out")"
    cat "$dir/$1.out"
}

# Live connections move to the kernel under load, and back after (seed 003: "reclaim any of
# them at any time"). A preloaded Python event loop echoes 3 connections that clients keep
# busy in rounds; they start offloaded. The stream makes the engine saturated (--handoff-load
# 21): it asks connections back, and the server hands each to its kernel at a call that finds
# both its rings empty (ss: the server owns them), with the receive timeout it had set. The
# stream ends: its first calls offload them again (ss: tcpsd). Every round's bytes must come
# back in order throughout. With $1 "shed-threads" the server has two threads per connection,
# one asleep in recv() while the other sends and hands the socket back: the sleeper must go
# on with the kernel socket. Such a connection, with a call asleep in it when it went, stays
# the kernel's (no re-offload: refs cannot tell that call from a second number).
shed() {
    local mode=$1
    : >"$dir/engine.log"
    start_engine --handoff-load 21
    local server_pid port clients
    echo_start shed "$mode" offloaded
    engine_holds_all || fail "shed: tcpsd does not hold the connections at first"
    "${PRELOAD[@]}" timeout 120 "$TCPS_TEST_APP" stream 100000 >"$dir/load.out" 2>&1 &
    local load_pid=$!
    track "$load_pid"
    wait_until 30 saturated || fail "shed: the stream never made the engine 21% busy: $(stats_now)"
    log "shed: $(stats_now)"
    wait_until 30 server_holds_all ||
        fail "shed: the connections were not handed to the server's kernel: $(cat "$dir/shed.out")"
    ss -tanpH state established "( sport = :$port )" | sed 's/^/  ss under load: /'
    ((workers == 1)) || fail "shed runs with one worker"
    STATS=$(stats_now)
    # At least the server's: the engine asks any of its connections, the load's own two
    # included, and one of those found idle at a call moves too (ss above counts the server's).
    (($(stat_sum shed) >= connections)) || fail "shed: the engine counts $(stat_sum shed) shed: $STATS"
    kill -TERM "$load_pid"
    wait "$load_pid" || true
    wait_until 10 has_room || fail "shed: the engine stayed saturated: $(stats_now)"
    if [[ $mode == shed ]]; then
        wait_until 30 engine_holds_all ||
            fail "shed: the connections were not offloaded again: $(cat "$dir/shed.out")"
        ss -tanpH state established "( sport = :$port )" | sed 's/^/  ss after: /'
    fi
    echo_finish shed
    for k in $(seq 0 $((connections - 1))); do
        grep -q "connection $k: now kernel .*, receive timeout 77 s" "$dir/shed.out" ||
            fail "shed: connection $k did not become a kernel socket with its receive timeout"
        [[ $mode == shed-threads ]] || grep -q "connection $k: now offloaded" "$dir/shed.out" ||
            fail "shed: the server did not see connection $k offloaded again"
    done
    STATS=$(stats_now)
    sed "s/^/  $mode: /" <<<"$STATS"
    [[ $mode == shed-threads ]] || (($(stat_sum "adopted sockets") >= connections)) ||
        fail "shed: the engine adopted $(stat_sum "adopted sockets") sockets"
    stop_engine
    log "$mode: $connections live connections handed to the kernel under load, every byte echoed"
}

# Connections a saturated engine left to the kernel, in a server with two threads per
# connection (handoff_server.py shed-threads: one asleep in recv(), the other sending back what
# it got), which clients keep busy in rounds. Once the engine has room they are offloaded
# again at a call that finds no other thread inside a kernel call on them (adopt.cpp,
# KernelCall), the reader's next recv(): ss shows tcpsd owning them. The writer's calls, made
# while the reader sleeps in the kernel's recv(), must not move them: the engine's receive and
# the sleeping one would race for the next round's bytes (a round lost or out of order).
reoffload_threads() {
    start_saturated reoffload-threads
    local server_pid port clients
    echo_start reoffload-threads shed-threads kernel
    wait_until 10 server_holds_all || fail "reoffload-threads: the server does not hold them all"
    end_load reoffload-threads
    wait_until 30 engine_holds_all ||
        fail "reoffload-threads: the connections were not offloaded again: $(cat "$dir/reoffload-threads.out")"
    ss -tanpH state established "( sport = :$port )" | sed 's/^/  ss after: /'
    echo_finish reoffload-threads
    for k in $(seq 0 $((connections - 1))); do
        grep -q "connection $k: now offloaded" "$dir/reoffload-threads.out" ||
            fail "reoffload-threads: the server did not see connection $k offloaded again"
    done
    STATS=$(stats_now)
    sed "s/^/  reoffload-threads: /" <<<"$STATS"
    (($(stat_sum "adopted sockets") >= connections)) ||
        fail "reoffload-threads: the engine adopted $(stat_sum "adopted sockets") sockets"
    stop_engine
    log "reoffload-threads: $connections connections of a threaded server offloaded again, every byte echoed"
}

# The rule itself, without timing: a connection left to the kernel under load, with a thread
# of the server asleep in the kernel's recv() on it (handoff_server.py blocked-reader, which
# reads /proc to know). Once the engine has room, another thread's send() must leave it the
# kernel's; the peer's answer must reach the sleeping reader; the reader's next recv()
# offloads it, and gets the peer's next bytes through the engine.
blocked_reader() {
    start_saturated blocked-reader
    rm -f "$dir/br.port"
    mkfifo "$dir/br.in"
    "${PRELOAD[@]}" "$PYTHON" "$server" 1 "$dir/br.port" blocked-reader \
        <"$dir/br.in" >"$dir/br.out" 2>&1 &
    local server_pid=$!
    track "$server_pid"
    exec 7>"$dir/br.in"
    local port
    port=$(wait_for_port_file 10 "$dir/br.port") || fail "blocked-reader: no server"
    "$PYTHON" -c 'import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(30)
for want, answer in ((b"W", b"X"), (b"Z", b"Y")):
    got = s.recv(1)
    if got != want:
        sys.exit(f"got {got!r}, not {want!r}")
    s.sendall(answer)
if s.recv(1) != b"":
    sys.exit("not closed")' "$port" >"$dir/br.client" 2>&1 &
    local client=$!
    wait_for_line 10 "$dir/br.out" "accepted: kernel socket, reader asleep" ||
        fail "blocked-reader: no kernel socket with a reader asleep in it: $(cat "$dir/br.out")"
    end_load blocked-reader
    echo >&7
    exec 7>&-
    wait "$client" || fail "blocked-reader: the client failed: $(cat "$dir/br.client") $(cat "$dir/br.out")"
    wait "$server_pid" || fail "blocked-reader: the server failed: $(cat "$dir/br.out")"
    sed 's/^/  blocked-reader: /' "$dir/br.out"
    grep -q "trigger sent: now kernel" "$dir/br.out" ||
        fail "blocked-reader: a send offloaded the socket while a reader slept in the kernel's recv()"
    grep -q "reader: got b'X'" "$dir/br.out" || fail "blocked-reader: the sleeping reader did not get X"
    grep -q "reader: got b'Y', now offloaded" "$dir/br.out" ||
        fail "blocked-reader: the reader's next recv() did not offload it"
    stop_engine
    log "blocked-reader: not offloaded under a sleeping kernel recv(), offloaded at the reader's next"
}

# Two workers, one of them saturated by another family's stream (a sink under the shim, fed by
# a kernel sender: its one connection is one worker's, and stays so), the other with room: the family's new
# connections all go to the worker with room and are offloaded (engine/policy.hpp
# next_worker(), family_saturated()); none is given to the busy worker, which would leave it to
# the kernel, and the listener's twin is not steered to.
# $1: the phase; $SINK: half-closed (the default) or open (its connection may be asked back).
# shellcheck disable=SC2317  # PHASE_START and PHASE_END
start_sink_load() {
    rm -f "$dir/sink.port" "$dir/sink.stop"
    "${PRELOAD[@]}" timeout 120 "$PYTHON" -c 'import os, socket, sys, time
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(1)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(l.getsockname()[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
c, _ = l.accept()
if sys.argv[2] == "half-closed":
    c.shutdown(socket.SHUT_WR)  # never asked back (shed_to_kernel): the load stays
# Else it says each time its connection changes hands, and since when it was where it was.
where, since = "offloaded", time.monotonic()
while c.recv(1 << 20):
    if sys.argv[2] == "half-closed":
        continue
    now = "kernel" if os.readlink(f"/proc/self/fd/{c.fileno()}").startswith("socket:") else "offloaded"
    if now != where:
        print(f"now {now}, {where} for {(time.monotonic() - since) * 1000:.0f} ms", flush=True)
        where, since = now, time.monotonic()' "$dir/sink.port" "${SINK:-half-closed}" >"$dir/sink.out" 2>&1 &
    SINK_PID=$!
    track "$SINK_PID"
    local sink_port
    sink_port=$(wait_for_port_file 10 "$dir/sink.port") || fail "$1: the sink did not start"
    timeout 120 "$PYTHON" -c 'import os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
piece = bytes(1 << 20)
while not os.path.exists(sys.argv[2]):
    s.sendall(piece)' "$sink_port" "$dir/sink.stop" &
    SENDER_PID=$!
    track "$SENDER_PID"
    wait_until 30 one_saturated || fail "$1: no single saturated worker: $(stats_now)"
    BUSY_WORKER=$(sed -n 's/^.*worker \([0-9]\): .*(saturated).*$/\1/p' <<<"$(stats_now)")
    log "$1: worker $BUSY_WORKER saturated by the sink's stream"
    if ((workers == 2)); then
        # The stream's processes onto that worker's core (worker k runs on core k): the other
        # worker's core stays the test's, so rounds of its that they preempt do not make it
        # look saturated too.
        local pid
        for pid in "$SINK_PID" "$SENDER_PID" $(pgrep -P "$SINK_PID") $(pgrep -P "$SENDER_PID"); do
            taskset -a -p -c "$BUSY_WORKER" "$pid" >/dev/null || fail "$1: taskset $pid"
        done
    fi
}
# shellcheck disable=SC2317
stop_sink_load() {
    touch "$dir/sink.stop"
    wait "$SENDER_PID" || true
    wait "$SINK_PID" || true
}
# shellcheck disable=SC2317
one_saturated() { (($(stats_now | grep -c '(saturated)') == 1)); }
# Worker $2's count after "$1 " in STATS.
worker_stat() { sed -n "s/.*worker $2: .* $1 \([0-9]*\)[ ,].*/\1/p" <<<"$STATS"; }

steer() {
    PHASE_START=start_sink_load PHASE_END=stop_sink_load
    run_phase steer offloaded --handoff-load 21
    PHASE_START='' PHASE_END=''
    local other=$((1 - BUSY_WORKER))
    grep -q "worker $BUSY_WORKER: .*(saturated)" <<<"$STATS" ||
        fail "steer: worker $BUSY_WORKER was no longer saturated at the end"
    (($(stat_sum kernel-served) == 0)) || fail "steer: $(stat_sum kernel-served) connections left to the kernel"
    (($(stat_sum "steered to") == 0)) || fail "steer: the twin was steered to with a worker free"
    (($(worker_stat "bytes in [0-9]* out" "$BUSY_WORKER") == 0)) ||
        fail "steer: the saturated worker $BUSY_WORKER served a connection"
    (($(worker_stat "bytes in [0-9]* out" "$other") == connections * 100000)) ||
        fail "steer: worker $other sent $(worker_stat "bytes in [0-9]* out" "$other") bytes, not $((connections * 100000))"
    log "steer: worker $BUSY_WORKER saturated; all $connections connections offloaded to worker $other"
}
if ((workers == 2)); then
    steer
fi

# A bulk stream whose own load saturates the worker: asked back, it leaves the worker idle, and
# offered again it would saturate it again, over and over (ping-pong). Each time it is asked
# back again soon it stays the kernel's twice as long (adopt.cpp, ShedHistory: 100 ms, then
# 200, 400, 800...). The sink says when its connection changes hands: the 4th time it was
# asked back, it must have stayed the kernel's for most of 800 ms (without the hold, about
# 300 ms each time: the load windows until the worker has room again).
ping_pong() {
    : >"$dir/engine.log"
    # 10 (no longer saturated below 5): the stream saturates its worker at once even on a
    # machine busy with other work, where it gets less of its core.
    start_engine --handoff-load 10
    SINK=open start_sink_load ping-pong
    # shellcheck disable=SC2317  # called by wait_until
    offloaded_again() { (($(grep -c "now offloaded" "$dir/sink.out") >= 4)); }
    wait_until 30 offloaded_again || fail "ping-pong: not asked back and offloaded again 4 times: $(cat "$dir/sink.out")"
    stop_sink_load
    stop_engine
    sed 's/^/  ping-pong: sink: /' "$dir/sink.out"
    local held
    held=$(sed -n 's/^now offloaded, kernel for \([0-9]*\) ms$/\1/p' "$dir/sink.out" | sed -n 4p)
    ((held >= 700)) || fail "ping-pong: asked back the 4th time, offloaded again after $held ms"
    log "ping-pong: asked back the 4th time, the kernel's for $held ms"
}

# A connection the saturated engine has asked back, reset by its peer before the application's
# next call on it: that call must report the reset as Linux's would (ECONNRESET), so the
# connection stays the engine's (the engine's receive took the kernel socket's error; handed
# back, its first send said EPIPE). The ask is seen in the statistics before the reset.
reset_asked() {
    : >"$dir/engine.log"
    start_engine "${cores[@]}" --handoff-load 0
    mkfifo "$dir/reset.in"
    "${PRELOAD[@]}" "$TCPS_TEST_APP" reset-asked <"$dir/reset.in" >"$dir/reset.out" 2>&1 &
    local app=$!
    track "$app"
    exec 7>"$dir/reset.in"
    wait_for_line 10 "$dir/reset.out" "reset-asked: ticking" ||
        fail "reset-asked: no half-closed connection: $(cat "$dir/reset.out")"
    # The half-closed one may have been asked before its shutdown, never after: asks beyond
    # these are for the connection to come, the only one the engine can ask for.
    STATS=$(stats_now)
    local before
    before=$(stat_sum "asked back")
    echo >&7
    wait_for_line 10 "$dir/reset.out" "reset-asked: connected" ||
        fail "reset-asked: no connection: $(cat "$dir/reset.out")"
    # shellcheck disable=SC2317  # called by wait_until
    asked() { STATS=$(stats_now) && (($(stat_sum "asked back") > before)); }
    wait_until 10 asked || fail "reset-asked: the engine never asked for the connection: $STATS"
    echo >&7
    exec 7>&-
    wait "$app" || fail "reset-asked: $(cat "$dir/reset.out")"
    sed 's/^/  /' "$dir/reset.out"
    grep -q "send=-1 ECONNRESET, then recv=0 0, offloaded" "$dir/reset.out" ||
        fail "reset-asked: not reported as Linux does: $(cat "$dir/reset.out")"
    stop_engine
    log "reset-asked: a connection asked back and reset meanwhile reports ECONNRESET, offloaded"
}
reset_asked

# One worker: the stream's load and the adoptions meet on it.
if ((workers == 1)); then
    ping_pong
    reoffload
    reoffload_threads
    blocked_reader
    shed shed
    shed shed-threads
fi
log "handoff: pass"
