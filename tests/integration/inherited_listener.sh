#!/usr/bin/env bash
# A listener inherited from outside the shim (socket activation: systemd, a supervisor): a
# parent without the shim listens and starts a preloaded child that inherits the listener
# (inherited_listener.py). Its FD_CLOEXEC set and fstat(), as sd_listen_fds() and
# sd_is_socket() do first, still see the kernel socket; its first use offers it to the
# engine, which serves it on
# demand (ipc::kAdoptOnDemand): it accepts nothing ahead, since others may accept from the
# same kernel queue; the child accepts with the kernel's accept4() when the engine says
# connections wait, and each connection is offloaded at its first use once 10 ms old (a
# shorter one stays the kernel's: its move would cost more than its life). Proved: every
# client echoed; the engine accepted none itself, served the listener on demand and adopted
# each of the child's connections (its counters), so their bytes went through it; none that
# had its first echo within 8 ms of its accept was offloaded by then; none moved while
# another thread of the child slept in the kernel's poll() on it. With the listener
# shared (the parent keeps its copy, as systemd does), 2 clients that connect while the child
# still holds it and then closes it reach the parent: none was accepted ahead and lost.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
[[ -n $PYTHON ]] || skip "python3 is not installed"
helper=$(dirname "$0")/inherited_listener.py
dir=$TCPS_TEST_DIR

# Runs the helper with arguments "$@" (a fresh engine); its counters into STATS.
run_phase() {
    local name=$1
    shift
    : >"$dir/engine.log"
    start_engine
    local status=0
    LIBTCPS=$LIBTCPS TCPS_ENGINE_SOCKET=$ENGINE_SOCK timeout 120 "$PYTHON" "$helper" "$@" \
        >"$dir/$name.out" 2>&1 || status=$?
    sed "s/^/  $name: /" "$dir/$name.out"
    ((status == 0)) || fail "$name: a client lost its echo, or the child failed (status $status)"
    kill -USR1 "$ENGINE_PID"
    # shellcheck disable=SC2317  # called by wait_until
    logged() { grep -q 'worker 0: sessions' "$dir/engine.log"; }
    wait_until 10 logged || fail "$name: no statistics"
    STATS=$(grep 'worker 0: sessions' "$dir/engine.log" | tail -n 1)
    stop_engine
}
stat_of() { sed -n "s/.* $1 \([0-9]*\)[ ,)].*/\1/p" <<<"$STATS"; }

for mode in accept epoll poll; do
    run_phase "alone-$mode" alone "$mode"
    grep -q '^listener: offloaded' "$dir/alone-$mode.out" || fail "$mode: the listener stayed the kernel's"
    (($(grep -c "^connection 'hello [0-9]': offloaded" "$dir/alone-$mode.out") == 4)) ||
        fail "$mode: not every connection was offloaded once old enough"
    ! grep "young: offloaded" "$dir/alone-$mode.out" ||
        fail "$mode: a connection was offloaded before it was 10 ms old"
    young=$(grep -c "young: kernel" "$dir/alone-$mode.out" || true)
    if [[ $mode == poll ]]; then
        (($(grep -c "while polled: kernel" "$dir/alone-$mode.out") == 4)) ||
            fail "poll: a connection moved to the engine while a thread slept in poll() on it"
    fi
    (($(stat_of accepts) == 0)) || fail "$mode: the engine accepted $(stat_of accepts) itself"
    (($(stat_of "(on demand") == 1)) || fail "$mode: the listener was not served on demand"
    (($(stat_of "adopted sockets") == 4)) || fail "$mode: the engine adopted $(stat_of "adopted sockets") connections, not 4"
    (($(stat_of "bytes in") > 0)) || fail "$mode: no byte went through the engine"
    log "alone ($mode): 4 connections from an inherited listener, accepted on demand, offloaded" \
        "once 10 ms old ($young seen still the kernel's when younger)"
done

run_phase shared shared
(($(stat_of accepts) == 0)) || fail "shared: the engine accepted $(stat_of accepts) itself"
(($(stat_of "(on demand") == 1)) || fail "shared: the listener was not served on demand"
(($(stat_of "adopted sockets") == 4)) || fail "shared: the child's 4 connections were not adopted"
log "shared: the 2 waiting at the child's close and 4 more reached the parent"
log "inherited listener: pass"
