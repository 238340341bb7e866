#!/usr/bin/env bash
# nginx, a master and 2 workers with sendfile on, started as a daemon through tcps-run with the
# engine on its own core, serving a 16 KB and a 10 MB file to http_check, a plain client that
# checks every byte: HTTP/1.0, HTTP/1.1 keep-alive and 10 MB bodies. Then `nginx -s reload` under
# load with no failed request, and `nginx -s quit`, after which the engine holds nothing. ss
# proves that the listener and the connections belonged to tcpsd.
#
# Development knobs: TCPS_NATIVE=1 (kernel TCP, see servers_lib.sh); TCPS_NGINX_ONE_PROCESS=1
# runs nginx with `master_process off` (one process, no fork) and skips the reload.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

HTTP_CHECK=${HTTP_CHECK:?HTTP_CHECK names the http_check client}
nginx=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $nginx ]] || skip "nginx is not installed (bash scripts/setup.sh)"
id www-data >/dev/null 2>&1 || skip "there is no www-data user for nginx's workers"
need_tool ss timeout
[[ -n $PYTHON ]] || skip "python3 is not installed"
one_process=${TCPS_NGINX_ONE_PROCESS:-0}

dir=$TCPS_TEST_DIR
site=$dir/site
prefix=$dir/nginx
mkdir -p "$site" "$prefix/tmp"
head -c 16384 /dev/urandom >"$site/f16k"
head -c $((10 << 20)) /dev/urandom >"$site/f10m"
chmod 755 "$dir" "$site"
chmod 644 "$site"/*

start_offload
daemon_runner
port=$(free_port)
if ((one_process)); then
    process_model='master_process off;
daemon off;'
else
    process_model='master_process on;
daemon on;
worker_processes 2;'
fi
nginx_configure "$process_model" '    sendfile on;
    keepalive_requests 1000;'

log "nginx on port $port"
if ((one_process)); then
    "${OFFLOAD[@]}" "${nginx_cmd[@]}" >"$prefix/stdout" 2>&1 &
    master_pid=$!
    track "$master_pid"
else
    # daemon on: the command returns once the master runs; the pid file names it.
    "${DAEMON[@]}" "${nginx_cmd[@]}" >"$prefix/stdout" 2>&1 ||
        fail "nginx failed to start: $(cat "$prefix/stdout" "$error_log" 2>/dev/null)"
    wait_until 10 test -s "$pid_file" || fail "nginx wrote no pid file"
    master_pid=$(<"$pid_file")
    track "$master_pid"
    two_workers() { [[ $(workers_of "$master_pid" | wc -w) == 2 ]]; }
    wait_until 10 two_workers || fail "nginx did not start 2 workers: $(tail -n 5 "$error_log")"
    log "  master $master_pid, workers $(workers_of "$master_pid")"
fi
if offloaded; then expect_engine_listener "$port" "$master_pid"; fi
wait_until 20 nginx_answers || fail "nginx does not answer on port $port: $(tail -n 5 "$error_log")"
run_standard_loads "$port" "$site" "$master_pid" "sendfile"
check=(--port "$port" --expect "$site/f16k" --path /f16k)

if ((one_process)); then
    log "one process (master_process off): no reload; stopping it"
    "${nginx_cmd[@]}" -s quit >"$prefix/quit.out" 2>&1 || fail "nginx -s quit failed"
    wait_until 30 gone "$master_pid" || fail "nginx (pid $master_pid) did not exit within 30 s"
else
    log "nginx -s reload under load (HTTP/1.0 and keep-alive clients running)"
    workers_before=$(workers_of "$master_pid")
    "$HTTP_CHECK" "${check[@]}" --mode 10 --concurrency 4 --duration-s 90 --progress-ms 100 \
        >"$dir/reload10.out" 2>&1 &
    reload10_pid=$!
    "$HTTP_CHECK" "${check[@]}" --mode 11 --per-conn 10 --concurrency 4 --duration-s 90 \
        --max-retries 1000 --progress-ms 100 >"$dir/reload11.out" 2>&1 &
    reload11_pid=$!
    track "$reload10_pid" "$reload11_pid"
    wait_progress "$dir/reload10.out" 20 200 || fail "the HTTP/1.0 load made no progress"
    wait_progress "$dir/reload11.out" 20 200 || fail "the keep-alive load made no progress"
    "${nginx_cmd[@]}" -s reload >"$prefix/reload.out" 2>&1 ||
        fail "nginx -s reload failed: $(cat "$prefix/reload.out")"
    # The new generation: two workers, none of them from before; the old ones finish and exit.
    new_workers() {
        local now pid
        now=$(workers_of "$master_pid")
        [[ $(wc -w <<<"$now") == 2 ]] || return 1
        for pid in $workers_before; do
            [[ " $now " != *" $pid "* ]] || return 1
            ! kill -0 "$pid" 2>/dev/null || return 1
        done
    }
    wait_until 30 new_workers ||
        fail "no new workers after reload (before: $workers_before," \
            "now: $(workers_of "$master_pid"))"
    after10=$(progress_ok "$dir/reload10.out")
    after11=$(progress_ok "$dir/reload11.out")
    wait_progress "$dir/reload10.out" 30 $((after10 + 200)) ||
        fail "the HTTP/1.0 load stalled after the reload"
    wait_progress "$dir/reload11.out" 30 $((after11 + 200)) ||
        fail "the keep-alive load stalled after the reload"
    kill -0 "$master_pid" 2>/dev/null || fail "the nginx master died in the reload"
    log "  workers $workers_before replaced by $(workers_of "$master_pid")"
    finish_load "$reload10_pid" "$dir/reload10.out"
    finish_load "$reload11_pid" "$dir/reload11.out"

    log "nginx -s quit"
    nginx_pids="$master_pid $(workers_of "$master_pid")"
    "${nginx_cmd[@]}" -s quit >"$prefix/quit.out" 2>&1 ||
        fail "nginx -s quit failed: $(cat "$prefix/quit.out")"
    wait_until 30 gone "$master_pid" || fail "nginx (pid $master_pid) did not exit within 30 s"
    all_gone() {
        local pid
        for pid in $nginx_pids; do ! kill -0 "$pid" 2>/dev/null || return 1; done
    }
    wait_until 30 all_gone || fail "nginx processes left after quit, of: $nginx_pids"
fi

expect_engine_empty 20 "$port"
if offloaded; then stop_engine; fi
grep -E '\[(alert|crit|emerg)\]' "$error_log" | head -n 5 | sed 's/^/  nginx: /' || true
log "nginx: all checks passed"
