#!/usr/bin/env bash
# lighttpd 1.4 (one process, epoll, linux-sendfile, as www-data after binding as root) under the
# shim with the engine on its own core, serving a 16 KB and a 10 MB file to http_check, a plain
# client that checks every byte: HTTP/1.0 (a connection per request), HTTP/1.1 keep-alive and
# 10 MB bodies; then curl preloaded too (both ends offloaded), every body's sha256 checked. Then
# a graceful restart (SIGUSR1) under load with no failed request, and SIGTERM, after which the
# engine holds nothing. ss proves that the listener and the connections belonged to tcpsd.
#
# Development knob: TCPS_NATIVE=1 (kernel TCP, see servers_lib.sh).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

HTTP_CHECK=${HTTP_CHECK:?HTTP_CHECK names the http_check client}
lighttpd=$(command -v lighttpd || echo /usr/sbin/lighttpd)
[[ -x $lighttpd ]] || skip "lighttpd is not installed (bash scripts/setup.sh)"
id www-data >/dev/null 2>&1 || skip "there is no www-data user for lighttpd"
need_tool ss timeout curl sha256sum
[[ -n $PYTHON ]] || skip "python3 is not installed"

dir=$TCPS_TEST_DIR
site=$dir/site
mkdir -p "$site" "$dir/lighttpd"
head -c 16384 /dev/urandom >"$site/f16k"
head -c $((10 << 20)) /dev/urandom >"$site/f10m"
for size in 0 1 65535 65536 65537 1000000; do head -c "$size" /dev/urandom >"$site/s$size"; done
chmod 755 "$dir" "$site"
chmod 644 "$site"/*

start_offload
port=$(free_port)
conf=$dir/lighttpd/lighttpd.conf
error_log=$dir/lighttpd/error.log
# A private configuration: nothing from /etc/lighttpd, no access log, www-data after the bind.
cat >"$conf" <<EOF
server.document-root = "$site"
server.bind = "127.0.0.1"
server.port = $port
server.username = "www-data"
server.groupname = "www-data"
server.errorlog = "$error_log"
server.pid-file = "$dir/lighttpd/lighttpd.pid"
server.event-handler = "linux-sysepoll"
server.network-backend = "sendfile"
server.max-keep-alive-requests = 1000
server.max-keep-alive-idle = 30
server.graceful-shutdown-timeout = 20
mimetype.assign = ("" => "application/octet-stream")
EOF
"$lighttpd" -tt -f "$conf" >"$dir/lighttpd/configtest.out" 2>&1 ||
    fail "lighttpd rejects the configuration: $(cat "$dir/lighttpd/configtest.out")"
chown www-data "$dir/lighttpd"

lighttpd_answers() {
    "$HTTP_CHECK" --port "$port" --path /f16k --expect "$site/f16k" --requests 1 --timeout-s 2 \
        >/dev/null 2>&1
}

log "lighttpd on port $port"
"${OFFLOAD[@]}" "$lighttpd" -D -f "$conf" >"$dir/lighttpd/stdout" 2>&1 &
server_pid=$!
track "$server_pid"
if offloaded; then expect_engine_listener "$port" "$server_pid"; fi
wait_until 20 lighttpd_answers ||
    fail "lighttpd does not answer on port $port: $(tail -n 5 "$error_log")"
run_standard_loads "$port" "$site" "$server_pid" "linux-sendfile"

log "curl preloaded: files of 0 B to 1 MB, one connection per file and all on one connection"
urls=()
for file in "$site"/s*; do urls+=("http://127.0.0.1:$port/${file##*/}"); done
curl_check() {
    local out=$dir/curl-$1
    shift
    mkdir -p "$out"
    local status=0
    (cd "$out" && timeout 60 "${OFFLOAD[@]}" curl -sS --fail "$@" --remote-name-all "${urls[@]}") ||
        status=$?
    ((status == 0)) || fail "curl $* failed with status $status"
    local file
    for file in "$site"/s*; do
        [[ $(sha256_of "$out/${file##*/}") == "$(sha256_of "$file")" ]] ||
            fail "curl $*: ${file##*/} differs from the file served"
    done
}
curl_check http10 --http1.0
curl_check keepalive --http1.1
log "  every body's sha256 matches (HTTP/1.0 and keep-alive)"
if offloaded; then
    # A connection left open by a preloaded client shows both of its ends under tcpsd.
    "${OFFLOAD[@]}" "$PYTHON" -c 'import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /f16k HTTP/1.1\r\nHost: x\r\n\r\n")
time.sleep(60)' "$port" &
    held_pid=$!
    track "$held_pid"
    both_ends() {
        local lines
        lines=$(ss -tanpH state established "( sport = :$port or dport = :$port )")
        (($(grep -c "pid=$ENGINE_PID," <<<"$lines") >= 2))
    }
    wait_until 10 both_ends || fail "no connection with both ends under tcpsd appeared"
    ss -tanpH state established "( sport = :$port or dport = :$port )" | sed 's/^/  ss: /'
    owners=$(ss -tanpH "( sport = :$port or dport = :$port )")
    if grep -Eq "pid=($held_pid|$server_pid)," <<<"$owners"; then
        fail "the preloaded client or lighttpd holds a kernel socket on port $port"
    fi
    log "evidence: both ends of the preloaded client's connection belong to tcpsd"
    stop_pid "$held_pid"
fi

log "graceful restart (SIGUSR1) under load (HTTP/1.0 and keep-alive clients running)"
check=(--port "$port" --expect "$site/f16k" --path /f16k)
"$HTTP_CHECK" "${check[@]}" --mode 10 --concurrency 4 --duration-s 90 --progress-ms 100 \
    >"$dir/restart10.out" 2>&1 &
restart10_pid=$!
"$HTTP_CHECK" "${check[@]}" --mode 11 --per-conn 10 --concurrency 4 --duration-s 90 \
    --max-retries 1000 --progress-ms 100 >"$dir/restart11.out" 2>&1 &
restart11_pid=$!
track "$restart10_pid" "$restart11_pid"
wait_progress "$dir/restart10.out" 20 200 || fail "the HTTP/1.0 load made no progress"
wait_progress "$dir/restart11.out" 20 200 || fail "the keep-alive load made no progress"
restarts() { grep -c 'server started' "$error_log" || true; }
before=$(restarts)
kill -USR1 "$server_pid"
restarted() { (($(restarts) > before)); }
wait_until 30 restarted || fail "lighttpd did not restart after SIGUSR1: $(tail -n 5 "$error_log")"
kill -0 "$server_pid" 2>/dev/null || fail "lighttpd exited in the graceful restart"
after10=$(progress_ok "$dir/restart10.out")
after11=$(progress_ok "$dir/restart11.out")
wait_progress "$dir/restart10.out" 30 $((after10 + 200)) ||
    fail "the HTTP/1.0 load stalled after the restart"
wait_progress "$dir/restart11.out" 30 $((after11 + 200)) ||
    fail "the keep-alive load stalled after the restart"
finish_load "$restart10_pid" "$dir/restart10.out"
finish_load "$restart11_pid" "$dir/restart11.out"
if offloaded; then expect_engine_listener "$port" "$server_pid"; fi

log "SIGTERM"
stop_pid "$server_pid" 30
expect_engine_empty 20 "$port"
if offloaded; then stop_engine; fi
grep -E '\((alert|crit|emerg|error)\)' "$error_log" | head -n 5 | sed 's/^/  lighttpd: /' || true
log "lighttpd: all checks passed"
