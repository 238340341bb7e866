"""An echo server for handoff.sh, run under the shim: accepts N connections on 127.0.0.1,
echoes each one's 100,000 bytes back, and says for each whether accept() gave it a kernel
socket (seed 003's handoff: the engine was saturated) or an offloaded one (a placeholder), and
what it is once used. Waits for a line on stdin before closing each connection, so the test can
look at it with ss. With "later", it accepts all N first, registers them with an epoll, says
so, and waits for a line before it reads any (the test lets the engine's load fall meanwhile);
then it serves them from the epoll's events.
"""
import os
import selectors
import socket
import sys

count = int(sys.argv[1])
port_file = sys.argv[2]
later = len(sys.argv) > 3 and sys.argv[3] == "later"


def kind_of(conn):
    target = os.readlink(f"/proc/self/fd/{conn.fileno()}")
    return "kernel" if target.startswith("socket:") else "offloaded"


def echo(k, conn, kind):
    data = b""
    while len(data) < 100000:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    conn.sendall(data)
    print(f"connection {k}: {kind} socket, {len(data)} bytes echoed, now {kind_of(conn)}",
          flush=True)


listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
with open(port_file + ".tmp", "w") as f:
    f.write(str(listener.getsockname()[1]))
os.rename(port_file + ".tmp", port_file)
if later:
    # An event loop (epoll) over all of them: registered while they are kernel sockets, their
    # registrations must move with them when they are offloaded again.
    accepted = []
    events = selectors.EpollSelector()
    for k in range(count):
        conn, _ = listener.accept()
        accepted.append((conn, kind_of(conn)))
        events.register(conn, selectors.EVENT_READ, k)
        print(f"connection {k} accepted: {accepted[-1][1]} socket", flush=True)
    sys.stdin.readline()  # the engine has room again
    received = [b""] * count
    left = count
    while left > 0:
        ready = events.select(timeout=30)
        if not ready:
            sys.exit(f"no event for 30 s with {left} connections to go: {received!r:.200}")
        for key, _ in ready:
            k = key.data
            conn, kind = accepted[k]
            chunk = conn.recv(65536)
            received[k] += chunk
            if not chunk or len(received[k]) >= 100000:
                events.unregister(conn)
                conn.sendall(received[k])
                print(f"connection {k}: {kind} socket, {len(received[k])} bytes echoed, "
                      f"now {kind_of(conn)}", flush=True)
                left -= 1
    sys.stdin.readline()  # the test has looked at them
    for conn, _ in accepted:
        conn.close()
else:
    for k in range(count):
        conn, _ = listener.accept()
        echo(k, conn, kind_of(conn))
        sys.stdin.readline()  # the test has looked at it
        conn.close()
