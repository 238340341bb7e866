# shellcheck shell=bash disable=SC2034  # OFFLOAD and friends are used by the sourcing scripts
# Helpers for the multi-process server tests (apache, nginx, fork_accept, scm_rights, inetd).
# Source it after lib.sh.
#
# TCPS_NATIVE=1 runs the same script on kernel TCP, without the engine or the shim, and skips
# every proof of offload: it is for developing the harness only. The real tests run without it.

NATIVE=${TCPS_NATIVE:-0}
OFFLOAD=()  # "${OFFLOAD[@]}" PROGRAM...: the program with the shim and this test's engine
ENGINE_EXTRA=()
ENGINE_ARGS=()  # options for tcpsd in every placement (a test's own arguments, say)
ENGINE_WORKERS=1

offloaded() { [[ $NATIVE != 1 ]]; }

# Hold points (servers_common.hpp): a test program prints "holding NAME" and waits for the file
# NAME here, so that the script can look at a connection that is surely open.
export TCPS_TEST_HOLD_DIR=$TCPS_TEST_DIR/holds
mkdir -p "$TCPS_TEST_HOLD_DIR"
# Waits (20 s at most) until the program whose output goes to file $1 holds at point $2.
at_hold() {
    wait_for_line 20 "$1" "^holding $2\$" ||
        fail "the program never reached hold point '$2': $(tail -n 5 "$1")"
}
release_hold() { : >"$TCPS_TEST_HOLD_DIR/$1"; }

# Starts the private engine, its worker pinned to the last CPU (the engine on its own core), or
# nothing at all under TCPS_NATIVE=1.
start_offload() {
    if ! offloaded; then
        log "TCPS_NATIVE=1: kernel TCP, no engine, no shim (harness development only)"
        return 0
    fi
    need_engine
    local last_cpu=$(($(nproc) - 1))
    if [[ -n ${ENGINE_CORES:-} ]]; then
        # Several workers serve each family (ENGINE_CORES="0,1": two), with the options in
        # the array ENGINE_EXTRA if set.
        ENGINE_WORKERS=$(tr ',' '\n' <<<"$ENGINE_CORES" | wc -l)
        start_engine --cores "$ENGINE_CORES" "${ENGINE_EXTRA[@]}" "${ENGINE_ARGS[@]}"
    elif ((last_cpu > 0)); then
        start_engine --cores "$last_cpu" "${ENGINE_ARGS[@]}"
    else
        start_engine "${ENGINE_ARGS[@]}"
    fi
    OFFLOAD=("${PRELOAD[@]}")
    # The shim in processes that dropped root (www-data) must reach the engine's socket.
    chmod 755 "$TCPS_TEST_DIR"
}

# Daemons go through tcps-run (it uses the engine already running at --socket) when it is built.
daemon_runner() {
    DAEMON=()
    offloaded || return 0
    if [[ -n ${TCPS_RUN:-} && -x ${TCPS_RUN:-} ]]; then
        DAEMON=("$TCPS_RUN" --socket "$ENGINE_SOCK" --engine "$TCPSD" --lib "$LIBTCPS" --)
    else
        DAEMON=("${OFFLOAD[@]}")
    fi
}

# --- the engine's own account: SIGUSR1 makes it log one stats line per worker ---
# Worker $1's number after "$2 " in LAST_STATS (e.g. accepts, sockets).
worker_stat() { sed -n "s/.*worker $1: .*[ ,(]$2 \([0-9]*\).*/\1/p" <<<"$LAST_STATS"; }
# Worker $1's bytes sent in LAST_STATS.
worker_bytes_out() { sed -n "s/.*worker $1: .* out \([0-9]*\) (direct.*/\1/p" <<<"$LAST_STATS"; }
stats_lines() { grep -c 'worker [0-9]*: sessions' "$TCPS_TEST_DIR/engine.log" 2>/dev/null || true; }

# Asks for fresh stats (5 s at most) and keeps the newest line of each worker in LAST_STATS.
request_stats() {
    local before
    before=$(stats_lines)
    kill -USR1 "$ENGINE_PID" 2>/dev/null || return 1
    # shellcheck disable=SC2317  # called by wait_until
    fresh_stats() { (($(stats_lines) >= before + ENGINE_WORKERS)); }
    wait_until 5 fresh_stats || return 1
    LAST_STATS=$(grep 'worker [0-9]*: sessions' "$TCPS_TEST_DIR/engine.log" |
        tail -n "$ENGINE_WORKERS")
}

