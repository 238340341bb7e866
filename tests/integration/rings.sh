#!/usr/bin/env bash
# Rings that grow (docs/architecture.md, "Rings that grow"): one offloaded connection streams
# 256 MiB each way at once, with sends and receives of every size and readers that stop now
# and then (tcps_test_app stream), every byte checked. The engine's counters must show that
# the traffic went through it, that both directions' tx and rx rings grew, and that it saw no
# protocol violation; after the close the engine holds no socket. Arguments go to tcpsd
# (rings_2_workers: --cores 0,1, the accepted end on the second worker).
#
# Sends of 64 KiB and more out of a grown ring go with SEND_ZC (--send-zc): the client may
# write over their bytes only once the kernel's notification releases them. By default
# (auto), the first such send of each socket on loopback comes back "copied" and the socket
# copies from then on; with --send-zc always (rings_send_zc) every one goes zero-copy, so the
# stream's every byte checked proves that no byte was written over while the kernel held it.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
need_tool timeout
app=${TCPS_TEST_APP:?TCPS_TEST_APP names tcps_test_app}
dir=$TCPS_TEST_DIR
mib=256

start_engine "$@"
workers=1
[[ ${1:-} == --cores ]] && workers=$(tr ',' '\n' <<<"$2" | wc -l)
zc_mode=auto
[[ " $* " == *" --send-zc always "* ]] && zc_mode=always
stream=(stream "$mib")
# Zero-copy: small receive buffers hold the sent bytes in the sender's kernel socket, not yet
# copied to the receiver, long after the send completed; a ring that let the client write
# over them before the notification would corrupt the stream (checked by doing just that).
[[ $zc_mode == always ]] && stream=(stream 64 65536) mib=64
"${PRELOAD[@]}" timeout 120 "$app" "${stream[@]}" >"$dir/stream.out" 2>&1 || {
    status=$?
    sed 's/^/  /' "$dir/stream.out"
    fail "the stream failed (status $status)"
}
sed 's/^/  /' "$dir/stream.out"

# The engine's statistics lines (SIGUSR1, one per worker), once the stream's sockets are closed.
stats_lines() { grep 'worker [0-9]*: sessions' "$TCPS_TEST_DIR/engine.log" | tail -n "$workers"; }
# shellcheck disable=SC2317  # called by wait_until
closed_and_reported() {
    kill -USR1 "$ENGINE_PID"
    (($(stats_lines | grep -c 'sockets 0,') == workers))
}
wait_until 10 closed_and_reported || fail "the engine still holds sockets: $(stats_lines)"
lines=$(stats_lines)
log "engine: $lines"
# A counter summed over the workers.
field() { sed -n "s/.*$1 \([0-9]*\).*/\1/p" <<<"$lines" | awk '{ sum += $1 } END { print sum + 0 }'; }
bytes_in=$(field "bytes in")
bytes_out=$(field "bytes in [0-9]* out")
tx_grown=$(field "rings grown tx")
rx_grown=$(field "rings grown tx [0-9]* rx")
violations=$(field "violations")
total=$((2 * mib * 1024 * 1024))
((bytes_in >= total && bytes_out >= total)) ||
    fail "the engine moved $bytes_in bytes in and $bytes_out out, not the stream's $total each"
# Each direction's tx ring (the sender's) and rx ring (the receiver's) doubles from 64 KiB to
# 2 MiB: five doublings each, so 10 of each over both directions.
((tx_grown >= 10)) || fail "only $tx_grown tx ring doublings (the senders' rings did not grow)"
((rx_grown >= 10)) || fail "only $rx_grown rx ring doublings (the engine did not grow them)"
((violations == 0)) || fail "the engine saw $violations protocol violations"
# A receive whose room wraps past the ring's end fills both parts at once (recvmsg): the
# checked bytes prove they landed where the reader looks.
wrapped=$(field "receives across the wrap")
log "receives across the wrap: $wrapped"
((wrapped > 0)) || fail "no receive filled both sides of a ring's wrap"
zc_sends=$(field "ring SEND_ZC sends")
zc_copied=$(field "ring SEND_ZC sends [0-9]* copied")
zc_bytes=$(field "ring SEND_ZC sends [0-9]* copied [0-9]* bytes")
log "ring sends with SEND_ZC: $zc_sends, reported copied: $zc_copied, bytes not copied: $zc_bytes"
if grep -q 'zero-copy out unsupported' <<<"$lines"; then
    log "this kernel has no io_uring SEND_ZC: ring sends are copied"
elif [[ $zc_mode == always ]]; then
    # 64 MiB each way in sends of at most 2 MiB, one zero-copy send pending per socket at a
    # time (copies go on meanwhile): some 80 of them.
    ((zc_sends >= 20)) || fail "only $zc_sends ring sends went with SEND_ZC under --send-zc always"
else
    # Loopback copies: one zero-copy send per direction, each reported copied, then copies.
    ((zc_sends >= 2 && zc_sends <= 4)) ||
        fail "$zc_sends ring sends went with SEND_ZC (auto: one or so per direction on loopback)"
    ((zc_copied == zc_sends)) || fail "only $zc_copied of $zc_sends loopback SEND_ZCs reported copied"
fi

# A process whose address space cannot hold the bulk rings (RLIMIT_AS): it says so when it maps
# a chunk, and no ring of its family grows (its recv() must never fail with ENOMEM, which Linux's
# never does for want of address space); the stream goes through the small rings, every byte
# checked. Only the default run: the others test the same rings.
if (($# == 0)) && command -v prlimit >/dev/null; then
    "${PRELOAD[@]}" prlimit --as=$((4 << 30)) timeout 120 "$app" stream 32 >"$dir/limited.out" 2>&1 || {
        status=$?
        sed 's/^/  /' "$dir/limited.out"
        fail "the stream with a 4 GiB address space failed (status $status)"
    }
    sed 's/^/  /' "$dir/limited.out"
    wait_until 10 closed_and_reported || fail "the engine still holds sockets: $(stats_lines)"
    lines=$(stats_lines)
    limited_tx=$(($(field "rings grown tx") - tx_grown))
    limited_rx=$(($(field "rings grown tx [0-9]* rx") - rx_grown))
    ((limited_tx == 0 && limited_rx == 0)) ||
        fail "rings grew for a process that cannot map them: $limited_tx tx, $limited_rx rx"
    log "ok: 32 MiB each way through the small rings of a process limited to 4 GiB of address space"
fi
stop_engine
log "ok: $mib MiB each way through growing rings, $tx_grown tx and $rx_grown rx doublings"
