"""The TunnelDirectory actor, and the hooks that connect tunnels to engines.

The directory maps a bastion's fingerprint to its one
:class:`~enginehouse.actors.tunnel_supervisor.TunnelSupervisor`. Messages reach it one at a time, so
many databases that first use a bastion at once still start one supervisor,
hence one SSH session. It stops its supervisors when it stops.

:class:`TunnelPreparer` is the registry's ``prepare`` hook: it rewrites a
tunneled plan's URL to ``127.0.0.1:<local port>`` and adds pool listeners
that retire connections made over a transport that has since died.
:class:`TunnelHealthRound` is the Janitor's round that checks every tunnel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pykka
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError

from enginehouse.actors.policy import RestartPolicy
from enginehouse.actors.registry import ENGINE_HOOKS, Snapshot
from enginehouse.actors.supervisor import report_crash
from enginehouse.actors.tunnel_supervisor import (
    Board,
    HoldSession,
    Link,
    ReleaseSession,
    TunnelSupervisor,
)
from enginehouse.errors import TunnelError
from enginehouse.messages.registry import EnginePlan
from enginehouse.messages.supervision import Deliver, WhereIs
from enginehouse.messages.tunnel import (
    CheckHealth,
    EnsureConnected,
    Forwarded,
    GetTunnelStats,
    OpenForward,
    Owner,
    ReleaseForwards,
    TunnelFor,
    TunnelStats,
)
from enginehouse.specs import SSHTunnelSpec

log = logging.getLogger("enginehouse.tunnel")

_GENERATION = "enginehouse.tunnel_generation"


class TunnelDirectory(pykka.ThreadingActor):
    """One :class:`TunnelSupervisor` per bastion; see the module docstring."""

    use_daemon_thread = True

    def __init__(
        self,
        *,
        policy: RestartPolicy,
        connect_timeout: float,
        ask_timeout: float,
        idle_timeout: float,
        supervisor: pykka.ActorRef[Any] | None = None,
        name: str = "tunnels",
        hold_session: HoldSession | None = None,
        release_session: ReleaseSession | None = None,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 5.0,
        known_hosts: Path | None = None,
        transport: str = "paramiko",
    ) -> None:
        super().__init__()
        self._transport = transport  # ssh_transport: paramiko | openssh
        self._keepalive = (keepalive_interval, keepalive_timeout)
        self._known_hosts = known_hosts
        # Each supervisor publishes its TunnelView here: stats never wait on a tunnel.
        self._board: Board = {}
        # max_tunnels_per_bastion, passed on to each TunnelSupervisor (None: uncapped).
        self._hold_session = hold_session
        self._release_session = release_session
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._ask_timeout = ask_timeout
        self._idle_timeout = idle_timeout
        self._supervisor = supervisor
        self._name = name
        self._tunnels: dict[str, pykka.ActorRef[Any]] = {}

    def on_stop(self) -> None:
        self._stop_all()

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop_all()
        report_crash(self._supervisor, self._name, self.actor_urn, exc)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, TunnelFor):
            return self._tunnel_for(message)
        if isinstance(message, ReleaseForwards):
            return self._release(message)
        if isinstance(message, CheckHealth):
            return self._check_health(message)
        if isinstance(message, GetTunnelStats):
            return self._stats()
        raise TypeError(f"unexpected message {type(message).__name__}")

    def _tunnel_for(self, message: TunnelFor) -> pykka.ActorRef[Any]:
        spec = message.spec
        ref = self._tunnels.get(spec.fingerprint)
        if ref is None or not ref.is_alive():
            ref = TunnelSupervisor.start(
                spec,
                policy=self._policy,
                connect_timeout=self._connect_timeout,
                ask_timeout=self._ask_timeout,
                idle_timeout=self._idle_timeout,
                hold_session=self._hold_session,
                release_session=self._release_session,
                keepalive_interval=self._keepalive[0],
                keepalive_timeout=self._keepalive[1],
                known_hosts=self._known_hosts,
                board=self._board,
                transport=self._transport,
            )
            self._tunnels[spec.fingerprint] = ref
        return ref

    def _release(self, message: ReleaseForwards) -> tuple[pykka.Future[Any], ...]:
        """Send the release to every tunnel; answers their replies to come, as futures.

        The directory never waits for them: one bastion that is reconnecting
        must not hold it (issue 13, item 8). The caller may wait, in its own
        thread, with one deadline for all (:func:`await_replies`). A
        supervisor left without forwards stops itself; :meth:`_live` forgets it.
        """
        futures = []
        for ref in self._live().values():
            with contextlib.suppress(pykka.ActorDeadError):
                futures.append(ref.ask(message, block=False))
        return tuple(futures)

    def _check_health(self, message: CheckHealth) -> None:
        for ref in self._live().values():
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(message)

    def _stats(self) -> tuple[TunnelStats, ...]:
        """What each live tunnel last published: answers at once, whatever a bastion does."""
        live = self._live()
        views = [self._board.get(fingerprint) for fingerprint in live]
        return tuple(view.stats() for view in views if view is not None)

    def _live(self) -> dict[str, pykka.ActorRef[Any]]:
        for fingerprint, ref in list(self._tunnels.items()):
            if not ref.is_alive():
                del self._tunnels[fingerprint]
        return self._tunnels

    def _stop_all(self) -> None:
        """Stop every tunnel at once, waiting for all of them within one ``ask_timeout``."""
        refs = list(self._tunnels.values())
        self._tunnels.clear()
        futures = []
        for ref in refs:
            with contextlib.suppress(pykka.ActorDeadError):
                futures.append(ref.stop(block=False))
        deadline = time.monotonic() + self._ask_timeout
        for future in futures:
            try:
                future.get(timeout=max(deadline - time.monotonic(), 0.0))
            except (pykka.ActorDeadError, pykka.Timeout):
                log.warning("a tunnel did not stop within %.1fs", self._ask_timeout)


def await_replies(futures: tuple[pykka.Future[Any], ...], timeout: float) -> int:
    """Wait in the caller's thread for replies, one overall ``timeout``; answers how many came."""
    deadline = time.monotonic() + timeout
    came = 0
    for future in futures:
        try:
            future.get(timeout=max(deadline - time.monotonic(), 0.0))
            came += 1
        except (pykka.ActorDeadError, pykka.Timeout):
            continue
        except Exception as exc:  # a tunnel's own error: logged, the others still count
            log.warning("a tunnel failed to release forwards: %s", exc)
    return came


