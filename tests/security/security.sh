#!/usr/bin/env bash
# The engine as an attacker meets it: other users, hostile clients, exhaustion. Each case is a
# function; `security.sh CASE...` runs some, no argument runs all. Root only (it switches to
# other uids with setpriv); skipped otherwise.
#
# Cases:
#   squatting   a process trusts only root's engine or its own uid's, in a directory nobody else
#               controls: another user's tcpsd on the path is refused (the program keeps kernel
#               sockets and TCPS_DEBUG says why), and tcps-run starts a private engine instead
#   region      a family's region can be opened through /proc/PID/fd only by those who may
#               ptrace a member (and so read its memory anyway): not by another uid
#   owner       an offloaded socket belongs to the process's uid (ss shows it for the listener,
#               the connection and the accepted end), and SO_REUSEPORT groups follow Linux's
#               same-owner rule, also against native sockets: another uid gets EADDRINUSE;
#               a listener root made and passed to another uid, which offloads it: what the
#               engine accepts on it is that uid's
#   twin        under --handoff-load a listener's twin (engine/twin.cpp) is its owner's too,
#               and another uid cannot join its SO_REUSEPORT group to take its connections
#   netns       a socket lives in its process's network namespace; binds follow that namespace's
#               ip_unprivileged_port_start as it is at the bind; nft rules on meta skuid in it
#               apply to offloaded sockets as to native ones
#   exhaustion  a uid that takes all it can of the engine (waiter pipes, sessions, silent
#               connections, sockets) is refused with a clear error at its share, while other
#               users are still served; a listener whose connections cannot be taken says so;
#               a received connection with bytes its sender left unread that the engine
#               cannot take is reset, never served without them
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/../integration/lib.sh"

((EUID == 0)) || skip "needs root (runs clients and engines as other users)"
need_engine
need_tool setpriv ss timeout
[[ -n $PYTHON ]] || skip "python3 is not installed"

# The command prefix that runs a program as uid/gid $1 with no supplementary groups and no
# capabilities (setpriv execs it: a background job's $! is the program's pid).
as_user() {
    AS_USER=(setpriv --reuid="$1" --regid="$1" --clear-groups --inh-caps=-all
        --bounding-set=-all --)
}

