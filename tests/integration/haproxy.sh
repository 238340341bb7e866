#!/usr/bin/env bash
# HAProxy 2.6 (2 threads, epoll) under the shim, with the engine on its own core, as an HTTP
# proxy (mode http, connections to the backend reused) and as a TCP proxy (mode tcp, forwarding
# with splice() through pipes), in front
# of a Python HTTP/1.1 backend: first a plain one, then one preloaded too. http_check, a plain
# client, checks every byte through both: HTTP/1.0, keep-alive and 10 MB bodies. ss proves
# that both of HAProxy's sides were tcpsd's: its listeners, the connections it accepted and the
# connections it made to the backend (and, with the backend preloaded, the backend's ends too).
# Then HAProxy's master-worker reload (SIGUSR2: the master re-executes itself and starts a new
# worker that takes over the listeners, passed with SCM_RIGHTS) under HTTP/1.0 and keep-alive
# load with no failed request, the listeners offloaded again after it, and SIGTERM, after
# which the engine holds nothing.
#
# Development knob: TCPS_NATIVE=1 (kernel TCP, see servers_lib.sh).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

HTTP_CHECK=${HTTP_CHECK:?HTTP_CHECK names the http_check client}
haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)
[[ -x $haproxy ]] || skip "haproxy is not installed (bash scripts/setup.sh)"
need_tool ss timeout
[[ -n $PYTHON ]] || skip "python3 is not installed"

dir=$TCPS_TEST_DIR
site=$dir/site
mkdir -p "$site" "$dir/haproxy"
head -c 16384 /dev/urandom >"$site/f16k"
head -c $((10 << 20)) /dev/urandom >"$site/f10m"

start_offload
http_port=$(free_port)
tcp_port=$(free_port)
backend_port=$(free_port)
((http_port != tcp_port)) || tcp_port=$(free_port)

# The backend: Python's file server speaking HTTP/1.1 (keep-alive, Content-Length), a thread
# per connection, started plain or preloaded ($1).
cat >"$dir/backend.py" <<'EOF'
import functools, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK wait
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", int(sys.argv[1])), functools.partial(Handler, directory=sys.argv[2]))
server.daemon_threads = True
server.serve_forever()
EOF
start_backend() {
    local runner=()
    if [[ $1 == preloaded ]]; then runner=("${OFFLOAD[@]}"); fi
    "${runner[@]}" "$PYTHON" "$dir/backend.py" "$backend_port" "$site" >"$dir/backend-$1.log" 2>&1 &
    backend_pid=$!
    track "$backend_pid"
    backend_answers() {
        "$HTTP_CHECK" --port "$backend_port" --path /f16k --expect "$site/f16k" --requests 1 \
            --timeout-s 2 >/dev/null 2>&1
    }
    wait_until 20 backend_answers ||
        fail "the backend does not answer: $(tail -n 5 "$dir/backend-$1.log")"
}

conf=$dir/haproxy/haproxy.cfg
cat >"$conf" <<EOF
global
    nbthread 2
    maxconn 2000
    pidfile $dir/haproxy/haproxy.pid
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend http_in
    mode http
    bind 127.0.0.1:$http_port
    default_backend web
frontend tcp_in
    mode tcp
    bind 127.0.0.1:$tcp_port
    default_backend web_tcp
backend web
    mode http
    http-reuse always
    server backend 127.0.0.1:$backend_port
backend web_tcp
    mode tcp
    option splice-request
    option splice-response
    server backend 127.0.0.1:$backend_port
EOF
"$haproxy" -c -f "$conf" >"$dir/haproxy/configtest.out" 2>&1 ||
    fail "haproxy rejects the configuration: $(cat "$dir/haproxy/configtest.out")"

start_backend plain
log "haproxy: HTTP proxy on port $http_port, TCP proxy on port $tcp_port, backend on $backend_port"
# -W: master-worker; -db: stays in the foreground. The master forks the worker that serves.
"${OFFLOAD[@]}" "$haproxy" -W -db -f "$conf" >"$dir/haproxy/stdout" 2>&1 &
master_pid=$!
track "$master_pid"
worker_of() { pgrep -P "$master_pid" -x haproxy | head -n 1 || true; }
has_worker() { [[ -n $(worker_of) ]]; }
wait_until 20 has_worker || fail "haproxy started no worker: $(tail -n 5 "$dir/haproxy/stdout")"
if offloaded; then
    expect_engine_listener "$http_port" "$master_pid"
    expect_engine_listener "$tcp_port" "$(worker_of)"
fi

