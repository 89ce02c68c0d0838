"""Heartbeat: notice a bastion that stopped answering, within a bounded time.

TCP alone cannot see it when something in between still acknowledges our
packets (a proxy, a NAT box, a load balancer, a hung sshd): writes succeed and
relays wait for replies that never come. So every ``interval`` seconds this
thread sends an SSH ``keepalive@openssh.com`` request that wants a reply
(OpenSSH answers it, with a failure, which is enough); when no reply comes
within ``timeout`` seconds it closes the transport. Paramiko then ends every
channel over it, so relays see EOF and their clients a closed connection, and
the next use reconnects (the TunnelSupervisor's usual path).

A thread of its own, not the supervisor actor: the wait for a reply must not
block the actor's mailbox (issue 13, items 7 and 8).
"""

from __future__ import annotations

import logging
import threading

import paramiko

log = logging.getLogger("enginehouse.tunnel")


class Heartbeat:
    """Pings one transport until it closes or :meth:`stop` is called."""

    def __init__(
        self, transport: paramiko.Transport, bastion: str, *, interval: float, timeout: float
    ) -> None:
        self._transport = transport
        self._bastion = bastion
        self._interval = interval
        self._timeout = timeout
        self._stopped = threading.Event()
        self.missed = False
        self._thread = threading.Thread(
            target=self._run, name=f"enginehouse-heartbeat-{bastion}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging; the thread ends within one ping (its transport closing ends it sooner)."""
        self._stopped.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        transport = self._transport
        while not self._stopped.wait(self._interval) and transport.is_active():
            deadline = threading.Timer(self._timeout, self._expire)
            deadline.daemon = True
            deadline.start()
            try:
                # Returns on the reply, or as soon as the transport is closed (by _expire).
                transport.global_request("keepalive@openssh.com", wait=True)
            except (paramiko.SSHException, EOFError, OSError):
                return  # the transport died: its owner notices on next use
            finally:
                deadline.cancel()

    def _expire(self) -> None:
        if self._stopped.is_set() or not self._transport.is_active():
            return
        self.missed = True
        log.warning(
            "bastion %s did not answer a keepalive within %gs: closing its SSH transport",
            self._bastion,
            self._timeout,
        )
        self._transport.close()