Lookup = Callable[[], pykka.ActorRef[Any]]
"""Finds the live TunnelDirectory (through the Supervisor, so a restarted one is found)."""


def directory_lookup(supervisor: pykka.ActorRef[Any], timeout: float) -> Lookup:
    """A :data:`Lookup` asking ``supervisor`` where the child ``tunnels`` is."""

    def lookup() -> pykka.ActorRef[Any]:
        return _ask(supervisor, WhereIs("tunnels"), timeout)

    return lookup


OpenKey = tuple[str, str, int, object]
"""(bastion fingerprint, remote host, remote port, owner): one open forward of one database."""


class TunnelPreparer:
    """Opens forwards in the caller's thread; the registry's ``prepare`` hook only reads them.

    :meth:`warm` (the facade, before asking the registry) asks the directory and
    the bastion's supervisor for the forward and records it. ``__call__`` (the
    registry's ``prepare``, in the registry actor) rewrites the plan from that
    record and never asks an actor: a reconnecting bastion holds its own
    callers only, never the registry (issue 13, item 8).
    """

    def __init__(self, lookup: Lookup | None, ask_timeout: float) -> None:
        self.lookup = lookup  # set once the supervisor runs; only warm() uses it
        # Under the caller's own ask to the registry, leave it time to hear our error.
        self._timeout = ask_timeout * 0.8
        self._open_forwards: dict[OpenKey, tuple[int, pykka.ActorRef[Any], Link]] = {}
        # The supervisor of each bastion seen, so a known bastion costs one ask, not three.
        self._refs: dict[str, pykka.ActorRef[Any]] = {}

    def warm(self, plan: EnginePlan) -> None:
        """Open ``plan``'s forward now, in the caller's thread, unless it is open already."""
        key = self._key(plan)
        if key is None:
            return
        known = self._open_forwards.get(key)
        if known is not None and known[2].serves(known[0]) and known[2].active():
            return
        spec = plan.tunnel
        assert spec is not None
        self._open_forwards[key] = self._open(spec, key[1], key[2], plan.database_id)

    def forward(self, spec: SSHTunnelSpec, host: str, port: int, owner: Owner) -> int:
        """The local port that reaches ``host:port`` over ``spec``'s shared SSH session.

        For integrations whose own code rewrites the engine URL (Superset's SSH
        manager). A known forward that still listens over a live transport costs no ask.
        """
        key = (spec.fingerprint, host, port, owner)
        known = self._open_forwards.get(key)
        if known is not None and known[2].serves(known[0]) and known[2].active():
            return known[0]
        self._open_forwards[key] = self._open(spec, host, port, owner)
        return self._open_forwards[key][0]

    def _key(self, plan: EnginePlan) -> OpenKey | None:
        spec = plan.tunnel
        if spec is None:
            return None
        host = plan.url.host
        if not host:
            raise TunnelError(f"database {plan.database_id}: a tunneled URI needs a host")
        port = plan.url.port if plan.url.port is not None else _default_port(plan)
        return (spec.fingerprint, host, port, plan.database_id)

    def __call__(self, plan: EnginePlan) -> EnginePlan:
        key = self._key(plan)
        if key is None:
            return plan
        known = self._open_forwards.get(key)
        if known is None or not known[2].serves(known[0]):
            raise TunnelError(
                f"database {plan.database_id}: its forward via bastion {known_bastion(plan)} "
                "closed before its engine was built (released meanwhile); try again"
            )
        local_port, ref, link = known
        kwargs = dict(plan.kwargs)
        kwargs["pool_events"] = [
            *kwargs.get("pool_events", ()),
            *pool_listeners(link, ref, self._timeout),
        ]
        url = plan.url.set(host="127.0.0.1", port=local_port)
        prepared = dataclasses.replace(plan, url=url, kwargs=kwargs)
        _PREPARED[id(prepared)] = (weakref.ref(prepared), link, ref, self._timeout)
        weakref.finalize(prepared, _forget_prepared, id(prepared))
        return prepared

    def _open(
        self, spec: SSHTunnelSpec, host: str, port: int, owner: Owner
    ) -> tuple[int, Any, Link]:
        deadline = time.monotonic() + self._timeout
        for _attempt in range(3):
            remaining = max(deadline - time.monotonic(), 0.001)
            ref: pykka.ActorRef[Any] | None = self._refs.get(spec.fingerprint)
            try:
                if ref is None or not ref.is_alive():
                    if self.lookup is None:
                        raise TunnelError("SSH tunnels are not started yet")
                    ref = _ask(self.lookup(), TunnelFor(spec), remaining)
                    self._refs[spec.fingerprint] = ref
                remaining = max(deadline - time.monotonic(), 0.001)
                forwarded: Forwarded = _ask(
                    ref, OpenForward(host, port, owner), remaining
                )
                return forwarded.local_port, ref, cast(Link, forwarded.link)
            except pykka.ActorDeadError:
                # That supervisor was closing (its last forward released): ask for a new one.
                self._refs.pop(spec.fingerprint, None)
                continue
            except pykka.Timeout:
                break
            except TunnelError as exc:
                if "is closed" not in str(exc) or ref is None:
                    raise
                self._refs.pop(spec.fingerprint, None)
                ref.actor_stopped.wait(remaining)
        raise TunnelError(
            f"SSH tunnel to bastion {spec.bastion} did not open within {self._timeout:g}s"
        )


