#!/usr/bin/env bash
# The inetd pattern: a preloaded server accepts, forks, and the child execs a program with the
# connection dup2'ed onto its stdin and stdout (this suite's `inetd child`, or /bin/sh with read
# and echo). A plain client sends a line per connection and must receive the program's reply
# byte for byte, then the FIN when the program exits. Run twice: with LD_PRELOAD kept for the
# exec'd program, and with it removed from the program's environment. ss proves that the
# listener and the connections belonged to tcpsd; at the end the engine holds nothing.
#
# Development knob: TCPS_NATIVE=1 (kernel TCP, see servers_lib.sh).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

app=${INETD:?INETD names the inetd program}
need_tool ss
[[ -x /bin/sh ]] || skip "/bin/sh is missing"
dir=$TCPS_TEST_DIR
conns=100

start_offload
# TCPS_INETD_MODES (development): the runs to make, "keep strip" by default.
for env_mode in ${TCPS_INETD_MODES:-keep strip}; do
    rm -f "$dir/port" "$TCPS_TEST_HOLD_DIR/connection"
    "${OFFLOAD[@]}" "$app" server "$dir/port" "$conns" "$env_mode" \
        >"$dir/server-$env_mode.out" 2>&1 &
    server_pid=$!
    track "$server_pid"
    port=$(wait_for_port_file 10 "$dir/port") ||
        fail "the server did not announce its port: $(cat "$dir/server-$env_mode.out")"
    label=kept
    [[ $env_mode == keep ]] || label=removed
    log "LD_PRELOAD $label for the exec'd programs: server pid $server_pid, port $port"
    wait_until 5 listening_on "$port" ||
        fail "nothing listens on port $port: $(cat "$dir/server-$env_mode.out")"
if offloaded; then expect_engine_listener "$port" "$server_pid"; fi
    "$app" client "$port" "$conns" >"$dir/client-$env_mode.out" 2>&1 &
    client_pid=$!
    track "$client_pid"
    at_hold "$dir/server-$env_mode.out" connection
    if offloaded; then expect_engine_server_side "$port" "$server_pid"; fi
    release_hold connection
    record_server_side "$port" "$client_pid" 100 "$dir/ss-$env_mode.txt"
    client_status=0
    wait_pid "$client_pid" 100 || client_status=$?
    server_status=0
    wait_pid "$server_pid" 30 || server_status=$?
    grep -Ev '^(child pid|holding)' "$dir/server-$env_mode.out" | sed 's/^/  /'
    sed 's/^/  /' "$dir/client-$env_mode.out"
    ((client_status != 124)) || fail "the client did not finish within 100 s"
    ((server_status != 124)) || fail "the server did not finish within 30 s of its client"
    ((server_status == 0)) || fail "the server failed (status $server_status)"
    ((client_status == 0)) || fail "the client failed (status $client_status)"
    allowed=()
    if [[ $env_mode == strip ]]; then
        # A program without the shim may legitimately hold a kernel socket handed to it.
        mapfile -t allowed < <(sed -n 's/^child pid \([0-9]*\) .*/\1/p' "$dir/server-$env_mode.out")
    fi
    expect_no_strangers "$dir/ss-$env_mode.txt" "$port" "${allowed[@]}"
    expect_engine_empty 20 "$port"
done
if offloaded; then stop_engine; fi
log "inetd: all checks passed"
