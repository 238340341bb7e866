"""inherited_listener.sh's programs. The parent runs without the shim, as systemd or a
supervisor would: it makes a TCP listener and starts a child that inherits it (socket
activation), with the shim (LIBTCPS and TCPS_ENGINE_SOCKET name it and its engine).

  inherited_listener.py alone accept|epoll
      The child sets FD_CLOEXEC on the listener and looks at it with fstat() first, as
      sd_listen_fds() and sd_is_socket() do: a socket. Then it serves 4 connections from it
      (asleep in accept(), or a non-blocking listener on an epoll's events, as nginx waits),
      echoing 3 lines on each, and says what each descriptor is: "offloaded" (the shim's
      placeholder) or "kernel", after the first echo when that came within 8 ms of the
      accept() ("young"; the shim moves such a connection once it is 10 ms old) and after the
      last. The parent is their client: it waits 20 ms after the first echo, so that the
      connection is old enough to move, and checks every echo.
  inherited_listener.py alone poll
      The same, asleep in accept(), but after the first echo a second thread of the child
      sleeps in poll() on the connection (a kernel socket still), and once the connection is
      old enough to move, the first thread makes a call on it (getsockopt) and says what it is:
      "kernel", since a socket a thread sleeps on in the kernel's poll() must not move under
      it (the engine would take the bytes the sleeper waits for). Then the client is told to
      go on ("go"), the poll() returns, and the next read moves the connection.
  inherited_listener.py shared
      The parent keeps its copy of the listener, as systemd keeps a socket it activated. The
      child serves 4 connections; then 2 more clients connect and wait, and only then does the
      child close its copy and exit. On Linux those 2 wait in the listener's one queue for
      whoever holds it: the parent then accepts them (natively), and 4 more after them. Nothing
      may have been accepted ahead for the child and lost with its copy.
Exits 0 if every client got its echo; prints what happened.
"""
import fcntl
import os
import select
import selectors
import socket
import stat
import subprocess
import sys
import threading
import time


def read_line(sock):
    """One line (up to its newline, or what came before EOF)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        line += chunk
    return line


def kind(sock):
    target = os.readlink("/proc/self/fd/%d" % sock.fileno())
    return "offloaded" if target == "/dev/null" else "kernel"


CHILD_LINES = 3
OLD_ENOUGH = 0.020  # twice the age at which the shim moves a connection accepted on demand


def child(fd, mode, count):
    """The preloaded child: serves `count` connections from inherited listener `fd`."""
    # What sd_listen_fds() and sd_is_socket() do first: FD_CLOEXEC set, then fstat(), which
    # must see a socket.
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        sys.exit("fstat() of the inherited listener after F_SETFD: not a socket")
    listener = socket.socket(fileno=fd)
    events = None
    if mode == "epoll":
        listener.setblocking(False)
        events = selectors.EpollSelector()
        events.register(listener, selectors.EVENT_READ)
    print("listener:", kind(listener), flush=True)
    served = 0
    while served < count:
        started = time.monotonic()
        if events is not None:
            if not events.select(timeout=30):
                sys.exit("no connection for 30 s")
            started = time.monotonic()  # the accept() is not a wait here
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue  # taken by the other process
            conn.setblocking(True)
        else:
            conn, _ = listener.accept()
        conn.settimeout(30)
        first = None
        for k in range(CHILD_LINES):
            line = read_line(conn)
            conn.sendall(b"child " + line)
            if k == 0:
                first = line.decode().strip()
                if time.monotonic() - started < 0.008:
                    print("connection %r young: %s" % (first, kind(conn)), flush=True)
                if mode == "poll":
                    polled_call(conn, first, started)
        print("connection %r: %s" % (first, kind(conn)), flush=True)
        conn.close()
        served += 1
    if mode == "shared":
        print("child served %d" % served, flush=True)
        sys.stdin.readline()  # the parent's clients wait in the queue now
    listener.close()
    print("child closed its listener after %d" % served, flush=True)


def syscall_of(tid):
    """The number of the system call thread `tid` of this process is in, or None."""
    try:
        with open("/proc/self/task/%d/syscall" % tid) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def polled_call(conn, name, started):
    """A call on `conn` while another thread sleeps in the kernel's poll() on it."""
    polled = {}

    def poller():
        polled["tid"] = threading.get_native_id()
        waiter = select.poll()
        waiter.register(conn, select.POLLIN)
        polled["events"] = waiter.poll(30_000)

    thread = threading.Thread(target=poller)
    thread.start()
    deadline = time.monotonic() + 10
    while "tid" not in polled or syscall_of(polled["tid"]) not in (7, 271):  # poll, ppoll
        if time.monotonic() > deadline:
            sys.exit("the poller never slept in poll()")
        time.sleep(0.001)
    # Old enough to move (the rule's age, twice), then a call that would move it.
    time.sleep(max(0.0, started + OLD_ENOUGH - time.monotonic()))
    conn.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    print("connection %r while polled: %s" % (name, kind(conn)), flush=True)
    conn.sendall(b"go\n")
    thread.join(30)
    if not polled.get("events"):
        sys.exit("the poller did not see the client's next line")


