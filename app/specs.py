"""Immutable descriptions of the databases and bastions the manager connects to.

Secrets enter as :class:`pydantic.SecretStr` and stay masked: a password
written inside ``uri`` is moved into ``password`` during validation, so
``spec.uri`` is always safe to log.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote_plus

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from enginehouse.adapters import has_adapter
from enginehouse.errors import EngineManagerError, InvalidSpecError

POOL_CLASSES = ("queue", "singleton", "assertion", "null", "static")
"""Names accepted in ``extra.engine_params.poolclass`` (Superset's vocabulary)."""

DAY = 86_400
# Numeric engine parameters: (integers only?, smallest, largest). SQLAlchemy takes any
# number, but NaN makes a full pool's checkout spin, Infinity overflows a wait or a
# budget; the upper bounds are far above any sane setting and far below an overflow.
ENGINE_NUMBERS: dict[str, tuple[bool, float, float]] = {
    "pool_size": (True, 0, 10_000),
    "max_overflow": (True, -1, 10_000),
    "pool_recycle": (False, -1, 365 * DAY),
    "pool_timeout": (False, 0, DAY),
}
MAX_CONNECTIONS = 100_000
"""Largest ``extra.max_connections`` (a connection budget)."""
CONNECT_TIMEOUT_MAX = DAY
"""Largest numeric ``connect_args`` value whose name ends in ``timeout`` (seconds)."""
MAX_DEPTH = 32
"""How deeply ``extra`` and ``encrypted_extra`` may nest objects and arrays."""
_INT_RANGE = 2**63
"""Integers in ``extra`` must fit a signed 64-bit integer (JSON readers beyond Python agree)."""


def raise_invalid(exc: ValidationError, prefix: str = "") -> InvalidSpecError:
    """Turn a pydantic error into ours without echoing the input (it may be a secret)."""
    first = exc.errors(include_input=False, include_url=False)[0]
    cause = first.get("ctx", {}).get("error")
    where = ".".join(str(part) for part in first["loc"])
    if isinstance(cause, InvalidSpecError):
        field = cause.field
        if where and field != where and not field.startswith((f"{where}.", f"{where}[")):
            field = f"{where}.{field}"  # a nested spec's error: ssh_tunnel.server_port
        return InvalidSpecError(prefix + field, cause.reason)
    field = where or "spec"
    message = first["msg"]
    if first.get("ctx", {}).get("error") is not None:
        message = str(first["ctx"]["error"])
    return InvalidSpecError(prefix + field, message)


class _Spec(BaseModel):
    """Shared behaviour: frozen, strict about unknown fields, errors of our own."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise raise_invalid(exc) from None

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """A copy; its fingerprint is recomputed (a changed copy is a new key)."""
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("fingerprint", None)  # cached_property: pydantic copies its value
        return copy

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise raise_invalid(exc) from None


class SSHTunnelSpec(_Spec):
    """How to reach a bastion. One bastion (address, port, user, credentials) = one session."""

    server_address: str = Field(min_length=1)
    server_port: int = Field(default=22, ge=1, le=65535)
    username: str = Field(min_length=1)
    password: SecretStr | None = None
    private_key: SecretStr | None = None
    private_key_password: SecretStr | None = None
    host_key: str | None = None
    host_key_policy: Literal["strict", "pin-first", "accept"] = "pin-first"

    @model_validator(mode="after")
    def _one_credential(self) -> SSHTunnelSpec:
        if self.password is None and self.private_key is None:
            raise ValueError("give a password or a private_key")
        if self.private_key_password is not None and self.private_key is None:
            raise ValueError("private_key_password given without a private_key")
        return self

    @property
    def bastion(self) -> str:
        """``user@host:port``: how the bastion is named in logs, stats and errors."""
        return f"{self.username}@{self.server_address}:{self.server_port}"

    @cached_property
    def fingerprint(self) -> str:
        """A digest of everything that makes this bastion's session differ."""
        return _digest(
            self.server_address,
            self.server_port,
            self.username,
            _reveal(self.password),
            _reveal(self.private_key),
            _reveal(self.private_key_password),
            self.host_key,
            self.host_key_policy,
        )

    def host_key_lines(self) -> list[str]:
        """known_hosts lines from ``host_key`` (a line, or a path to a file)."""
        if self.host_key is None:
            return []
        text = self.host_key.strip()
        if "\n" not in text and not text.startswith(("ssh-", "ecdsa-", "|")) and " " not in text:
            try:
                path = Path(text).expanduser()
                text = path.read_text() if path.is_file() else text
            except (OSError, RuntimeError, ValueError):  # ~nosuchuser, unreadable, bad bytes
                raise InvalidSpecError(
                    "ssh_tunnel.host_key", "names a known_hosts file that cannot be read"
                ) from None
        return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


class DatabaseSpec(_Spec):
    """One database as a BI tool stores it: an id, a SQLAlchemy URI and its ``extra``."""

    id: int | str
    uri: str
    password: SecretStr | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    """Superset's ``extra``: a dict, or a JSON string of one."""
    impersonate_user: bool = False
    ssh_tunnel: SSHTunnelSpec | None = None
    encrypted_extra: SecretStr | None = None
    """Secret engine parameters: a JSON object (dict or text), or the ciphertext that the
    ``encrypted_extra_decryptor`` setting turns into one. Masked everywhere."""
    query_secrets: SecretStr | None = None
    """The URI's secret query parameters (``?password=``, ``sslpassword``, tokens, keys,
    credentials: see :func:`is_secret_param`) as a JSON object, moved here from ``uri``
    during validation and put back by :meth:`sqlalchemy_url`."""

    @model_validator(mode="before")
    @classmethod
    def _move_secrets(cls, data: Any) -> Any:
        """Password and secret query parameters leave ``uri`` for SecretStr fields."""
        if not isinstance(data, dict) or not isinstance(data.get("uri"), str):
            return data
        try:
            url = make_url(data["uri"])
        except (ArgumentError, ValueError):
            return data  # the field validator names the problem
        secrets = {name: value for name, value in url.query.items() if is_secret_param(name)}
        if url.password is None and not secrets:
            return data
        data = dict(data)
        if url.password is not None:
            if data.get("password") is not None:
                raise InvalidSpecError("uri", "password given both inside uri and as password")
            data["password"] = SecretStr(str(url.password))
        if secrets:
            if data.get("query_secrets") is not None:
                raise InvalidSpecError(
                    "uri", "secret query parameters given both inside uri and as query_secrets"
                )
            data["query_secrets"] = SecretStr(json.dumps(secrets, sort_keys=True))
            url = url.difference_update_query(secrets)
        data["uri"] = url._replace(password=None).render_as_string(hide_password=False)
        return data

    @field_validator("query_secrets", mode="before")
    @classmethod
    def _check_query_secrets(cls, value: Any) -> Any:
        if value is None:
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        parsed = load_json(text, "query_secrets") if isinstance(text, str) else text
        if not isinstance(parsed, dict) or not all(map(_texts, parsed.values())):
            raise ValueError("must be a JSON object of texts (or lists of texts)")
        return SecretStr(json.dumps(parsed, sort_keys=True))

    @field_validator("uri")
    @classmethod
    def _known_dialect(cls, value: str) -> str:
        try:
            url = make_url(value)
        except (ArgumentError, ValueError):
            raise ValueError("not a valid SQLAlchemy URL (dialect+driver://...)") from None
        try:
            url.get_dialect()
        except NoSuchModuleError:
            # A backend with an adapter is known even before its driver is installed.
            if not has_adapter(url.get_backend_name()):
                raise ValueError(f"unknown dialect {url.drivername!r}") from None
        return value

    @field_validator("encrypted_extra", mode="before")
    @classmethod
    def _wrap_encrypted_extra(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        if isinstance(value, dict):
            check_json_tree(value, "encrypted_extra", name_keys=False)
            try:
                return SecretStr(json.dumps(value))
            except (TypeError, ValueError):  # the message may quote a secret value
                raise ValueError("must hold JSON values only") from None
        if isinstance(value, SecretStr | str):
            text = value.get_secret_value() if isinstance(value, SecretStr) else value
            _reject_non_object_json(text)
            return SecretStr(text)
        raise ValueError(f"must be a JSON object or text, got {type(value).__name__}")

    @field_validator("extra", mode="before")
    @classmethod
    def _parse_extra(cls, value: Any) -> Any:
        if value is None or value == "":
            return {}
        if isinstance(value, str | bytes):
            value = load_json(value, "extra")
        if not isinstance(value, dict):
            raise ValueError(f"must be a JSON object, got {type(value).__name__}")
        check_json_tree(value, "extra")
        return value

    @field_validator("extra")
    @classmethod
    def _check_engine_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        params = value.get("engine_params", {})
        if not isinstance(params, dict):
            raise ValueError("engine_params must be a JSON object")
        check_engine_params(params)
        _check_max_connections(value.get("max_connections"))
        check_connection_shares(value.get("connection_shares"))
        return value

    @property
    def engine_params(self) -> dict[str, Any]:
        """``extra["engine_params"]`` (a fresh copy: callers may change it)."""
        params = self.extra.get("engine_params", {})
        return json.loads(json.dumps(params, default=str)) if params else {}

    def sqlalchemy_url(self) -> URL:
        """The URL with its password, for ``create_engine`` only. Never log it."""
        url = make_url(self.uri)
        if self.password is not None:
            url = url.set(password=self.password.get_secret_value())
        if self.query_secrets is not None:
            url = url.update_query_dict(json.loads(self.query_secrets.get_secret_value()))
        return url

    def decrypted_extra(self, decryptor: Callable[[str], Any] | None = None) -> dict[str, Any]:
        """``encrypted_extra`` as a dict (empty without one), via ``decryptor`` if given.

        The result holds secrets: use it to build an engine, never log it.
        """
        if self.encrypted_extra is None:
            return {}
        value: Any = self.encrypted_extra.get_secret_value()
        if decryptor is not None:
            try:
                value = decryptor(value)
            except EngineManagerError:
                raise
            except Exception as exc:
                # Neither the message nor the chain: either may quote the plaintext.
                raise InvalidSpecError(
                    "encrypted_extra", f"encrypted_extra_decryptor raised {type(exc).__name__}"
                ) from None
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str | bytes):
            try:
                value = load_json(value, "encrypted_extra")
            except InvalidSpecError as exc:
                if "not valid JSON" not in exc.reason:
                    raise
                raise InvalidSpecError(
                    "encrypted_extra",
                    "not valid JSON (set encrypted_extra_decryptor if it is ciphertext)",
                ) from None
        if not isinstance(value, dict):
            raise InvalidSpecError(
                "encrypted_extra", f"must be a JSON object, got {type(value).__name__}"
            )
        check_json_tree(value, "encrypted_extra", name_keys=False)
        return value

    @property
    def backend(self) -> str:
        """The dialect's backend name (``postgresql``, ``mysql``, ``sqlite``...)."""
        return make_url(self.uri).get_backend_name()

    @cached_property
    def fingerprint(self) -> str:
        """A digest of every input that makes this database's engines differ.

        A changed URI, password, extra or tunnel gives a new fingerprint, so
        engines built from the old details are never handed out again.
        """
        return _digest(
            self.id,
            self.uri,
            _reveal(self.password),
            json.dumps(self.extra, sort_keys=True, default=repr),
            self.impersonate_user,
            self.ssh_tunnel.fingerprint if self.ssh_tunnel else None,
            # Only a digest of the secret parameters enters the fingerprint.
            _digest(_reveal(self.encrypted_extra)) if self.encrypted_extra else None,
            _digest(_reveal(self.query_secrets)) if self.query_secrets else None,
        )


def _check_max_connections(cap: Any) -> None:
    """``extra["max_connections"]``, the database's connection budget: an integer >= 1."""
    if cap is None:
        return
    check_number(cap, "extra.max_connections", 1, MAX_CONNECTIONS, integral=True)


MAX_SHARE_WEIGHT = 1_000_000
"""Largest weight in ``extra.connection_shares``."""
MAX_SHARE_TIMEOUT = 86_400
"""Largest per-source ``pool_timeout`` in ``extra.connection_shares`` (seconds)."""


def check_connection_shares(shares: Any) -> None:
    """``extra["connection_shares"]``: source -> weight, or -> {"weight", "pool_timeout"}.

    Weights are finite numbers > 0; ``pool_timeout`` (optional) a finite number >= 0.
    """
    if shares is None:
        return
    field = "extra.connection_shares"
    if not isinstance(shares, dict) or not shares:
        raise InvalidSpecError(field, "must be a non-empty JSON object (source -> weight)")
    for source, share in shares.items():
        where = f"{field}.{source}"
        if not source:
            raise InvalidSpecError(field, "a source name must not be empty")
        if not isinstance(share, dict):
            _check_weight(share, where)
            continue
        unknown = sorted(set(share) - {"weight", "pool_timeout"})
        if unknown:
            raise InvalidSpecError(f"{where}.{unknown[0]}", "unknown key (weight, pool_timeout)")
        if "weight" not in share:
            raise InvalidSpecError(f"{where}.weight", "required")
        _check_weight(share["weight"], f"{where}.weight")
        if share.get("pool_timeout") is not None:
            check_number(share["pool_timeout"], f"{where}.pool_timeout", 0, MAX_SHARE_TIMEOUT,
                         integral=False)


def _check_weight(weight: Any, field: str) -> None:
    check_number(weight, field, 0, MAX_SHARE_WEIGHT, integral=False)
    if weight <= 0:
        raise InvalidSpecError(field, "must be > 0")


def check_engine_params(params: dict[str, Any]) -> None:
    """Refuse engine parameters that SQLAlchemy would reject later, naming the field."""
    prefix = "extra.engine_params."
    poolclass = params.get("poolclass")
    if poolclass is not None and poolclass not in POOL_CLASSES:
        raise InvalidSpecError(
            prefix + "poolclass", f"unknown pool class {poolclass!r}; use one of {POOL_CLASSES}"
        )
    for name, (integral, low, high) in ENGINE_NUMBERS.items():
        if name in params:
            check_number(params[name], prefix + name, low, high, integral=integral)
    if poolclass in ("null", "static", "assertion"):
        for name in ("pool_size", "max_overflow", "pool_timeout"):
            if name in params:
                raise InvalidSpecError(
                    prefix + name, f"does not apply to poolclass {poolclass!r}"
                )
    connect_args = params.get("connect_args", {})
    if not isinstance(connect_args, dict):
        raise InvalidSpecError(prefix + "connect_args", "must be a JSON object")
    for name, value in connect_args.items():
        # Drivers take timeouts as numbers or text ("10"); a number must be one they can wait.
        if str(name).endswith("timeout") and isinstance(value, int | float):
            field = f"{prefix}connect_args.{name}"
            check_number(value, field, 0, CONNECT_TIMEOUT_MAX, integral=False)


def check_number(value: Any, field: str, low: float, high: float, *, integral: bool) -> None:
    """A finite number (an integer if ``integral``) in ``[low, high]``; else an error naming
    ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSpecError(field, "must be an integer" if integral else "must be a number")
    if integral and not isinstance(value, int):
        raise InvalidSpecError(field, "must be an integer")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidSpecError(field, "must be a finite number (not NaN or Infinity)")
    if value < low:
        raise InvalidSpecError(field, f"must be >= {low:g}")
    if value > high:
        raise InvalidSpecError(field, f"must be <= {high:g}")


def load_json(text: str | bytes, field: str) -> Any:
    """Parse JSON text; bad text, overlong integers and deep nesting name ``field``.

    ``NaN`` and ``Infinity`` parse (as Python does): :func:`check_json_tree` then names them.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidSpecError(field, f"not valid JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise InvalidSpecError(field, f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):  # an integer beyond Python's digit limit, bad UTF-8
        raise InvalidSpecError(field, "not valid JSON (bad number or encoding)") from None


def check_json_tree(value: Any, field: str, *, name_keys: bool = True) -> None:
    """Refuse NaN/Infinity, integers beyond 64 bits, non-text keys and nesting past MAX_DEPTH.

    With ``name_keys=False`` (secret documents) errors name ``field`` only, never a key.
    """
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        item, path, depth = stack.pop()
        where = path if name_keys else field
        if depth > MAX_DEPTH:
            raise InvalidSpecError(field, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidSpecError(where, "must be a finite number (not NaN or Infinity)")
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= _INT_RANGE:
            raise InvalidSpecError(where, "integer out of range (64 bits)")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidSpecError(where, "object keys must be strings")
                stack.append((child, f"{path}.{key}", depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def _reject_non_object_json(text: str) -> None:
    # JSON is checked now; text that does not parse may be ciphertext (checked on use).
    try:
        value = load_json(text, "encrypted_extra")
    except InvalidSpecError as exc:
        if "not valid JSON" in exc.reason:
            return
        raise
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got {type(value).__name__}")
    check_json_tree(value, "encrypted_extra", name_keys=False)


_SECRET_PARAM = re.compile(
    r"pass|pwd|secret|token|key|credential|auth(?!enticator)|signature|^sig$|cookie|jwt"
)
"""Query parameter names whose values are secrets: password, sslpassword, passphrase,
passcode, access_token, api_key, sslkey, private_key, credentials(_base64/_info),
client_secret, auth_token, sig (SAS)... ``authenticator`` (Snowflake) names a method."""

MASK = "***"


def is_secret_param(name: str) -> bool:
    """Whether a URI query parameter ``name`` holds a secret (its value is never shown)."""
    return _SECRET_PARAM.search(name.lower()) is not None


def masked_url(url: URL | str) -> str:
    """``url`` as text for logs, stats and errors: password and secret query values ``***``.

    The one way enginehouse renders a database URL anywhere a person may read it.
    """
    if isinstance(url, str):
        try:
            url = make_url(url)
        except (ArgumentError, ValueError):
            return "<not a valid URL>"
    text = url.set(query={}).render_as_string(hide_password=True)
    pairs = [
        f"{quote_plus(name)}={MASK if is_secret_param(name) else quote_plus(item)}"
        for name, value in url.query.items()
        for item in (value if isinstance(value, tuple) else (value,))
    ]
    return f"{text}?{'&'.join(pairs)}" if pairs else text


def url_secrets(url: URL) -> list[str]:
    """The secret texts in ``url`` (password, secret query values), longest first: to mask."""
    found = {str(url.password)} if url.password else set()
    for name, value in url.query.items():
        if is_secret_param(name):
            found.update(v for v in (value if isinstance(value, tuple) else (value,)) if v)
    return sorted(found, key=len, reverse=True)


def _texts(value: Any) -> bool:
    """A query parameter's value: a text, or a list of texts (a repeated parameter)."""
    if isinstance(value, list | tuple):
        return all(isinstance(item, str) for item in value)
    return isinstance(value, str)


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]