def known_bastion(plan: EnginePlan) -> str:
    return plan.tunnel.bastion if plan.tunnel is not None else "?"


def _ask(ref: pykka.ActorRef[Any], message: object, timeout: float) -> Any:
    """``ref.ask`` with a timeout, typed as what the message answers (mypy sees a union)."""
    return ref.ask(message, timeout=timeout)


def _default_port(plan: EnginePlan) -> int:
    dialect = plan.url.get_dialect()
    port = getattr(dialect, "default_port", None)
    defaults = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}
    if isinstance(port, int):
        return port
    backend = plan.url.get_backend_name()
    if backend in defaults:
        return defaults[backend]
    raise TunnelError(f"database {plan.database_id}: give the port in the URI to tunnel it")


_PREPARED: dict[int, tuple[weakref.ref[EnginePlan], Link, pykka.ActorRef[Any], float]] = {}
"""Plans this module prepared, until :func:`tunnel_engine_hook` sees their engine.

Held weakly (a plan's URL carries the password): a plan whose ``create_engine``
failed leaves when it is collected, not never.
"""


def _forget_prepared(key: int) -> None:
    pending = _PREPARED.get(key)
    if pending is not None and pending[0]() is None:  # not a newer plan at the same id
        _PREPARED.pop(key, None)


