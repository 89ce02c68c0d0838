"""OAuth2 access tokens handed in by callers: kept out of keys, plans and logs.

A token belongs to one user's engine. That engine is built without it: a
``do_connect`` listener asks the dialect adapter where a token goes and
places the *current* one into each new DBAPI connection's arguments. A
token refresh is then one attribute store on the engine's
:class:`TokenHolder`: the cached engine is reused, never rebuilt or leaked.

The listener is attached by a SQLAlchemy ``CreateEnginePlugin`` named in the
engine arguments, so it exists from ``create_engine`` on, wherever the
engine is built (registry actor, NEW mode, behind a tunnel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr
from sqlalchemy import event
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import URL, CreateEnginePlugin, Dialect, Engine

from enginehouse.errors import InvalidSpecError

if TYPE_CHECKING:
    from enginehouse.adapters import DialectAdapter

PLUGIN_NAME = "enginehouse_access_token"
HOLDER_KWARG = "enginehouse_token_holder"


class TokenHolder:
    """The current access token of one user's engine, and the adapter that places it."""

    __slots__ = ("adapter", "owner", "secret")

    def __init__(
        self, adapter: DialectAdapter, owner: str, token: str | SecretStr | None = None
    ) -> None:
        self.adapter = adapter
        self.owner = owner
        self.secret: SecretStr | None = None
        if token is not None:
            self.set(token)

    def set(self, token: str | SecretStr) -> None:
        """Use ``token`` for the engine's next new connections (one attribute store)."""
        current = self.secret
        if isinstance(token, SecretStr):
            if not token.get_secret_value():
                raise InvalidSpecError("access_token", "must be a non-empty string")
            self.secret = token
        elif current is None or current.get_secret_value() != token:
            if not isinstance(token, str) or not token:
                raise InvalidSpecError("access_token", "must be a non-empty string")
            self.secret = SecretStr(token)  # a refresh; the same token again costs a compare

    def __repr__(self) -> str:
        # Engine keys digest the engine arguments' reprs: naming the owner keeps two
        # users' token engines apart even when their URLs are equal; the token stays out.
        return f"TokenHolder(owner={self.owner!r}, token=**********)"


def attach(kwargs: dict[str, Any], holder: TokenHolder) -> dict[str, Any]:
    """Engine arguments that make ``create_engine`` install ``holder``'s listener."""
    kwargs = dict(kwargs)
    kwargs["plugins"] = [*kwargs.get("plugins", ()), PLUGIN_NAME]
    kwargs[HOLDER_KWARG] = holder
    return kwargs


def holder_of(kwargs: Mapping[str, Any]) -> TokenHolder | None:
    """The holder an engine was built with (``None`` for engines shared by all users)."""
    holder: TokenHolder | None = kwargs.get(HOLDER_KWARG)
    return holder


class AccessTokenPlugin(CreateEnginePlugin):
    """Consumes the holder argument and listens to ``do_connect`` on the new engine."""

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        self.holder: TokenHolder = kwargs.pop(HOLDER_KWARG)

    def update_url(self, url: URL) -> URL:
        return url

    def engine_created(self, engine: Engine) -> None:
        event.listen(engine, "do_connect", _TokenPlacer(engine, self.holder))


class _TokenPlacer:
    """``do_connect`` listener: the current token into this connection's arguments."""

    def __init__(self, engine: Engine, holder: TokenHolder) -> None:
        self._engine = engine
        self._holder = holder
        self._cache: tuple[SecretStr, dict[str, Any]] | None = None

    def __call__(
        self, dialect: Dialect, record: Any, cargs: list[Any], cparams: dict[str, Any]
    ) -> None:
        secret = self._holder.secret
        if secret is None:
            return
        cached = self._cache
        if cached is None or cached[0] is not secret:
            cached = (secret, self._params(dialect, secret.get_secret_value()))
            self._cache = cached  # a single store: a racing connect just recomputes
        cparams.update(cached[1])

    def _params(self, dialect: Dialect, token: str) -> dict[str, Any]:
        # The engine's own URL: already adjusted for catalog, schema, user and tunnel.
        url = self._engine.url
        new_url, kwargs = self._holder.adapter.adjust(
            url, {"connect_args": {}}, catalog=None, schema=None, user=None, access_token=token
        )
        params: dict[str, Any] = {}
        if new_url != url:
            before = dialect.create_connect_args(url)[1]
            after = dialect.create_connect_args(new_url)[1]
            params = {k: v for k, v in after.items() if k not in before or before[k] != v}
        params.update(kwargs.get("connect_args") or {})
        return params


plugins.register(PLUGIN_NAME, __name__, "AccessTokenPlugin")
