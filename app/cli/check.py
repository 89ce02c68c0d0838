"""A "test connection" button: validate a spec, open its tunnel, connect, run a query.

Each step is timed and the first failure decides the exit code, so scripts
can tell a typo in a spec from a missing driver, a dead bastion, a wrong
password or a broken query. Every message is masked: no secret of the spec
is ever printed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import literal_column, select, text
from sqlalchemy.engine import Engine, make_url

from enginehouse.errors import (
    DriverNotInstalledError,
    EngineCreationError,
    EngineManagerError,
    InvalidSpecError,
    PoolExhaustedError,
    TunnelError,
)
from enginehouse.specs import DatabaseSpec, masked_url

T = TypeVar("T")


class ExitCode(IntEnum):
    """Process exit codes of ``enginehouse check`` (documented in docs/cli.md)."""

    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    DRIVER_MISSING = 3
    TUNNEL = 4
    CONNECT = 5
    QUERY = 6
    ENGINE = 7


# Connect-timeout argument per DBAPI driver, so an unreachable host fails in time.
_CONNECT_TIMEOUT_ARG = {
    "psycopg": "connect_timeout",
    "psycopg2": "connect_timeout",
    "pymysql": "connect_timeout",
    "mysqldb": "connect_timeout",
}


@dataclass
class Step:
    """One timed step: ``ok``, ``failed`` or ``skipped``."""

    name: str
    status: str
    seconds: float | None
    detail: str


@dataclass
class Report:
    """What ``check`` found, step by step."""

    source: str
    steps: list[Step] = field(default_factory=list)
    code: ExitCode = ExitCode.OK
    database_id: int | str | None = None

    @property
    def ok(self) -> bool:
        return self.code is ExitCode.OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "database_id": self.database_id,
            "ok": self.ok,
            "exit_code": int(self.code),
            "failure": None if self.ok else self.code.name.lower(),
            "steps": [asdict(step) for step in self.steps],
        }


class _Failed(Exception):
    def __init__(self, code: ExitCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class _Checker:
    """Runs the steps; collects the secrets it must mask as soon as it sees them."""

    def __init__(self, source: str, timeout: float) -> None:
        self.report = Report(source)
        self.timeout = timeout
        self.secrets: set[str] = set()

    def mask(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    @contextmanager
    def step(self, name: str, classify: Callable[[BaseException], ExitCode]) -> Iterator[Step]:
        current = Step(name, "ok", None, "")
        started = time.perf_counter()
        try:
            yield current
        except _Failed as failure:
            current.status, current.detail = "failed", self.mask(failure.detail)
            self.report.code = failure.code
            raise
        except Exception as exc:
            current.status, current.detail = "failed", self.mask(_describe(exc))
            self.report.code = classify(exc)
            raise _Failed(self.report.code, current.detail) from None
        finally:
            current.seconds = round(time.perf_counter() - started, 6)
            self.report.steps.append(current)

    def skip(self, name: str, detail: str) -> None:
        self.report.steps.append(Step(name, "skipped", None, detail))


def check_file(path: str | Path, **options: Any) -> Report:
    """Check the database spec stored as JSON in ``path`` (see :func:`check_data`)."""
    checker = _Checker(str(path), float(options.get("timeout", 10.0)))
    try:
        with checker.step("read", lambda _: ExitCode.BAD_INPUT) as step:
            data = _load(Path(path))
            step.detail = f"{Path(path).name}: {len(data)} fields"
    except _Failed:
        return checker.report
    options.pop("source", None)
    return _run(checker, data, **options)


def check_data(
    data: dict[str, Any],
    *,
    timeout: float = 10.0,
    catalog: str | None = None,
    schema: str | None = None,
    user: str | None = None,
    query: str | None = None,
    source: str = "<data>",
) -> Report:
    """Validate ``data`` as a :class:`DatabaseSpec`, then tunnel, connect and query."""
    return _run(
        _Checker(source, timeout),
        data,
        timeout=timeout,
        catalog=catalog,
        schema=schema,
        user=user,
        query=query,
    )


def _run(checker: _Checker, data: dict[str, Any], **options: Any) -> Report:
    _collect_raw_secrets(checker, data)
    with suppress(_Failed):  # the report already holds the failing step
        _steps(checker, data, **options)
    return checker.report


def _steps(
    checker: _Checker,
    data: dict[str, Any],
    *,
    timeout: float = 10.0,
    catalog: str | None = None,
    schema: str | None = None,
    user: str | None = None,
    query: str | None = None,
) -> None:
    from enginehouse.manager import EngineManager  # the actor system only starts when it is needed

    with checker.step("spec", _classify_spec) as step:
        _check_dialect(data)
        spec = DatabaseSpec.model_validate(data)
        checker.report.database_id = spec.id
        _collect_spec_secrets(checker, spec)
        step.detail = f"database {spec.id}: {spec.uri}"
    with checker.step("driver", lambda _: ExitCode.DRIVER_MISSING) as step:
        step.detail = _import_driver(spec)
    spec = _with_connect_timeout(spec, timeout)
    ask_timeout = max(10.0, timeout * 3)
    with EngineManager(mode="new", ask_timeout=ask_timeout, cleanup_interval=3600) as manager:
        name = "tunnel" if spec.ssh_tunnel is not None else "engine"
        if spec.ssh_tunnel is None:
            checker.skip("tunnel", "no ssh_tunnel in the spec")
        with checker.step(name, _classify_engine) as step:
            engine = manager.get(spec, catalog=catalog, schema=schema, user=user, source="check")
            step.detail = _engine_detail(engine, spec)
        try:
            _connect_and_query(checker, engine, query)
        finally:
            engine.dispose()


def _connect_and_query(checker: _Checker, engine: Engine, query: str | None) -> None:
    with checker.step("connect", _classify_connect) as step:
        connection = engine.connect()
        info = getattr(engine.dialect, "server_version_info", None)
        version = ".".join(str(part) for part in info) if info else ""
        step.detail = f"{engine.dialect.name} server {version}".rstrip()
    try:
        with checker.step("query", _classify_query) as step:
            statement: Any = text(query) if query else select(literal_column("1"))
            row = connection.execute(statement).first()
            step.detail = f"{query or 'SELECT 1'} -> {row[0] if row is not None else 'no rows'}"
            if query is None and (row is None or row[0] != 1):
                raise _Failed(ExitCode.QUERY, f"SELECT 1 returned {row!r}")
    finally:
        connection.close()


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _Failed(ExitCode.BAD_INPUT, f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _Failed(ExitCode.BAD_INPUT, f"{path.name}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        # exc.msg and the position only; the document itself may hold a password
        raise _Failed(
            ExitCode.BAD_INPUT, f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise _Failed(
            ExitCode.BAD_INPUT, f"{path.name}: must hold a JSON object, not {type(data).__name__}"
        )
    return data


def _check_dialect(data: dict[str, Any]) -> None:
    """An unknown dialect is a missing package (exit 3), not a typo in the spec."""
    uri = data.get("uri")
    if not isinstance(uri, str):
        return
    try:
        url = make_url(uri)
    except Exception:
        return  # the spec step names the problem
    try:
        url.get_dialect()
    except sa_exc.NoSuchModuleError:
        raise _Failed(
            ExitCode.DRIVER_MISSING,
            f"uri: no SQLAlchemy dialect {url.drivername!r} is installed",
        ) from None
    except Exception:
        return


def _import_driver(spec: DatabaseSpec) -> str:
    dialect = make_url(spec.uri).get_dialect()
    loader = getattr(dialect, "import_dbapi", None) or getattr(dialect, "dbapi", None)
    driver = make_url(spec.uri).get_driver_name()
    try:
        module = loader() if loader is not None else None
    except ImportError as exc:
        missing = getattr(exc, "name", None) or driver
        raise _Failed(
            ExitCode.DRIVER_MISSING,
            f"driver {driver!r} is not installed (cannot import {missing!r})",
        ) from None
    version = getattr(module, "__version__", None)
    return f"{driver} {version}" if version else driver


def _with_connect_timeout(spec: DatabaseSpec, timeout: float) -> DatabaseSpec:
    argument = _CONNECT_TIMEOUT_ARG.get(make_url(spec.uri).get_driver_name())
    if argument is None:
        return spec
    extra = json.loads(json.dumps(spec.extra, default=str))
    params = extra.setdefault("engine_params", {})
    connect_args = params.setdefault("connect_args", {})
    connect_args.setdefault(argument, max(1, round(timeout)))
    # A copy keeps every secret field (password, query secrets, encrypted_extra).
    copy: DatabaseSpec = spec.model_copy(update={"extra": extra})
    return copy


def _engine_detail(engine: Engine, spec: DatabaseSpec) -> str:
    url = masked_url(engine.url)
    if spec.ssh_tunnel is not None:
        return f"via {spec.ssh_tunnel.bastion}: {url}"
    return url


def _collect_raw_secrets(checker: _Checker, data: dict[str, Any]) -> None:
    """Secrets of the raw input, known before validation (which may fail on them)."""
    uri = data.get("uri")
    if isinstance(uri, str):
        try:
            password = make_url(uri).password
        except Exception:
            password = None
        if password:
            checker.secrets.add(str(password))
    _add_strings(checker, data.get("password"))
    tunnel = data.get("ssh_tunnel")
    if isinstance(tunnel, dict):
        for name in ("password", "private_key", "private_key_password"):
            _add_strings(checker, tunnel.get(name))


def _collect_spec_secrets(checker: _Checker, spec: DatabaseSpec) -> None:
    values = [spec.password]
    if spec.ssh_tunnel is not None:
        tunnel = spec.ssh_tunnel
        values += [tunnel.password, tunnel.private_key, tunnel.private_key_password]
    for value in values:
        if value is not None:
            _add_strings(checker, value.get_secret_value())


def _add_strings(checker: _Checker, value: Any) -> None:
    if isinstance(value, str) and value:
        checker.secrets.add(value)
        # a private key may be shown line by line by a library
        checker.secrets.update(line for line in value.splitlines() if len(line) >= 8)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        # the driver's own message; SQLAlchemy's wrapper appends the statement and a URL
        text = f"{type(exc.orig).__name__}: {exc.orig}"
    elif isinstance(exc, EngineManagerError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())  # one line, however the driver formats it


def _classify_spec(exc: BaseException) -> ExitCode:
    return ExitCode.BAD_INPUT if isinstance(exc, InvalidSpecError) else ExitCode.INTERNAL


def _classify_engine(exc: BaseException) -> ExitCode:
    if isinstance(exc, TunnelError):
        return ExitCode.TUNNEL
    if isinstance(exc, DriverNotInstalledError):
        return ExitCode.DRIVER_MISSING
    if isinstance(exc, InvalidSpecError):
        return ExitCode.BAD_INPUT
    if isinstance(exc, EngineCreationError):
        return ExitCode.ENGINE
    return ExitCode.INTERNAL


def _classify_connect(exc: BaseException) -> ExitCode:
    if isinstance(exc, TunnelError):
        return ExitCode.TUNNEL
    if isinstance(exc, sa_exc.DBAPIError | sa_exc.TimeoutError | PoolExhaustedError):
        return ExitCode.CONNECT
    if isinstance(exc, OSError):
        return ExitCode.CONNECT
    return ExitCode.INTERNAL


def _classify_query(exc: BaseException) -> ExitCode:
    if isinstance(exc, TunnelError):
        return ExitCode.TUNNEL
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return ExitCode.QUERY
    return ExitCode.INTERNAL
