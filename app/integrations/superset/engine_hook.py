"""Superset's own ``create_engine`` call, answered by enginehouse.

``Database._get_sqla_engine`` applies everything Superset knows (engine spec,
catalog and schema, impersonation, encrypted extra, ``DB_CONNECTION_MUTATOR``)
and then calls ``create_engine(url, **kwargs)``, a name imported into
``superset.models.core``. :func:`patch` replaces that name with
:class:`EngineHook` and wraps ``_get_sqla_engine`` so the hook knows which
database, catalog and schema it serves (a contextvar). Every Superset
semantic stays Superset's; only where the engine comes from changes:

* SINGLETON: one cached engine per final (URL, arguments, catalog, schema,
  user), with the pool the database's extra asks for instead of the NullPool
  Superset forces (default: the dialect's, QueuePool for servers).
* NEW: Superset's engine (NullPool), built by the manager so caps apply.

``get_sqla_engine`` (the context manager every caller enters) is wrapped too:
inside it, :data:`enginehouse.shares.request_source` is the query's source
(``QuerySource.SQL_LAB`` -> ``"SQL_LAB"``, else Superset's guess from the
request's referrer), so ``extra.connection_shares`` and leak detection see
which kind of work checks a connection out.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import create_engine as sqlalchemy_create_engine
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL, Engine

from enginehouse.errors import InvalidSpecError
from enginehouse.integrations.content_cache import digest
from enginehouse.integrations.superset.models import UNSAVED, database_facts
from enginehouse.manager import EngineManager
from enginehouse.messages.registry import EnginePlan
from enginehouse.plan import POOL_CLASS_BY_NAME
from enginehouse.settings import Mode
from enginehouse.shares import request_source
from enginehouse.specs import POOL_CLASSES, SSHTunnelSpec

log = logging.getLogger("enginehouse.superset")

_QUEUE_ONLY = ("pool_size", "max_overflow", "pool_timeout", "pool_use_lifo")
_SIZELESS = (sa_pool.NullPool, sa_pool.StaticPool, sa_pool.AssertionPool)


@dataclass(frozen=True)
class EngineRequest:
    """One ``_get_sqla_engine`` call: the model and what it was asked for."""

    database: Any
    catalog: str | None
    schema: str | None
    nullpool: bool


@dataclass(frozen=True)
class Forward:
    """The shared forward Superset's URL was pointed at (set by our SSH manager)."""

    spec: SSHTunnelSpec
    remote_host: str
    remote_port: int
    local_host: str
    local_port: int


REQUEST: contextvars.ContextVar[EngineRequest | None] = contextvars.ContextVar(
    "enginehouse_superset_request", default=None
)
FORWARD: contextvars.ContextVar[Forward | None] = contextvars.ContextVar(
    "enginehouse_superset_forward", default=None
)


class EngineHook:
    """Stands in for ``create_engine`` in ``superset.models.core``."""

    def __init__(self, manager: Callable[[], EngineManager]) -> None:
        self._manager = manager  # the app's live manager (started on first use)

    def __call__(self, url: Any, **kwargs: Any) -> Engine:
        request = REQUEST.get()
        if request is None:  # a call from outside _get_sqla_engine: not ours to change
            return sqlalchemy_create_engine(url, **kwargs)
        manager = self._manager()
        return manager.get_planned(plan_for(request, url, kwargs, manager.settings.mode))


def plan_for(request: EngineRequest, url: Any, kwargs: dict[str, Any], mode: Mode) -> EnginePlan:
    """The plan for Superset's final ``(url, kwargs)``; see the module docstring."""
    facts = database_facts(request.database)
    url = _as_url(url)
    kwargs = dict(kwargs)
    tunnel = None
    forward = FORWARD.get()
    if forward is not None and (url.host, url.port) == (forward.local_host, forward.local_port):
        # The registry opens (and watches) the same shared forward: key on the real end.
        url = url.set(host=forward.remote_host, port=forward.remote_port)
        tunnel = forward.spec
    # An unsaved model is a connection test: Superset's NullPool, nothing left open after.
    pooled = mode is Mode.SINGLETON and facts.database_id != UNSAVED
    _choose_pool(kwargs, facts.pool, request.nullpool, pooled)
    user = _effective_user(request.database, url) if facts.impersonate_user else None
    return EnginePlan(
        engine_key=digest(
            facts.fingerprint,
            url.render_as_string(hide_password=False),
            _stable_json(kwargs),
            request.catalog,
            request.schema,
            user,
        ),
        database_id=facts.database_id,
        fingerprint=facts.fingerprint,
        url=url,
        kwargs=kwargs,
        catalog=request.catalog,
        schema=request.schema,
        user=user,
        tunnel=tunnel,
        redact=facts.redact,
        max_connections=facts.max_connections,
        connection_shares=facts.shares if pooled else None,
    )


