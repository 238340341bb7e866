#!/usr/bin/env bash
# The web demo: Apache 2.4 (mpm_event, its usual master and child processes, unmodified)
# serves a 16 KB file, first natively, then with its TCP offloaded to tcpsd (started through
# tcps-run against a private engine). wrk drives load from outside (not offloaded). Checks the
# body's checksum in both runs, shows with `ss -tanp` that the offloaded server's sockets
# belonged to tcpsd, and prints requests/s, the CPU time of Apache's processes and of the engine
# per request for both, and the ratios.
#
# Placement, the same in both runs: with 2 CPUs or more, Apache on CPU 0 and tcpsd and wrk on
# the last CPU, the deployment tcps is for (the engine on a core the server does not use; on a
# 2-CPU machine it shares that core with the load generator). PLACEMENT=none leaves it all to
# the scheduler.
#
# Usage: bash bench/web_demo.sh [BUILD_DIR]        (default: build; run scripts/build.sh first)
# Environment: DURATION (seconds per run, default 5), CONNECTIONS (default 32), PLACEMENT
# (split or none, default split).
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
duration=${DURATION:-5}
connections=${CONNECTIONS:-32}
tcpsd=$build/engine/tcpsd
libtcps=$build/preload/libtcps.so
tcps_run=$build/engine/tcps-run
python=$(command -v /usr/bin/python3 || command -v python3)
apache=$(command -v apache2 || echo /usr/sbin/apache2)
modules=/usr/lib/apache2/modules
[[ -x $apache && -f $modules/mod_mpm_event.so ]] ||
    { echo "web_demo: apache2 is missing: run bash scripts/setup.sh" >&2; exit 1; }
command -v wrk >/dev/null 2>&1 || { echo "web_demo: wrk is missing: run bash scripts/setup.sh" >&2; exit 1; }

for needed in "$tcpsd" "$libtcps"; do
    [[ -e $needed ]] || { echo "web_demo: $needed is missing: run bash scripts/build.sh" >&2; exit 1; }
done
tcpsd=$(realpath "$tcpsd")
libtcps=$(realpath "$libtcps")

cpus=$(nproc)
if [[ ${PLACEMENT:-split} == split && $cpus -ge 2 ]]; then
    pin_server=(taskset -c 0)
    pin_client=(taskset -c $((cpus - 1)))
    engine_cores=(--cores $((cpus - 1)))
    placement="Apache on CPU 0, tcpsd and wrk on CPU $((cpus - 1)) of $cpus"
else
    pin_server=()
    pin_client=()
    engine_cores=()
    placement="$cpus CPUs shared by Apache, tcpsd and wrk"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/tcps-demo.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }

