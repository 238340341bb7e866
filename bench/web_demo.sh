#!/usr/bin/env bash
# The web demo: python3 -m http.server serves a 16 KB file, first natively, then with its TCP
# offloaded to tcpsd (through tcps-run, or LD_PRELOAD and a private engine if tcps-run is not
# built). wrk drives load from outside (not offloaded; a curl loop if wrk is missing). Checks
# the body's checksum in both runs, shows with `ss -tanp` that the offloaded server's sockets
# belonged to tcpsd, and prints requests/s for both and their ratio.
#
# Usage: bash bench/web_demo.sh [BUILD_DIR]        (default: build; run scripts/build.sh first)
# Environment: DURATION (seconds per run, default 5), CONNECTIONS (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
duration=${DURATION:-5}
connections=${CONNECTIONS:-8}
tcpsd=$build/engine/tcpsd
libtcps=$build/preload/libtcps.so
tcps_run=$build/engine/tcps-run
python=$(command -v /usr/bin/python3 || command -v python3)

for needed in "$tcpsd" "$libtcps"; do
    [[ -e $needed ]] || { echo "web_demo: $needed is missing: run bash scripts/build.sh" >&2; exit 1; }
done
tcpsd=$(realpath "$tcpsd")
libtcps=$(realpath "$libtcps")

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
    if command -v wrk >/dev/null 2>&1; then
        wrk -t1 -c"$connections" -d"${duration}s" "http://127.0.0.1:$port/page.bin" >"$work/wrk-$port.txt"
        sed 's/^/   /' "$work/wrk-$port.txt" >&2
        awk '/^Requests\/sec:/ { printf "%d\n", $2 }' "$work/wrk-$port.txt"
    else
        # No wrk: one curl after another for the same time.
        local count=0 end=$((SECONDS + duration))
        while ((SECONDS < end)); do
            curl -s -o /dev/null "http://127.0.0.1:$port/page.bin" && count=$((count + 1))
        done
        echo "   (wrk not installed: sequential curl loop)" >&2
        echo $((count / duration))
    fi
}

head -c 16384 /dev/urandom >"$work/page.bin"
expected=$(sha256sum "$work/page.bin" | cut -d' ' -f1)

say "native: python3 -m http.server, load: wrk -t1 -c$connections -d${duration}s"
port=$(free_port)
"$python" -m http.server "$port" --bind 127.0.0.1 --directory "$work" >"$work/native.log" 2>&1 &
pids+=($!)
native_pid=$!
wait_http "$port"
check_body "$port"
native_rps=$(load "$port")
kill -TERM "$native_pid"

say "offloaded: the same server with its TCP in tcpsd"
port=$(free_port)
if [[ -x $tcps_run ]]; then
    echo "via: tcps-run -- python3 -m http.server (a private engine if none is running)"
    "$tcps_run" --engine "$tcpsd" --lib "$libtcps" -- \
        "$python" -m http.server "$port" --bind 127.0.0.1 --directory "$work" \
        >"$work/offloaded.log" 2>&1 &
    pids+=($!)
else
    echo "via: LD_PRELOAD=libtcps.so and a private tcpsd (tcps-run is not built)"
    "$tcpsd" --socket "$work/engine.sock" --ready-fd 3 3>"$work/ready" >"$work/engine.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do grep -q ready "$work/ready" 2>/dev/null && break; sleep 0.05; done
    grep -q ready "$work/ready" || { echo "web_demo: tcpsd did not start" >&2; exit 1; }
    LD_PRELOAD=$libtcps TCPS_ENGINE_SOCKET=$work/engine.sock \
        "$python" -m http.server "$port" --bind 127.0.0.1 --directory "$work" \
        >"$work/offloaded.log" 2>&1 &
    pids=("$!" "${pids[@]}")  # the server stops before its engine
fi
wait_http "$port"
check_body "$port"
echo "ss -tlnp: who owns the listening socket on port $port"
listener=$(ss -tlnpH "( sport = :$port )")
sed 's/^/   /' <<<"$listener"
grep -q '"tcpsd"' <<<"$listener" ||
    { echo "web_demo: the listener is not tcpsd's: not offloaded" >&2; exit 1; }
# Accepted connections while the load runs (HTTP/1.0: each lives briefly): sample until seen.
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
offloaded_rps=$(load "$port")
wait "$sampler" || true
echo "ss -tanp during the load: accepted connections on port $port (first 3)"
head -n 3 "$work/ss-during.txt" | sed 's/^/   /'
if grep -q 'python' "$work/ss-during.txt"; then
    echo "web_demo: python holds kernel sockets on port $port: not offloaded" >&2
    exit 1
fi

ratio=$(awk -v a="$offloaded_rps" -v b="$native_rps" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }')
say "result (16 KB file, $connections connections, ${duration}s each, same machine)"
printf '   %-28s %12s\n' "" "requests/s"
printf '   %-28s %12s\n' "native" "$native_rps"
printf '   %-28s %12s\n' "offloaded (tcpsd)" "$offloaded_rps"
printf '   %-28s %12s\n' "ratio offloaded / native" "$ratio"
