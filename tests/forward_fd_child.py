"""Child process of test_tunnel_reliability: a PortForward whose process runs out of fds.

Speaks line by line on stdin/stdout: prints ``PORT <n>``; on ``exhaust`` fills
its descriptor table, then prints ``ERRORS`` once accept() has failed; on
``release`` frees the descriptors and prints ``RELEASED``. Relays go to a local
echo server (a socket stands in for the SSH channel: same recv/sendall/close).
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import threading
import time

from enginehouse.actors.counters import count_value
from enginehouse.actors.forwarder import PortForward


def echo(server: socket.socket) -> None:
    while True:
        conn, _ = server.accept()
        threading.Thread(target=lambda c=conn: _echo_one(c), daemon=True).start()


def _echo_one(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1024):
            conn.sendall(data)


def main() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=echo, args=(server,), daemon=True).start()
    echo_port = server.getsockname()[1]
    forward = PortForward(
        "127.0.0.1", echo_port, lambda h, p, o: socket.create_connection(("127.0.0.1", p))
    )
    print(f"PORT {forward.local_port}", flush=True)
    fillers: list[int] = []
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    for line in sys.stdin:
        if line.strip() == "exhaust":
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            while True:
                try:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break
            print("EXHAUSTED", flush=True)
            deadline = time.monotonic() + 30
            while not count_value(forward.accept_errors) and time.monotonic() < deadline:
                time.sleep(0.01)
            print("ERRORS" if count_value(forward.accept_errors) else "NO ERRORS", flush=True)
        elif line.strip() == "release":
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)  # room at once for accept + relay
            for fd in fillers:
                os.close(fd)
            fillers.clear()
            print("RELEASED", flush=True)


if __name__ == "__main__":
    main()
