# shellcheck shell=bash disable=SC2034,SC2154  # sourced: the caller sets and uses these
# Shared by bench/latency.sh and bench/throughput.sh: placement, the engine, process cleanup,
# CPU accounting from the kernel (schedstat) and the median [min-max] table helpers.
# Expects: build (the build directory) and name (the script's name, for messages).

tcpsd=$(realpath "$build/engine/tcpsd")
libtcps=$(realpath "$build/preload/libtcps.so")
pingpong=$(realpath "$build/bench/pingpong")

work=$(mktemp -d "${TMPDIR:-/tmp}/tcps-$name.XXXXXX")
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

# Placement: the application on core 0; its peer (or load generator) and the engine on the last
# core. With one core, everything shares it.
cores=$(nproc)
app_core=0
other_core=$((cores - 1))

die() { echo "$name: $*" >&2; exit 1; }

wait_file() {  # $1: file that must appear (5 s at most)
    for _ in $(seq 100); do [[ -s $1 ]] && return 0; sleep 0.05; done
    die "$1 did not appear"
}

# Scales a count by SCALE (may be fractional), at least $2 (default 1).
scaled() { awk -v c="$1" -v s="$scale" -v m="${2:-1}" 'BEGIN { n = int(c * s); print (n < m) ? m : n }'; }

# The engine's core (default: the last; ENGINE_CORES: a list, one worker on each) and its mode:
# ENGINE_ARGS in the environment, for example "--busy-poll" or "--spin-us 200" (default: spin
# 50 µs, then sleep).
engine_core=${ENGINE_CORES:-${ENGINE_CORE:-$other_core}}  # a --cores list
read -r -a engine_args <<<"${ENGINE_ARGS:-}"
engine_mode() {
    if [[ " ${engine_args[*]} " == *" --busy-poll "* ]]; then echo "busy-poll"
    else echo "spin-then-sleep, ${engine_args[*]:---spin-us 50}"; fi
}
start_engine() {
    taskset -c "$engine_core" "$tcpsd" --socket "$work/engine.sock" --cores "$engine_core" \
        "${engine_args[@]}" --ready-fd 3 3>"$work/ready" 2>"$work/engine.log" &
    engine_pid=$!
    pids+=("$engine_pid")
    wait_file "$work/ready"
}
preload=(env LD_PRELOAD="$libtcps" TCPS_ENGINE_SOCKET="$work/engine.sock")

# ns on CPU of all tasks of process $1 (the kernel's schedstat; 0 once it has gone).
cpu_ns() {
    local total=0 t value
    for t in /proc/"$1"/task/*/schedstat; do
        read -r value _ <"$t" 2>/dev/null || continue
        total=$((total + value))
    done
    echo "$total"
}

# Fails unless the listener on port $1 is a tcpsd socket (the offloaded server really is).
expect_engine_listener() {
    local owner
    for _ in $(seq 40); do
        owner=$(ss -tlnpH "( sport = :$1 )")
        [[ -n $owner ]] && break
        sleep 0.05
    done
    grep -q '"tcpsd"' <<<"$owner" || die "the listener on port $1 is not tcpsd's: not offloaded ($owner)"
}

# Asks the engine for its statistics; warns if it logged none (the runs then prove nothing).
check_engine_stats() {
    kill -USR1 "$engine_pid"
    for _ in $(seq 20); do grep -q bytes "$work/engine.log" && return 0; sleep 0.05; done
    echo "$name: the engine logged no statistics; cannot confirm offload" >&2
}

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; }