free_port() {
    "$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Waits (10 s at most) until the server on $1 answers.
wait_http() {
    for _ in $(seq 200); do
        curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.05
    done
    echo "web_demo: the server on port $1 does not answer" >&2
    exit 1
}

check_body() {
    local port=$1 got
    got=$(curl -sS --fail "http://127.0.0.1:$port/page.bin" | sha256sum | cut -d' ' -f1)
    [[ $got == "$expected" ]] || { echo "web_demo: checksum mismatch on port $port" >&2; exit 1; }
    echo "body: 16384 bytes, sha256 ${got:0:16}... matches"
}

# Prints the requests/s reached against port $1.
load() {
    local port=$1
    "${pin_client[@]}" wrk -t1 -c"$connections" -d"${duration}s" "http://127.0.0.1:$port/page.bin" \
        >"$work/wrk-$port.txt"
    sed 's/^/   /' "$work/wrk-$port.txt" >&2
    awk '/^Requests\/sec:/ { printf "%d\n", $2 }' "$work/wrk-$port.txt"
}

# utime + stime, in clock ticks, of the processes named (fields 14-15 of /proc/PID/stat).
ticks() {
    local total=0 pid stat
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        # shellcheck disable=SC2086  # split the fields on purpose
        set -- $stat
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

# Apache's processes: the master (its pid file) and its children.
apache_pids() {
    local master
    master=$(cat "$1")
    echo "$master" "$(pgrep -d ' ' -P "$master" || true)"
}

# A private configuration for an instance on port $1 in directory $2: nothing from /etc/apache2.
apache_conf() {
    local port=$1 dir=$2
    mkdir -p "$dir"
    cat >"$dir/apache2.conf" <<EOF
ServerRoot $dir
ServerName 127.0.0.1
Listen 127.0.0.1:$port
PidFile $dir/apache2.pid
ErrorLog $dir/error.log
LogLevel warn
DefaultRuntimeDir $dir
Mutex file:$dir default
User www-data
Group www-data
LoadModule mpm_event_module $modules/mod_mpm_event.so
LoadModule authz_core_module $modules/mod_authz_core.so
StartServers 2
ThreadsPerChild 25
MaxRequestWorkers 50
KeepAlive On
DocumentRoot $work/site
# As Debian's apache2.conf: no .htaccess lookups in every directory on every request.
<Directory />
    AllowOverride None
</Directory>
<Directory $work/site>
    Require all granted
</Directory>
EOF
}

# Starts Apache with the configuration in directory $1 through the command in $2...
start_apache() {
    local dir=$1
    shift
    "${pin_server[@]}" "$@" "$apache" -f "$dir/apache2.conf" -k start >"$dir/start.out" 2>&1 ||
        { cat "$dir/start.out" "$dir/error.log" >&2; exit 1; }
    for _ in $(seq 200); do [[ -s $dir/apache2.pid ]] && return 0; sleep 0.05; done
    echo "web_demo: apache2 wrote no pid file" >&2
    exit 1
}

stop_apache() {
    local dir=$1 master
    master=$(cat "$dir/apache2.pid")
    "$apache" -f "$dir/apache2.conf" -k stop >/dev/null 2>&1 || kill -TERM "$master"
    for _ in $(seq 200); do kill -0 "$master" 2>/dev/null || return 0; sleep 0.05; done
    kill -KILL "$master" 2>/dev/null || true
}

# Apache's children run as www-data: they must reach the files and the engine's socket.
chmod 755 "$work"
mkdir -p "$work/site"
head -c 16384 /dev/urandom >"$work/site/page.bin"
chmod 644 "$work/site/page.bin"
expected=$(sha256sum "$work/site/page.bin" | cut -d' ' -f1)
hz=$(getconf CLK_TCK)

say "native: apache2 (mpm_event), load: wrk -t1 -c$connections -d${duration}s; $placement"
port=$(free_port)
apache_conf "$port" "$work/native"
start_apache "$work/native"
wait_http "$port"
check_body "$port"
read -r -a procs <<<"$(apache_pids "$work/native/apache2.pid")"
before=$(ticks "${procs[@]}")
native_rps=$(load "$port")
read -r -a procs <<<"$(apache_pids "$work/native/apache2.pid")"
native_app_ticks=$(($(ticks "${procs[@]}") - before))
stop_apache "$work/native"

say "offloaded: the same Apache with its TCP in tcpsd"
port=$(free_port)
apache_conf "$port" "$work/offloaded"
"$tcpsd" "${engine_cores[@]}" --socket "$work/engine.sock" --ready-fd 3 3>"$work/ready" \
    >"$work/engine.log" 2>&1 &
engine_pid=$!
pids+=("$engine_pid")
for _ in $(seq 100); do grep -q ready "$work/ready" 2>/dev/null && break; sleep 0.05; done
grep -q ready "$work/ready" || { echo "web_demo: tcpsd did not start" >&2; exit 1; }
if [[ -x $tcps_run ]]; then
    echo "via: tcps-run --socket ENGINE -- apache2 -k start (tcpsd pid $engine_pid)"
    start_apache "$work/offloaded" "$tcps_run" --socket "$work/engine.sock" --lib "$libtcps" --
else
    echo "via: LD_PRELOAD=libtcps.so apache2 -k start (tcpsd pid $engine_pid)"
    start_apache "$work/offloaded" env LD_PRELOAD="$libtcps" TCPS_ENGINE_SOCKET="$work/engine.sock"
fi
wait_http "$port"
check_body "$port"
echo "ss -tlnp: who owns the listening socket on port $port"
listener=$(ss -tlnpH "( sport = :$port )")
sed 's/^/   /' <<<"$listener"
grep -q '"tcpsd"' <<<"$listener" ||
    { echo "web_demo: the listener is not tcpsd's: not offloaded" >&2; exit 1; }
# Accepted connections while the load runs: sample until seen.
(
    sleep 0.5
    for _ in $(seq 40); do
        # Lines without users: are still in the kernel's accept queue, owned by nobody yet.
        ss -tanpH state established "( sport = :$port )" | grep 'users:' >"$work/ss-during.txt" || true
        [[ -s $work/ss-during.txt ]] && break
        sleep 0.1
    done
) &
sampler=$!
read -r -a procs <<<"$(apache_pids "$work/offloaded/apache2.pid")"
before=$(ticks "${procs[@]}")
engine_before=$(ticks "$engine_pid")
offloaded_rps=$(load "$port")
read -r -a procs <<<"$(apache_pids "$work/offloaded/apache2.pid")"
offloaded_app_ticks=$(($(ticks "${procs[@]}") - before))
offloaded_engine_ticks=$(($(ticks "$engine_pid") - engine_before))
wait "$sampler" || true
echo "ss -tanp during the load: accepted connections on port $port (first 3)"
head -n 3 "$work/ss-during.txt" | sed 's/^/   /'
if grep -q 'apache2' "$work/ss-during.txt"; then
    echo "web_demo: apache2 holds kernel sockets on port $port: not offloaded" >&2
    exit 1
fi
stop_apache "$work/offloaded"

# CPU microseconds per request: ticks / hz over requests/s * duration.
per_request() {
    awk -v t="$1" -v hz="$hz" -v rps="$2" -v d="$duration" \
        'BEGIN { printf "%.1f", (rps > 0) ? t / hz * 1e6 / (rps * d) : 0 }'
}
native_app_us=$(per_request "$native_app_ticks" "$native_rps")
offloaded_app_us=$(per_request "$offloaded_app_ticks" "$offloaded_rps")
offloaded_engine_us=$(per_request "$offloaded_engine_ticks" "$offloaded_rps")
offloaded_total_us=$(awk -v a="$offloaded_app_us" -v e="$offloaded_engine_us" 'BEGIN { printf "%.1f", a + e }')

ratio=$(awk -v a="$offloaded_rps" -v b="$native_rps" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }')
ratio_of() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }'; }
say "result (Apache mpm_event, 16 KB file, $connections connections, ${duration}s each; $placement)"
printf '   %-26s %11s %17s %17s %17s\n' "" "requests/s" "Apache CPU/req" "engine CPU/req" "total CPU/req"
printf '   %-26s %11s %14s us %14s us %14s us\n' "native" "$native_rps" "$native_app_us" "-" "$native_app_us"
printf '   %-26s %11s %14s us %14s us %14s us\n' "offloaded (tcpsd)" "$offloaded_rps" \
    "$offloaded_app_us" "$offloaded_engine_us" "$offloaded_total_us"
printf '   %-26s %11s %17s %17s %17s\n' "ratio offloaded / native" "$ratio" \
    "$(ratio_of "$offloaded_app_us" "$native_app_us")" "" "$(ratio_of "$offloaded_total_us" "$native_app_us")"
