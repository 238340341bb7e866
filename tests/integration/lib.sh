# shellcheck shell=bash disable=SC2034  # PRELOAD and friends are used by the sourcing scripts
# Shared helpers for the integration tests (bash). Source it after `set -euo pipefail`.
#
# Each test starts its own private engine on a socket in a fresh temporary directory, runs real
# programs with `"${PRELOAD[@]}" PROGRAM ...` (LD_PRELOAD=$LIBTCPS, TCPS_ENGINE_SOCKET=its socket), and
# proves with `ss -p` that the sockets those programs used belonged to tcpsd. Everything started
# here is tracked and stopped by the EXIT trap with bounded waits.
#
# Environment: TCPSD (the engine binary) and LIBTCPS (the shim); meson's test() sets both.
# Exit status 77 tells meson the test was skipped (a tool or the engine is missing).

TCPS_TEST_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tcps-test.XXXXXX")
TCPS_PIDS=()
ENGINE_PID=
ENGINE_SOCK=
PRELOAD=()
PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3 || true)}

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*"; }
skip() {
    echo "SKIP: $*"
    exit 77
}
fail() {
    echo "FAIL: $*" >&2
    if [[ -s $TCPS_TEST_DIR/engine.log ]]; then
        echo "--- engine log (last 30 lines):" >&2
        tail -n 30 "$TCPS_TEST_DIR/engine.log" >&2
    fi
    exit 1
}

need_tool() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || skip "$tool is not installed (bash scripts/setup.sh)"
    done
}

need_engine() {
    [[ -n ${TCPSD:-} ]] || skip "TCPSD is not set (the engine is not built yet)"
    [[ -x $TCPSD ]] || skip "TCPSD=$TCPSD is not an executable (the engine is not built yet)"
    [[ -n ${LIBTCPS:-} ]] || skip "LIBTCPS is not set (the shim is not built yet)"
    [[ -f $LIBTCPS ]] || skip "LIBTCPS=$LIBTCPS does not exist (the shim is not built yet)"
    need_tool ss
}

track() { TCPS_PIDS+=("$@"); }

