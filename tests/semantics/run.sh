#!/usr/bin/env bash
# Runs the semantics program natively (twice: its output must be deterministic), then under
# libtcps.so with a private engine and --expect-offload, and diffs the offloaded output against
# the native one. Usage: run.sh PATH/TO/semantics [TCPSD OPTION...]   (TCPSD and LIBTCPS from
# the environment).
# With `--handoff-load 0` (semantics_twin) the engine is always saturated: every connection is
# accepted through its listener's twin (engine/twin.cpp), a kernel socket, so --expect-offload
# is left out and the engine's counters must show the twins instead; and the "reset seen"
# lines are left out of both outputs: a reset that such a kernel socket sends reaches its
# offloaded peer on this host when the engine next looks, not by the time close() returns
# (docs/architecture.md, "Handoff at accept"). With `--ask-back-at-once` too (semantics_shed),
# each connection the engine makes is asked back as soon as it is connected, and the shim hands
# it to the kernel at its first call if nothing is unread or unsent there: the engine's
# counters must show them. With `--cores 0,1` (semantics_2_workers) the family's connections
# are spread over both workers, so the two ends of one are often on different workers: both
# workers must have accepted connections.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/../integration/lib.sh"

program=${1:?usage: run.sh PATH/TO/semantics}
[[ -x $program ]] || fail "$program is not executable"
out=$TCPS_TEST_DIR

run_native() {
    local name=$1 status=0
    timeout 150 "$program" >"$out/$name.txt" 2>"$out/$name.err" || status=$?
    ((status == 0)) || {
        cat "$out/$name.err" >&2
        fail "the native run exited with status $status"
    }
}

run_native native1
run_native native2
if ! diff -u "$out/native1.txt" "$out/native2.txt" >"$out/native.diff"; then
    cat "$out/native.diff"
    fail "two native runs differ: the semantics program is not deterministic here"
fi
log "native: $(wc -l <"$out/native1.txt") observations, identical in two runs"

twins=0
[[ " ${*:2} " == *" --handoff-load 0 "* ]] && twins=1
workers=1
if [[ " ${*:2} " =~ \ --cores\ [^\ ]*[,-] ]]; then
    (($(nproc) >= 2)) || skip "this machine has one CPU: no two engine workers"
    workers=2
fi
need_engine
start_engine "${@:2}"
status=0
expect=(--expect-offload)
((twins)) && expect=()
"${PRELOAD[@]}" timeout 150 "$program" "${expect[@]}" >"$out/shim.txt" 2>"$out/shim.err" ||
    status=$?
if ((twins)); then
    for name in native1 shim; do
        grep -v '\] reset seen: ' "$out/$name.txt" >"$out/$name.kept" || true
        mv "$out/$name.kept" "$out/$name.txt"
    done
    kill -USR1 "$ENGINE_PID"
    # shellcheck disable=SC2317  # called by wait_until
    twins_used() { grep -q 'listener twins [1-9][0-9]* steered to [1-9][0-9]* ready [1-9]' "$TCPS_TEST_DIR/engine.log"; }
    wait_until 10 twins_used || fail "the connections did not go through twins: $(grep 'listener twins' "$TCPS_TEST_DIR/engine.log")"
    grep -o 'accepts [0-9]*, kernel-served [0-9]*' "$TCPS_TEST_DIR/engine.log" | tail -n 1 | sed 's/^/  engine: /'
    if [[ " ${*:2} " == *" --ask-back-at-once "* ]]; then
        # Each connection the engine made was asked back at once: those that were idle at
        # their first call went back to the kernel there.
        moves=$(grep -o 'asked back [0-9]* shed [0-9]*' "$TCPS_TEST_DIR/engine.log" | tail -n 1)
        echo "  engine: $moves"
        read -r asked shed < <(sed 's/asked back \([0-9]*\) shed \([0-9]*\)/\1 \2/' <<<"$moves")
        ((asked >= 50 && shed >= 25)) || fail "too few connections asked back and handed over: $moves"
    fi
fi
if ! diff -u "$out/native1.txt" "$out/shim.txt" >"$out/shim.diff"; then
    echo "--- native vs offloaded (- native, + offloaded):"
    cat "$out/shim.diff"
    [[ -s $out/shim.err ]] && { echo "--- stderr of the offloaded run:"; cat "$out/shim.err"; }
    fail "the offloaded run differs from the native run in $(grep -c '^+[^+]' "$out/shim.diff") lines"
fi
if ((status != 0)); then
    cat "$out/shim.err" >&2
    ((status == 3)) && fail "the program's TCP sockets were kernel sockets: the shim fell back"
    fail "the offloaded run exited with status $status"
fi
if ((workers > 1)); then
    kill -USR1 "$ENGINE_PID"
    # shellcheck disable=SC2317  # called by wait_until
    both_accepted() { (($(grep -c 'worker [01]: .* accepts [1-9]' "$TCPS_TEST_DIR/engine.log") >= 2)); }
    wait_until 10 both_accepted || fail "not both workers accepted connections: $(grep 'accepts' "$TCPS_TEST_DIR/engine.log")"
    grep -o 'worker [01]: .* accepts [0-9]*' "$TCPS_TEST_DIR/engine.log" | sed 's/: .* accepts/: accepts/; s/^/  engine: /'
fi
stop_engine
how="sockets offloaded"
((twins)) && how="accepted through the listeners' twins"
((workers > 1)) && how="sockets offloaded, over two workers"
log "offloaded: identical to native ($(wc -l <"$out/shim.txt") observations), $how"