# A fresh directory owned by uid $1 with mode $2, outside TCPS_TEST_DIR (which only root can
# enter). Removed by the EXIT trap.
OWNED_DIRS=()
owned_dir() {
    local dir
    dir=$(mktemp -d /tmp/tcps-sec.XXXXXX)
    chown "$1:$1" "$dir"
    chmod "$2" "$dir"
    OWNED_DIRS+=("$dir")
    echo "$dir"
}
NETNS_CREATED=
remove_owned_dirs() {
    ((${#OWNED_DIRS[@]} == 0)) || rm -rf "${OWNED_DIRS[@]}"
    [[ -z $NETNS_CREATED ]] || ip netns del "$NETNS_CREATED" 2>/dev/null || true
}
trap 'status=$?; remove_owned_dirs; set +e; (exit "$status"); cleanup' EXIT

# Starts a tcpsd as uid $1 on socket $2 and waits for it; sets OTHER_ENGINE_PID.
start_engine_as() {
    local uid=$1 sock=$2 ready
    ready=$(dirname "$sock")/ready
    : >"$ready"
    as_user "$uid"
    "${AS_USER[@]}" "$TCPSD" --socket "$sock" --ready-fd 3 3>"$ready" \
        >>"$TCPS_TEST_DIR/engine-$uid.log" 2>&1 &
    OTHER_ENGINE_PID=$!
    track "$OTHER_ENGINE_PID"
    # shellcheck disable=SC2317  # called by wait_until
    ready_now() { grep -q ready "$ready" 2>/dev/null; }
    wait_until 5 ready_now || fail "tcpsd as uid $uid did not start on $sock"
}

# Root's engine on a socket every user can reach (TCPS_TEST_DIR is root's alone); sets
# ROOT_SOCK. The lib.sh engine functions do the rest.
start_root_engine() {
    local dir
    dir=$(owned_dir 0 0755)
    ENGINE_SOCK=$dir/engine.sock
    : >"$TCPS_TEST_DIR/ready"
    "$TCPSD" --socket "$ENGINE_SOCK" --ready-fd 3 "$@" 3>"$TCPS_TEST_DIR/ready" \
        >>"$TCPS_TEST_DIR/engine.log" 2>&1 &
    ENGINE_PID=$!
    track "$ENGINE_PID"
    wait_until 5 engine_ready || fail "the engine did not report ready within 5 s"
}
stop_root_engine() { stop_engine; }

# A plain (not preloaded) TCP listener on 127.0.0.1; sets LISTEN_PORT and LISTEN_PID.
start_plain_listener() {
    LISTEN_PORT=$(free_port)
    "$PYTHON" -c 'import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
conns = []
while True:
    c, _ = s.accept(); conns.append(c)' "$LISTEN_PORT" &
    LISTEN_PID=$!
    track "$LISTEN_PID"
    wait_until 10 listening_on "$LISTEN_PORT" || fail "the plain listener did not start"
}

# A client that connects to port $2 and holds the connection until its stdin closes, as uid
# $1, preloaded with the engine socket $3; its stderr goes to file $4. Sets CLIENT_PID.
start_held_client() {
    local uid=$1 port=$2 sock=$3 err=$4
    mkfifo "$err.in"
    as_user "$uid"
    "${AS_USER[@]}" env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$sock" TCPS_DEBUG=1 \
        "$PYTHON" -c 'import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
sys.stdin.read()' "$port" <"$err.in" >"$err.out" 2>"$err" &
    CLIENT_PID=$!
    track "$CLIENT_PID"
    exec {CLIENT_STDIN}>"$err.in"
    wait_for_line 10 "$err.out" connected || fail "the client did not connect: $(cat "$err")"
}
stop_held_client() {
    exec {CLIENT_STDIN}>&-
    wait_pid "$CLIENT_PID" 10 || fail "the client did not exit"
}

# The connection from the client (pid $1) to port $2 is its own kernel socket.
expect_own_socket() {
    local pid=$1 port=$2 lines
    lines=$(ss -tanpH state established "( dport = :$port )")
    printf '  ss: %s\n' "$lines"
    grep -q "pid=$pid," <<<"$lines" || fail "the client (pid $pid) holds no kernel socket to $port"
}

case_squatting() {
    local squatter=65534 victim=4242 dir sock engine_pid lines
    log "squatting: uid $squatter runs tcpsd on a path uid $victim would use"
    dir=$(owned_dir "$squatter" 0755)
    sock=$dir/engine.sock
    start_engine_as "$squatter" "$sock"
    engine_pid=$OTHER_ENGINE_PID
    start_plain_listener

    start_held_client "$victim" "$LISTEN_PORT" "$sock" "$TCPS_TEST_DIR/victim.err"
    expect_own_socket "$CLIENT_PID" "$LISTEN_PORT"
    grep -q "runs as uid $squatter, not root or uid $victim" "$TCPS_TEST_DIR/victim.err" ||
        fail "TCPS_DEBUG did not say why the engine was refused: $(cat "$TCPS_TEST_DIR/victim.err")"
    stop_held_client
    log "  refused: $(grep -m1 'no engine' "$TCPS_TEST_DIR/victim.err")"

    # The squatter's own programs may use it: the same uid is trusted.
    start_held_client "$squatter" "$LISTEN_PORT" "$sock" "$TCPS_TEST_DIR/own.err"
    lines=$(ss -tanpH state established "( dport = :$LISTEN_PORT )")
    grep -q "pid=$engine_pid," <<<"$lines" || fail "uid $squatter's own engine was not used: $lines"
    stop_held_client
    log "  the same uid's engine is used"

    # tcps-run says so and brings its own engine instead.
    local out=$TCPS_TEST_DIR/run.out
    as_user "$victim"
    "${AS_USER[@]}" env TCPS_ENGINE_SOCKET="$sock" HOME=/ "$TCPS_RUN" --engine "$TCPSD" \
        --lib "$LIBTCPS" -- "$PYTHON" -c 'import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
import subprocess
print(subprocess.run(["ss", "-tanpH", "state", "established", "( dport = :%s )" % sys.argv[1]],
                     capture_output=True, text=True).stdout)' "$LISTEN_PORT" >"$out" 2>&1 ||
        fail "tcps-run failed: $(cat "$out")"
    grep -q "not using the engine on $sock" "$out" || fail "tcps-run did not refuse: $(cat "$out")"
    grep -q '"tcpsd"' "$out" && ! grep -q "pid=$engine_pid," "$out" ||
        fail "tcps-run's program was not served by a private engine: $(cat "$out")"
    log "  tcps-run refuses it and starts a private engine"

    # Root's engine in a directory others may change is refused too.
    local open_dir
    open_dir=$(owned_dir 0 0777)
    "$TCPSD" --socket "$open_dir/engine.sock" >>"$TCPS_TEST_DIR/engine-open.log" 2>&1 &
    track $!
    # shellcheck disable=SC2317  # called by wait_until
    sock_there() { [[ -S $open_dir/engine.sock ]]; }
    wait_until 5 sock_there || fail "root's tcpsd did not start in $open_dir"
    start_held_client "$victim" "$LISTEN_PORT" "$open_dir/engine.sock" "$TCPS_TEST_DIR/open.err"
    expect_own_socket "$CLIENT_PID" "$LISTEN_PORT"
    grep -q "only they can change" "$TCPS_TEST_DIR/open.err" ||
        fail "a world-writable directory was not refused: $(cat "$TCPS_TEST_DIR/open.err")"
    stop_held_client
    log "  root's engine in a world-writable directory is refused"
}

case_region() {
    local owner=4242 other=4243 fd_link="" fd
    log "region: uid $other tries to map uid $owner's region through /proc"
    start_root_engine
    start_plain_listener
    start_held_client "$owner" "$LISTEN_PORT" "$ENGINE_SOCK" "$TCPS_TEST_DIR/owner.err"
    for fd in /proc/"$CLIENT_PID"/fd/*; do
        [[ $(readlink "$fd") == /memfd:tcps-region* ]] && fd_link=$fd
    done
    [[ -n $fd_link ]] || fail "no region memfd in the client (pid $CLIENT_PID): not offloaded"
    as_user "$other"
    local result
    result=$("${AS_USER[@]}" "$PYTHON" -c 'import os, sys
for path, flags in ((sys.argv[1], os.O_RDWR), (sys.argv[2], os.O_RDONLY)):
    try:
        os.close(os.open(path, flags)); print("opened", path)
    except PermissionError:
        print("denied")' "$fd_link" "/proc/$CLIENT_PID/mem")
    [[ $result == $'denied\ndenied' ]] || fail "uid $other reached the region: $result"
    # The owner's own uid may (as it may read the process's memory): what the docs say.
    as_user "$owner"
    result=$("${AS_USER[@]}" "$PYTHON" -c 'import os, sys
os.close(os.open(sys.argv[1], os.O_RDWR)); print("opened")' "$fd_link" 2>&1 || true)
    [[ $result == opened ]] || fail "the owner's uid could not open its region: $result"
    stop_held_client
    stop_root_engine
    log "  another uid: denied, as for the process's memory; the same uid: allowed, as ptrace is"
}

PROBE=$(dirname "$0")/probe.py

# Runs probe.py MODE PORT [reuseport] as uid $1, offloaded (root's engine, ENGINE_SOCK), in
# network namespace $NETNS if set; prints its line.
probe() {
    local uid=$1
    shift
    as_user "$uid"
    ${NETNS:+ip netns exec "$NETNS"} "${AS_USER[@]}" env LD_PRELOAD="$LIBTCPS" \
        TCPS_ENGINE_SOCKET="$ENGINE_SOCK" "$PYTHON" "$PROBE" "$@"
}
# The same, natively.
native_probe() {
    local uid=$1
    shift
    as_user "$uid"
    ${NETNS:+ip netns exec "$NETNS"} "${AS_USER[@]}" "$PYTHON" "$PROBE" "$@"
}
expect_probe() {
    local want=$1 got
    shift
    got=$("$@" 2>&1) || true
    [[ $got == "$want" ]] || fail "$*: '$got', expected '$want'"
    log "  $*: $got"
}

# probe.py hold PORT [reuseport] as uid $1, offloaded, in the background until it holds its
# listener, connection and accepted end (its line in hold.out); sets HOLDER.
start_holder() {
    local uid=$1
    shift
    as_user "$uid"
    "${AS_USER[@]}" env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$ENGINE_SOCK" "$PYTHON" \
        "$PROBE" hold "$@" >"$TCPS_TEST_DIR/hold.out" 2>&1 &
    HOLDER=$!
    track "$HOLDER"
    wait_for_line 10 "$TCPS_TEST_DIR/hold.out" ready || fail "the holder: $(cat "$TCPS_TEST_DIR/hold.out")"
}

case_owner() {
    local user=4242 port lines
    log "owner: uid $user's offloaded sockets are uid $user's"
    start_root_engine
    port=$(free_port)
    start_holder "$user" "$port" reuseport
    local holder=$HOLDER
    grep -q "ready offloaded offloaded offloaded" "$TCPS_TEST_DIR/hold.out" ||
        fail "not offloaded: $(cat "$TCPS_TEST_DIR/hold.out")"
    lines=$(ss -tanpeH "( sport = :$port or dport = :$port )")
    printf '  ss: %s\n' "$lines"
    (($(grep -c "pid=$ENGINE_PID," <<<"$lines") == 3)) || fail "not three engine sockets"
    (($(grep -c "uid:$user " <<<"$lines") == 3)) || fail "not all three are uid $user's"

    # SO_REUSEPORT: another uid may not join the group (Linux: sk_reuseport_match()).
    expect_probe "EADDRINUSE offloaded" probe 4243 bind "$port" reuseport
    expect_probe "ok offloaded" probe "$user" bind "$port" reuseport
    # Nor a root-owned native group: the check is the kernel's now.
    local native_port
    native_port=$(free_port)
    "$PYTHON" -c 'import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); print("ready", flush=True); time.sleep(60)' \
        "$native_port" >"$TCPS_TEST_DIR/native.out" 2>&1 &
    track $!
    wait_for_line 10 "$TCPS_TEST_DIR/native.out" ready || fail "native listener"
    expect_probe "EADDRINUSE offloaded" probe "$user" bind "$native_port" reuseport
    expect_probe "EADDRINUSE kernel" native_probe "$user" bind "$native_port" reuseport
    stop_pid "$holder"

    # A listener root made, passed with SCM_RIGHTS to uid $user's process, which offloads it:
    # what the engine accepts on it is uid $user's, as the kernel's accept() in that process
    # would make it, not the listener maker's.
    port=$(free_port)
    as_user "$user"
    "$PYTHON" -c 'import socket, subprocess, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(8)
mine, theirs = socket.socketpair()
child = subprocess.Popen(sys.argv[2:], stdin=theirs)
theirs.close()
socket.send_fds(mine, [b"L"], [listener.fileno()])
listener.close()
client = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
print("ready", flush=True)
time.sleep(60)' "$port" "${AS_USER[@]}" env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$ENGINE_SOCK" \
        "$PYTHON" "$PROBE" adopt >"$TCPS_TEST_DIR/adopt.out" 2>&1 &
    holder=$!
    track "$holder"
    wait_for_line 10 "$TCPS_TEST_DIR/adopt.out" '^accepted' ||
        fail "the adopter: $(cat "$TCPS_TEST_DIR/adopt.out")"
    grep -q "adopted offloaded" "$TCPS_TEST_DIR/adopt.out" && grep -q "accepted offloaded" "$TCPS_TEST_DIR/adopt.out" ||
        fail "not offloaded: $(cat "$TCPS_TEST_DIR/adopt.out")"
    lines=$(ss -tanpeH state established "( sport = :$port )")
    printf '  ss: %s\n' "$lines"
    grep -q "pid=$ENGINE_PID," <<<"$lines" || fail "the accepted end is not the engine's"
    grep -q "uid:$user " <<<"$lines" || fail "the accepted end on root's passed listener is not uid $user's"
    log "  a passed listener offloaded by uid $user: its accepted connections are uid $user's"
    stop_pid "$holder"
    pkill -f "$PROBE adopt" 2>/dev/null || true
    stop_root_engine
}

case_twin() {
    local user=4242 port lines
    log "twin: a listener's twin is its owner's, and no other uid's way in"
    start_root_engine --handoff-load 0
    port=$(free_port)
    start_holder "$user" "$port"
    local holder=$HOLDER
    # The saturated engine sent the connection to the twin: the accepted end is the kernel's.
    grep -q "ready offloaded offloaded kernel" "$TCPS_TEST_DIR/hold.out" ||
        fail "not through the twin: $(cat "$TCPS_TEST_DIR/hold.out")"
    lines=$(ss -tlnpeH "( sport = :$port )")
    printf '  ss: %s\n' "$lines"
    (($(wc -l <<<"$lines") == 2)) || fail "not a listener and its twin"
    (($(grep -c "uid:$user " <<<"$lines") == 2)) || fail "the twin is not uid $user's"
    # Another uid, with SO_REUSEPORT or without, is refused the port (the same-owner rule).
    expect_probe "EADDRINUSE offloaded" probe 4243 bind "$port" reuseport
    expect_probe "EADDRINUSE kernel" native_probe 4243 bind "$port" reuseport
    expect_probe "EADDRINUSE offloaded" probe 4243 bind "$port"
    stop_pid "$holder"
    stop_root_engine
}

case_netns() {
    local user=4242 other=4243 ns port lines
    need_tool ip
    ns=tcps-sec-$$
    ip netns add "$ns" || skip "cannot create a network namespace"
    NETNS_CREATED=$ns
    ip -n "$ns" link set lo up
    log "netns: uid $user offloaded in namespace $ns, root's engine outside it"
    start_root_engine
    port=$(free_port)
    NETNS=$ns expect_probe "ok offloaded" probe "$user" bind "$port"
    # The socket was the namespace's: its address exists there only.
    as_user "$user"
    ip netns exec "$ns" "${AS_USER[@]}" env LD_PRELOAD="$LIBTCPS" \
        TCPS_ENGINE_SOCKET="$ENGINE_SOCK" "$PYTHON" "$PROBE" hold "$port" \
        >"$TCPS_TEST_DIR/ns.out" 2>&1 &
    local holder=$!
    track "$holder"
    wait_for_line 10 "$TCPS_TEST_DIR/ns.out" ready || fail "the holder: $(cat "$TCPS_TEST_DIR/ns.out")"
    grep -q "ready offloaded offloaded offloaded" "$TCPS_TEST_DIR/ns.out" ||
        fail "not offloaded: $(cat "$TCPS_TEST_DIR/ns.out")"
    lines=$(ip netns exec "$ns" ss -tlnpH "( sport = :$port )")
    printf '  ss in %s: %s\n' "$ns" "$lines"
    grep -q "pid=$ENGINE_PID," <<<"$lines" || fail "the listener is not the engine's, in $ns"
    [[ -z $(ss -tlnH "( sport = :$port )") ]] || fail "the listener is in the engine's namespace"
    stop_pid "$holder"

    # ip_unprivileged_port_start: the namespace's own, as it is at each bind.
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_unprivileged_port_start=80
    NETNS=$ns expect_probe "ok offloaded" probe "$user" bind 80
    expect_probe "EACCES offloaded" probe "$user" bind 81
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_unprivileged_port_start=1024
    NETNS=$ns expect_probe "EACCES offloaded" probe "$user" bind 82

    # A firewall rule on the socket's owner applies to offloaded sockets as to native ones.
    if command -v nft >/dev/null 2>&1; then
        local blocked
        blocked=$(free_port)
        ip netns exec "$ns" "$PYTHON" -c 'import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True); time.sleep(60)' "$blocked" >"$TCPS_TEST_DIR/blocked.out" 2>&1 &
        track $!
        wait_for_line 10 "$TCPS_TEST_DIR/blocked.out" ready || fail "listener in $ns"
        ip netns exec "$ns" nft -f - <<NFT
table inet tcps_sec {
    chain out {
        type filter hook output priority 0;
        meta skuid $user tcp dport $blocked reject with tcp reset
    }
}
NFT
        NETNS=$ns expect_probe "ECONNREFUSED kernel" native_probe "$user" connect "$blocked"
        NETNS=$ns expect_probe "ECONNREFUSED offloaded" probe "$user" connect "$blocked"
        NETNS=$ns expect_probe "ok offloaded" probe "$other" connect "$blocked"
    else
        log "  (nft is not installed: the meta skuid check is skipped)"
    fi
    stop_root_engine
}

# Other users are served while an attacker holds its share.
expect_others_served() {
    local port
    port=$(free_port)
    expect_probe "ok offloaded offloaded offloaded" probe 4242 pair "$port"
    port=$(free_port)
    expect_probe "ok offloaded offloaded offloaded" probe 0 pair "$port"
}

case_exhaustion() {
    local attacker=4243 attack out pid
    need_tool timeout
    [[ -x ${TCPS_ATTACKER:-} ]] || skip "TCPS_ATTACKER is not set (tests/security not built)"
    # 1,000 descriptors for clients: a uid may hold at most half of what the others leave.
    start_root_engine --max-fds 1000
    log "exhaustion: uid $attacker against an engine with --max-fds 1000"
    for attack in waiters sessions hellos; do
        out=$TCPS_TEST_DIR/attack-$attack.out
        as_user "$attacker"
        "${AS_USER[@]}" "$TCPS_ATTACKER" "$attack" "$ENGINE_SOCK" >"$out" 2>&1 &
        pid=$!
        track "$pid"
        wait_for_line 60 "$out" "^took" || fail "$attack: the attacker never stopped: $(cat "$out")"
        log "  $attack: $(cat "$out")"
        grep -Eq "then (ENFILE|EAGAIN)" "$out" || fail "$attack: not refused with a clear error"
        expect_others_served
        kill -TERM "$pid"
        local status=0
        wait_pid "$pid" 10 || status=$?
        ((status == 0)) || fail "$attack: the attacker exited $status"
        kill -0 "$ENGINE_PID" 2>/dev/null || fail "the engine died under the $attack attack"
    done
    # Through the shim: socket() says ENFILE at the share, and a listener whose connections the
    # engine cannot take any more says so in accept() instead of waiting for ever.
    local port
    port=$(free_port)
    out=$TCPS_TEST_DIR/exhaust.out
    as_user "$attacker"
    "${AS_USER[@]}" env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$ENGINE_SOCK" "$PYTHON" \
        "$PROBE" exhaust "$port" >"$out" 2>&1 &
    pid=$!
    track "$pid"
    wait_for_line 60 "$out" "^exhausted" || fail "socket() never refused: $(cat "$out")"
    log "  sockets: $(head -n 1 "$out")"
    grep -q "^exhausted [0-9]* ENFILE offloaded" "$out" || fail "socket(): not ENFILE"
    # More connections than the share can have grown by since (others' sockets closing).
    "$PYTHON" -c 'import socket, sys, time
held = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(32)]
time.sleep(60)' "$port" &
    track $!
    # shellcheck disable=SC2317  # called by wait_until
    refused() { grep -q "^accept E" "$out"; }
    wait_until 30 refused || fail "accept() never said why it could not go on: $(cat "$out")"
    log "  accepts: $(grep "^accept" "$out" | sort | uniq -c | tr -s ' \n' ' ')"
    [[ $(grep "^accept E" "$out") == "accept ENFILE" ]] ||
        fail "a connection the engine cannot take: accept() did not say ENFILE"
    expect_others_served
    stop_pid "$pid"
    # A received connection with bytes its sender left unread, which the engine cannot take
    # (the uid's share used up): reset, never served from its kernel socket without them. A
    # fresh engine: the share follows what others hold, and the engine is still closing the
    # sockets of the probe above.
    stop_root_engine
    start_root_engine --max-fds 1000
    port=$(free_port)
    out=$TCPS_TEST_DIR/unread.out
    as_user "$attacker"
    "${AS_USER[@]}" env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$ENGINE_SOCK" timeout 60 \
        "$PYTHON" "$PROBE" unread "$port" >"$out" 2>&1 || fail "unread: the probe failed: $(cat "$out")"
    log "  unread bytes: $(tr '\n' ' ' <"$out")"
    grep -Eq "^unread ENFILE receive (ECONNRESET|ENOTCONN) peer (ECONNRESET|EPIPE)" "$out" ||
        fail "unread: a refused connection was not reset, or went on without its first bytes"
    grep -q "the 5 bytes its sender had not read" "$out" || fail "unread: not said on stderr"
    stop_root_engine
}

all_cases=(squatting region owner twin netns exhaustion)
cases=("$@")
((${#cases[@]} > 0)) || cases=("${all_cases[@]}")
for name in "${cases[@]}"; do
    "case_$name"
done
log "security: ${#cases[@]} case(s) passed"