def start_child(listener, mode, count):
    env = dict(os.environ, LD_PRELOAD=os.environ["LIBTCPS"])
    return subprocess.Popen(
        [sys.executable, __file__, "child", str(listener.fileno()), mode, str(count)],
        pass_fds=[listener.fileno()], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)


def client(port, k, results, lines=1, wait_go=False):
    """Sends `lines` lines on one connection, the second one OLD_ENOUGH after the first
    echo (or after the server says "go"); results[k] is the first echo if every echo came
    back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            for n in range(lines):
                if n == 1 and wait_go:
                    go = read_line(s)
                    if go != b"go\n":
                        results[k] = "no go: %r" % go
                        return
                elif n == 1:
                    time.sleep(OLD_ENOUGH)
                s.sendall(b"hello %d\n" % k)
                echo = read_line(s).decode().strip()
                if n == 0:
                    results[k] = echo
                elif echo != results[k]:
                    results[k] = "echo %d: %r" % (n, echo)
    except OSError as error:
        results[k] = "error: %s" % error


def main():
    phase = sys.argv[1]
    if phase == "child":
        child(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    results = {}
    if phase == "alone":
        server = start_child(listener, sys.argv[2], 4)
        listener.close()  # the child's alone now, as after a supervisor's hand-over
        for k in range(4):
            client(port, k, results, CHILD_LINES, sys.argv[2] == "poll")
        out, _ = server.communicate(timeout=60)
        print(out, end="")
        want = {k: "child hello %d" % k for k in range(4)}
        ok = server.returncode == 0 and results == want
    else:
        server = start_child(listener, "shared", 4)
        for k in range(4):
            client(port, k, results, CHILD_LINES)
        for line in server.stdout:
            print(line, end="")
            if line.startswith("child served"):
                break
        if not line.startswith("child served 4"):
            sys.exit("the child did not serve 4: %r" % line)
        # Two clients that wait in the queue while the child still holds the listener.
        waiting = [threading.Thread(target=client, args=(port, k, results)) for k in (4, 5)]
        for t in waiting:
            t.start()
        queued = lambda: sum(1 for _ in open("/proc/net/tcp").readlines()[1:]
                             if (":%04X" % port) in _.split()[1] and _.split()[3] == "01")
        for _ in range(300):  # the two established, server side (3 s at most)
            if queued() >= 2:
                break
            threading.Event().wait(0.01)
        out, _ = server.communicate("close\n", timeout=60)
        print(out, end="")
        listener.settimeout(30)
        parent_served = 0
        later = [threading.Thread(target=client, args=(port, k, results)) for k in range(6, 10)]
        for t in later:
            t.start()
        for _ in range(6):
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                break
            with conn:
                conn.settimeout(30)
                conn.sendall(b"parent " + read_line(conn))
                parent_served += 1
        for t in waiting + later:
            t.join(60)
        print("parent served %d after the child closed its copy" % parent_served)
        want = {k: "child hello %d" % k for k in range(4)}
        want.update({k: "parent hello %d" % k for k in range(4, 10)})
        ok = server.returncode == 0 and parent_served == 6 and results == want
    for k in sorted(results):
        print("client %d: %s" % (k, results[k]))
    sys.exit(0 if ok else 1)


main()
