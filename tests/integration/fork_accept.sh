#!/usr/bin/env bash
# A preloaded server creates a listener and forks 4 children that accept on it concurrently:
# blocking accept() in some and poll() + accept4 in others, then a round where the shared
# listener is non-blocking and every child polls and gets EAGAIN when it loses the race. A
# plain client makes 400 connections per round, each echoed byte for byte, and every one is
# served exactly once (the children report their ids to the parent through pipes). After the
# children exited, the parent's listener still accepts. Then the engine holds nothing. ss proves
# that the listener and the server's connections belonged to tcpsd.
#
# Development knob: TCPS_NATIVE=1 (kernel TCP, see servers_lib.sh).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

app=${FORK_ACCEPT:?FORK_ACCEPT names the fork_accept program}
need_tool ss
dir=$TCPS_TEST_DIR
children=4 conns=400 parent_conns=20

start_offload
"${OFFLOAD[@]}" "$app" server "$dir/port" "$children" "$conns" "$parent_conns" \
    >"$dir/server.out" 2>&1 &
server_pid=$!
track "$server_pid"
port=$(wait_for_port_file 10 "$dir/port") ||
    fail "the server did not announce its port: $(cat "$dir/server.out")"
log "server pid $server_pid listens on port $port; $children children per round"
wait_until 5 listening_on "$port" || fail "nothing listens on port $port: $(cat "$dir/server.out")"
if offloaded; then expect_engine_listener "$port" "$server_pid"; fi

"$app" client "$port" "$children" "$conns" "$parent_conns" >"$dir/client.out" 2>&1 &
client_pid=$!
track "$client_pid"
at_hold "$dir/client.out" connection
if offloaded; then expect_engine_server_side "$port" "$server_pid"; fi
release_hold connection
record_server_side "$port" "$client_pid" 100 "$dir/ss.txt"
client_status=0
wait_pid "$client_pid" 100 || client_status=$?
release_hold exit  # the server may exit now that the client has read everything
server_status=0
wait_pid "$server_pid" 30 || server_status=$?
grep -v '^holding' "$dir/server.out" | sed 's/^/  /'
grep -v '^holding' "$dir/client.out" | sed 's/^/  /'
((client_status != 124)) || fail "the client did not finish within 100 s"
((server_status != 124)) || fail "the server did not finish within 30 s of its client"
((server_status == 0)) || fail "the server failed (status $server_status)"
((client_status == 0)) || fail "the client failed (status $client_status)"
expect_no_strangers "$dir/ss.txt" "$port"
expect_engine_empty 20 "$port"
if offloaded; then stop_engine; fi
log "fork_accept: all checks passed"