# True when every worker reports no session and no socket, and the engine's map of session ids
# (logged just before the workers' lines) has forgotten every session.
engine_empty() {
    request_stats || return 1
    ! grep -qv 'sessions 0 (.*sockets 0,' <<<"$LAST_STATS" &&
        grep 'sessions known by id' "$TCPS_TEST_DIR/engine.log" | tail -n 1 | grep -q ': 0 sessions'
}

# Waits up to $1 seconds for the engine to hold nothing: no session, no socket, and no kernel
# socket of tcpsd's on port $2.
expect_engine_empty() {
    local seconds=$1 port=$2
    offloaded || return 0
    LAST_STATS=
    # shellcheck disable=SC2317  # called by wait_until
    no_engine_socket_on_port() {
        local lines
        lines=$(ss -tanpH "( sport = :$port or dport = :$port )")
        ! grep -q "pid=$ENGINE_PID," <<<"$lines"
    }
    wait_until "$seconds" no_engine_socket_on_port || {
        ss -tanpH "( sport = :$port or dport = :$port )" | grep "pid=$ENGINE_PID," | head -n 5 |
            sed 's/^/  ss: /'
        fail "tcpsd still holds sockets on port $port ${seconds}s after the servers stopped"
    }
    wait_until "$seconds" engine_empty || {
        kill -0 "$ENGINE_PID" 2>/dev/null || fail "the engine died"
        printf '%s\n' "$LAST_STATS" | sed 's/^/  /'
        fail "the engine still holds sessions or sockets ${seconds}s after the servers stopped"
    }
    printf '%s\n' "$LAST_STATS" | sed 's/^/  engine: /'
    log "evidence: tcpsd holds nothing on port $port, no session and no socket"
}

# Records `ss -tanp` lines matching the ss filter $1 every 20 ms while process $2 runs (at most
# $3 seconds) into file $4.
record_sockets() {
    local filter=$1 pid=$2 seconds=$3 file=$4
    local deadline=$((SECONDS + seconds))
    : >"$file"
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        ss -tanpH "$filter" >>"$file" 2>/dev/null || true
        sleep 0.02
    done
}

# The server side of port $1, recorded while process $2 runs (see record_sockets).
record_server_side() { record_sockets "( sport = :$1 )" "$2" "$3" "$4"; }

# Every socket recorded in file $1 (for port $2) that a process owned belonged to tcpsd or to
# one of the pids $3...: no process of the application held a kernel TCP socket there.
expect_no_strangers() {
    local file=$1 port=$2
    shift 2
    offloaded || return 0
    local allowed="pid=$ENGINE_PID," pid
    for pid in "$@"; do allowed+="|pid=$pid,"; done
    local strangers
    strangers=$(grep 'users:' "$file" | grep -Ev "$allowed" | head -n 5 || true)
    if [[ -n $strangers ]]; then
        printf '%s\n' "$strangers" | sed 's/^/  ss: /'
        fail "a process other than tcpsd held kernel sockets on port $port"
    fi
    local samples
    samples=$(grep -c 'users:' "$file" || true)
    log "evidence: $samples ss lines of owned sockets on port $port, all of them tcpsd's"
}

# Like lib.sh's hold_connection, for HTTP servers: Apache's listeners use TCP_DEFER_ACCEPT, so a
# silent connection would never be accepted. This one sends the start of a request and holds.
hold_http_connection() {
    "$PYTHON" -c 'import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /held HTTP/1.1\r\n")
time.sleep(60)' "$1" &
    HOLD_PID=$!
    track "$HOLD_PID"
}

# --- load: http_check, a plain client ---

# Runs http_check with a time limit of $2 seconds and its arguments $3...; its output goes to
# $TCPS_TEST_DIR/$1.out. Fails unless every response was byte-exact.
http_load() {
    local name=$1 limit=$2 status=0
    shift 2
    timeout "$limit" "$HTTP_CHECK" "$@" >"$TCPS_TEST_DIR/$name.out" 2>&1 || status=$?
    sed 's/^/  /' "$TCPS_TEST_DIR/$name.out"
    ((status != 124)) || fail "$name: http_check did not finish within $limit s"
    ((status == 0)) || fail "$name: http_check failed (status $status)"
}

