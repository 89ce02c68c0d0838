"""Opening one SSH session to a bastion: TCP connect, host key check, authentication.

Every failure becomes a :class:`~enginehouse.errors.TunnelError` naming the bastion and
the step (or an :class:`~enginehouse.errors.InvalidSpecError` naming the field for
unusable input), never carrying a secret, and never leaving a socket or a
paramiko thread behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from enginehouse.actors.host_keys import pin_host_key, verify_host_key
from enginehouse.errors import InvalidSpecError, TunnelError
from enginehouse.specs import SSHTunnelSpec

log = logging.getLogger("enginehouse.tunnel")

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


def connect(
    spec: SSHTunnelSpec,
    key: paramiko.PKey | None,
    timeout: float,
    *,
    known_hosts: Path | None = None,
    dead_after: float = 30.0,
) -> paramiko.Transport:
    """An authenticated transport to the bastion, each step bounded by ``timeout``.

    ``known_hosts``: the shared known_hosts file (``ssh_known_hosts_file``) that
    host-key checks read and pin-first pins go to (after authentication).
    ``dead_after``: seconds after which the kernel gives up on a bastion that
    stopped acknowledging (TCP keepalive and ``TCP_USER_TIMEOUT``).
    """
    bastion = spec.bastion
    try:
        sock = open_socket(spec.server_address, spec.server_port, timeout, dead_after)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TunnelError(f"cannot reach bastion {bastion}: {reason}") from None
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
        try:
            # paramiko's start_client returns, rather than raises, when its timeout ends
            # the key exchange early; then there is no server key yet.
            server_key = transport.get_remote_server_key()
        except (paramiko.SSHException, EOFError, OSError):
            raise TunnelError(
                f"SSH handshake with bastion {bastion} did not complete within {timeout:g}s"
            ) from None
        to_pin = verify_host_key(spec, server_key, known_hosts)
        _authenticate(spec, transport, key)
        if to_pin:
            pin_host_key(spec, server_key, known_hosts)
    except BaseException:
        transport.close()
        sock.close()
        if transport.is_alive():  # leave no thread behind
            transport.join(timeout)
        raise
    transport.set_keepalive(0)  # our Heartbeat sends keepalives and waits for the replies
    return transport


class QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it reads at once (Linux ``TCP_QUICKACK``), while eager.

    Why: OpenSSH's sshd leaves Nagle on for a session without a terminal, so
    when it sends two small packets in a row (a channel's close, then the next
    channel's open confirmation) the second waits for our ACK of the first,
    which Linux delays up to 40 ms. That was the ~45 ms stall on 14% of new
    connections opened back to back (issue 14). The kernel clears the flag
    after use, hence one ``setsockopt`` per read, but only for a short while
    after a channel opens or closes (:meth:`eager`): re-arming it on every read
    of a busy pooled connection cost ~20 us per round trip (extra ACK packets).
    """

    eager_until = 0.0

    def eager(self, seconds: float = 0.25) -> None:
        """Acknowledge at once for the next ``seconds`` (a channel opens or closes)."""
        self.eager_until = time.monotonic() + seconds
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if self.eager_until and time.monotonic() < self.eager_until:
            with contextlib.suppress(OSError):
                self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data


def quick_acks_for_a_while(transport: object) -> None:
    """Before a channel opens or after one closed: see :class:`QuickAckSocket`."""
    sock = getattr(transport, "sock", None)
    if isinstance(sock, QuickAckSocket):
        sock.eager()


_QUICKACK: int = getattr(socket, "TCP_QUICKACK", 0)


def open_socket(host: str, port: int, timeout: float, dead_after: float) -> socket.socket:
    """A connected TCP socket to the bastion, tuned for small packets and a dead peer.

    TCP_NODELAY (no Nagle on our side), quick ACKs (see :class:`QuickAckSocket`),
    TCP keepalive and ``TCP_USER_TIMEOUT``: a bastion whose host vanished (no
    RST) is given up by the kernel after about ``dead_after`` seconds, which
    ends every relay over it.
    """
    plain = socket.create_connection((host, port), timeout=timeout)
    sock: socket.socket = plain
    if _QUICKACK:
        sock = QuickAckSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(int(dead_after / 3), 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", max(idle // 3, 1)),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(dead_after * 1000)),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return sock


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
