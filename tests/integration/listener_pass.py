"""Helpers for listener_pass.sh: a listener passed on with SCM_RIGHTS while connections wait
in it (HAProxy's reload passes its listeners to the new process this way).

  sender PORT_FILE UNIX_PATH    (under the shim) listens on 127.0.0.1, writes its port, and
                                at a line on stdin passes the listener, twice in one message,
                                to the receiver at UNIX_PATH, closes its own, says "passed"
  receiver UNIX_PATH COUNT      (under the shim) takes the two descriptors, accepts COUNT
                                connections through the second, echoes each one's line, and
                                says what each descriptor is (kernel socket or offloaded)
  blocked-accept                (under the shim) a thread asleep in accept() on an offloaded
                                listener while another passes the listener on: the sleeper goes
                                on with the kernel's accept() and gets the next connection (it
                                must not fail with EBADF); exits 1 if not
  clients PORT FIRST COUNT      (plain) connects COUNT clients, each sends "hello K\\n" at once
                                and waits up to 30 s for "echo hello K\\n"; exits 1 if any did
                                not get it (a reset: the connection was lost)
"""
import array
import os
import socket
import sys
import time


def kind_of(sock):
    target = os.readlink(f"/proc/self/fd/{sock.fileno()}")
    return "kernel" if target.startswith("socket:") else "offloaded"


def sender(port_file, unix_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    with open(port_file + ".tmp", "w") as f:
        f.write(f"{listener.getsockname()[1]}\n")
    os.rename(port_file + ".tmp", port_file)
    print(f"listening: {kind_of(listener)}", flush=True)
    sys.stdin.readline()  # the clients wait in it, accepted by the engine, not taken
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.connect(unix_path)
    fds = array.array("i", [listener.fileno(), listener.fileno()])
    channel.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    print(f"passed; the listener here is now a {kind_of(listener)} socket", flush=True)
    listener.close()
    channel.close()
    sys.stdin.readline()


def receiver(unix_path, count):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(unix_path)
    server.listen(1)
    print("ready", flush=True)
    channel, _ = server.accept()
    _, fds, _, _ = socket.recv_fds(channel, 16, 2)
    first = socket.socket(fileno=fds[0])
    second = socket.socket(fileno=fds[1])
    # The first use offers each to the engine: one kernel listener, one slot.
    print(f"first descriptor: {kind_of(first)} {first.getsockname()[1]}", flush=True)
    print(f"second descriptor: {kind_of(second)} {second.getsockname()[1]}", flush=True)
    second.settimeout(30)
    for _ in range(count):
        conn, _ = second.accept()
        conn.settimeout(30)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(100)
            if not chunk:
                break
            line += chunk
        conn.sendall(b"echo " + line)
        print(f"connection {line.decode().strip()!r}: {kind_of(conn)}", flush=True)
        conn.close()
    print("done", flush=True)
    sys.stdin.readline()


def blocked_accept():
    import threading
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    print(f"listening: {kind_of(listener)}", flush=True)
    result = {}

    def sleeper():
        try:
            conn, _ = listener.accept()
            result["kind"] = kind_of(conn)
            conn.sendall(b"echo " + conn.recv(100))
            conn.close()
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=sleeper)
    thread.start()
    # Asleep (state S) in the shim's accept(), not spinning: bounded wait.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "S":
                break
        time.sleep(0.01)
    else:
        print("the accepting thread never slept", flush=True)
        sys.exit(1)
    # Passed on (into a socket nobody reads: the kernel listener is then this process's alone).
    left, right = socket.socketpair()
    left.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [listener.fileno()]))])
    print(f"passed; the listener here is now a {kind_of(listener)} socket", flush=True)
    client = socket.create_connection(listener.getsockname(), timeout=30)
    client.sendall(b"hello\n")
    got = client.recv(100)
    thread.join(30)
    print(f"sleeper: {result}, client got {got!r}", flush=True)
    sys.exit(0 if result.get("kind") == "kernel" and got == b"echo hello\n" else 1)


def clients(port, first, count):
    conns = []
    for k in range(first, first + count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        conn.sendall(f"hello {k}\n".encode())
        conns.append((k, conn))
    print(f"connected {count}", flush=True)
    failed = 0
    deadline = time.monotonic() + 30
    for k, conn in conns:
        want = f"echo hello {k}\n".encode()
        got = b""
        try:
            while len(got) < len(want) and time.monotonic() < deadline:
                chunk = conn.recv(100)
                if not chunk:
                    break
                got += chunk
        except OSError as error:
            print(f"client {k}: {error}", flush=True)
        if got == want:
            print(f"client {k}: echoed", flush=True)
        else:
            print(f"client {k}: got {got!r}, not {want!r}", flush=True)
            failed += 1
        conn.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "sender":
        sender(sys.argv[2], sys.argv[3])
    elif mode == "receiver":
        receiver(sys.argv[2], int(sys.argv[3]))
    elif mode == "blocked-accept":
        blocked_accept()
    else:
        clients(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
