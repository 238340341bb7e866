#!/usr/bin/env bash
# nginx outlives its engine: a master and 2 workers serve through tcpsd, tcpsd is killed with
# SIGKILL, and `nginx -s reload` must bring nginx back on its port. nginx's reload keeps the
# listening socket it already has for an unchanged `listen` (ngx_init_cycle() reuses the fd)
# and forks new workers that add it to their epoll and accept on it. The engine's kernel
# listener died with the engine, so the master (the oldest process of the family holding it)
# makes it again in the kernel before it forks, and the new workers inherit a working one.
# Proved here: nothing listens after the engine's death; after the reload the new workers run
# (no epoll_ctl EBADF), every byte of 200 responses is right, and the listener and the
# connections belong to nginx's own processes (ss), not to a tcpsd. Arguments go to tcpsd:
# nginx_engine_death_twin (--handoff-load 0) has the workers accept through the listener's twin
# (engine/twin.cpp), so they hold it when the engine dies: they must let it go, or the master's
# new listener could not bind the port.
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
offloaded || skip "TCPS_NATIVE=1: there is no engine to kill"

dir=$TCPS_TEST_DIR
site=$dir/site
prefix=$dir/nginx
mkdir -p "$site" "$prefix/tmp"
head -c 16384 /dev/urandom >"$site/f16k"
chmod 755 "$dir" "$site"
chmod 644 "$site"/*

ENGINE_ARGS=("$@")
start_offload
daemon_runner
port=$(free_port)
nginx_configure 'master_process on;
daemon on;
worker_processes 2;' ''

log "nginx on port $port"
"${DAEMON[@]}" "${nginx_cmd[@]}" >"$prefix/stdout" 2>&1 ||
    fail "nginx failed to start: $(cat "$prefix/stdout" "$error_log" 2>/dev/null)"
wait_until 10 test -s "$pid_file" || fail "nginx wrote no pid file"
master_pid=$(<"$pid_file")
track "$master_pid"
two_workers() { [[ $(workers_of "$master_pid" | wc -w) == 2 ]]; }
wait_until 10 two_workers || fail "nginx did not start 2 workers: $(tail -n 5 "$error_log")"
workers_before=$(workers_of "$master_pid")
log "  master $master_pid, workers $workers_before"
expect_engine_listener "$port" "$master_pid"
wait_until 20 nginx_answers || fail "nginx does not answer on port $port: $(tail -n 5 "$error_log")"
http_load before 60 --port "$port" --expect "$site/f16k" --path /f16k --mode 10 --requests 100 \
    --concurrency 4

if (($# > 0)); then
    kill -USR1 "$ENGINE_PID"
    # shellcheck disable=SC2317  # called by wait_until
    through_twin() { grep -q "listener twins 1 steered to 1 ready [1-9][0-9]* parked 0" "$dir/engine.log"; }
    wait_until 10 through_twin || fail "the workers did not accept through the twin: $(grep "listener twins" "$dir/engine.log")"
    grep -q "accepts 0," "$dir/engine.log" || fail "the engine accepted connections itself"
    log "  the workers accepted through the listener's twin"
fi
log "SIGKILL to the engine (pid $ENGINE_PID)"
kill -KILL "$ENGINE_PID"
status=0
wait_pid "$ENGINE_PID" 10 || status=$?
((status != 124)) || fail "the engine did not exit within 10 s of SIGKILL"
ENGINE_PID=
nothing_listens() { ! listening_on "$port"; }
wait_until 5 nothing_listens || fail "something still listens on port $port: $(ss -tlnpH "( sport = :$port )")"
log "  nothing listens on port $port now; nginx's processes live on"
for pid in $master_pid $workers_before; do
    kill -0 "$pid" 2>/dev/null || fail "nginx process $pid died with the engine"
done

log "nginx -s reload"
"${nginx_cmd[@]}" -s reload >"$prefix/reload.out" 2>&1 ||
    fail "nginx -s reload failed: $(cat "$prefix/reload.out")"
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
    fail "no new workers after the reload (before: $workers_before, now:" \
        "$(workers_of "$master_pid")): $(tail -n 5 "$error_log")"
workers_after=$(workers_of "$master_pid")
log "  workers $workers_before replaced by $workers_after"
wait_until 20 nginx_answers ||
    fail "nginx does not answer on port $port after the reload: $(tail -n 5 "$error_log")"
hold_http_connection "$port"
held_by_nginx() {
    local lines
    lines=$(ss -tanpH state established "( sport = :$port )")
    grep -q '"nginx"' <<<"$lines"
}
wait_until 5 held_by_nginx || fail "no connection accepted by nginx itself on port $port"
lines=$(ss -tlnpH "( sport = :$port )")
sed 's/^/  ss: /' <<<"$lines"
grep -q "pid=$master_pid," <<<"$lines" || fail "the listener on port $port is not the nginx master's"
if grep -q '"tcpsd"' <<<"$lines"; then fail "a tcpsd listens on port $port"; fi
stop_pid "$HOLD_PID"
log "evidence: the listener on port $port is a kernel socket of nginx's (master $master_pid)"
http_load after 60 --port "$port" --expect "$site/f16k" --path /f16k --mode 10 --requests 100 \
    --concurrency 4
http_load after11 60 --port "$port" --expect "$site/f16k" --path /f16k --mode 11 --per-conn 10 \
    --requests 100 --concurrency 4
for pid in $workers_after; do
    kill -0 "$pid" 2>/dev/null || fail "new worker $pid exited: $(tail -n 5 "$error_log")"
done
if grep -q 'epoll_ctl.*failed' "$error_log"; then
    fail "a worker's epoll_ctl failed: $(grep 'epoll_ctl.*failed' "$error_log" | head -n 2)"
fi

log "nginx -s quit"
"${nginx_cmd[@]}" -s quit >"$prefix/quit.out" 2>&1 || fail "nginx -s quit failed: $(cat "$prefix/quit.out")"
wait_until 30 gone "$master_pid" || fail "nginx (pid $master_pid) did not exit within 30 s"
log "nginx after its engine's death: reloaded, served on kernel sockets"
