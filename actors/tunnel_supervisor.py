"""The TunnelSupervisor actor: one per bastion, one SSH transport, every forward over it.

It connects lazily (on the first :class:`OpenForward`), reconnects a dead
transport under a :class:`~enginehouse.actors.policy.RestartPolicy` (when a health round
or a new channel finds it dead), closes an idle one, and gives up with a
:class:`~enginehouse.errors.TunnelError` that names the bastion and why. Local
listeners outlive transports, so an engine's ``127.0.0.1:port`` stays valid
across restarts.

The only state shared with other threads is the :class:`Link`: forwarder
threads and pool checkouts read its ``transport`` and ``generation``; only
this actor replaces them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import paramiko
import pykka

from enginehouse import forking
from enginehouse.actors.counters import count_value
from enginehouse.actors.forwarder import ChannelOpener
from enginehouse.actors.policy import RestartLedger, RestartPolicy
from enginehouse.actors.ssh import quick_acks_for_a_while
from enginehouse.actors.ssh_transport import (
    Forward,
    Session,
    SSHTransport,
    TransportSettings,
    transport_for,
)
from enginehouse.errors import EngineManagerError, PoolExhaustedError, TunnelError
from enginehouse.messages.tunnel import (
    CheckHealth,
    CloseTunnel,
    EnsureConnected,
    Forwarded,
    ForwardStats,
    GetTunnelStats,
    OpenForward,
    Owner,
    ReleaseForwards,
    TunnelStats,
)
from enginehouse.specs import SSHTunnelSpec

log = logging.getLogger("enginehouse.tunnel")

HoldSession = Callable[[str, float], Any]
"""``hold(bastion, timeout)``: wait up to ``timeout`` s for a permit to open one SSH
session to ``bastion`` (``max_tunnels_per_bastion``); answers a lease for
:data:`ReleaseSession`, raises an ``EngineManagerError`` when none came."""
ReleaseSession = Callable[[Any], None]
"""``release(lease)``: the session that lease was for is closed (a tell; never raises)."""


class Link:
    """The bastion's current transport and open local ports, as the actor last set them."""

    __slots__ = ("__weakref__", "bastion", "closed", "generation", "ports", "transport")

    def __init__(self, bastion: str) -> None:
        self.bastion = bastion
        self.transport: Session | None = None  # paramiko's Transport, or an OpenSSH master
        self.generation = 0
        self.closed = False
        self.ports: frozenset[int] = frozenset()  # replaced whole, never mutated
        forking.track(self)

    def active(self) -> bool:
        transport = self.transport
        return transport is not None and transport.is_active()

    def serves(self, local_port: int) -> bool:
        """True while this link's supervisor still listens on ``local_port``."""
        return not self.closed and local_port in self.ports

    def after_fork_in_child(self) -> None:
        """Close the child's copy of the SSH socket (never the parent's connection)."""
        transport = self.transport
        sock = getattr(transport, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()  # close(), not shutdown(): the parent's session lives on


@dataclass(frozen=True)
class TunnelView:
    """What a supervisor last published about itself; read without asking it (issue 13, item 8).

    Channel counts are read from the forwards when :meth:`stats` is called,
    so they are current even while the actor is busy (connecting, backing off).
    """

    bastion: str
    state: str
    connects: int
    restarts: int
    forwards: tuple[tuple[Forward, int], ...]  # (forward, owners)
    last_error: str | None
    gave_up: str | None
    link: Link

    def stats(self) -> TunnelStats:
        state = self.state
        if state == "connected" and not self.link.active():
            state = "disconnected"
        return TunnelStats(
            bastion=self.bastion,
            state=state,
            connects=self.connects,
            restarts=self.restarts,
            forwards=tuple(
                ForwardStats(
                    remote=forward.remote,
                    local_port=forward.local_port,
                    owners=owners,
                    active_channels=forward.active_channels,
                    channels_opened=count_value(getattr(forward, "opened", _NONE)),
                    channel_failures=count_value(getattr(forward, "failures", _NONE)),
                )
                for forward, owners in self.forwards
            ),
            last_error=self.last_error,
            gave_up=self.gave_up,
        )


_NONE = itertools.count()  # never advanced: a forward that does not count channels

Board = dict[str, TunnelView]
"""Where supervisors publish their :class:`TunnelView`, by bastion fingerprint."""


class TunnelSupervisor(pykka.ThreadingActor):
    """Owns one bastion's SSH transport and forwards; see the module docstring."""

    use_daemon_thread = True

    def __init__(
        self,
        spec: SSHTunnelSpec,
        *,
        policy: RestartPolicy,
        connect_timeout: float,
        ask_timeout: float,
        idle_timeout: float,
        hold_session: HoldSession | None = None,
        release_session: ReleaseSession | None = None,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 5.0,
        known_hosts: Path | None = None,
        board: Board | None = None,
        transport: str = "paramiko",
    ) -> None:
        super().__init__()
        self._spec = spec
        self._board = board
        # The ssh_transport strategy: it opens, probes, forwards and closes (actors/ssh_transport).
        self._transport: SSHTransport = transport_for(
            transport,
            TransportSettings(
                spec,
                connect_timeout=connect_timeout,
                keepalive_interval=keepalive_interval,
                keepalive_timeout=keepalive_timeout,
                known_hosts=known_hosts,
                on_death=self._tell_health_round,
            ),
        )
        self._stopping = False
        # The bastion's session budget (None: uncapped, nothing to do).
        self._hold_session = hold_session
        self._release_session = release_session
        self._lease: Any = None  # held from the transport's open to its close
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._ask_timeout = ask_timeout
        self._idle_timeout = idle_timeout
        self.link = Link(spec.bastion)
        self._forwards: dict[tuple[str, int], Forward] = {}
        self._owners: dict[tuple[str, int], set[Owner]] = {}
        self._opened: dict[tuple[str, int], float] = {}  # last OpenForward per remote
        self._ledger = RestartLedger(policy)
        self._state = "new"
        self._deliberate = True  # the next connect is not a restart (first one, or after idle)
        self._connects = 0
        self._last_error: str | None = None
        self._gave_up: str | None = None
        self._last_used = time.monotonic()
        self._handlers: dict[type, Any] = {
            OpenForward: self._open_forward,
            ReleaseForwards: self._release,
            EnsureConnected: self._ensure_connected,
            CheckHealth: self._check_health,
            GetTunnelStats: self._stats,
            CloseTunnel: self._close_and_stop,
        }

    def _tell_health_round(self) -> None:
        """The strategy saw its session die: a health round (a tell that never raises)."""
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor_ref.tell(CheckHealth(time.monotonic()))

    # -- lifecycle -------------------------------------------------------------

    def on_start(self) -> None:
        self._publish()

    def on_stop(self) -> None:
        self._close_all()
        self._unpublish()

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._close_all()
        self._unpublish()

    def on_receive(self, message: Any) -> Any:
        handler = self._handlers.get(type(message))
        if handler is None:
            raise TypeError(f"unexpected message {type(message).__name__}")
        try:
            return handler(message)
        finally:
            self._publish()

    # -- handlers --------------------------------------------------------------

    def _open_forward(self, message: OpenForward) -> Forwarded:
        remote = (message.remote_host, message.remote_port)
        try:
            self._ensure_connected(EnsureConnected("open forward"))
            forward = self._forwards.get(remote)
            if forward is None:
                self._probe(*remote)
                forward = self._listen(message)
                self._forwards[remote] = forward
        except EngineManagerError:
            if not self._forwards:
                self._close_and_stop(CloseTunnel())  # nothing left behind
            raise
        self._owners.setdefault(remote, set()).add(message.owner)
        self._last_used = self._opened[remote] = time.monotonic()
        return Forwarded(forward.local_port, self.link)

    def _release(self, message: ReleaseForwards) -> int:
        """Drop ``owner``; answers how many forwards remain (0: this actor stops)."""
        for remote, owners in list(self._owners.items()):
            owners.discard(message.owner)
            if not owners:
                del self._owners[remote]
                forward = self._forwards.pop(remote, None)
                if forward is not None:
                    forward.close()
                    log.info("closed forward %s via %s", forward.remote, self._spec.bastion)
        if not self._forwards:
            self._close_and_stop(CloseTunnel())
        return len(self._forwards)

    def _ensure_connected(self, message: EnsureConnected) -> Session:
        transport = self.link.transport
        if transport is not None and transport.is_active():
            return transport
        if transport is not None:
            self._drop_transport()  # dead: its session permit goes back before we wait
        if self.link.closed:
            raise TunnelError(f"SSH tunnel to bastion {self._spec.bastion} is closed")
        if not self._deliberate:
            self._wait_before_restart(message.reason)
        return self._connect()

    def _check_health(self, message: CheckHealth) -> None:
        # A tell: an exception here would kill this actor and its listeners with it.
        try:
            self._health_round(message)
        except Exception:
            log.exception("health check of the tunnel to %s failed", self._spec.bastion)

    def _health_round(self, message: CheckHealth) -> None:
        if message.live is not None:
            self._release_evicted(message.live, message.now)
        if not self._forwards or self._state in ("idle", "new"):
            return
        if self.link.active():
            if self._idle(message.now):
                self._close_idle()
            return  # a live transport: its Heartbeat watches it
        if self.link.transport is not None:
            self._drop_transport()  # dead: give its session permit back now
        recent = self._ledger.recent
        if self._gave_up is not None and recent and message.now - recent[-1] <= self._policy.period:
            return  # still within the period that made us give up
        try:
            self._ensure_connected(EnsureConnected("health check found the transport dead"))
        except EngineManagerError as exc:
            log.warning("tunnel to %s still down: %s", self._spec.bastion, exc)

    def _release_evicted(self, live: frozenset[Owner], now: float) -> None:
        """Release owners without a cached engine whose forwards have been idle a while."""
        for remote, owners in list(self._owners.items()):
            forward = self._forwards.get(remote)
            if forward is None or forward.active_channels:
                continue
            quiet = now - max(forward.last_activity, self._opened.get(remote, 0.0))
            if quiet <= self._idle_timeout:
                continue
            for owner in owners - live:
                log.info("releasing %s's forward via %s: no engine uses it", owner, forward.remote)
                self._release(ReleaseForwards(owner))
            if not self._forwards:
                return  # the last forward went: this actor is stopping

    def _stats(self, message: GetTunnelStats) -> TunnelStats:
        if self._state == "connected" and not self.link.active():
            self._state = "disconnected"
        return self._view().stats()

    def _view(self) -> TunnelView:
        return TunnelView(
            bastion=self._spec.bastion,
            state=self._state,
            connects=self._connects,
            restarts=self._ledger.restarts,
            forwards=tuple(
                (forward, len(self._owners.get(remote, ())))
                for remote, forward in self._forwards.items()
            ),
            last_error=self._last_error,
            gave_up=self._gave_up,
            link=self.link,
        )

    def _publish(self) -> None:
        if self._stopping:
            return
        self.link.ports = frozenset(f.local_port for f in self._forwards.values())
        if self._board is not None:
            self._board[self._spec.fingerprint] = self._view()

    def _unpublish(self) -> None:
        self.link.ports = frozenset()
        if self._board is not None:
            view = self._board.get(self._spec.fingerprint)
            if view is not None and view.link is self.link:
                del self._board[self._spec.fingerprint]

    def _close_and_stop(self, message: CloseTunnel) -> None:
        self._close_all()
        self._stopping = True  # stats() no longer lists it, though its stop is still queued
        self._unpublish()
        self.stop()

    # -- internals -------------------------------------------------------------

    def _wait_before_restart(self, reason: str) -> None:
        if self._state == "connected":
            log.warning("SSH transport to %s died (%s): reconnecting", self._spec.bastion, reason)
            self._state = "disconnected"
        delay = self._ledger.next_delay()
        if delay is None:
            self._state = "failed"
            self._gave_up = (
                f"{self._policy.max_restarts} reconnects within {self._policy.period:g}s; "
                f"last error: {self._last_error or reason}"
            )
            log.error("giving up on SSH tunnel to %s: %s", self._spec.bastion, self._gave_up)
            raise TunnelError(
                f"SSH tunnel to bastion {self._spec.bastion} is down: gave up after {self._gave_up}"
            )
        # Backoff blocks only this bastion's actor, never longer than backoff_max.
        self._publish()
        time.sleep(delay)

    def _connect(self) -> Session:
        self._drop_transport()
        previous, self._state = self._state, "connecting"
        self._publish()  # stats() shows "connecting" while this actor is busy here
        self._state = previous
        try:
            lease = self._hold_permit()
            try:
                transport = self._transport.open(list(self._forwards.values()))
            except BaseException:
                self._give_back(lease)
                raise
        except TunnelError as exc:
            self._last_error = str(exc)
            self._state = "failed" if self._connects == 0 else "disconnected"
            self._deliberate = False
            raise
        self._lease = lease
        self.link.transport = transport
        self.link.generation += 1
        self._connects += 1
        self._state = "connected"
        self._deliberate = False
        self._gave_up = None
        log.info(
            "SSH transport to %s open (%s, connect #%d)",
            self._spec.bastion,
            self._transport.name,
            self._connects,
        )
        return transport

    def _hold_permit(self) -> Any:
        """A ``max_tunnels_per_bastion`` permit for one session, or None when uncapped.

        Waits in this bastion's own actor (which opens the session next, each
        step bounded by the same connect timeout): only this bastion's callers
        wait with it, never the registry or the directory.
        """
        if self._hold_session is None:
            return None
        bastion, timeout = self._spec.bastion, self._connect_timeout
        try:
            return self._hold_session(bastion, timeout)
        except PoolExhaustedError:
            raise TunnelError(
                f"SSH tunnel to bastion {bastion}: max_tunnels_per_bastion reached "
                f"(no session to it ended within {timeout:g}s)"
            ) from None
        except EngineManagerError as exc:
            raise TunnelError(
                f"SSH tunnel to bastion {bastion}: no session permit "
                f"(max_tunnels_per_bastion): {exc}"
            ) from None

    def _give_back(self, lease: Any) -> None:
        if lease is not None and self._release_session is not None:
            self._release_session(lease)

    def _probe(self, host: str, port: int) -> None:
        """Open and close one channel, so an unreachable remote fails now with its reason."""
        self._transport.probe(self._ensure_connected(EnsureConnected("probe")), host, port)

    def _listen(self, message: OpenForward) -> Forward:
        def opener() -> ChannelOpener:
            return channel_opener(
                self.link, self.actor_ref, self._ask_timeout, self._connect_timeout
            )

        session = self._ensure_connected(EnsureConnected("listen"))
        try:
            return self._transport.listen(
                session, message.remote_host, message.remote_port, message.local_port, opener
            )
        except OSError as exc:
            raise TunnelError(
                f"cannot listen on 127.0.0.1:{message.local_port} for "
                f"{message.remote_host}:{message.remote_port} via bastion {self._spec.bastion}: "
                f"{exc.strerror or exc}"
            ) from None

    def _idle(self, now: float) -> bool:
        if any(forward.active_channels for forward in self._forwards.values()):
            return False
        last = max([self._last_used, *(f.last_activity for f in self._forwards.values())])
        return now - last > self._idle_timeout

    def _close_idle(self) -> None:
        log.info("closing idle SSH transport to %s (listeners stay)", self._spec.bastion)
        self._drop_transport()
        self._state = "idle"
        self._deliberate = True

    def _drop_transport(self) -> None:
        self.link.transport = None
        self._transport.close()
        lease, self._lease = self._lease, None
        self._give_back(lease)  # after the close: the session is gone when the permit is

    def _close_all(self) -> None:
        self.link.closed = True
        forwards = list(self._forwards.values())
        self._forwards.clear()
        self._owners.clear()
        self._drop_transport()  # ends every channel, so relays see EOF
        for forward in forwards:
            forward.close()
        if self._state != "failed":
            self._state = "closed"


def channel_opener(
    link: Link, ref: pykka.ActorRef[Any], ask_timeout: float, channel_timeout: float
) -> ChannelOpener:
    """What a forwarder thread calls: a channel on the live transport, reconnecting if dead."""

    def ensure(reason: str) -> paramiko.Transport:
        if link.closed:
            raise TunnelError(f"SSH tunnel to bastion {link.bastion} is closed")
        try:
            transport: paramiko.Transport = ref.ask(EnsureConnected(reason), timeout=ask_timeout)
        except (pykka.ActorDeadError, pykka.Timeout):
            raise TunnelError(f"SSH tunnel to bastion {link.bastion} is not answering") from None
        return transport

    def open_channel(host: str, port: int, origin: tuple[str, int]) -> paramiko.Channel:
        transport = cast(paramiko.Transport | None, link.transport)
        if transport is None or not transport.is_active():
            transport = ensure("a new connection found the transport dead")
        quick_acks_for_a_while(transport)
        try:
            return transport.open_channel(
                "direct-tcpip", (host, port), origin, timeout=channel_timeout
            )
        except paramiko.ChannelException:
            raise  # the bastion answered: the remote end refused
        except (paramiko.SSHException, EOFError, OSError):
            if transport.is_active():
                raise
        transport = ensure("a channel open found the transport dead")
        return transport.open_channel("direct-tcpip", (host, port), origin, timeout=channel_timeout)

    return open_channel
