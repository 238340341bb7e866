#!/usr/bin/env bash
# Python's subprocess (vfork, dup2 onto 0 and 1, close_range, execve) with an offloaded
# connection as the child's stdin and stdout: a preloaded server accepts each connection and
# runs `sh -c 'read x; echo out:$x'` on it, then closes its own copy. A plain client sends a
# line per connection and must get the reply byte for byte, then the FIN when sh exits. The
# parent's sockets must survive every vfork child. ss proves tcpsd owned the listener and the
# connections; at the end the engine holds nothing.
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

need_tool ss
[[ -x /bin/sh ]] || skip "/bin/sh is missing"
[[ -n $PYTHON ]] || skip "python3 is missing"
dir=$TCPS_TEST_DIR
conns=20

cat >"$dir/server.py" <<'PY'
import os, socket, subprocess, sys
port_file, conns = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
with open(port_file + ".tmp", "w") as f:
    f.write(str(listener.getsockname()[1]))
os.rename(port_file + ".tmp", port_file)
for k in range(conns):
    conn, _ = listener.accept()
    conn.settimeout(10)
    # close_fds=True (the default): the child closes everything but 0-2 before its exec.
    done = subprocess.run(["/bin/sh", "-c", "read x; echo out:$x"], stdin=conn, stdout=conn,
                          timeout=20)
    conn.close()
    if done.returncode != 0:
        sys.exit("child %d exited with %d" % (k, done.returncode))
print("served", conns)
PY
cat >"$dir/client.py" <<'PY'
import socket, sys
port, conns = int(sys.argv[1]), int(sys.argv[2])
for k in range(conns):
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(b"in%d\n" % k)
    data = b""
    while True:
        chunk = c.recv(100)
        if not chunk:
            break
        data += chunk
    if data != b"out:in%d\n" % k:
        sys.exit("connection %d: got %r" % (k, data))
    c.close()
print("ok", conns, "replies byte for byte, each followed by the FIN")
PY

start_offload
"${OFFLOAD[@]}" "$PYTHON" "$dir/server.py" "$dir/port" "$conns" >"$dir/server.out" 2>&1 &
server_pid=$!
track "$server_pid"
port=$(wait_for_port_file 10 "$dir/port") || fail "the server did not start: $(cat "$dir/server.out")"
wait_until 5 listening_on "$port" || fail "nothing listens on port $port"
if offloaded; then expect_engine_listener "$port" "$server_pid"; fi
"$PYTHON" "$dir/client.py" "$port" "$conns" >"$dir/client.out" 2>&1 &
client_pid=$!
track "$client_pid"
record_server_side "$port" "$client_pid" 60 "$dir/ss.txt"
status=0
wait_pid "$client_pid" 60 || status=$?
sed 's/^/  /' "$dir/client.out"
((status == 0)) || fail "the client failed (status $status): $(cat "$dir/server.out")"
status=0
wait_pid "$server_pid" 30 || status=$?
((status == 0)) || fail "the server failed (status $status): $(cat "$dir/server.out")"
# The sh children run offloaded too (each joins the session as a member): nobody but tcpsd
# may have held a kernel socket on the port.
expect_no_strangers "$dir/ss.txt" "$port"
expect_engine_empty 20 "$port"
if offloaded; then stop_engine; fi
log "subprocess_stdio: all checks passed"