# Waits up to $1 seconds for the command in $2... to succeed. Polls every 50 ms.
wait_until() {
    local seconds=$1
    shift
    local deadline=$((SECONDS + seconds))
    while ! "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}

# True once process $1 has exited (bash reaps its background jobs as they end).
gone() { ! kill -0 "$1" 2>/dev/null; }

# Waits up to $2 seconds for process $1 to exit. Returns its exit status, or 124 on timeout.
wait_pid() {
    local pid=$1 seconds=$2
    wait_until "$seconds" gone "$pid" || return 124
    local status=0
    wait "$pid" 2>/dev/null || status=$?
    return "$status"
}

# Stops a process: SIGTERM, up to $2 seconds (default 5), then SIGKILL.
stop_pid() {
    local pid=$1 seconds=${2:-5}
    kill -0 "$pid" 2>/dev/null || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until "$seconds" gone "$pid"; then
        echo "process $pid ignored SIGTERM for ${seconds}s: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 5 gone "$pid" || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    local pid
    for ((i = ${#TCPS_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${TCPS_PIDS[i]}
        [[ $pid == "$ENGINE_PID" ]] && continue  # the engine last, after its clients
        stop_pid "$pid" 5
    done
    if [[ -n $ENGINE_PID ]]; then stop_pid "$ENGINE_PID" 10; fi
    rm -rf "$TCPS_TEST_DIR"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

engine_ready() {
    kill -0 "$ENGINE_PID" 2>/dev/null || fail "the engine exited during start-up"
    grep -q ready "$TCPS_TEST_DIR/ready" 2>/dev/null
}

# Starts the private engine and waits (5 s at most) for its "ready" on --ready-fd. Arguments
# go to tcpsd (--busy-poll, --spin-us N). A test may start another engine after stopping one.
# shellcheck disable=SC2120  # arguments are optional
start_engine() {
    ENGINE_SOCK=$TCPS_TEST_DIR/engine.sock
    : >"$TCPS_TEST_DIR/ready"
    "$TCPSD" --socket "$ENGINE_SOCK" --ready-fd 3 "$@" 3>"$TCPS_TEST_DIR/ready" \
        >>"$TCPS_TEST_DIR/engine.log" 2>&1 &
    ENGINE_PID=$!
    track "$ENGINE_PID"
    # "${PRELOAD[@]}" PROGRAM...: runs PROGRAM with the shim and this engine. A command, not a
    # function, so that `$!` of a background job is the program's own pid (env execs it).
    PRELOAD=(env LD_PRELOAD="$LIBTCPS" TCPS_ENGINE_SOCKET="$ENGINE_SOCK")
    wait_until 5 engine_ready || fail "the engine did not report ready within 5 s"
    log "engine pid $ENGINE_PID ready on $ENGINE_SOCK${*:+ ($*)}"
}

# The engine must still be running (a crash during a test is a failure), then stops it and
# checks that it exited cleanly.
stop_engine() {
    kill -0 "$ENGINE_PID" 2>/dev/null || fail "the engine died during the test"
    kill -TERM "$ENGINE_PID"
    local status=0
    wait_pid "$ENGINE_PID" 10 || status=$?
    ((status != 124)) || fail "the engine did not exit within 10 s of SIGTERM"
    ((status == 0)) || fail "the engine exited with status $status after SIGTERM"
    ENGINE_PID=
}

# --- processes: CPU time and sleep, from /proc ---

# utime + stime of process $1, all its threads, in clock ticks (fields 14 and 15 of
# /proc/PID/stat, counted after the command name, which may hold spaces).
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat") || return 1
    stat=${stat##*) }
    # shellcheck disable=SC2086  # split the fields on purpose
    set -- $stat
    echo $((${12} + ${13}))
}

# True when every thread of process $1 is asleep (S) or waiting (D): none runs or spins.
all_threads_asleep() {
    local task stat state
    for task in /proc/"$1"/task/*; do
        { stat=$(<"$task/stat"); } 2>/dev/null || continue  # a thread that just ended
        stat=${stat##*) }
        state=${stat%% *}
        [[ $state == S || $state == D ]] || return 1
    done
}

# Percent of one CPU that processes $2... used over the next $1 seconds (one decimal).
cpu_percent_over() {
    local seconds=$1 pid before=0 after=0 start end hz
    shift
    hz=$(getconf CLK_TCK)
    for pid in "$@"; do before=$((before + $(cpu_ticks "$pid"))); done
    start=${EPOCHREALTIME/./}
    sleep "$seconds"  # the measurement interval itself, not a wait for something
    for pid in "$@"; do after=$((after + $(cpu_ticks "$pid"))); done
    end=${EPOCHREALTIME/./}
    # ticks / hz seconds of CPU over (end - start) microseconds of wall time, in tenths of %
    local tenths=$(((after - before) * 1000 * 1000000 / hz / (end - start)))
    printf '%d.%d\n' $((tenths / 10)) $((tenths % 10))
}

# Waits up to $1 seconds for a line matching $3 in file $2.
wait_for_line() {
    local seconds=$1 file=$2 pattern=$3
    # shellcheck disable=SC2317  # called by wait_until
    has_line() { grep -q -- "$pattern" "$file" 2>/dev/null; }
    wait_until "$seconds" has_line
}

# Waits up to $1 seconds for file $2 to hold a port number, and prints it.
wait_for_port_file() {
    local seconds=$1 file=$2
    # shellcheck disable=SC2317  # called by wait_until
    has_port() { [[ -s $file ]]; }
    wait_until "$seconds" has_port || return 1
    cat "$file"
}

# A TCP port on 127.0.0.1 that nothing uses right now (the kernel picks it).
free_port() {
    "$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# --- evidence: which process owns a socket (`ss -p` shows users:(("name",pid=N,fd=M))) ---

listening_on() { [[ -n $(ss -tlnH "( sport = :$1 )") ]]; }

# Every listening socket on port $1 belongs to the engine, none to process $2.
expect_engine_listener() {
    local port=$1 app_pid=$2 lines
    wait_until 5 listening_on "$port" || fail "nothing listens on port $port"
    lines=$(ss -tlnpH "( sport = :$port )")
    echo "$lines" | sed 's/^/  ss: /'
    if grep -q "pid=$app_pid," <<<"$lines"; then
        fail "port $port is listened on by the application (pid $app_pid), not the engine"
    fi
    if grep -qv "pid=$ENGINE_PID," <<<"$lines"; then
        fail "a listener on port $port is not owned by the engine (pid $ENGINE_PID)"
    fi
    grep -q '"tcpsd"' <<<"$lines" || fail "the listener on port $port is not tcpsd's"
    log "evidence: the listener on port $port belongs to tcpsd (pid $ENGINE_PID)"
}

engine_has_connection() {
    local filter=$1
    local lines  # not `ss | grep -q`: with pipefail, grep quitting early fails the pipeline
    lines=$(ss -tanpH state established "$filter")
    grep -q "pid=$ENGINE_PID," <<<"$lines"
}

# While a connection to port $1 made by process $2 is open: its client end belongs to the
# engine, and process $2 has no TCP socket to that port.
expect_engine_client() {
    local port=$1 app_pid=$2 lines
    wait_until 5 engine_has_connection "( dport = :$port )" ||
        fail "no engine-owned connection to port $port appeared"
    lines=$(ss -tanpH "( dport = :$port )")
    grep -m 3 "pid=$ENGINE_PID," <<<"$lines" | sed 's/^/  ss: /'
    if grep -q "pid=$app_pid," <<<"$lines"; then
        fail "the application (pid $app_pid) holds a kernel socket to port $port"
    fi
    log "evidence: connections to port $port belong to tcpsd (pid $ENGINE_PID)"
}

# While a connection accepted on port $1 is open: its server end belongs to the engine.
expect_engine_server_side() {
    local port=$1 app_pid=$2 lines
    wait_until 5 engine_has_connection "( sport = :$port )" ||
        fail "no engine-owned accepted connection on port $port appeared"
    lines=$(ss -tanpH state established "( sport = :$port )")
    grep -m 3 "pid=$ENGINE_PID," <<<"$lines" | sed 's/^/  ss: /'
    if grep -q "pid=$app_pid," <<<"$lines"; then
        fail "the application (pid $app_pid) holds an accepted kernel socket on port $port"
    fi
    log "evidence: connections accepted on port $port belong to tcpsd (pid $ENGINE_PID)"
}

# Opens a plain (not preloaded) connection to port $1 and holds it, silent, for up to 60 s:
# the server's accepted end then stays open for ss to look at, however fast the server is.
# Sets HOLD_PID; stop it with stop_pid.
hold_connection() {
    "$PYTHON" -c 'import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
time.sleep(60)' "$1" &
    HOLD_PID=$!
    track "$HOLD_PID"
}

# Records `ss` lines for connections to port $1 every 20 ms while process $2 runs (at most
# $3 seconds) into file $4, for programs too quick to check while they run.
record_connections() {
    local port=$1 pid=$2 seconds=$3 file=$4
    local deadline=$((SECONDS + seconds))
    : >"$file"
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        ss -tanpH "( dport = :$port )" >>"$file" 2>/dev/null || true
        sleep 0.02
    done
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
