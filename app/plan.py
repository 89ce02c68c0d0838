"""From a request (database, catalog, schema, user, source) to an engine plan.

Runs in the caller's thread, so user hooks (the connection mutator) can
never block or crash an actor, and a miss costs the registry only a lookup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pydantic import SecretStr
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL

from enginehouse import compat, credentials
from enginehouse.adapters import DialectAdapter, adapter_for, merge_encrypted_extra
from enginehouse.budgeted_pool import BudgetedQueuePool
from enginehouse.errors import EngineCreationError, EngineManagerError, InvalidSpecError
from enginehouse.messages.registry import EnginePlan, RequestKey
from enginehouse.settings import ManagerSettings, Mode
from enginehouse.shares import pool_argument as shares_argument
from enginehouse.specs import DatabaseSpec, check_engine_params

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
    access_token: object = None,
) -> RequestKey:
    """The hit-path key: cheap tuple, user and source only where they matter.

    An access token makes the engine the user's own (the token itself is
    never part of the key: a refreshed token finds the same engine).
    """
    mutated = settings.connection_mutator is not None
    if access_token is not None and user is None:
        raise InvalidSpecError("user", "required with access_token (a token is one user's)")
    return RequestKey(
        spec.id,
        spec.fingerprint,
        catalog,
        schema,
        user if (spec.impersonate_user or mutated or access_token is not None) else None,
        source if mutated else None,
    )


def build_plan(
    spec: DatabaseSpec,
    key: RequestKey,
    settings: ManagerSettings,
    *,
    access_token: str | SecretStr | None = None,
) -> EnginePlan:
    """Engine URL and arguments for ``key``: extra and encrypted extra, adapter, mutator.

    An engine of one user (``key.user`` set) gets a token holder: the access
    token is placed at connect time, never in the plan (see enginehouse.credentials).
    """
    adapter = adapter_for(spec.backend)
    params, redact = _with_encrypted_extra(spec, settings, adapter)
    kwargs = _engine_kwargs(params, settings.mode)
    user = _impersonated(key.user, settings) if spec.impersonate_user else None
    url, kwargs = adapter.adjust(
        spec.sqlalchemy_url(), kwargs, catalog=key.catalog, schema=key.schema, user=user
    )
    if settings.connection_mutator is not None:
        url, kwargs = _mutate(settings, url, kwargs, key)
    kwargs = compat.pool_defaults_of_sqlalchemy_2(url, kwargs)
    cap = spec.extra.get("max_connections") or settings.default_max_connections
    kwargs = _budgeted(url, kwargs, cap, _shares(spec))
    if access_token is not None and not adapter.supports_impersonation:
        raise InvalidSpecError("access_token", f"the {spec.backend} adapter takes no user token")
    if key.user is not None:
        holder = credentials.TokenHolder(adapter, key.user, access_token)
        kwargs = credentials.attach(kwargs, holder)
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
        redact=redact,
        max_connections=spec.extra.get("max_connections"),
    )


def _with_encrypted_extra(
    spec: DatabaseSpec, settings: ManagerSettings, adapter: DialectAdapter
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Engine parameters with the secret ones merged, and the texts errors must mask."""
    params = spec.engine_params
    if spec.encrypted_extra is None:
        return params, ()
    secret = spec.decrypted_extra(settings.encrypted_extra_decryptor)
    merge = getattr(adapter, "merge_encrypted_extra", merge_encrypted_extra)
    merged: dict[str, Any] = merge(params, secret)
    try:
        check_engine_params(merged)
    except InvalidSpecError as exc:
        # Name the field; only the pool class check quotes a value, and it may be a secret.
        field = "encrypted_extra." + exc.field.removeprefix("extra.")
        reason = "unknown pool class" if field.endswith(".poolclass") else exc.reason
        raise InvalidSpecError(field, reason) from None
    # SQLAlchemy quotes unknown argument names in its errors: mask keys and values.
    return merged, tuple(sorted(_texts(secret), key=len, reverse=True))


_STRUCTURE = frozenset({"engine_params", "connect_args"})  # our vocabulary, not secrets


def _texts(value: Any) -> set[str]:
    if isinstance(value, dict):
        found = {str(key) for key in value if key not in _STRUCTURE}
        for item in value.values():
            found |= _texts(item)
        return found
    if isinstance(value, list):
        return set().union(*map(_texts, value))
    # Shorter texts (ports, flags) would mask half a message and protect nothing.
    return {value} if isinstance(value, str) and len(value) >= 4 else set()


def _impersonated(user: str | None, settings: ManagerSettings) -> str | None:
    if user is not None and settings.impersonate_with_email_prefix:
        return user.split("@", 1)[0] or user
    return user


def _engine_kwargs(params: dict[str, Any], mode: Mode) -> dict[str, Any]:
    name = params.pop("poolclass", None)
    if mode is Mode.NEW:
        for option in _QUEUE_ONLY:
            params.pop(option, None)
        params["poolclass"] = sa_pool.NullPool
    elif name is not None:
        params["poolclass"] = POOL_CLASS_BY_NAME[name]
    return params


def with_budgeted_pool(plan: EnginePlan, settings: ManagerSettings) -> EnginePlan:
    """``plan`` (built by an integration, not :func:`build_plan`) with the budget's pool class.

    The same rule as :func:`build_plan`'s: a capped database's QueuePool, or one
    with ``plan.connection_shares``, becomes a BudgetedQueuePool; the engine key
    stays (the rule is a function of it).
    """
    cap = plan.max_connections or settings.default_max_connections
    shares = dict(plan.connection_shares) if plan.connection_shares else None
    kwargs = _budgeted(plan.url, dict(plan.kwargs), cap, shares)
    return dataclasses.replace(plan, kwargs=kwargs)


def _budgeted(
    url: URL, kwargs: dict[str, Any], cap: int | None, shares: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A capped database's QueuePool becomes a BudgetedQueuePool (the budget's pool class).

    So does one with ``connection_shares`` (its cap: the budget's, else the
    pool's own size), which the pool receives to share its connections by source.
    Other pool classes (NullPool in NEW mode, SingletonThreadPool, StaticPool...)
    keep theirs; the budget caps their connects instead (enginehouse.budget_client).
    """
    if (cap is None and shares is None) or "pool" in kwargs:
        return kwargs
    poolclass = kwargs.get("poolclass") or _dialect_pool_class(url)
    if poolclass is not sa_pool.QueuePool:
        return kwargs
    if shares is not None:
        return {**kwargs, "poolclass": BudgetedQueuePool, "connection_shares": shares}
    return {**kwargs, "poolclass": BudgetedQueuePool}


def _shares(spec: DatabaseSpec) -> dict[str, Any] | None:
    """``extra.connection_shares`` as the pool's argument, or None."""
    shares = spec.extra.get("connection_shares")
    return shares_argument(spec.id, shares) if shares else None


def _dialect_pool_class(url: URL) -> type[sa_pool.Pool] | None:
    """The pool class the URL's dialect picks by itself (None: unknown, create_engine will say)."""
    try:
        dialect: Any = url.get_dialect()  # (typed as Dialect, which leaves get_pool_class out)
        pool_class: type[sa_pool.Pool] = dialect.get_pool_class(url)
    except Exception:
        return None
    return pool_class


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
