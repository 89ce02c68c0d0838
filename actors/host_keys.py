"""Checking a bastion's host key: known_hosts lines, a shared pin file, three policies.

Where keys come from:

- the spec's ``host_key`` (``SSHTunnelSpec.host_key``: known_hosts lines, bare
  ``type base64`` keys, or the path of a file of them), and
- the ``ssh_known_hosts_file`` setting: a known_hosts file shared by every
  process of the host. pin-first writes its pins there, so all workers of a
  web server agree on a bastion's key, and a restart keeps it.

Only lines that name the bastion count (``host``, ``[host]:port``, hashed
``|1|...`` names, as OpenSSH writes them), plus bare keys in ``host_key``,
which name no host and so mean "this bastion". A line for another host (an
alias such as ``ssh-gw``) parses but is never accepted for this bastion.
``@revoked`` lines refuse their key; ``@cert-authority`` lines are skipped
(certificates are not supported). Parsing is paramiko's ``HostKeyEntry``.

Pins are appended (one whole line per ``write`` on an ``O_APPEND`` file,
under ``flock`` so two processes pinning the same bastion at once agree) only
after authentication succeeded: a server that cannot prove it serves our
account does not get pinned.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry

from enginehouse.errors import InvalidSpecError, TunnelError
from enginehouse.specs import SSHTunnelSpec

log = logging.getLogger("enginehouse.tunnel")

HOST_KEY_PINS: dict[tuple[str, int], str] = {}
"""pin-first without a known_hosts file: ``(address, port) -> fingerprint``, this process only."""


def key_fingerprint(key: paramiko.PKey) -> str:
    """``ssh-ed25519 SHA256:...``, as ``ssh-keygen -l`` prints it."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def host_names(spec: SSHTunnelSpec) -> tuple[str, ...]:
    """How known_hosts names this bastion: ``[host]:port``, and ``host`` itself."""
    return (f"[{spec.server_address}]:{spec.server_port}", spec.server_address)


def pin_name(spec: SSHTunnelSpec) -> str:
    """The name a pin is written under (OpenSSH's form: bare host on port 22)."""
    if spec.server_port == 22:
        return spec.server_address
    return f"[{spec.server_address}]:{spec.server_port}"


@dataclass
class KnownKeys:
    """What the known_hosts lines say about one bastion."""

    accepted: list[paramiko.PKey] = field(default_factory=list)
    revoked: list[paramiko.PKey] = field(default_factory=list)
    other_hosts: set[str] = field(default_factory=set)

    def has(self, key: paramiko.PKey) -> bool:
        return any(same_key(key, known) for known in self.accepted)

    def is_revoked(self, key: paramiko.PKey) -> bool:
        return any(same_key(key, known) for known in self.revoked)


@dataclass(frozen=True)
class _Line:
    marker: str | None
    names: tuple[str, ...]  # empty for a bare key
    key: paramiko.PKey


def parse_line(line: str) -> _Line | None:
    """One known_hosts line (or a bare key); ``None`` for a line paramiko cannot read."""
    text = line.strip()
    marker = None
    if text.startswith("@"):
        marker, _, text = text.partition(" ")
        text = text.strip()
    fields = text.split()
    try:
        if len(fields) >= 2 and not _is_key_type(fields[1:2]) and _is_key_type(fields[:1]):
            # "type base64 [comment]": a bare key, no host (an alias such as "ssh-gw" is
            # a host name: the word after it is the key type)
            key = paramiko.PKey.from_type_string(fields[0], base64.b64decode(fields[1]))
            return _Line(marker, (), key)
        entry = HostKeyEntry.from_line(text)
    except Exception:  # paramiko raises several types for a bad line
        return None
    if entry is None or entry.key is None:
        return None
    return _Line(marker, tuple(entry.hostnames), entry.key)


def _is_key_type(words: list[str]) -> bool:
    """Whether the (one) word names a key type paramiko knows, such as ``ssh-ed25519``."""
    return bool(words) and words[0] in _KEY_TYPES


_KEY_TYPES = frozenset(
    name for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)
    for name in (*cls.identifiers(), "ssh-rsa")
)