# Loads through both proxies while ss records the backend port: every connection HAProxy made
# to the backend must be tcpsd's; the backend's own ends may belong only to pids $2...
# ($1: a name for the output).
through_both() {
    local name=$1 pid status=0
    shift
    local big=(--expect "$site/f10m" --path /f10m --concurrency 4)
    local small=(--expect "$site/f16k" --path /f16k --concurrency 8 --requests 1000)
    (
        "$HTTP_CHECK" --port "$http_port" "${small[@]}" --mode 10 &&
            "$HTTP_CHECK" --port "$http_port" "${small[@]}" --mode 11 --per-conn 10 &&
            "$HTTP_CHECK" --port "$http_port" "${big[@]}" --mode 11 --per-conn 5 --requests 10 &&
            "$HTTP_CHECK" --port "$tcp_port" "${small[@]}" --mode 10 &&
            "$HTTP_CHECK" --port "$tcp_port" "${small[@]}" --mode 11 --per-conn 10 &&
            "$HTTP_CHECK" --port "$tcp_port" "${big[@]}" --mode 10 --requests 10
    ) >"$dir/$name.out" 2>&1 &
    pid=$!
    track "$pid"
    record_sockets "( dport = :$backend_port or sport = :$backend_port )" "$pid" 120 \
        "$dir/ss-$name.txt"
    wait_pid "$pid" 120 || status=$?
    sed 's/^/  /' "$dir/$name.out"
    ((status == 0)) || fail "$name: a load through haproxy failed (status $status)"
    if offloaded; then
        expect_no_strangers "$dir/ss-$name.txt" "$backend_port" "$@"
        local lines
        lines=$(grep "pid=$ENGINE_PID," "$dir/ss-$name.txt" | grep -c ":$backend_port *users" ||
            true)
        ((lines > 0)) || fail "$name: no connection of tcpsd's to the backend was seen"
        log "evidence: haproxy's connections to the backend (port $backend_port) were tcpsd's"
    fi
}

log "case a: the backend plain"
run_standard_loads "$http_port" "$site" "$(worker_of)" "mode http"
through_both plain "$backend_pid"
stop_pid "$backend_pid"

log "case b: the backend preloaded too"
start_backend preloaded
through_both preloaded

# The reload. The new master asks the old worker for the listeners (`_getsocks`) and gets them
# with SCM_RIGHTS, so they go back to the kernel (docs/architecture.md, "Listeners passed on"),
# with the connections the engine had accepted on them and the old worker had not taken parked
# for the listener's next owner. The new master, preloaded, offers each received listener to
# the engine at its first use; its new worker accepts through the engine, the parked ones first.
# So connections made all through the reload lose nothing: HTTP/1.0 clients (a connection per
# request, no retry allowed) alongside 4 keep-alive ones (whose connections the old worker
# closes when it stops: each then retries on a new connection, the race every HTTP client
# meets, RFC 9112 9.3.1).
log "master-worker reload (SIGUSR2) under HTTP/1.0 and keep-alive load through the HTTP proxy"
old_worker=$(worker_of)
"$HTTP_CHECK" --port "$http_port" --expect "$site/f16k" --path /f16k --concurrency 4 \
    --duration-s 90 --progress-ms 100 --mode 11 --per-conn 1000000 --max-retries 100 \
    >"$dir/reload.out" 2>&1 &
reload_pid=$!
track "$reload_pid"
"$HTTP_CHECK" --port "$http_port" --expect "$site/f16k" --path /f16k --concurrency 4 \
    --duration-s 90 --progress-ms 100 --mode 10 >"$dir/reload10.out" 2>&1 &
reload10_pid=$!
track "$reload10_pid"
wait_progress "$dir/reload.out" 20 200 || fail "the load through the HTTP proxy made no progress"
wait_progress "$dir/reload10.out" 20 200 || fail "the HTTP/1.0 load through the HTTP proxy made no progress"
kill -USR2 "$master_pid"
new_worker() {
    local now
    now=$(worker_of)
    [[ -n $now && $now != "$old_worker" ]] && ! kill -0 "$old_worker" 2>/dev/null
}
wait_until 30 new_worker ||
    fail "no new haproxy worker after SIGUSR2 (old $old_worker, now $(worker_of))"
kill -0 "$master_pid" 2>/dev/null || fail "the haproxy master died in the reload"
worker=$(worker_of)
log "  worker $old_worker replaced by $worker"
after=$(progress_ok "$dir/reload.out")
wait_progress "$dir/reload.out" 30 $((after + 200)) ||
    fail "the load through the HTTP proxy stalled after the reload"
after=$(progress_ok "$dir/reload10.out")
wait_progress "$dir/reload10.out" 30 $((after + 200)) ||
    fail "the HTTP/1.0 load through the HTTP proxy stalled after the reload"
finish_load "$reload_pid" "$dir/reload.out"
finish_load "$reload10_pid" "$dir/reload10.out"
grep -h 'tcps:' "$dir/haproxy/stdout" | sed 's/^/  haproxy: /' || true
if offloaded; then
    ! grep -q 'are lost' "$dir/haproxy/stdout" || fail "the reload lost connections (haproxy's stderr)"
    # Each listener is tcpsd's again, for the new worker, and never the old one's.
    for port in "$http_port" "$tcp_port"; do
        expect_engine_listener "$port" "$worker"
        ! grep -q "pid=$old_worker," <<<"$(ss -tlnpH "( sport = :$port )")" ||
            fail "after the reload the old worker still holds the listener on port $port"
    done
    log "evidence: the listeners went with SCM_RIGHTS and are offloaded again in the new worker"
fi
log "after the reload: loads through both proxies, the backend's connections recorded"
through_both reloaded
log "SIGTERM"
stop_pid "$master_pid" 30
stop_pid "$backend_pid"
expect_engine_empty 20 "$http_port"
expect_engine_empty 20 "$tcp_port"
expect_engine_empty 20 "$backend_port"
if offloaded; then stop_engine; fi
log "haproxy: all checks passed"
