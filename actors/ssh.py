"""Opening one SSH session to a bastion: TCP connect, host key check, authentication.

Every failure becomes a :class:`~enginehouse.errors.TunnelError` naming the bastion and
the step (or an :class:`~enginehouse.errors.InvalidSpecError` naming the field for
unusable input), never carrying a secret, and never leaving a socket or a
paramiko thread behind.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import socket
from collections.abc import Callable

import paramiko
from paramiko.hostkeys import HostKeyEntry

from enginehouse.errors import InvalidSpecError, TunnelError
from enginehouse.specs import SSHTunnelSpec

log = logging.getLogger("enginehouse.tunnel")

HOST_KEY_PINS: dict[tuple[str, int], str] = {}
"""pin-first: ``(address, port) -> "type SHA256:..."`` of the first key seen in this process."""

_KEY_CLASSES: tuple[type[paramiko.PKey], ...] = (
    paramiko.Ed25519Key,
    paramiko.ECDSAKey,
    paramiko.RSAKey,
)


def load_private_key(spec: SSHTunnelSpec) -> paramiko.PKey | None:
    """The spec's private key as a paramiko key (Ed25519, ECDSA or RSA), or ``None``.

    Raises :class:`InvalidSpecError` for malformed text, a missing or a wrong passphrase.
    """
    if spec.private_key is None:
        return None
    text = spec.private_key.get_secret_value()
    passphrase = spec.private_key_password
    secret = None if passphrase is None else passphrase.get_secret_value()
    reasons: list[str] = []
    for cls in _KEY_CLASSES:
        try:
            return cls.from_private_key(io.StringIO(text), password=secret)
        except paramiko.PasswordRequiredException:
            raise InvalidSpecError(
                "ssh_tunnel.private_key_password",
                f"the private key for bastion {spec.bastion} is encrypted: give its passphrase",
            ) from None
        except (paramiko.SSHException, ValueError, TypeError) as exc:
            reasons.append(str(exc))
    if secret is not None and any(_wrong_passphrase(reason) for reason in reasons):
        raise InvalidSpecError(
            "ssh_tunnel.private_key_password",
            f"cannot decrypt the private key for bastion {spec.bastion}: wrong passphrase",
        )
    raise InvalidSpecError(
        "ssh_tunnel.private_key",
        "not a private key paramiko can read (Ed25519, ECDSA or RSA, OpenSSH or PEM format)",
    )


def _wrong_passphrase(reason: str) -> bool:
    return "checkints do not match" in reason or "Bad password" in reason


def key_fingerprint(key: paramiko.PKey) -> str:
    """``ssh-ed25519 SHA256:...``, as ``ssh-keygen -l`` prints it."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def expected_host_keys(spec: SSHTunnelSpec) -> list[paramiko.PKey]:
    """Keys that ``host_key`` lists for this bastion (all of them when none names it)."""
    try:
        lines = spec.host_key_lines()
    except OSError as exc:
        raise InvalidSpecError("ssh_tunnel.host_key", f"cannot read: {exc.strerror}") from None
    names = {spec.server_address, f"[{spec.server_address}]:{spec.server_port}"}
    named: list[paramiko.PKey] = []
    every: list[paramiko.PKey] = []
    for line in lines:
        entry, key = _parse_host_key_line(line)
        every.append(key)
        if entry is not None and _names_match(entry, names):
            named.append(key)
    if lines and not every:
        raise InvalidSpecError("ssh_tunnel.host_key", "no usable known_hosts line")
    return named or every


def _parse_host_key_line(line: str) -> tuple[HostKeyEntry | None, paramiko.PKey]:
    fields = line.split()
    try:
        if len(fields) >= 2 and "." not in fields[0] and fields[0].startswith(("ssh-", "ecdsa-")):
            # "type base64": a bare key, no host names.
            return None, paramiko.PKey.from_type_string(fields[0], base64.b64decode(fields[1]))
        entry = HostKeyEntry.from_line(line)
    except Exception:  # paramiko raises several types for a bad line
        entry = None
    if entry is None or entry.key is None:
        raise InvalidSpecError(
            "ssh_tunnel.host_key", "not a known_hosts line or a key paramiko reads"
        )
    return entry, entry.key