def _names_match(names: Iterable[str], wanted: tuple[str, ...]) -> bool:
    for name in names:
        if name.startswith("|1|"):
            if any(paramiko.HostKeys.hash_host(want, name) == name for want in wanted):
                return True
        elif name in wanted:
            return True
    return False


def collect(lines: Iterable[_Line], wanted: tuple[str, ...], keys: KnownKeys) -> None:
    """Add what ``lines`` say about the host named ``wanted`` to ``keys``."""
    for line in lines:
        if line.marker == "@cert-authority":
            continue  # certificates are not supported: such a line vouches for nothing here
        if line.names and not _names_match(line.names, wanted):
            keys.other_hosts.update(n for n in line.names if not n.startswith("|"))
            continue
        if line.marker == "@revoked":
            keys.revoked.append(line.key)
        elif line.marker is None:
            keys.accepted.append(line.key)


def spec_lines(spec: SSHTunnelSpec) -> list[_Line]:
    """The spec's ``host_key`` lines, parsed; :class:`InvalidSpecError` for an unusable one."""
    try:
        texts = spec.host_key_lines()
    except OSError as exc:
        raise InvalidSpecError("ssh_tunnel.host_key", f"cannot read: {exc.strerror}") from None
    parsed = []
    for text in texts:
        line = parse_line(text)
        if line is None:
            raise InvalidSpecError(
                "ssh_tunnel.host_key", "not a known_hosts line or a key paramiko reads"
            )
        parsed.append(line)
    return parsed


def file_lines(path: Path | None) -> Iterator[_Line]:
    """Readable lines of a known_hosts file (a missing file has none; bad lines are skipped)."""
    if path is None:
        return
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TunnelError(f"cannot read ssh_known_hosts_file: {exc.strerror}") from None
    for raw in text.splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            line = parse_line(raw)
            if line is not None:
                yield line


def known_keys(spec: SSHTunnelSpec, known_hosts: Path | None) -> tuple[KnownKeys, KnownKeys]:
    """(from the spec's ``host_key``, from the known_hosts file) for this bastion."""
    wanted = host_names(spec)
    from_spec, from_file = KnownKeys(), KnownKeys()
    collect(spec_lines(spec), wanted, from_spec)
    collect(file_lines(known_hosts), wanted, from_file)
    return from_spec, from_file


@dataclass(frozen=True)
class HostKeyDecision:
    """What ``host_key_policy`` decides for a bastion before any key is seen.

    One decision with two mappings: :func:`verify_host_key` (paramiko, per key
    presented) and the OpenSSH transport's known_hosts file and
    ``StrictHostKeyChecking`` (``actors/openssh.HostKeyPlan``). ``mode`` is
    ``accept`` (any key; a warning when it is not the listed one), ``listed``
    (only ``expected.accepted``), ``refuse`` (``refusal`` says why) or ``pin``
    (an unknown bastion under pin-first).
    """

    mode: str
    revoked: list[paramiko.PKey]
    expected: KnownKeys
    from_spec: bool  # expected comes from the spec's host_key (else the shared file)
    refusal: str = ""

    def mismatch(self, spec: SSHTunnelSpec, known_hosts: Path | None, seen: str | None) -> str:
        """Why a key other than the listed ones is refused (``seen``: the one presented)."""
        wanted = ", ".join(key_fingerprint(k) for k in self.expected.accepted)
        if self.from_spec:
            presented = f"it presented {seen}, " if seen else ""
            bastion = spec.bastion
            return f"host key mismatch for bastion {bastion}: {presented}host_key expects {wanted}"
        presented = f"it presented {seen}, but " if seen else ""
        return (
            f"host key of bastion {spec.bastion} changed: {presented}ssh_known_hosts_file "
            f"({known_hosts}) lists {wanted} (host_key_policy {spec.host_key_policy})"
        )


