#!/usr/bin/env bash
# Rings that grow (docs/architecture.md, "Rings that grow"): one offloaded connection streams
# 256 MiB each way at once, with sends and receives of every size and readers that stop now
# and then (tcps_test_app stream), every byte checked. The engine's counters must show that
# the traffic went through it, that both directions' tx and rx rings grew, and that it saw no
# protocol violation; after the close the engine holds no socket. Arguments go to tcpsd
# (rings_2_workers: --cores 0,1, the accepted end on the second worker).
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
"${PRELOAD[@]}" timeout 120 "$app" stream "$mib" >"$dir/stream.out" 2>&1 || {
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
stop_engine
log "ok: $mib MiB each way through growing rings, $tx_grown tx and $rx_grown rx doublings"
