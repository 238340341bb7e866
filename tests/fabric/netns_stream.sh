#!/bin/bash
# The cross-host channel between two network namespaces joined by a veth pair, over
# tcp;ofi_rxm: side B (the "engine") in one namespace, side A (the "client") in the other,
# streaming 64 MB through a slot's tx ring, then the ordering check.
#
#   netns_stream.sh /path/to/fabric_peer [megabytes, default 64]
#
# Needs root (ip netns); exits 77 (skip) where namespaces cannot be made. Addresses are IPv6
# ULA (fd00::/8) with DAD off, so the link is usable at once; nothing leaves the veth pair.
set -u

peer=${1:?usage: netns_stream.sh /path/to/fabric_peer [megabytes]}
megabytes=${2:-64}
step_timeout=120   # seconds for each side of each scenario

skip() { echo "SKIP: $*"; exit 77; }
fail() { echo "FAIL: $*"; exit 1; }

[ -x "$peer" ] || fail "$peer is not executable"
[ "$(id -u)" = 0 ] || skip "needs root for ip netns"
command -v ip >/dev/null || skip "no ip(8)"

suffix=$$
ns_a=tcps-fab-a-$suffix
ns_b=tcps-fab-b-$suffix
veth_a=tfa$suffix    # interface names: at most 15 characters
veth_b=tfb$suffix
addr_a=fd00:7463:7073::1
addr_b=fd00:7463:7073::2
port=17900

cleanup() {
    # Kill only what this script started, then the namespaces (which removes the veth pair).
    [ -n "${pid_b:-}" ] && kill "$pid_b" 2>/dev/null
    ip netns del "$ns_a" 2>/dev/null
    ip netns del "$ns_b" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # so that a timeout still runs the cleanup

ip netns add "$ns_a" 2>/dev/null || skip "ip netns add is not permitted here"
ip netns add "$ns_b" || fail "ip netns add $ns_b"
ip link add "$veth_a" type veth peer name "$veth_b" || skip "cannot create a veth pair"
ip link set "$veth_a" netns "$ns_a" || fail "move $veth_a"
ip link set "$veth_b" netns "$ns_b" || fail "move $veth_b"
ip -n "$ns_a" addr add "$addr_a/64" dev "$veth_a" nodad || fail "address A"
ip -n "$ns_b" addr add "$addr_b/64" dev "$veth_b" nodad || fail "address B"
for ns in "$ns_a" "$ns_b"; do ip -n "$ns" link set lo up || fail "lo up in $ns"; done
ip -n "$ns_a" link set "$veth_a" up || fail "veth A up"
ip -n "$ns_b" link set "$veth_b" up || fail "veth B up"

# Wait (bounded) until both ends of the link are up.
for _ in $(seq 1 50); do
    if ip -n "$ns_a" link show "$veth_a" | grep -q 'state UP' &&
       ip -n "$ns_b" link show "$veth_b" | grep -q 'state UP'; then
        break
    fi
    sleep 0.1
done

# run_pair SCENARIO [extra fabric_peer args...]: B listens for the bootstrap, A connects.
run_pair() {
    local scenario=$1
    shift
    local out_b
    out_b=$(mktemp)
    timeout "$step_timeout" ip netns exec "$ns_b" "$peer" --role b --scenario "$scenario" \
        --node "$addr_b" --listen "[$addr_b]:$port" --timeout-ms $((step_timeout * 900)) "$@" \
        >"$out_b" 2>&1 &
    pid_b=$!
    local out_a rc_a rc_b
    out_a=$(timeout "$step_timeout" ip netns exec "$ns_a" "$peer" --role a --scenario "$scenario" \
        --node "$addr_a" --connect "[$addr_b]:$port" --timeout-ms $((step_timeout * 900)) "$@" 2>&1)
    rc_a=$?
    wait "$pid_b"
    rc_b=$?
    pid_b=
    echo "$out_a"
    cat "$out_b"
    rm -f "$out_b"
    port=$((port + 1))
    [ $rc_a = 0 ] && [ $rc_b = 0 ] || fail "$scenario: side A exit $rc_a, side B exit $rc_b"
}

run_pair stream --bytes "${megabytes}M"
run_pair ordering --count 1000
echo "PASS: the channel between $ns_a and $ns_b"
