#!/usr/bin/env bash
# Apache 2.4 (Debian's apache2) with the MPM given as $1 (prefork, worker or event), started as a
# daemon through tcps-run with the engine on its own core, serving a 16 KB and a 10 MB file to
# http_check, a plain client that checks every byte: HTTP/1.0 (a connection per request),
# HTTP/1.1 keep-alive, and 10 MB bodies. Then `apache2 -k graceful` under load with no failed
# request, and `apache2 -k stop`, after which the engine holds nothing. ss proves that the
# listener and the connections belonged to tcpsd.
#
# Development knobs: TCPS_NATIVE=1 (kernel TCP, see servers_lib.sh); TCPS_APACHE_ONE_PROCESS=1
# runs `apache2 -X` (one process, no fork) in the foreground and skips the graceful restart.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

mpm=${1:-}
[[ $mpm == prefork || $mpm == worker || $mpm == event ]] ||
    fail "usage: apache.sh prefork|worker|event [2-workers|elastic]"
# 2-workers: the engine runs two workers (--cores 0,1) and Apache's connections must be served
# by both (issue 11: one family over all of the engine's cores). elastic: the same two workers,
# elastic (--min-workers 1, low watermarks so that this load surely crosses them): the second
# is parked before the load, takes connections under it, and is parked again after it.
two_workers=0
elastic=0
case ${2:-} in
    2-workers) two_workers=1 ;;
    elastic) elastic=1 ENGINE_EXTRA=(--min-workers 1 --elastic-marks "20,10") ;;
    '') ;;
    *) fail "unknown mode '${2:-}'" ;;
esac
if ((two_workers || elastic)); then
    (($(nproc) >= 2)) || skip "this machine has one CPU: no two engine workers"
    ENGINE_CORES=0,1
fi
second_parked() {
    request_stats && grep -q 'worker 1: .*(parked)' <<<"$LAST_STATS"
}
HTTP_CHECK=${HTTP_CHECK:?HTTP_CHECK names the http_check client}
apache=/usr/sbin/apache2
modules=/usr/lib/apache2/modules
[[ -x $apache ]] || skip "$apache is not installed (bash scripts/setup.sh)"
[[ -f $modules/mod_mpm_$mpm.so ]] || skip "$modules/mod_mpm_$mpm.so is missing"
id www-data >/dev/null 2>&1 || skip "there is no www-data user for Apache's children"
need_tool ss timeout
[[ -n $PYTHON ]] || skip "python3 is not installed"
one_process=${TCPS_APACHE_ONE_PROCESS:-0}