def tunnel_engine_hook(engine: Engine, plan: EnginePlan) -> None:
    """An ``ENGINE_HOOKS`` hook: before each new connection, make sure the transport lives.

    So a connection through a tunnel that cannot be reopened fails with the
    ``TunnelError`` that says why, not with the driver's "server closed the
    connection".
    """
    pending = _PREPARED.pop(id(plan), None)
    if pending is None or pending[0]() is not plan:
        return
    _, link, ref, timeout = pending

    def before_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        if not link.active():
            _ensure(link, ref, timeout, "a new connection found the transport dead")

    event.listen(engine, "do_connect", before_connect)


def _ensure(link: Link, ref: pykka.ActorRef[Any], timeout: float, reason: str) -> None:
    try:
        ref.ask(EnsureConnected(reason), timeout=timeout)
    except (pykka.ActorDeadError, pykka.Timeout):
        raise TunnelError(f"SSH tunnel to bastion {link.bastion} is not answering") from None


if tunnel_engine_hook not in ENGINE_HOOKS:
    ENGINE_HOOKS.append(tunnel_engine_hook)


def pool_listeners(
    link: Link, ref: pykka.ActorRef[Any], timeout: float
) -> list[tuple[Callable[..., None], str]]:
    """``connect``/``checkout`` listeners: a connection made over a dead transport is retired.

    On checkout, a dead transport is reconnected first (a ``TunnelError`` if
    that fails, naming the bastion); then a connection from an older transport
    raises ``DisconnectionError``, which makes the pool open a fresh one.
    """

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        record.info[_GENERATION] = link.generation

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        transport = link.transport
        if transport is not None and transport.is_active():
            if record.info.get(_GENERATION) == link.generation:
                return  # the hot path: two attribute reads
        else:
            _ensure(link, ref, timeout, "a pool checkout found the transport dead")
        raise DisconnectionError(f"SSH transport to {link.bastion} was restarted")

    return [(on_connect, "connect"), (on_checkout, "checkout")]


class TunnelHealthRound:
    """The Janitor's round: tell the directory to check every tunnel (never raises).

    With the registry's ``snapshot`` (SINGLETON mode), it also says which databases
    still have a cached engine, so forwards of evicted databases are released.
    """

    def __init__(self, supervisor: pykka.ActorRef[Any], snapshot: Snapshot | None = None) -> None:
        self._supervisor = supervisor
        self._snapshot = snapshot

    def __call__(self) -> None:
        live = None
        if self._snapshot is not None:
            live = frozenset(key.database_id for key in self._snapshot.entries)
        try:
            # A tell through the supervisor: the Janitor never waits on another actor.
            self._supervisor.tell(Deliver("tunnels", CheckHealth(time.monotonic(), live)))
        except Exception as exc:  # the Janitor keeps ticking whatever happens here
            log.warning("tunnel health round skipped: %s", exc)
