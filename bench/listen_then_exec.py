"""Socket activation for a benchmark: makes a kernel TCP listener on 127.0.0.1:PORT in this
process (which runs without tcps), then execs the command with it inherited and named in the
environment as nginx's binary upgrade names its listeners (NGINX="fd;"). A preloaded command
finds a listener it did not make through the shim: tcps serves it on demand
(docs/architecture.md, "Listeners inherited from outside the shim").

Usage: python3 bench/listen_then_exec.py PORT COMMAND [ARG...]
"""
import os
import socket
import sys


def main():
    port = int(sys.argv[1])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(511)
    listener.set_inheritable(True)
    os.environ["NGINX"] = f"{listener.fileno()};"
    os.execvp(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
