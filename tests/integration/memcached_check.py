#!/usr/bin/env python3
"""memcached_check: a memcached text-protocol client that checks every byte it gets back.

    memcached_check.py --port P [--threads N] [--rounds R] [--max-size BYTES] [--tag T]
    memcached_check.py --port P --stats     (prints `STAT name value` lines, then exits)

Each of N threads has its own connection and its own keys (prefix T:tN:). Per round it:
  * sets a value of every size in SIZES up to --max-size (0 B to 2 MB: the 64 KiB rings of an
    offloaded socket are crossed many times) and gets each back, checking flags, length and bytes;
  * gets them all in one multi-get (one response of several MB) and checks every value;
  * pipelines 200 small sets in one write, then 200 gets in one write, and checks each reply;
  * exercises add/replace/append/prepend/cas/incr/decr/touch/delete and noreply, checking each
    reply against what memcached documents (protocol.txt).
Values are random bytes (with CR LF inside them), different in every round.

Prints `threads N rounds R commands C bytes-checked B` and exits 0 only when every reply was
right; on the first wrong reply it says what was expected and what came, and exits 1.
"""

import argparse
import os
import random
import socket
import sys
import threading

SIZES = [0, 1, 2, 7, 100, 1000, 1023, 1024, 4095, 4096, 8191, 16384, 65535, 65536, 65537,
         100000, 262144, 500000, 1000000, 2000000]


class Mismatch(Exception):
    pass


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = bytearray()
        self.commands = 0
        self.checked = 0

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise Mismatch("memcached closed the connection")
        self.buf += chunk

    def line(self):
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                out = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return out
            self._fill()

    def exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def expect_line(self, want, what):
        got = self.line()
        self.commands += 1
        if got != want:
            raise Mismatch(f"{what}: expected {want!r}, got {got[:200]!r}")

    def read_values(self, what):
        """Reads VALUE blocks up to END: {key: (flags, data, cas or None)}."""
        values = {}
        while True:
            header = self.line()
            if header == b"END":
                self.commands += 1
                return values
            parts = header.split(b" ")
            if parts[0] != b"VALUE" or len(parts) not in (4, 5):
                raise Mismatch(f"{what}: expected VALUE or END, got {header[:200]!r}")
            length = int(parts[3])
            data = self.exact(length)
            if self.exact(2) != b"\r\n":
                raise Mismatch(f"{what}: value of {parts[1]!r} is not followed by CR LF")
            cas = int(parts[4]) if len(parts) == 5 else None
            values[parts[1]] = (int(parts[2]), data, cas)

    def check_value(self, values, key, flags, data, what):
        if key not in values:
            raise Mismatch(f"{what}: no value for {key!r}")
        got_flags, got, _ = values[key]
        if got_flags != flags:
            raise Mismatch(f"{what}: {key!r} flags {got_flags}, expected {flags}")
        if got != data:
            first = next((i for i in range(min(len(got), len(data))) if got[i] != data[i]),
                         min(len(got), len(data)))
            raise Mismatch(f"{what}: {key!r} has {len(got)} bytes, expected {len(data)}; "
                           f"first difference at byte {first}")
        self.checked += len(data)


def store(conn, verb, key, flags, data, noreply=False):
    tail = b" noreply" if noreply else b""
    conn.send(b"%s %s %d 0 %d%s\r\n%s\r\n" % (verb, key, flags, len(data), tail, data))


