"""Pytest plugin: no secret used by a test may ever be logged (or raised).

For the whole session a handler on the root logger (at DEBUG) records the
formatted message (and traceback) of every log record. At session end the
session fails if any record contains a known secret. The report names the
logger, the test that was running and the secret's index, never the secret.

Tests add the secrets they use with :func:`register_secret`; raised errors
and program output are checked on the spot with :func:`assert_no_secret`
(also offered as the ``assert_no_secret`` fixture).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest

SECRETS: set[str] = {
    "s3cr3t-pw",
    "hunter2-pw",
    "tunnel-s3cr3t",
    "key-passphrase-s3cr3t",
    "bad-pw-s3cr3t",
    "tunnel-pass-0123",  # tests/sshd_fixtures.py: the bastion user's password
    "key-phrase-4567",  # tests/sshd_fixtures.py: private key passphrase
}
"""Strings that must never appear in a log record, an error or CLI output."""

_MIN_LENGTH = 6  # shorter strings occur by chance; refuse them as secrets


def register_secret(*values: str) -> None:
    """Add secrets (at least 6 characters each) the whole session must never log."""
    for value in values:
        if not isinstance(value, str) or len(value) < _MIN_LENGTH:
            raise ValueError(f"a secret must be a string of >= {_MIN_LENGTH} characters")
        SECRETS.add(value)


def leaked(text: str) -> list[int]:
    """Indices (in sorted order of :data:`SECRETS`) of the secrets found in ``text``."""
    return [index for index, secret in enumerate(sorted(SECRETS)) if secret in text]


def exception_text(exc: BaseException) -> str:
    """Everything an exception would show: str, repr, args, its displayed chain."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [type(current).__name__, str(current), repr(current)]
        parts += [repr(arg) for arg in current.args]
        # Follow the chain a traceback would show ("raise ... from None" hides the context).
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return "\n".join(parts)


def assert_no_secret(value: object, *, what: str = "value") -> None:
    """Fail (without echoing it) if ``value`` (text, bytes or exception) holds a secret."""
    if isinstance(value, BaseException):
        text = exception_text(value)
    elif isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    else:
        text = str(value)
    found = leaked(text)
    if found:
        raise AssertionError(f"{what} contains {len(found)} known secret(s) (indices {found})")


@dataclass
class _Leak:
    logger: str
    level: str
    test: str
    secrets: list[int]


class _Recorder(logging.Handler):
    """Keeps each record's text for the end-of-session scan."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[tuple[str, str, str, str]] = []
        self.current_test = "(outside any test)"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed call: scan its raw parts instead
            text = f"{record.msg!r} {record.args!r}"
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            text += "\n" + exception_text(record.exc_info[1])
        if record.stack_info:
            text += "\n" + record.stack_info
        self.records.append((record.name, record.levelname, self.current_test, text))

    def leaks(self) -> list[_Leak]:
        return [
            _Leak(name, level, test, found)
            for name, level, test, text in self.records
            if (found := leaked(text))
        ]


_recorder = _Recorder()
_previous_level: int | None = None
_attached: list[logging.Logger] = []


def _attach_to_isolated_loggers() -> None:
    """Loggers with ``propagate=False`` never reach the root: record them directly."""
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue  # a PlaceHolder: no logger of that exact name yet
        if not logger.propagate and _recorder not in logger.handlers:
            logger.addHandler(_recorder)
            _attached.append(logger)


def pytest_sessionstart(session: pytest.Session) -> None:
    global _previous_level
    root = logging.getLogger()
    _previous_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(_recorder)
    _attach_to_isolated_loggers()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    _recorder.current_test = item.nodeid
    _attach_to_isolated_loggers()  # loggers configured by earlier tests or imports
    yield
    _recorder.current_test = "(outside any test)"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    root = logging.getLogger()
    root.removeHandler(_recorder)
    for logger in _attached:
        logger.removeHandler(_recorder)
    _attached.clear()
    if _previous_level is not None:
        root.setLevel(_previous_level)
    leaks = _recorder.leaks()
    scanned = len(_recorder.records)
    _recorder.records.clear()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write: Callable[[str], None] = print
    if reporter is not None:
        reporter.ensure_newline()
        write = reporter.write_line
    if not leaks:
        write(f"secret scan: {scanned} log records, {len(SECRETS)} secrets, no leak")
        return
    write(f"SECRET SCAN FAILED: {len(leaks)} of {scanned} log records contain a known secret")
    for line in _summarise(leaks):
        write("  " + line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _summarise(leaks: Iterable[_Leak]) -> list[str]:
    counts: dict[tuple[str, str, str, tuple[int, ...]], int] = {}
    for leak in leaks:
        key = (leak.logger, leak.level, leak.test, tuple(leak.secrets))
        counts[key] = counts.get(key, 0) + 1
    return [
        f"logger {logger!r} ({level}) during {test}: {n} record(s), secret indices {list(ids)}"
        for (logger, level, test, ids), n in sorted(counts.items())
    ]


@pytest.fixture(name="assert_no_secret")
def _assert_no_secret_fixture() -> Callable[..., None]:
    """The :func:`assert_no_secret` helper, for tests that prefer a fixture."""
    return assert_no_secret
