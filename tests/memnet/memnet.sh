#!/usr/bin/env bash
# The MemNet API: memnet_check natively (the kernel's calls), then under libtcps.so with a
# private engine (--expect-offload: the sockets are the engine's and the registration shared
# with it). With "2-workers" the engine runs two workers (--cores 0,1): the check's accepted
# connections alternate between them, so registrations and direct transfers are used on the
# family's shard too (issue 11).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/../integration/lib.sh"

engine_args=()
check_args=()
workers=1
if [[ ${1:-} == 2-workers ]]; then
    (($(nproc) >= 2)) || skip "this machine has one CPU: no two engine workers"
    engine_args=(--cores "0,1")
    # The first connection the family accepts goes to the second worker: use that end.
    check_args=(--accepted-end)
    workers=2
fi

[[ -x ${MEMNET_CHECK:-} ]] || skip "MEMNET_CHECK is not set (not built)"
out=$TCPS_TEST_DIR
timeout 60 "$MEMNET_CHECK" >"$out/native.txt" 2>&1 || {
    cat "$out/native.txt"
    fail "natively"
}
log "native: $(grep -c '^ok' "$out/native.txt") checks passed"
need_engine
start_engine "${engine_args[@]}"
timeout 60 "${PRELOAD[@]}" "$MEMNET_CHECK" --expect-offload "${check_args[@]}" >"$out/offloaded.txt" 2>&1 || {
    cat "$out/offloaded.txt"
    fail "through the engine"
}
cat "$out/offloaded.txt"
grep -q '^PASS' "$out/offloaded.txt" || fail "no PASS line"
# The engine sent the buffer itself, from the registered memory: send_direct's 1 MiB and the
# async jobs' bytes, none of it through the tx ring.
kill -USR1 "$ENGINE_PID"
# shellcheck disable=SC2317  # called by wait_until
stats_logged() { (($(grep -c "direct in" "$TCPS_TEST_DIR/engine.log") >= workers)); }
wait_until 10 stats_logged || fail "the engine logged no statistics"
stats=$(grep "direct in" "$TCPS_TEST_DIR/engine.log" | tail -n "$workers")
sed 's/^/  /' <<<"$stats"
# Each worker's counters, added up.
sum_of() { sed -n "s/$1/\\1/p" <<<"$stats" | awk '{ total += $1 } END { print total + 0 }'; }
direct_out=$(sum_of '.*(direct in [0-9]* out \([0-9]*\),.*')
direct_in=$(sum_of '.*(direct in \([0-9]*\) out.*')
zerocopy=$(sed -n 's/.*zero-copy out \([0-9a-z]*\).*/\1/p' <<<"$stats" | tail -1)
if [[ $zerocopy != unsupported ]]; then
    # SEND_ZC's bytes: those the kernel sent from the pages and those it reported it copied
    # (loopback copies at delivery).
    zerocopy_copied=$(sum_of '.*zero-copy out [0-9]* copied \([0-9]*\)).*')
    zerocopy=$(($(sum_of '.*zero-copy out \([0-9]*\) copied.*') + zerocopy_copied))
fi
if ((workers == 2)); then
    shard_direct=$(sed -n 's/.*worker 1: .*(direct in \([0-9]*\) out \([0-9]*\),.*/\1 \2/p' <<<"$stats")
    [[ -n $shard_direct && $shard_direct != "0 0" ]] ||
        fail "the second worker moved no byte from or into registered memory"
fi
log "the engine sent $direct_out bytes from registered memory ($zerocopy with SEND_ZC) and received $direct_in into it"
((direct_out >= 2 * 1048576)) || fail "the engine sent only $direct_out bytes from registered memory"
# Sends of 64 KiB and more go out with SEND_ZC, where the kernel has it, until it reports it
# copied them anyway (--send-zc auto): send_direct's 1 MiB at least starts so.
if [[ $zerocopy == unsupported ]]; then
    log "this kernel has no io_uring SEND_ZC: large direct sends are copied"
else
    ((zerocopy >= 65536)) || fail "only $zerocopy bytes went out with SEND_ZC"
fi
# The 4 MiB stream received ahead (on a connection of its own, whose rx ring stays 64 KiB), less
# what the rx ring held when its first receive was queued (64 KiB) and a ring receive in flight
# then (64 KiB).
((direct_in >= 4 * 1048576 - 2 * 65536)) || fail "the engine received only $direct_in bytes into registered memory"
stop_engine
log "memnet: $(grep -c '^ok' "$out/offloaded.txt") checks passed through the engine"

# After the engine's end (SIGTERM: it says so in the region), as send() and recv() fail then.
start_engine "${engine_args[@]}"
mkfifo "$out/death.in"
timeout 60 "${PRELOAD[@]}" "$MEMNET_CHECK" --after-engine-death <"$out/death.in" \
    >"$out/death.txt" 2>&1 &
death_pid=$!
track "$death_pid"
exec 7>"$out/death.in"
wait_for_line 10 "$out/death.txt" '^ready' || fail "after-engine-death did not start: $(cat "$out/death.txt")"
stop_engine
echo gone >&7
exec 7>&-
wait "$death_pid" || {
    cat "$out/death.txt"
    fail "after the engine's end"
}
cat "$out/death.txt"