def decide_host_keys(
    spec: SSHTunnelSpec, known_hosts: Path | None, seen: str | None = None
) -> HostKeyDecision:
    """The policy's decision for ``spec``'s bastion (``seen`` only words a refusal)."""
    from_spec, from_file = known_keys(spec, known_hosts)
    revoked = [*from_spec.revoked, *from_file.revoked]
    # The spec's own keys decide; the shared file is for bastions without them.
    given = spec.host_key is not None
    expected = from_spec if given else from_file

    def decision(mode: str, refusal: str = "") -> HostKeyDecision:
        return HostKeyDecision(mode, revoked, expected, given, refusal)

    if spec.host_key_policy == "accept":
        return decision("accept")
    if expected.accepted:
        return decision("listed")
    if given:
        others = ", ".join(sorted(from_spec.other_hosts)) or "none"
        return decision(
            "refuse",
            f"host_key lists no key for bastion {spec.bastion} (it names other hosts: {others}; "
            f"use {pin_name(spec)} as the host name, or a bare key)"
            + (f"; it presented {seen}" if seen else ""),
        )
    if spec.host_key_policy == "strict":
        return decision(
            "refuse",
            f"host key of bastion {spec.bastion} is unknown"
            + (f" ({seen})" if seen else "")
            + " and host_key_policy is strict: give host_key, or list it in ssh_known_hosts_file",
        )
    return decision("pin")


def verify_host_key(spec: SSHTunnelSpec, key: paramiko.PKey, known_hosts: Path | None) -> bool:
    """Apply ``host_key_policy`` to the key the bastion presented, before authentication.

    Answers True when the key is new and pin-first should pin it once
    authentication succeeds (:func:`pin_host_key`); raises ``TunnelError`` to refuse it.
    """
    seen = key_fingerprint(key)
    decided = decide_host_keys(spec, known_hosts, seen)
    if any(same_key(key, known) for known in decided.revoked):
        raise TunnelError(f"host key of bastion {spec.bastion} ({seen}) is marked @revoked")
    if decided.mode == "accept":
        if not decided.expected.has(key):
            log.warning(
                "host_key_policy=accept: not verifying bastion %s, which presented %s",
                spec.bastion,
                seen,
            )
        return False
    if decided.mode == "listed":
        if not decided.expected.has(key):
            raise TunnelError(decided.mismatch(spec, known_hosts, seen))
        return False
    if decided.mode == "refuse":
        raise TunnelError(decided.refusal)
    if known_hosts is None:
        return _check_memory_pin(spec, seen)
    return True


def _check_memory_pin(spec: SSHTunnelSpec, seen: str) -> bool:
    pinned = HOST_KEY_PINS.get((spec.server_address, spec.server_port))
    if pinned is not None and pinned != seen:
        raise TunnelError(
            f"host key of bastion {spec.bastion} changed: it presented {seen}, but {pinned} "
            "was pinned when this process first connected (host_key_policy pin-first)"
        )
    return pinned is None


def pin_host_key(spec: SSHTunnelSpec, key: paramiko.PKey, known_hosts: Path | None) -> None:
    """pin-first, after authentication: record the key (in the file when there is one).

    Under an exclusive ``flock`` of the file, the file is read again: when
    another process pinned a different key meanwhile, this connection is refused.
    """
    seen = key_fingerprint(key)
    if known_hosts is None:
        HOST_KEY_PINS.setdefault((spec.server_address, spec.server_port), seen)
        _check_memory_pin(spec, seen)
        return
    line = f"{pin_name(spec)} {key.get_name()} {key.get_base64()}\n".encode()
    try:
        known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        # A read-only home (some containers) must not take every tunnel down: pin in
        # this process only, as before the file existed, and say so.
        log.warning(
            "cannot write ssh_known_hosts_file %s (%s): pinning bastion %s in this process only",
            known_hosts,
            exc.strerror,
            spec.bastion,
        )
        pin_host_key(spec, key, None)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pinned = KnownKeys()
        collect(file_lines(known_hosts), host_names(spec), pinned)
        if pinned.accepted and not pinned.has(key):
            wanted = ", ".join(key_fingerprint(k) for k in pinned.accepted)
            raise TunnelError(
                f"host key of bastion {spec.bastion} changed: it presented {seen}, but "
                f"ssh_known_hosts_file pins {wanted} (host_key_policy pin-first)"
            )
        if not pinned.accepted:
            os.write(fd, line)  # one whole line, appended
            log.info("pinned host key of bastion %s: %s", spec.bastion, seen)
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def same_key(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return a.get_name() == b.get_name() and a.asbytes() == b.asbytes()


def default_known_hosts_file() -> Path:
    """``$XDG_STATE_HOME/enginehouse/known_hosts`` (default ``~/.local/state/...``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "enginehouse" / "known_hosts"
