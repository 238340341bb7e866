"""An echo server for handoff.sh, run under the shim: accepts N connections on 127.0.0.1,
echoes each one's 100,000 bytes back, and says for each whether accept() gave it a kernel
socket (seed 003's handoff: the engine was saturated) or an offloaded one (a placeholder), and
what it is once used. Waits for a line on stdin before closing each connection, so the test can
look at it with ss. With "later", it accepts all N first, registers them with an epoll, says
so, and waits for a line before it reads any (the test lets the engine's load fall meanwhile);
then it serves them from the epoll's events. With "shed", it accepts all N, then echoes
whatever each sends, from an epoll's events, until each closes, and says each time a
connection changes hands (kernel socket or offloaded) and how many bytes it had echoed then.
With "shed-threads", the same with two threads per connection instead of an epoll: one blocks
in recv() and queues what it gets, the other sends it back (a socket handed to the kernel by
one thread while the other sleeps in a receive on it). With "blocked-reader", one connection
with a thread asleep in the kernel's recv() on it while another thread sends (see below).
"""
import os
import queue
import selectors
import socket
import struct
import sys
import threading

count = int(sys.argv[1])
port_file = sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else ""
later = mode == "later"


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


def accept_all():
    """Accepts all the connections and registers each with one epoll (data: its index)."""
    accepted = []
    events = selectors.EpollSelector()
    for k in range(count):
        conn, _ = listener.accept()
        accepted.append([conn, kind_of(conn), 0])
        events.register(conn, selectors.EVENT_READ, k)
        print(f"connection {k} accepted: {accepted[-1][1]} socket", flush=True)
    return accepted, events


def reads(accepted, events, timeout):
    """Yields (index, connection, what one recv() got) for each read event, while any
    connection is registered (the caller unregisters each when it is done)."""
    while events.get_map():
        ready = events.select(timeout=timeout)
        if not ready:
            sys.exit(f"no event for {timeout} s with {len(events.get_map())} connections to go")
        for key, _ in ready:
            conn = accepted[key.data][0]
            yield key.data, conn, conn.recv(65536)


listener = socket.socket()
# HANDOFF_REUSEPORT=1: a listener with SO_REUSEPORT of its own, which gets no twin (the engine
# hands its connections over one by one).
if os.environ.get("HANDOFF_REUSEPORT") == "1":
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(16)
# HANDOFF_EPOLL=1: the default mode accepts from a non-blocking listener on an epoll's events,
# as nginx does, instead of asleep in accept().
listener_events = None
if os.environ.get("HANDOFF_EPOLL") == "1":
    listener.setblocking(False)
    listener_events = selectors.EpollSelector()
    listener_events.register(listener, selectors.EVENT_READ)


def accept_one():
    if listener_events is None:
        return listener.accept()[0]
    while True:
        if not listener_events.select(timeout=30):
            sys.exit("the listener was not readable for 30 s")
        try:
            conn = listener.accept()[0]
        except BlockingIOError:
            continue  # readable, and taken by nobody else: the twin's flag, cleared now
        conn.setblocking(True)
        return conn
with open(port_file + ".tmp", "w") as f:
    f.write(str(listener.getsockname()[1]))
os.rename(port_file + ".tmp", port_file)
def report_change(k, conn, state):
    """Says when connection k changed hands; state is [kind, bytes echoed]."""
    kind = kind_of(conn)
    if kind != state[0]:
        state[0] = kind
        timeout = struct.unpack("ll", conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
        print(f"connection {k}: now {kind} after {state[1]} bytes, receive timeout "
              f"{timeout[0]} s", flush=True)


def set_receive_timeout(conn):
    # A receive timeout the shim keeps for an offloaded socket must be the kernel socket's
    # once it is handed back (the options go with the socket, as in Linux).
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 77, 0))


