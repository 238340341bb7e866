"""An echo server for handoff.sh, run under the shim: accepts N connections on 127.0.0.1,
echoes each one's 100,000 bytes back, and says for each whether accept() gave it a kernel
socket (seed 003's handoff: the engine was saturated) or an offloaded one (a placeholder).
Waits for a byte on stdin before closing each connection, so the test can look at it with ss.
"""
import os
import socket
import sys

count = int(sys.argv[1])
port_file = sys.argv[2]
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
with open(port_file + ".tmp", "w") as f:
    f.write(str(listener.getsockname()[1]))
os.rename(port_file + ".tmp", port_file)
for k in range(count):
    conn, _ = listener.accept()
    target = os.readlink(f"/proc/self/fd/{conn.fileno()}")
    kind = "kernel" if target.startswith("socket:") else "offloaded"
    data = b""
    while len(data) < 100000:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    conn.sendall(data)
    print(f"connection {k}: {kind} socket, {len(data)} bytes echoed", flush=True)
    sys.stdin.readline()  # the test has looked at it
    conn.close()
