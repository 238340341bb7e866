# shellcheck shell=bash disable=SC2034,SC2154  # sourced: the caller sets and uses these
# Shared by bench/apache.sh and bench/conn_rate.sh, sourced after bench/lib.sh: placement, the
# document root, private Apache and nginx configurations, starting and stopping servers (whole
# process trees), and one measured run of a load generator.
#
# Environment: PLACEMENT   split (default): server on core 0, load generator and engine on the
#                          last core; shared: server and engine on core 0, load generator on
#                          the last core
#              APACHE_MODE event (default: mpm_event, several processes), worker, prefork, or
#                          single (apache2 -X: mpm_event in one process, no fork)
#              NGINX_MODE  single (default: master_process off, one process) or workers
#                          (a master and 2 worker processes)
#              NGINX_LISTENER own (default: nginx makes its listener) or inherited (made by a
#                          process without tcps that execs nginx with it, as socket
#                          activation does: bench/listen_then_exec.py; tcps serves it on
#                          demand, each connection offloaded at its first use)
#              ENGINE_CORES the engine's workers, a --cores list (e.g. 0,1: one family over
#                          two workers), instead of the placement's one core
#              APACHE_MODULES, MIME_TYPES, APACHE_USER where Apache's modules and mime.types
#                          are and whom its children run as (default Debian's
#                          /usr/lib/apache2/modules, /etc/mime.types, www-data; a machine
#                          without the packages uses copies: bench/device_pack.sh)

command -v python3 >/dev/null 2>&1 || die "python3 is not installed"
webtool=(python3 bench/webtool.py)

load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
placement=${PLACEMENT:-split}
server_core=$app_core
loadgen_core=$other_core
case $placement in
split) engine_core=$other_core ;;
shared) engine_core=$app_core ;;
*) die "PLACEMENT must be split or shared, not '$placement'" ;;
esac
engine_core=${ENGINE_CORES:-$engine_core}
apache_mode=${APACHE_MODE:-event}
apache_modules=${APACHE_MODULES:-/usr/lib/apache2/modules}
mime_types=${MIME_TYPES:-/etc/mime.types}
apache_user=${APACHE_USER:-www-data}
nginx_mode=${NGINX_MODE:-single}
nginx_listener=${NGINX_LISTENER:-own}
[[ $nginx_listener == own || $nginx_listener == inherited ]] ||
    die "NGINX_LISTENER must be own or inherited, not '$nginx_listener'"
# nginx 1.22 with inherited listeners and master_process off crashes (natively too).
[[ $nginx_listener == inherited && $nginx_mode == single ]] &&
    die "NGINX_LISTENER=inherited needs NGINX_MODE=workers"

