#!/usr/bin/env bash
# Hot path honesty: with the engine polling (--busy-poll, it never sleeps), a preloaded program's
# 20,000 sends of 64 B and 20,000 recvs on an offloaded socket make no send/recv/read/write
# syscall on that socket, and fewer syscalls in all than 1% of those 40,000 operations.
#
# strace records every syscall of the program; two getppid() calls mark the loop. The replies
# come from a plain echo peer, 512 messages (32 KiB) ahead of the reader, so recv() mostly
# finds its data already in the ring; a recv that must wait spins (TCPS_SPIN_US) rather than
# sleeps, as a latency-minded program's would, so what is counted is the data path itself.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

need_engine
need_tool strace awk
app=${TCPS_TEST_APP:?TCPS_TEST_APP names tcps_test_app}
strace -f -qq -o /dev/null true 2>/dev/null || skip "strace cannot trace processes here (ptrace)"

operations=20000
start_engine --busy-poll

"$app" echo "$TCPS_TEST_DIR/echo.port" 2>"$TCPS_TEST_DIR/echo.err" &
track $!
port=$(wait_for_port_file 10 "$TCPS_TEST_DIR/echo.port") || fail "the echo peer did not start"

trace=$TCPS_TEST_DIR/trace.txt
status=0
timeout 120 strace -f -qq -o "$trace" \
    -E LD_PRELOAD="$LIBTCPS" -E TCPS_ENGINE_SOCKET="$ENGINE_SOCK" -E TCPS_SPIN_US=2000 \
    "$app" hotpath "$port" "$operations" >"$TCPS_TEST_DIR/app.out" 2>&1 || status=$?
sed 's/^/  app: /' "$TCPS_TEST_DIR/app.out"
((status == 0)) || fail "the hot-path program failed (status $status)"
fd=$(sed -n 's/^hotpath: fd \([0-9]*\)$/\1/p' "$TCPS_TEST_DIR/app.out")
[[ -n $fd ]] || fail "the program did not say which fd its socket has"

# The syscalls between the two markers, one per line as "name fd" (fd: the first argument).
# `<... name resumed>` lines finish a call already counted; `---`/`+++` are signals and exits.
awk '
    /getppid\(\)/ { marks++; next }
    marks == 1 && !/resumed>/ && !/^[0-9]+ +(---|\+\+\+)/ {
        if (match($0, /^[0-9]+ +[a-z0-9_]+\(/)) {
            call = substr($0, RSTART, RLENGTH - 1)
            sub(/^[0-9]+ +/, "", call)
            rest = substr($0, RSTART + RLENGTH)
            split(rest, args, /[,)]/)
            print call, args[1]
        }
    }
    END { if (marks != 2) print "MARKERS", marks }
' "$trace" >"$TCPS_TEST_DIR/calls.txt"
grep -q '^MARKERS' "$TCPS_TEST_DIR/calls.txt" &&
    fail "expected two getppid() markers in the trace, found $(awk '/^MARKERS/ {print $2}' "$TCPS_TEST_DIR/calls.txt")"

total=$(wc -l <"$TCPS_TEST_DIR/calls.txt")
log "syscalls during $operations sends + $operations recvs: $total"
if ((total > 0)); then
    awk '{ print $1 }' "$TCPS_TEST_DIR/calls.txt" | sort | uniq -c | sort -rn | sed 's/^/  /'
fi
data_calls='^(send|sendto|sendmsg|sendmmsg|recv|recvfrom|recvmsg|recvmmsg)$'
on_socket='^(read|write|readv|writev|pread64|pwrite64)$'
socket_calls=$(awk -v fd="$fd" -v data="$data_calls" -v io="$on_socket" \
    '$1 ~ data || ($1 ~ io && $2 == fd)' "$TCPS_TEST_DIR/calls.txt" | wc -l)
((socket_calls == 0)) || fail "$socket_calls send/recv/read/write syscalls on the offloaded socket"
limit=$((2 * operations / 100))
((total < limit)) || fail "$total syscalls for $((2 * operations)) operations (limit: 1%, $limit)"
stop_engine
log "hot path: no data syscalls, $total syscalls in all (< $limit)"
