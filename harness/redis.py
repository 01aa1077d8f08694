"""Private redis-servers on free ports: one node (`RedisProcess`), which a caller may kill
and start again, or a Redis Cluster of them (`RedisCluster`), whose masters it may kill."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from harness.server import free_port


def redis_answers(url: str) -> bool:
    """Whether a Redis at `url` answers PING within a second."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False


# Cluster node ports and their bus ports (port + 10000) stay below the kernel's range for
# outgoing connections (32768 and up on Linux), so no client socket can take one between
# the check here and the node binding it; ports handed out stay reserved in this process.
CLUSTER_PORTS = range(10_000, 22_000)
_claimed: set[int] = set()


def free_cluster_port() -> int:
    """A free port P whose cluster bus port, P + 10000, is free too, not handed out before."""
    for _ in range(1000):
        port = random.choice(CLUSTER_PORTS)
        if {port, port + 10_000} & _claimed:
            continue
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        _claimed.update((port, port + 10_000))
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisProcess:
    """redis-server on 127.0.0.1 and a free port, persisting nothing, at `url` (db `db`).

    `start()` returns once it answers and raises RuntimeError, in one line, when
    redis-server is not installed or does not start within 10 s. The port stays the
    same across `kill()` and `start()`, so clients see the same server come back."""

    def __init__(
        self, workdir: Path, db: int = 0, cluster_node_timeout_ms: int | None = None
    ) -> None:
        self.port = free_port() if cluster_node_timeout_ms is None else free_cluster_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/{db}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cluster_node_timeout_ms = cluster_node_timeout_ms  # None: not a cluster node

    def _cluster_args(self) -> list[str]:
        if self.cluster_node_timeout_ms is None:
            return []
        return [
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            str(self.cluster_node_timeout_ms),
            "--cluster-config-file",
            f"nodes-{self.port}.conf",
            "--logfile",
            f"redis-{self.port}.log",
            # the other shards keep serving while one has no master
            "--cluster-require-full-coverage",
            "no",
            # a replica takes over however long ago it last heard from its master
            "--cluster-replica-validity-factor",
            "0",
            "--repl-diskless-sync-delay",
            "0",
        ]

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.proc = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self._cluster_args(),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"private redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would; a no-op when it is not running."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def _command(port: int, *args: str) -> Any:
    """One command to the node on `port`."""
    client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1)
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]  # untyped in redis-py
    finally:
        client.close()


def cluster_info(port: int) -> dict[str, str]:
    """CLUSTER INFO of the node on `port`, as a dict; empty when it does not answer."""
    try:
        text = _command(port, "CLUSTER", "INFO")
    except redis.RedisError:
        return {}
    if isinstance(text, bytes):
        text = text.decode()
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in str(text).split() if ":" in line)


class RedisCluster:
    """A Redis Cluster on 127.0.0.1: `masters` masters, each with one replica, persisting
    nothing, seeded at `url`. `start()` returns once every node says cluster_state:ok.

    A short node timeout (1 s by default) makes a killed master's replica take over within
    seconds; the nodes serve the slots they have while another shard has no master."""

    def __init__(self, workdir: Path, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.workdir = workdir
        self.nodes = [
            RedisProcess(workdir, cluster_node_timeout_ms=node_timeout_ms)
            for _ in range(2 * masters)
        ]
        self.url = self.nodes[0].url

    def start(self, timeout_s: float = 60) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (make test installs it)")
        try:
            for node in self.nodes:
                node.start()
        except RuntimeError:
            self.stop()  # the nodes that did start
            raise
        created = subprocess.run(
            [cli, "--cluster", "create"]
            + [f"127.0.0.1:{node.port}" for node in self.nodes]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            timeout=timeout_s,
        )
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-300:]!r}")
        try:
            self.wait_ok(timeout_s)
        except RuntimeError:
            self.stop()
            raise

    def live_ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.proc is not None]

    def wait_ok(self, timeout_s: float = 60) -> None:
        """Return once every running node says cluster_state:ok and sees every slot
        served, and every replica is in sync with its master; RuntimeError after
        `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            infos = [cluster_info(port) for port in self.live_ports()]
            if all(
                info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == "16384"
                for info in infos
            ) and all(self._in_sync(port) for port in self.live_ports()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not ok after {timeout_s} s: {infos}")
            time.sleep(0.1)

    @staticmethod
    def _in_sync(port: int) -> bool:
        """A master, or a replica whose link to its master is up."""
        try:
            info = _command(port, "INFO", "replication")
        except redis.RedisError:
            return False
        return bool(info.get("role") == "master" or info.get("master_link_status") == "up")

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot now."""
        for port in self.live_ports():
            try:
                slot = int(_command(port, "CLUSTER", "KEYSLOT", key))
                ranges = _command(port, "CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            for start, end, master, *_ in ranges:
                if start <= slot <= end:
                    return int(master[1])
        raise RuntimeError(f"no node knows who serves {key!r}")

    def masters(self) -> list[int]:
        """The ports of the masters now serving slots."""
        for port in self.live_ports():
            try:
                ranges = _command(port, "CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            return sorted({int(master[1]) for _, _, master, *_ in ranges})
        raise RuntimeError("no node of the cluster answers")

    def wait_failover(self, port: int, timeout_s: float = 60) -> None:
        """Return once a replica serves the slots of the (killed) master on `port`, and
        the cluster is ok; RuntimeError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while port in self.masters():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from port {port} in {timeout_s} s")
            time.sleep(0.1)
        self.wait_ok(max(1.0, deadline - time.monotonic()))

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port`, as a crash would."""
        for node in self.nodes:
            if node.port == port:
                node.kill()

    def flush(self) -> None:
        """Empty every master."""
        for port in self.masters():
            client = redis.Redis(port=port)
            client.flushall()
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