# Both Apache's children (www-data) and nginx read the document root.
chmod 755 "$work"
docroot=$work/docroot
mkdir -p "$docroot"
head -c 16384 /dev/urandom >"$docroot/file16k.bin"
printf 'tcps\n' >"$docroot/tiny.html"
chmod 644 "$docroot"/*

free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (10 s at most) until $1 (a URL) answers 200.
wait_http() {
    for _ in $(seq 200); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "$1") == 200 ]] && return 0
        sleep 0.05
    done
    die "$1 does not answer"
}

# Fails unless the body at URL $1 is the file $2.
check_body() {
    [[ $(curl -sS --fail "$1" | sha256sum) == "$(sha256sum <"$2")" ]] || die "wrong body from $1"
}

# Writes an Apache configuration for port $2 into directory $1 and prints its path. The
# workers and limits follow Debian's defaults for each MPM. No access log.
apache_conf() {
    local dir=$1 port=$2 mpm=event limits
    mkdir -p "$dir/logs" "$dir/run"
    case $apache_mode in
    event | worker)
        mpm=$apache_mode
        limits="StartServers 2
MinSpareThreads 25
MaxSpareThreads 75
ThreadLimit 64
ThreadsPerChild 25
MaxRequestWorkers 150" ;;
    prefork)
        mpm=prefork
        limits="StartServers 5
MinSpareServers 5
MaxSpareServers 10
MaxRequestWorkers 150" ;;
    single)  # one process: as many threads as an event child can have
        limits="ThreadLimit 64
ThreadsPerChild 64
MaxRequestWorkers 64" ;;
    *) die "APACHE_MODE must be event, worker, prefork or single, not '$apache_mode'" ;;
    esac
    cat >"$dir/httpd.conf" <<EOF
ServerRoot $dir
ServerName 127.0.0.1
Listen 127.0.0.1:$port
PidFile $dir/run/httpd.pid
DefaultRuntimeDir $dir/run
ErrorLog $dir/logs/error.log
LogLevel warn
LoadModule mpm_${mpm}_module $apache_modules/mod_mpm_${mpm}.so
LoadModule authz_core_module $apache_modules/mod_authz_core.so
LoadModule mime_module $apache_modules/mod_mime.so
TypesConfig $mime_types
User $apache_user
Group $(id -gn "$apache_user")
DocumentRoot $docroot
# As Debian's apache2.conf: no .htaccess files anywhere (without it Apache looks for one in
# every directory above the file, on every request).
<Directory />
    AllowOverride None
</Directory>
<Directory $docroot>
    Require all granted
</Directory>
KeepAlive On
MaxKeepAliveRequests 100
KeepAliveTimeout 5
$limits
EOF
    echo "$dir/httpd.conf"
}

apache_description() {
    case $apache_mode in
    single) echo "Apache 2.4 mpm_event, one process (-X) x 64 threads" ;;
    prefork) echo "Apache 2.4 mpm_prefork, 5-150 processes" ;;
    *) echo "Apache 2.4 mpm_$apache_mode, 2-6 processes x 25 threads" ;;
    esac
}

nginx_conf() {
    local dir=$1 port=$2 process_lines
    mkdir -p "$dir/logs" "$dir/tmp"
    case $nginx_mode in
    single) process_lines="master_process off;
worker_processes 1;" ;;
    workers) process_lines="master_process on;
worker_processes 2;
user www-data;" ;;
    *) die "NGINX_MODE must be single or workers, not '$nginx_mode'" ;;
    esac
    cat >"$dir/nginx.conf" <<EOF
daemon off;
$process_lines
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server { listen 127.0.0.1:$port backlog=4096; root $docroot; }
}
EOF
    echo "$dir/nginx.conf"
}

nginx_description() {
    case $nginx_mode in
    single) echo -n "nginx, one process (master_process off)" ;;
    workers) echo -n "nginx, a master and 2 workers" ;;
    esac
    [[ $nginx_listener == inherited ]] && echo -n ", its listener inherited (on demand)"
    echo
}

# Starts a server (apache or nginx, $1) natively or offloaded ($2) on a free port, pinned to the
# server core; waits until it serves. Sets server_pid and server_port. In a session of its own
# (setsid, which execs in place: the pid stays the server's): prefork Apache stops by signalling
# its whole process group, which would otherwise be this script's.
server_roots=()
start_server() {
    local kind=$1 mode=$2 dir runner=() conf
    dir=$work/$kind-$mode
    server_port=$(free_port)
    [[ $mode == offloaded ]] && runner=("${preload[@]}")
    case $kind in
    apache)
        conf=$(apache_conf "$dir" "$server_port")
        local flags=(-D FOREGROUND)
        [[ $apache_mode == single ]] && flags=(-X)
        taskset -c "$server_core" setsid "${runner[@]}" apache2 -f "$conf" "${flags[@]}" \
            >"$dir/stdout.log" 2>&1 &
        ;;
    nginx)
        conf=$(nginx_conf "$dir" "$server_port")
        local launcher=()
        [[ $nginx_listener == inherited ]] &&
            launcher=(python3 bench/listen_then_exec.py "$server_port" env)
        taskset -c "$server_core" setsid "${launcher[@]}" "${runner[@]}" nginx -p "$dir" \
            -c "$conf" >"$dir/stdout.log" 2>&1 &
        ;;
    esac
    server_pid=$!
    server_roots+=("$server_pid")
    wait_http "http://127.0.0.1:$server_port/tiny.html"
    [[ $mode == offloaded ]] && expect_engine_listener "$server_port"
    return 0
}

descendants() {  # $1 and every process below it
    local child
    echo "$1"
    for child in $(pgrep -P "$1"); do descendants "$child"; done
}

# Stops a server's whole tree: SIGTERM to its root, 10 s to exit, then SIGKILL to what is left.
# A crash on the way out is reported, not fatal: the measurements are already taken.
stop_server() {
    local root=$1 tree status=0
    kill -0 "$root" 2>/dev/null || return 0
    read -r -a tree <<<"$(descendants "$root" | tr '\n' ' ')"
    kill -TERM "$root" 2>/dev/null || true
    for _ in $(seq 200); do
        local alive=0 pid
        for pid in "${tree[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.05
    done
    kill -KILL "${tree[@]}" 2>/dev/null || true
    wait "$root" 2>/dev/null || status=$?
    if ((status != 0 && status != 143)); then
        echo "$name: warning: server $root exited with status $status when stopped" >&2
    fi
}
stop_servers() {
    local root
    for root in "${server_roots[@]}"; do stop_server "$root"; done
    server_roots=()
}
trap 'stop_servers; cleanup' EXIT

# Waits (10 s at most) until no connection to port $1 is left, so a run does not start while
# the previous one's backlog is still being served.
wait_quiet() {
    for _ in $(seq 200); do
        [[ -z $(ss -tnH state established "( sport = :$1 )") ]] && return 0
        sleep 0.05
    done
    echo "$name: warning: connections to port $1 still open after 10 s" >&2
}

# Sets machine_idle to the ns all cores have spent idle since boot (/proc/stat: idle + iowait,
# which the kernel measures from its idle entry and exit times) and machine_time to the time
# of day in ns; the sample is a builtin read, so no process of ours runs to take it. Busy
# time is cores x elapsed - idle. The user and system columns are not used: they are sampled
# at the timer tick, which stops while a core idles, so they miss much of a server's short
# bursts of work (here by up to 0.6 cores against the processes' own, exact, accounting).
machine_idle=0 machine_time=0
sample_machine_idle() {
    local _cpu user nice system idle iowait _rest
    read -r _cpu user nice system idle iowait _rest </proc/stat
    machine_idle=$(((idle + iowait) * tick_ns))
    machine_time=$(date +%s%N)
}
tick_ns=$((1000000000 / $(getconf CLK_TCK)))
machine_cores=$(grep -c '^cpu[0-9]' /proc/stat)

# Waits (30 s at most) until the rest of the machine uses less than MAX_OTHER_CORES.
wait_machine_quiet() {
    local idle0 time0
    for _ in $(seq 30); do
        sample_machine_idle
        idle0=$machine_idle time0=$machine_time
        sleep 1
        sample_machine_idle
        awk -v i=$((machine_idle - idle0)) -v t=$((machine_time - time0)) -v c="$machine_cores" \
            -v m="$max_other_cores" 'BEGIN { exit !((c * t - i) / t < m) }' && return 0
    done
    echo "$name: the machine is still busy after 30 s: going on" >&2
}

# The CSV fields of the wrk report in $work/wrk.txt: requests,seconds,requests_per_s,p50_ms,
# p99_ms,errors. Dies if wrk got no reply ($1 names the run in the message).
wrk_fields() {
    local parsed requests secs p50 p99 errors
    parsed=$("${webtool[@]}" wrk "$work/wrk.txt") || die "cannot parse wrk's report: $(cat "$work/wrk.txt")"
    [[ ${parsed%%,*} -gt 0 ]] || die "wrk got no reply ($1): $(cat "$work/wrk.txt")"
    IFS=, read -r requests secs p50 p99 errors <<<"$parsed"
    echo "$requests,$secs,$(awk -v r="$requests" -v s="$secs" 'BEGIN { printf "%.1f", (s > 0) ? r / s : 0 }'),$p50,$p99,$errors"
}

# One measured run of a load generator (the command after $1..$3) against a server:
# $1 server root pid, $2 report file, $3 timeout in seconds. Sets run_cpu to
# "server_cpu_ns,engine_cpu_ns,loadgen_cpu_ns,wall_ns,other_cpu_ns". The generator's own CPU
# comes from its rusage (pingpong --measure); timeout ends a run that hangs (SIGINT: httperf
# still reports). other_cpu_ns is what the rest of the machine used meanwhile (all cores' busy
# time, less the three above; within about 0.05 cores): on a shared machine it tells the
# disturbed runs.
# With MAX_OTHER_CORES set (say 0.25), a run during which the rest of the machine used more
# than that many cores is taken again, up to 3 times, each after the machine has calmed down
# (the last attempt is kept whatever it measured, with a warning).
max_other_cores=${MAX_OTHER_CORES:-}
measured_run() {
    local attempt
    for attempt in 1 2 3 4; do
        measure_once "$@"
        [[ -n $max_other_cores ]] || return 0
        awk -v o="$other_ns" -v w="$wall_ns" -v m="$max_other_cores" 'BEGIN { exit !(o / w > m) }' ||
            return 0
        local used
        used=$(awk -v o="$other_ns" -v w="$wall_ns" 'BEGIN { printf "%.2f", o / w }')
        if ((attempt == 4)); then
            echo "$name: warning: other processes used $used cores during this run; kept" >&2
            return 0
        fi
        echo "$name: other processes used $used cores during the run: waiting, then again" >&2
        wait_machine_quiet
    done
}
measure_once() {
    local root=$1 report=$2 limit=$3 before after idle0 time0 status=0
    shift 3
    read -r -a before <<<"$("${webtool[@]}" cpu "$root" "$engine_pid" | tr '\n' ' ')"
    sample_machine_idle
    idle0=$machine_idle time0=$machine_time
    taskset -c "$loadgen_core" "$pingpong" --measure "$work/loadgen-cpu" -- \
        timeout -s INT -k 5 "$limit" "$@" >"$report" 2>"$report.err" || status=$?
    sample_machine_idle
    read -r -a after <<<"$("${webtool[@]}" cpu "$root" "$engine_pid" | tr '\n' ' ')"
    # 124: the time limit hit, and the generator printed its report anyway.
    if ((status != 0 && status != 124)); then
        die "$1 failed with status $status: $(tail -c 600 "$report.err")"
    fi
    local server_ns=$((after[0] - before[0])) engine_ns=$((after[1] - before[1])) loadgen_ns
    loadgen_ns=$(cat "$work/loadgen-cpu")
    wall_ns=$((machine_time - time0))
    other_ns=$((machine_cores * wall_ns - (machine_idle - idle0) - server_ns - engine_ns - loadgen_ns))
    run_cpu="$server_ns,$engine_ns,$loadgen_ns,$wall_ns,$other_ns"
}
