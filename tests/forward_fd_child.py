"""Child process of test_tunnel_reliability: a PortForward whose process runs out of fds.

Speaks line by line on stdin/stdout: prints ``PORT <n>``; on ``exhaust`` fills
its descriptor table and prints ``EXHAUSTED``; on ``errors?`` prints ``ERRORS``
once accept() has failed (``NO ERRORS`` after 30 s); on
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

ECHOING: list[socket.socket] = []


def echo(server: socket.socket) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # out of descriptors too: wait for the release
            time.sleep(0.01)
            continue
        ECHOING.append(conn)
        threading.Thread(target=lambda c=conn: _echo_one(c), daemon=True).start()


def _echo_one(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1024):
            conn.sendall(data)


def main() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=echo, args=(server,), daemon=True).start()
    echo_port = server.getsockname()[1]
    # Channels made before the descriptors run out: a relay then needs no new fd, so the
    # only thing failing is accept() (a blocked accept() holds the fd it will return).
    ready = [socket.create_connection(("127.0.0.1", echo_port)) for _ in range(4)]
    while len(ECHOING) < len(ready):  # their echo ends hold their fds before we exhaust
        time.sleep(0.01)

    def opener(host: str, port: int, origin: object) -> socket.socket:
        return ready.pop() if ready else socket.create_connection((host, port))

    forward = PortForward("127.0.0.1", echo_port, opener)
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
        elif line.strip() == "errors?":
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