dir=$TCPS_TEST_DIR
site=$dir/site
mkdir -p "$site" "$dir/apache"
head -c 16384 /dev/urandom >"$site/f16k"
head -c $((10 << 20)) /dev/urandom >"$site/f10m"
chmod 755 "$dir" "$site"
chmod 644 "$site"/*

start_offload
daemon_runner
port=$(free_port)
conf=$dir/apache/httpd.conf
error_log=$dir/apache/error.log
pid_file=$dir/apache/httpd.pid

case $mpm in
    prefork) mpm_conf='StartServers 4
MinSpareServers 4
MaxSpareServers 8
ServerLimit 32
MaxRequestWorkers 32' ;;
    *) mpm_conf='StartServers 2
ServerLimit 8
ThreadsPerChild 16
ThreadLimit 16
MinSpareThreads 16
MaxSpareThreads 48
MaxRequestWorkers 64' ;;
esac

# A private, minimal configuration: nothing from /etc/apache2, no envvars, no access log.
cat >"$conf" <<EOF
ServerRoot $dir/apache
ServerName 127.0.0.1
Listen 127.0.0.1:$port
PidFile $pid_file
ErrorLog $error_log
LogLevel notice
DefaultRuntimeDir $dir/apache
Mutex file:$dir/apache default
User www-data
Group www-data
LoadModule mpm_${mpm}_module $modules/mod_mpm_$mpm.so
LoadModule authz_core_module $modules/mod_authz_core.so
$mpm_conf
MaxConnectionsPerChild 0
KeepAlive On
MaxKeepAliveRequests 100
KeepAliveTimeout 5
EnableSendfile On
DocumentRoot $site
<Directory $site>
    Require all granted
</Directory>
EOF
"$apache" -t -f "$conf" >"$dir/apache/configtest.out" 2>&1 ||
    fail "apache2 rejects the configuration: $(cat "$dir/apache/configtest.out")"

generations() { grep -c 'resuming normal operations' "$error_log" 2>/dev/null || true; }
apache_answers() {
    "$HTTP_CHECK" --port "$port" --path /f16k --expect "$site/f16k" --requests 1 --timeout-s 2 \
        >/dev/null 2>&1
}

log "apache2 mpm_$mpm on port $port"
if ((one_process)); then
    "${OFFLOAD[@]}" "$apache" -f "$conf" -X >"$dir/apache/stdout" 2>&1 &
    apache_pid=$!
    track "$apache_pid"
else
    # -k start daemonizes: the command returns once the daemon runs; the pid file names it.
    "${DAEMON[@]}" "$apache" -f "$conf" -k start >"$dir/apache/stdout" 2>&1 ||
        fail "apache2 -k start failed: $(cat "$dir/apache/stdout" "$error_log" 2>/dev/null)"
    wait_until 10 test -s "$pid_file" || fail "apache2 wrote no pid file"
    apache_pid=$(<"$pid_file")
    track "$apache_pid"
fi
if offloaded; then expect_engine_listener "$port" "$apache_pid"; fi
wait_until 20 apache_answers ||
    fail "apache2 does not answer on port $port: $(tail -n 5 "$error_log")"
if offloaded && ((elastic)); then
    wait_until 10 second_parked || fail "the second worker is not parked before the load"
    log "elastic: the second worker is parked while Apache is idle"
fi
run_standard_loads "$port" "$site" "$apache_pid"
if offloaded && ((two_workers)); then
    # Every byte was checked by the loads above; the workers' own counters say who served.
    request_stats || fail "the engine logged no statistics"
    sed 's/^/  /' <<<"$LAST_STATS"
    for w in 0 1; do
        accepts=$(worker_stat "$w" accepts)
        out=$(worker_bytes_out "$w")
        ((${accepts:-0} >= 500)) || fail "worker $w served ${accepts:-no} of the connections"
        ((${out:-0} >= 10000000)) || fail "worker $w sent only ${out:-0} bytes"
    done
    log "both workers served Apache's connections"
fi
if offloaded && ((elastic)); then
    request_stats || fail "the engine logged no statistics"
    sed 's/^/  /' <<<"$LAST_STATS"
    accepts=$(worker_stat 1 accepts)
    ((${accepts:-0} > 0)) || fail "the second worker took no connection under load"
    wait_until 15 second_parked || fail "the second worker was not parked again after the load"
    log "elastic: the second worker took $accepts connections under load, parked again after it"
fi
check=(--port "$port" --expect "$site/f16k" --path /f16k)

if ((one_process)); then
    log "one process (-X): no graceful restart; stopping it"
    stop_pid "$apache_pid" 10
else
    log "graceful restart under load (HTTP/1.0 and keep-alive clients running)"
    children_before=$(pgrep -P "$apache_pid" | tr '\n' ' ')
    gen_before=$(generations)
    # Bounded by --duration-s in case nobody stops them; finish_load stops them earlier.
    "$HTTP_CHECK" "${check[@]}" --mode 10 --concurrency 4 --duration-s 90 --progress-ms 100 \
        >"$dir/restart10.out" 2>&1 &
    restart10_pid=$!
    "$HTTP_CHECK" "${check[@]}" --mode 11 --per-conn 10 --concurrency 4 --duration-s 90 \
        --max-retries 1000 --progress-ms 100 \
        >"$dir/restart11.out" 2>&1 &
    restart11_pid=$!
    track "$restart10_pid" "$restart11_pid"
    wait_progress "$dir/restart10.out" 20 200 || fail "the HTTP/1.0 load made no progress"
    wait_progress "$dir/restart11.out" 20 200 || fail "the keep-alive load made no progress"
    "$apache" -f "$conf" -k graceful >"$dir/apache/graceful.out" 2>&1 ||
        fail "apache2 -k graceful failed: $(cat "$dir/apache/graceful.out")"
    new_generation() { (($(generations) > gen_before)); }
    wait_until 30 new_generation ||
        fail "no new generation after -k graceful: $(tail -n 5 "$error_log")"
    # The old children finish their requests and exit; the load goes on through the new ones.
    old_children_gone() {
        local pid
        for pid in $children_before; do ! kill -0 "$pid" 2>/dev/null || return 1; done
    }
    wait_until 30 old_children_gone ||
        fail "children of the old generation still run: $children_before"
    after10=$(progress_ok "$dir/restart10.out")
    after11=$(progress_ok "$dir/restart11.out")
    wait_progress "$dir/restart10.out" 30 $((after10 + 200)) ||
        fail "the HTTP/1.0 load stalled after the restart"
    wait_progress "$dir/restart11.out" 30 $((after11 + 200)) ||
        fail "the keep-alive load stalled after the restart"
    kill -0 "$apache_pid" 2>/dev/null || fail "the apache2 parent died in the restart"
    log "  new generation serving (old children $children_before gone)"
    finish_load "$restart10_pid" "$dir/restart10.out"
    finish_load "$restart11_pid" "$dir/restart11.out"

    log "apache2 -k stop"
    "$apache" -f "$conf" -k stop >"$dir/apache/stop.out" 2>&1 ||
        fail "apache2 -k stop failed: $(cat "$dir/apache/stop.out")"
    wait_until 30 gone "$apache_pid" || fail "apache2 (pid $apache_pid) did not exit within 30 s"
    leftovers=$(pgrep -f "$conf" || true)
    [[ -z $leftovers ]] || fail "apache2 processes left after stop: $leftovers"
fi

expect_engine_empty 20 "$port"
if offloaded; then stop_engine; fi
grep -E '\[(core|mpm_[a-z]+):(error|crit|alert|emerg)\]' "$error_log" | head -n 5 |
    sed 's/^/  apache: /' || true
log "apache mpm_$mpm: all checks passed"