def _choose_pool(kwargs: dict[str, Any], wanted: str | None, nullpool: bool, pooled: bool) -> None:
    """When ``pooled``, the NullPool Superset forced becomes the pool the extra names.

    Sizing options of ``engine_params`` are dropped for pools without a size
    (stock Superset fails with ``Invalid argument(s) 'pool_size'`` there).
    """
    current = kwargs.get("poolclass")
    if isinstance(current, str):  # a name from engine_params that Superset did not replace
        kwargs["poolclass"] = _pool_class(current, "extra.engine_params.poolclass")
    elif pooled and nullpool and current is sa_pool.NullPool:
        if wanted is None:
            del kwargs["poolclass"]  # the dialect's default: QueuePool for every server
        else:
            kwargs["poolclass"] = _pool_class(wanted, "extra.poolclass")
        # Stock Superset never reuses a connection, so it never meets one the server or a
        # proxy ended in between; a pool does: check each before use (engine_params may
        # say otherwise).
        kwargs.setdefault("pool_pre_ping", True)
    if kwargs.get("poolclass") in _SIZELESS:
        for option in _QUEUE_ONLY:
            kwargs.pop(option, None)


def _pool_class(name: str, field: str) -> type[sa_pool.Pool]:
    found = POOL_CLASS_BY_NAME.get(name)
    if found is None:
        raise InvalidSpecError(field, f"unknown pool class; use one of {POOL_CLASSES}")
    return found


def _effective_user(database: Any, url: URL) -> str | None:
    effective = getattr(database, "get_effective_user", None)
    user = effective(url) if callable(effective) else None
    return user if isinstance(user, str) and user else None


def _as_url(url: Any) -> URL:
    if isinstance(url, URL):
        return url
    from sqlalchemy.engine import make_url

    return make_url(str(url))


def _stable_json(kwargs: dict[str, Any]) -> str:
    return json.dumps(kwargs, sort_keys=True, default=_stable)


def _stable(value: Any) -> str:
    """Classes by name; other objects by type and identity (a new object is a new engine)."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return f"{type(value).__module__}.{type(value).__qualname__}@{id(value):x}"


# -- patching Superset -----------------------------------------------------------------


def patch(core: Any, hook: EngineHook) -> None:
    """Point ``core`` (``superset.models.core``) at ``hook``; idempotent."""
    core.create_engine = hook
    database = core.Database
    original = database._get_sqla_engine
    if getattr(original, "__enginehouse_wrapped__", False):
        return
    database._get_sqla_engine = _recording(original)
    if hasattr(database, "get_sqla_engine"):
        database.get_sqla_engine = _sourced(database.get_sqla_engine)


def _sourced(original: Callable[..., Any]) -> Callable[..., Any]:
    """``get_sqla_engine`` with the query's source in :data:`request_source` while inside."""
    signature = inspect.signature(original)

    @contextlib.contextmanager
    @functools.wraps(original)
    def get_sqla_engine(self: Any, *args: Any, **kwargs: Any) -> Iterator[Engine]:
        source = signature.bind(self, *args, **kwargs).arguments.get("source")
        token = request_source.set(source_name(source))
        try:
            with original(self, *args, **kwargs) as engine:
                yield engine
        finally:
            with contextlib.suppress(ValueError):  # left in another context: nothing to undo
                request_source.reset(token)

    get_sqla_engine.__enginehouse_wrapped__ = True  # type: ignore[attr-defined]
    return get_sqla_engine


def source_name(source: Any) -> str | None:
    """A ``QuerySource`` (or its name) as a ``connection_shares`` key; None: ``"*"``.

    With no source given, Superset's own guess from the request's referrer
    (dashboard, explore, SQL Lab), as it does for ``DB_CONNECTION_MUTATOR``.
    """
    if source is None:
        source = _source_from_request()
    if source is None:
        return None
    return str(getattr(source, "name", source))


def _source_from_request() -> Any:
    try:
        from superset.utils.core import get_query_source_from_request
    except ImportError:  # not inside Superset (a stand-in in tests)
        return None
    try:
        return get_query_source_from_request()
    except RuntimeError:  # no request context (a Celery task, a CLI command)
        return None


def _recording(original: Callable[..., Engine]) -> Callable[..., Engine]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _get_sqla_engine(self: Any, *args: Any, **kwargs: Any) -> Engine:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        token = REQUEST.set(
            EngineRequest(
                database=self,
                catalog=arguments.get("catalog"),
                schema=arguments.get("schema"),
                nullpool=bool(arguments.get("nullpool", True)),
            )
        )
        try:
            return original(self, *args, **kwargs)
        finally:
            REQUEST.reset(token)

    _get_sqla_engine.__enginehouse_wrapped__ = True  # type: ignore[attr-defined]
    return _get_sqla_engine
