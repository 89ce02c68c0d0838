"""Conversation with the SSH tunnel actors.

The :class:`~enginehouse.actors.tunnel_directory.TunnelDirectory` answers which
:class:`~enginehouse.actors.tunnel_supervisor.TunnelSupervisor` serves a bastion; each supervisor
opens and releases forwards over its one SSH transport, checks its health on
the Janitor's round and reports :class:`TunnelStats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from enginehouse.specs import SSHTunnelSpec


class TransportLink(Protocol):
    """What a :class:`Forwarded` answer exposes of the bastion's transport (the tunnel
    supervisor's ``Link``): its name and whether the transport is up right now."""

    bastion: str

    def active(self) -> bool: ...

    def serves(self, local_port: int) -> bool:
        """True while the supervisor still listens on ``local_port``."""
        ...

Owner = int | str
"""Who uses a forward: a database id."""


@dataclass(frozen=True)
class TunnelFor:
    """Ask (directory): the supervisor ``ActorRef`` of this bastion, started on first use."""

    spec: SSHTunnelSpec


@dataclass(frozen=True)
class OpenForward:
    """Ask (supervisor): a :class:`Forwarded` port on 127.0.0.1 to ``remote_host:remote_port``.

    Connects the transport if needed and checks once that the bastion can
    reach the remote end, so a bad host or port fails here with a clear error.
    ``local_port=0`` lets the system choose a free port.
    """

    remote_host: str
    remote_port: int
    owner: Owner
    local_port: int = 0


@dataclass(frozen=True)
class Forwarded:
    """Answer to :class:`OpenForward`: the local port, and the bastion's live link.

    Pool listeners read ``link`` to retire connections made over a dead transport.
    """

    local_port: int
    link: TransportLink


@dataclass(frozen=True)
class ReleaseForwards:
    """Drop ``owner`` from every forward. Ask (supervisor): answers how many forwards remain
    (0: it stops). Ask (directory): asks every supervisor without waiting, answers
    their replies to come (a tuple of futures the caller may wait on)."""

    owner: Owner


@dataclass(frozen=True)
class EnsureConnected:
    """Ask (supervisor): an active transport, reconnecting under the restart policy.

    Sent by forwarder threads and pool checkouts that found the transport dead.
    """

    reason: str


@dataclass(frozen=True)
class CheckHealth:
    """Tell (directory or supervisor): check transports; reconnect dead ones, close idle ones.

    ``live``, when given, holds the owners that still have a cached engine: an owner
    not in it whose forward stayed unused for the idle timeout is released (the
    Janitor evicted its engines), so evicted databases leave no listener behind.
    """

    now: float
    live: frozenset[Owner] | None = None


@dataclass(frozen=True)
class GetTunnelStats:
    """Ask (directory): a tuple of :class:`TunnelStats`; (supervisor): one."""


@dataclass(frozen=True)
class CloseTunnel:
    """Ask (supervisor): close every forward and the transport, then stop."""


@dataclass(frozen=True)
class ForwardStats:
    """One local listener and where it leads."""

    remote: str
    local_port: int
    owners: int
    active_channels: int
    channels_opened: int
    channel_failures: int


@dataclass(frozen=True)
class TunnelStats:
    """One bastion's SSH session and its forwards.

    ``state`` is ``connected``, ``disconnected`` (dead, reconnects on demand or
    on the next health round), ``idle`` (closed after ``tunnel_idle_timeout``;
    reopens on demand), ``failed`` (gave up; ``gave_up`` says why) or ``new``.
    """

    bastion: str
    state: str
    connects: int
    restarts: int
    forwards: tuple[ForwardStats, ...]
    last_error: str | None
    gave_up: str | None
