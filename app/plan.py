"""From a request (database, catalog, schema, user, source) to an engine plan.

Runs in the caller's thread, so user hooks (the connection mutator) can
never block or crash an actor, and a miss costs the registry only a lookup.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL

from app.adapters import adapter_for
from app.errors import EngineCreationError, EngineManagerError, InvalidSpecError
from app.settings import ManagerSettings, Mode
from app.specs import DatabaseSpec
from messages.registry import EnginePlan, RequestKey

POOL_CLASS_BY_NAME: dict[str, type[sa_pool.Pool]] = {
    "queue": sa_pool.QueuePool,
    "singleton": sa_pool.SingletonThreadPool,
    "assertion": sa_pool.AssertionPool,
    "null": sa_pool.NullPool,
    "static": sa_pool.StaticPool,
}
_QUEUE_ONLY = ("pool_size", "max_overflow", "pool_timeout", "pool_use_lifo")


def request_key(
    spec: DatabaseSpec,
    settings: ManagerSettings,
    *,
    catalog: str | None,
    schema: str | None,
    user: str | None,
    source: str | None,
) -> RequestKey:
    """The hit-path key: cheap tuple, user and source only where they matter."""
    mutated = settings.connection_mutator is not None
    return RequestKey(
        spec.id,
        spec.fingerprint,
        catalog,
        schema,
        user if (spec.impersonate_user or mutated) else None,
        source if mutated else None,
    )


def build_plan(spec: DatabaseSpec, key: RequestKey, settings: ManagerSettings) -> EnginePlan:
    """Engine URL and arguments for ``key``: extra, then adapter, then mutator."""
    kwargs = _engine_kwargs(spec, settings.mode)
    user = key.user if spec.impersonate_user else None
    adapter = adapter_for(spec.backend)
    url, kwargs = adapter.adjust(
        spec.sqlalchemy_url(), kwargs, catalog=key.catalog, schema=key.schema, user=user
    )
    if settings.connection_mutator is not None:
        url, kwargs = _mutate(settings, url, kwargs, key)
    return EnginePlan(
        engine_key=_digest(spec.id, spec.fingerprint, url, kwargs),
        database_id=spec.id,
        fingerprint=spec.fingerprint,
        url=url,
        kwargs=kwargs,
        catalog=key.catalog,
        schema=key.schema,
        user=user,
        tunnel=spec.ssh_tunnel,
    )


def _engine_kwargs(spec: DatabaseSpec, mode: Mode) -> dict[str, Any]:
    params = spec.engine_params
    name = params.pop("poolclass", None)
    if mode is Mode.NEW:
        for option in _QUEUE_ONLY:
            params.pop(option, None)
        params["poolclass"] = sa_pool.NullPool
    elif name is not None:
        params["poolclass"] = POOL_CLASS_BY_NAME[name]
    return params


def _mutate(
    settings: ManagerSettings, url: URL, kwargs: dict[str, Any], key: RequestKey
) -> tuple[URL, dict[str, Any]]:
    mutator = settings.connection_mutator
    assert mutator is not None
    try:
        result = mutator(url, kwargs, user=key.user, source=key.source)
    except EngineManagerError:
        raise
    except Exception as exc:
        raise EngineCreationError(
            "connection_mutator", f"raised {type(exc).__name__}", database_id=key.database_id
        ) from exc
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], URL)):
        raise InvalidSpecError("connection_mutator", "must return (sqlalchemy URL, engine_kwargs)")
    if not isinstance(result[1], dict):
        raise InvalidSpecError("connection_mutator", "engine_kwargs must be a dict")
    return result[0], result[1]


def _stable(value: Any) -> str:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return f"{getattr(value, '__module__', '?')}.{name}@{id(value):x}"
    return repr(value)


def _digest(database_id: Any, fingerprint: str, url: URL, kwargs: dict[str, Any]) -> str:
    text = json.dumps(
        [repr(database_id), fingerprint, url.render_as_string(hide_password=False), kwargs],
        sort_keys=True,
        default=_stable,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]