def _names_match(entry: HostKeyEntry, names: set[str]) -> bool:
    for host in entry.hostnames:
        if host.startswith("|1|"):
            if any(paramiko.HostKeys.hash_host(name, host) == host for name in names):
                return True
        elif host in names:
            return True
    return False


def verify_host_key(spec: SSHTunnelSpec, key: paramiko.PKey) -> None:
    """Apply ``host_key_policy`` to the key the bastion presented."""
    seen = key_fingerprint(key)
    expected = expected_host_keys(spec)
    if spec.host_key_policy == "accept":
        if not any(_same_key(key, known) for known in expected):
            log.warning(
                "host_key_policy=accept: not verifying bastion %s, which presented %s",
                spec.bastion,
                seen,
            )
        return
    if expected:
        if not any(_same_key(key, known) for known in expected):
            wanted = ", ".join(key_fingerprint(k) for k in expected)
            raise TunnelError(
                f"host key mismatch for bastion {spec.bastion}: it presented {seen}, "
                f"host_key expects {wanted}"
            )
        return
    if spec.host_key_policy == "strict":
        raise TunnelError(
            f"host key of bastion {spec.bastion} is unknown ({seen}) and host_key_policy is "
            "strict: give host_key (a known_hosts line or file)"
        )
    pinned = HOST_KEY_PINS.setdefault((spec.server_address, spec.server_port), seen)
    if pinned != seen:
        raise TunnelError(
            f"host key of bastion {spec.bastion} changed: it presented {seen}, but {pinned} "
            "was pinned when this process first connected (host_key_policy pin-first)"
        )


def _same_key(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return a.get_name() == b.get_name() and a.asbytes() == b.asbytes()


def connect(spec: SSHTunnelSpec, key: paramiko.PKey | None, timeout: float) -> paramiko.Transport:
    """An authenticated transport to the bastion, each step bounded by ``timeout``."""
    bastion = spec.bastion
    try:
        sock = socket.create_connection((spec.server_address, spec.server_port), timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TunnelError(f"cannot reach bastion {bastion}: {reason}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    _prefer_fast_ciphers(transport)
    transport.banner_timeout = timeout
    transport.handshake_timeout = timeout
    transport.auth_timeout = timeout
    try:
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TunnelError(f"SSH handshake with bastion {bastion} failed: {exc}") from None
        verify_host_key(spec, transport.get_remote_server_key())
        _authenticate(spec, transport, key)
    except BaseException:
        transport.close()
        sock.close()
        if transport.is_alive():  # leave no thread behind
            transport.join(timeout)
        raise
    transport.set_keepalive(0)  # the Janitor's health round sends our keepalives
    return transport


def _prefer_fast_ciphers(transport: paramiko.Transport) -> None:
    """AES-GCM first: one AEAD call per packet instead of a cipher and an HMAC."""
    options = transport.get_security_options()
    ciphers = tuple(options.ciphers)
    fast = tuple(
        name for name in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if name in ciphers
    )
    options.ciphers = fast + tuple(name for name in ciphers if name not in fast)


def _authenticate(
    spec: SSHTunnelSpec, transport: paramiko.Transport, key: paramiko.PKey | None
) -> None:
    tried: list[str] = []
    if key is not None:
        tried.append(f"{key.get_name()} key")
        if _try_auth(lambda: transport.auth_publickey(spec.username, key)):
            return
    if spec.password is not None and transport.is_active():
        tried.append("password")
        password = spec.password.get_secret_value()
        if _try_auth(lambda: transport.auth_password(spec.username, password)):
            return
    if not transport.is_active():
        raise TunnelError(f"bastion {spec.bastion} closed the connection during authentication")
    raise TunnelError(
        f"SSH authentication failed at bastion {spec.bastion} with the {' and '.join(tried)} "
        "(wrong password, or key not authorized for this user)"
    )


def _try_auth(attempt: Callable[[], object]) -> bool:
    try:
        attempt()
    except paramiko.AuthenticationException:
        return False
    except (paramiko.SSHException, EOFError, OSError):
        return False
    return True