# The loads both server tests run once the server (process $3) answers on port $1, from site
# directory $2 ($4: a note for the 10 MB line): offloaded, a held connection shows tcpsd on the
# server side first; then 2,000 HTTP/1.0 requests while ss records who owns the connections
# (nobody but tcpsd may), 2,000 keep-alive requests, and 10 MB bodies both ways, every body
# checked byte for byte.
run_standard_loads() {
    local port=$1 site=$2 server_pid=$3 note=${4:-} load_pid status=0
    if offloaded; then
        hold_http_connection "$port"
        expect_engine_server_side "$port" "$server_pid"
        stop_pid "$HOLD_PID"
    fi

    log "HTTP/1.0, a connection per request: 2000 x 16 KB, 8 at a time"
    local check=(--port "$port" --expect "$site/f16k" --path /f16k)
    "$HTTP_CHECK" "${check[@]}" --mode 10 --requests 2000 --concurrency 8 \
        >"$TCPS_TEST_DIR/load10.out" 2>&1 &
    load_pid=$!
    track "$load_pid"
    record_server_side "$port" "$load_pid" 60 "$TCPS_TEST_DIR/ss-load10.txt"
    wait_pid "$load_pid" 60 || status=$?
    sed 's/^/  /' "$TCPS_TEST_DIR/load10.out"
    ((status == 0)) || fail "HTTP/1.0 load failed (status $status)"
    expect_no_strangers "$TCPS_TEST_DIR/ss-load10.txt" "$port"

    log "HTTP/1.1 keep-alive: 2000 x 16 KB, 10 per connection, 8 at a time"
    http_load load11 60 "${check[@]}" --mode 11 --per-conn 10 --requests 2000 --concurrency 8

    log "10 MB bodies${note:+ ($note)}: 20 requests, HTTP/1.0 and keep-alive"
    local big=(--port "$port" --expect "$site/f10m" --path /f10m --concurrency 4)
    http_load big10 60 "${big[@]}" --mode 10 --requests 10
    http_load big11 60 "${big[@]}" --mode 11 --per-conn 5 --requests 10
}

# The ok count in the newest progress line of http_check output file $1.
progress_ok() {
    local line
    line=$(grep '^progress ok' "$1" | tail -n 1 || true)
    line=${line#progress ok }
    echo "${line%% *}"
}

# Waits up to $2 seconds for http_check (output file $1) to count at least $3 good responses.
wait_progress() {
    local file=$1 seconds=$2 want=$3
    # shellcheck disable=SC2317  # called by wait_until
    enough() {
        local ok
        ok=$(progress_ok "$file")
        ((${ok:-0} >= want))
    }
    wait_until "$seconds" enough
}

# Stops a background http_check $1 (output file $2) with SIGTERM: it finishes its requests in
# flight and prints its summary. Fails unless every response was byte-exact.
finish_load() {
    local pid=$1 file=$2 status=0
    kill -TERM "$pid" 2>/dev/null || true
    wait_pid "$pid" 60 || status=$?
    grep -v '^progress' "$file" | sed 's/^/  /'
    ((status != 124)) || fail "http_check did not stop within 60 s of SIGTERM"
    ((status == 0)) || fail "http_check reported failures (status $status)"
}

# nginx with a private configuration (nothing from /etc/nginx, every path inside $prefix),
# serving $site on 127.0.0.1:$port. $1: the process model's directives; $2: extra directives
# for the http block. Sets conf, error_log, pid_file and nginx_cmd (checked with -t); with
# nginx_answers (one 16 KB request) and workers_of MASTER (its workers, by title) below.
# shellcheck disable=SC2154  # prefix, site, port and nginx are the caller's
nginx_configure() {
    conf=$prefix/nginx.conf
    error_log=$prefix/error.log
    pid_file=$prefix/nginx.pid
    cat >"$conf" <<EOF
$1
user www-data;
pid $pid_file;
error_log $error_log notice;
events { worker_connections 256; }
http {
    access_log off;
$2
    client_body_temp_path $prefix/tmp/body;
    proxy_temp_path $prefix/tmp/proxy;
    fastcgi_temp_path $prefix/tmp/fastcgi;
    uwsgi_temp_path $prefix/tmp/uwsgi;
    scgi_temp_path $prefix/tmp/scgi;
    server {
        listen 127.0.0.1:$port;
        root $site;
    }
}
EOF
    nginx_cmd=("$nginx" -p "$prefix" -c "$conf" -e "$error_log")
    "${nginx_cmd[@]}" -t >"$prefix/configtest.out" 2>&1 ||
        fail "nginx rejects the configuration: $(cat "$prefix/configtest.out")"
}
nginx_answers() {
    "$HTTP_CHECK" --port "$port" --path /f16k --expect "$site/f16k" --requests 1 --timeout-s 2 \
        >/dev/null 2>&1
}
workers_of() { pgrep -P "$1" -f 'nginx: worker process' | sort | tr '\n' ' ' || true; }