def one_round(conn, rng, prefix, max_size, round_no):
    sizes = [size for size in SIZES if size <= max_size]
    stored = {}
    # Every size, set then get.
    for size in sizes:
        key = b"%ssize%d" % (prefix, size)
        data = rng.randbytes(size)
        if size >= 4:  # CR LF inside a value must not confuse anyone
            data = data[:size // 2 - 1] + b"\r\n" + data[size // 2 + 1:]
        flags = (size * 7 + round_no) % 65536
        store(conn, b"set", key, flags, data)
        conn.expect_line(b"STORED", f"set {key!r} ({size} bytes)")
        conn.send(b"get %s\r\n" % key)
        conn.check_value(conn.read_values(f"get {key!r}"), key, flags, data, "get")
        stored[key] = (flags, data)
    # One multi-get of all of them.
    conn.send(b"get " + b" ".join(stored) + b"\r\n")
    values = conn.read_values("multi-get")
    if len(values) != len(stored):
        raise Mismatch(f"multi-get: {len(values)} values, expected {len(stored)}")
    for key, (flags, data) in stored.items():
        conn.check_value(values, key, flags, data, "multi-get")
    # Pipelines: 200 sets in one write, then 200 gets in one write.
    small = {b"%spipe%d" % (prefix, i): rng.randbytes(rng.randrange(1, 3000)) for i in range(200)}
    conn.send(b"".join(b"set %s %d 0 %d\r\n%s\r\n" % (key, i, len(data), data)
                       for i, (key, data) in enumerate(small.items())))
    for key in small:
        conn.expect_line(b"STORED", f"pipelined set {key!r}")
    conn.send(b"".join(b"get %s\r\n" % key for key in small))
    for i, (key, data) in enumerate(small.items()):
        conn.check_value(conn.read_values(f"pipelined get {key!r}"), key, i, data, "pipelined get")
    # The other commands, each reply as protocol.txt says.
    key = prefix + b"ops"
    conn.send(b"delete %s\r\n" % key)
    line = conn.line()
    conn.commands += 1
    if line not in (b"DELETED", b"NOT_FOUND"):
        raise Mismatch(f"delete {key!r}: got {line!r}")
    store(conn, b"replace", key, 0, b"x")
    conn.expect_line(b"NOT_STORED", "replace of a missing key")
    store(conn, b"add", key, 5, b"middle")
    conn.expect_line(b"STORED", "add")
    store(conn, b"add", key, 5, b"again")
    conn.expect_line(b"NOT_STORED", "add of a present key")
    store(conn, b"append", key, 0, b"-end")
    conn.expect_line(b"STORED", "append")
    store(conn, b"prepend", key, 0, b"start-")
    conn.expect_line(b"STORED", "prepend")
    conn.send(b"gets %s\r\n" % key)
    values = conn.read_values("gets")
    conn.check_value(values, key, 5, b"start-middle-end", "gets after append/prepend")
    cas = values[key][2]
    if cas is None:
        raise Mismatch("gets returned no cas unique")
    conn.send(b"cas %s 6 0 3 %d\r\nnew\r\n" % (key, cas + 1))
    conn.expect_line(b"EXISTS", "cas with a stale unique")
    conn.send(b"cas %s 6 0 3 %d\r\nnew\r\n" % (key, cas))
    conn.expect_line(b"STORED", "cas with the right unique")
    conn.send(b"set %s 0 0 2\r\n10\r\nincr %s 32\r\ndecr %s 50\r\ndecr %s 1\r\n"
              % (key, key, key, key))
    conn.expect_line(b"STORED", "set counter")
    conn.expect_line(b"42", "incr 32")
    conn.expect_line(b"0", "decr 50 stops at 0")
    conn.expect_line(b"0", "decr of 0")
    conn.send(b"touch %s 100\r\ntouch %snone 100\r\n" % (key, key))
    conn.expect_line(b"TOUCHED", "touch")
    conn.expect_line(b"NOT_FOUND", "touch of a missing key")
    quiet = rng.randbytes(777)
    store(conn, b"set", key, 9, quiet, noreply=True)
    conn.send(b"get %s %snone\r\n" % (key, key))
    conn.check_value(conn.read_values("get after a noreply set"), key, 9, quiet, "noreply set")
    conn.send(b"delete %s\r\nget %s\r\n" % (key, key))
    conn.expect_line(b"DELETED", "delete")
    if conn.read_values("get of a deleted key"):
        raise Mismatch("get of a deleted key returned a value")
    conn.send(b"bogus_command\r\n")
    conn.expect_line(b"ERROR", "an unknown command")


def worker(args, index, results):
    rng = random.Random(args.seed * 1000 + index)
    prefix = b"%s:t%d:" % (args.tag.encode(), index)
    try:
        conn = Conn(args.port)
        for round_no in range(args.rounds):
            one_round(conn, rng, prefix, args.max_size, round_no)
        conn.send(b"quit\r\n")
        if conn.sock.recv(1) != b"":
            raise Mismatch("bytes after quit")
        conn.sock.close()
        results[index] = (None, conn.commands, conn.checked)
    except (Mismatch, OSError) as error:
        results[index] = (f"thread {index}: {error}", 0, 0)


def print_stats(port):
    conn = Conn(port)
    conn.send(b"stats\r\n")
    while True:
        line = conn.line()
        if line == b"END":
            break
        print(line.decode())
    conn.sock.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-size", type=int, default=max(SIZES))
    parser.add_argument("--tag", default="check")
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    parser.add_argument("--stats", action="store_true")
    args = parser.parse_args()
    if args.stats:
        print_stats(args.port)
        return 0
    results = [None] * args.threads
    threads = [threading.Thread(target=worker, args=(args, i, results))
               for i in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [error for error, _, _ in results if error]
    for error in errors:
        print("FAIL:", error, file=sys.stderr)
    print(f"threads {args.threads} rounds {args.rounds} "
          f"commands {sum(r[1] for r in results)} bytes-checked {sum(r[2] for r in results)} "
          f"seed {args.seed}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
