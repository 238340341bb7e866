"""Small socket probes for tests/security/security.sh, run as other users, natively or under
libtcps.so. Each prints one line: what happened (ok or the errno's name), and for an offloaded
socket "offloaded" (its descriptor is the shim's placeholder, not a kernel socket)."""
import errno
import os
import select
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


def connected(port):
    """A listener on PORT, a connection to it and its accepted end."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    server, _ = listener.accept()
    return listener, client, server


def pair(port):
    """A listener on PORT, a connection to it and its accepted end, then closed."""
    listener, client, server = connected(port)
    client.sendall(b"ping")
    got = server.recv(4)
    print("ok" if got == b"ping" else "got %r" % got, where(listener), where(client),
          where(server), flush=True)


def fill_share():
    """Sockets until socket() fails: them, and the error."""
    held = []
    while len(held) < 200000:
        try:
            held.append(socket.socket())
        except OSError as e:
            return held, e
    return held, None


def exhaust(port):
    """A listener on PORT, then sockets until socket() fails; then accepts of the connections
    the script makes, until one fails: what each says. Held until a signal."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    held, error = fill_share()
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


def pass_unread(port):
    """A connection whose first bytes the engine has received and nobody read, passed to this
    same process with SCM_RIGHTS (the engine parks those bytes); then sockets until socket()
    fails (the uid's share used up); then the received connection's first receive: the engine
    cannot take it, and a stream without the parked bytes must not be served. Prints what the
    receive and the peer see."""
    listener, client, server = connected(port)
    client.sendall(b"first")
    poller = select.poll()
    poller.register(server, select.POLLIN)
    if not poller.poll(10_000):
        sys.exit("the first bytes never arrived")
    # Used before it is passed on, so that the engine takes its bytes from the kernel socket
    # rather than only peeking at them (engine/session.hpp, EngineSlot::peeking).
    server.sendall(b"ok")
    client.settimeout(10)
    if client.recv(2) != b"ok":
        sys.exit("the server's reply never came")
    left, right = socket.socketpair()
    socket.send_fds(left, [b"x"], [server.fileno()])
    server.close()
    _, fds, _, _ = socket.recv_fds(right, 16, 1)
    held, error = fill_share()
    received = socket.socket(fileno=fds[0])
    received.settimeout(5)
    try:
        got = received.recv(100)
        seen = "data %r" % got
    except OSError as e:
        seen = outcome(e)
    client.settimeout(5)
    try:
        client.sendall(b"more")
        peer = "peer got %r" % client.recv(100)
    except OSError as e:
        peer = "peer " + outcome(e)
    print("unread", outcome(error), "receive", seen, peer, flush=True)
    del held  # the share stayed used up until here


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
    elif mode == "unread":
        pass_unread(port)
    else:
        sys.exit("unknown mode " + mode)


main()
