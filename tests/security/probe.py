"""Small socket probes for tests/security/security.sh, run as other users, natively or under
libtcps.so. Each prints one line: what happened (ok or the errno's name), and for an offloaded
socket "offloaded" (its descriptor is the shim's placeholder, not a kernel socket)."""
import errno
import os
import signal
import socket
import sys


def where(sock):
    # The shim keeps an offloaded socket's number with an O_PATH descriptor of /dev/null.
    target = os.readlink("/proc/self/fd/%d" % sock.fileno())
    return "offloaded" if target == "/dev/null" else "kernel"


def outcome(error):
    return errno.errorcode.get(error.errno, str(error.errno)) if error else "ok"


def try_bind(port, reuseport):
    sock = socket.socket()
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    error = None
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        error = e
    print(outcome(error), where(sock), flush=True)


def try_connect(port):
    sock = socket.socket()
    sock.settimeout(10)
    error = None
    try:
        sock.connect(("127.0.0.1", port))
    except OSError as e:
        error = e
    print(outcome(error), where(sock), flush=True)


def hold_pair(port, reuseport):
    """A listener on PORT, a connection to it and its accepted end, held until a signal."""
    listener = socket.socket()
    if reuseport:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    server, _ = listener.accept()
    print("ready", where(listener), where(client), where(server), flush=True)
    signal.pause()


def pair(port):
    """A listener on PORT, a connection to it and its accepted end, then closed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    server, _ = listener.accept()
    client.sendall(b"ping")
    got = server.recv(4)
    print("ok" if got == b"ping" else "got %r" % got, where(listener), where(client),
          where(server), flush=True)


def exhaust(port):
    """A listener on PORT, then sockets until socket() fails; then accepts of the connections
    the script makes, until one fails: what each says. Held until a signal."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    held, error = [], None
    while len(held) < 200000:
        try:
            held.append(socket.socket())
        except OSError as e:
            error = e
            break
    print("exhausted", len(held), outcome(error), where(listener), flush=True)
    listener.settimeout(20)
    accepted = []
    for _ in range(32):
        try:
            accepted.append(listener.accept())
            print("accept ok", flush=True)
        except OSError as e:
            print("accept", outcome(e), flush=True)
            break
    signal.pause()


def adopt_listener():
    """A listener another user made, received with SCM_RIGHTS on stdin (a socketpair): its
    first use offers it to the engine; one connection accepted and held."""
    channel = socket.socket(fileno=0)
    _, fds, _, _ = socket.recv_fds(channel, 16, 1)
    listener = socket.socket(fileno=fds[0])
    print("adopted", where(listener), flush=True)
    listener.settimeout(10)
    server, _ = listener.accept()
    print("accepted", where(server), flush=True)
    signal.pause()


def main():
    if sys.argv[1] == "adopt":
        adopt_listener()
        return
    mode, port = sys.argv[1], int(sys.argv[2])
    flag = len(sys.argv) > 3 and sys.argv[3] == "reuseport"
    if mode == "bind":
        try_bind(port, flag)
    elif mode == "connect":
        try_connect(port)
    elif mode == "hold":
        hold_pair(port, flag)
    elif mode == "pair":
        pair(port)
    elif mode == "exhaust":
        exhaust(port)
    else:
        sys.exit("unknown mode " + mode)


main()
