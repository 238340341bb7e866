#!/usr/bin/env bash
# Runs the semantics program natively (twice: its output must be deterministic), then under
# libtcps.so with a private engine and --expect-offload, and diffs the offloaded output against
# the native one. Usage: run.sh PATH/TO/semantics   (TCPSD and LIBTCPS from the environment)
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

need_engine
start_engine
status=0
"${PRELOAD[@]}" timeout 150 "$program" --expect-offload >"$out/shim.txt" 2>"$out/shim.err" ||
    status=$?
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
stop_engine
log "offloaded: identical to native ($(wc -l <"$out/shim.txt") observations), sockets offloaded"