if mode == "shed-threads":
    def reader(conn, chunks):
        try:
            while True:
                chunk = conn.recv(65536)
                chunks.put(chunk)
                if not chunk:
                    return
        except OSError as error:
            print(f"recv failed: {error}", flush=True)
            os._exit(1)

    def writer(k, conn, chunks, state):
        while True:
            chunk = chunks.get()
            if not chunk:
                print(f"connection {k}: {state[1]} bytes echoed, closed", flush=True)
                conn.close()
                return
            conn.sendall(chunk)
            state[1] += len(chunk)
            report_change(k, conn, state)

    threads = []
    for k in range(count):
        conn, _ = listener.accept()
        set_receive_timeout(conn)
        state = [kind_of(conn), 0]
        print(f"connection {k} accepted: {state[0]} socket", flush=True)
        chunks = queue.Queue()
        threads.append(threading.Thread(target=reader, args=(conn, chunks)))
        threads.append(threading.Thread(target=writer, args=(k, conn, chunks, state)))
        threads[-2].start()
        threads[-1].start()
    for thread in threads:
        thread.join()
elif mode == "shed":
    # A saturated engine asks live connections back (seed 003): the event loop must see every
    # byte whoever serves the socket, and the registrations must follow it both ways.
    accepted, events = accept_all()
    for conn, _, _ in accepted:
        set_receive_timeout(conn)
    for k, conn, chunk in reads(accepted, events, 60):
        if not chunk:
            events.unregister(conn)
            print(f"connection {k}: {accepted[k][2]} bytes echoed, closed", flush=True)
            conn.close()
            continue
        conn.sendall(chunk)
        accepted[k][2] += len(chunk)
        state = accepted[k][1:]
        report_change(k, conn, state)
        accepted[k][1:] = state
elif mode == "blocked-reader":
    # One connection, accepted while the engine is saturated (a kernel socket), with a thread
    # asleep in the kernel's recv() on it. Once the engine has room (a line on stdin), another
    # thread's send() on it must not offload it (the sleeping receive would race the engine's
    # for the peer's next bytes); the reader's own next recv() does.
    conn, _ = listener.accept()
    got = queue.Queue()
    z_sent = threading.Event()

    def reader():
        got.put(conn.recv(100))  # asleep in the kernel until the peer answers the trigger
        z_sent.wait()
        data = conn.recv(100)  # no other call in flight now: offloaded first
        print(f"reader: got {data!r}, now {kind_of(conn)}", flush=True)

    thread = threading.Thread(target=reader)
    thread.start()
    # Asleep in recvfrom (45 on x86-64, 207 on arm64) in the kernel, per /proc.
    recvfrom = 45 if os.uname().machine == "x86_64" else 207
    for _ in range(1000):
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            if f.read().split()[0] == str(recvfrom):
                break
        threading.Event().wait(0.01)
    else:
        sys.exit("the reader never slept in recv()")
    print(f"connection 0 accepted: {kind_of(conn)} socket, reader asleep in recv()", flush=True)
    sys.stdin.readline()  # the engine has room again
    conn.sendall(b"W")  # the peer answers with X, which the sleeping reader must get
    print(f"trigger sent: now {kind_of(conn)}", flush=True)
    first = got.get(timeout=30)
    print(f"reader: got {first!r}", flush=True)
    conn.sendall(b"Z")  # the peer answers with Y
    z_sent.set()
    thread.join()
    conn.close()
elif later:
    # An event loop (epoll) over all of them: registered while they are kernel sockets, their
    # registrations must move with them when they are offloaded again.
    accepted, events = accept_all()
    sys.stdin.readline()  # the engine has room again
    # Each call offers a kernel-served socket again; the engine takes one only while its last
    # load window was nearly idle, and taking the first brings traffic that can make it refuse
    # the next for a window (the shim then waits 100 ms before offering again). So a call on
    # each until it is offloaded, for at most 10 s, before the event loop reads any of them.
    for conn, _, _ in accepted:
        for _ in range(200):
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            if kind_of(conn) == "offloaded":
                break
            threading.Event().wait(0.05)
    received = [b""] * count
    for k, conn, chunk in reads(accepted, events, 30):
        received[k] += chunk
        if not chunk or len(received[k]) >= 100000:
            events.unregister(conn)
            conn.sendall(received[k])
            print(f"connection {k}: {accepted[k][1]} socket, {len(received[k])} bytes echoed, "
                  f"now {kind_of(conn)}", flush=True)
    sys.stdin.readline()  # the test has looked at them
    for conn, _, _ in accepted:
        conn.close()
else:
    for k in range(count):
        conn = accept_one()
        echo(k, conn, kind_of(conn))
        sys.stdin.readline()  # the test has looked at it
        conn.close()
