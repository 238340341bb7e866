#!/usr/bin/env bash
# memcached with 4 threads (-t 4, its own libevent loop in each) under the shim, run as nobody,
# with the engine on its own core. Clients check every byte: memcached_check.py (values of 0 B
# to 2 MB, multi-gets of several MB, pipelines, every storage and arithmetic command),
# memccapable (libmemcached's protocol conformance tests, text and binary) and memcaslap (a
# 3-second load that verifies every value it gets). Case a: plain clients; case b: the clients
# preloaded too. ss proves that the listener and both ends of the connections were tcpsd's,
# memcached's own counters that the traffic reached it, and the engine holds nothing at the end.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

need_tool memcached memccapable memcaslap ss timeout
[[ -n $PYTHON ]] || skip "python3 is not installed"
id nobody >/dev/null 2>&1 || skip "there is no user nobody for memcached"
CHECK=$(dirname "$0")/memcached_check.py

dir=$TCPS_TEST_DIR
start_offload
port=$(free_port)

# memcached drops root for nobody before it opens its sockets, so the shim says hello as nobody.
"${OFFLOAD[@]}" memcached -l 127.0.0.1 -p "$port" -U 0 -t 4 -m 256 -I 4m -c 1024 -u nobody \
    >"$dir/memcached.log" 2>&1 &
server_pid=$!
track "$server_pid"
memcached_answers() { "$PYTHON" "$CHECK" --port "$port" --stats >"$dir/stats.txt" 2>/dev/null; }
wait_until 10 memcached_answers ||
    fail "memcached does not answer: $(tail -n 5 "$dir/memcached.log")"
stat_of() { awk -v name="$1" '$1 == "STAT" && $2 == name { print $3 }' "$dir/stats.txt"; }
[[ $(stat_of threads) == 4 ]] || fail "memcached runs $(stat_of threads) threads, not 4"
if offloaded; then
    expect_engine_listener "$port" "$server_pid"
    hold_connection "$port"
    expect_engine_server_side "$port" "$server_pid"
    stop_pid "$HOLD_PID"
fi

# Runs memcached_check.py (under runner $1: "plain" or "preloaded") with 8 threads x 2 rounds,
# recording both ends of port $port's connections while it runs; fails on any wrong byte.
check_values() {
    local runner=() status=0 pid
    if [[ $1 == preloaded ]]; then runner=("${OFFLOAD[@]}"); fi
    "${runner[@]}" "$PYTHON" "$CHECK" --port "$port" --threads 8 --rounds 2 --tag "$1" \
        >"$dir/check-$1.out" 2>&1 &
    pid=$!
    track "$pid"
    record_sockets "( sport = :$port or dport = :$port )" "$pid" 120 "$dir/ss-check-$1.txt"
    wait_pid "$pid" 120 || status=$?
    sed 's/^/  /' "$dir/check-$1.out"
    ((status == 0)) || fail "memcached_check.py ($1) failed (status $status)"
    CHECK_PID=$pid
}

# memccapable: the text and binary protocol conformance tests (they flush the server).
conformance() {
    local runner=() status=0
    if [[ $1 == preloaded ]]; then runner=("${OFFLOAD[@]}"); fi
    timeout 120 "${runner[@]}" memccapable -h 127.0.0.1 -p "$port" -t 10 >"$dir/capable-$1.out" \
        2>&1 || status=$?
    grep -c '\[pass\]' "$dir/capable-$1.out" | sed 's/^/  memccapable: passed /'
    if ((status != 0)) || grep -q '\[FAIL\]' "$dir/capable-$1.out" ||
        ! grep -q 'All tests passed' "$dir/capable-$1.out"; then
        fail "memccapable ($1) failed (status $status):" \
            "$(grep -v '\[pass\]' "$dir/capable-$1.out" | tail -n 5)"
    fi
}

# memcaslap: 2 threads, 16 connections, 3 s, 90% gets, every value it gets verified.
load() {
    local runner=() status=0 out=$dir/slap-$1.out
    if [[ $1 == preloaded ]]; then runner=("${OFFLOAD[@]}"); fi
    timeout 60 "${runner[@]}" memcaslap -s "127.0.0.1:$port" -T 2 -c 16 -t 3s --verify=1 \
        >"$out" 2>&1 || status=$?
    grep -E '^(cmd_get|cmd_set|verify_failed|Run time)' "$out" | sed 's/^/  memcaslap: /'
    ((status == 0)) || fail "memcaslap ($1) exited with status $status: $(tail -n 5 "$out")"
    local gets failed
    gets=$(awk '$1 == "cmd_get:" { print $2 }' "$out")
    failed=$(awk '$1 == "verify_failed:" { print $2 }' "$out")
    ((${gets:-0} > 1000)) || fail "memcaslap ($1) made only ${gets:-no} gets"
    [[ $failed == 0 ]] || fail "memcaslap ($1): ${failed:-no count of} values failed verification"
}

for mode in plain preloaded; do
    log "case $mode: clients ${mode/plain/not preloaded}"
    check_values "$mode"
    if offloaded; then
        if [[ $mode == plain ]]; then
            expect_no_strangers "$dir/ss-check-$mode.txt" "$port" "$CHECK_PID"
        else
            expect_no_strangers "$dir/ss-check-$mode.txt" "$port"
        fi
        grep -q "pid=$ENGINE_PID," "$dir/ss-check-$mode.txt" ||
            fail "no connection of tcpsd's on port $port was seen while the check ran"
    fi
    conformance "$mode"
    load "$mode"
done

# memcached's own account: it served these connections, and every one of them has gone.
memcached_answers || fail "memcached stopped answering"
log "memcached: $(stat_of total_connections) connections, $(stat_of cmd_get) gets," \
    "$(stat_of cmd_set) sets, $(stat_of get_hits) hits"
(($(stat_of total_connections) > 40)) ||
    fail "memcached counted only $(stat_of total_connections) connections"
# Then only the stats connection itself is left (and the listener, which memcached counts), once
# memcached's threads have seen the clients' FINs.
only_stats_left() { memcached_answers && (($(stat_of curr_connections) <= 2)); }
wait_until 10 only_stats_left || fail "memcached still has $(stat_of curr_connections) connections"

kill -0 "$server_pid" 2>/dev/null || fail "memcached died"
stop_pid "$server_pid"
expect_engine_empty 20 "$port"
if offloaded; then stop_engine; fi
log "memcached: all checks passed"
