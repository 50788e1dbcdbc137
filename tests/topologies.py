"""Redis topologies as real processes on loopback: a Sentinel-watched primary and its replica.

Every process is started here and stopped here by its PID; nothing is written outside the
test's own directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from loadtest.procs import Proc, free_port
from tests.helpers import port_open, redis_argv, redis_server_binary, wait_until

SERVICE = "routerprimary"
"""The primary's name in the sentinels' configuration (the URL's path)."""


@dataclass
class SentinelSet:
    """One primary, one replica, three sentinels (quorum 2)."""

    primary: Proc
    primary_port: int
    replica: Proc
    replica_port: int
    sentinel_ports: list[int]
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def primary_address(self) -> tuple[str, int] | None:
        """Where the sentinels say the primary is (the first sentinel that answers)."""
        for port in self.sentinel_ports:
            addr = ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            if addr:
                return str(addr[0]), int(addr[1])
        return None


def ask(port: int, *command: str) -> Any:
    """One command to the server on ``port``; ``None`` if it does not answer."""
    with (
        contextlib.suppress(redis.RedisError),
        redis.Redis(port=port, socket_timeout=1, decode_responses=True) as r,
    ):
        return r.execute_command(*command)
    return None


def _sentinel_ready(port: int) -> bool:
    """The sentinel on ``port`` sees the primary, its replica and the two other sentinels."""
    state = ask(port, "SENTINEL", "MASTER", SERVICE)
    if not state:
        return False
    info = dict(zip(state[::2], state[1::2], strict=True)) if isinstance(state, list) else state
    return int(info["num-slaves"]) >= 1 and int(info["num-other-sentinels"]) >= 2


def _replica_synced(port: int) -> bool:
    info = ask(port, "INFO", "replication")
    return bool(info) and info.get("master_link_status") == "up"


@contextlib.contextmanager
def sentinel_set(log_dir: Path) -> Iterator[SentinelSet]:
    """Start the set and wait until every sentinel sees the whole of it; stop it all after."""
    procs: list[Proc] = []
    env = dict(os.environ)
    try:
        pport, rport = free_port(), free_port()
        (log_dir / "primary").mkdir()
        (log_dir / "replica").mkdir()
        primary = Proc(
            f"redis-primary-{pport}", redis_argv(pport, log_dir / "primary"), env, log_dir
        )
        procs.append(primary)
        replica_argv = [
            *redis_argv(rport, log_dir / "replica"),
            "--replicaof",
            "127.0.0.1",
            str(pport),
        ]
        replica = Proc(f"redis-replica-{rport}", replica_argv, env, log_dir)
        procs.append(replica)
        wait_until(lambda: port_open(pport) and port_open(rport), 10, "primary and replica")
        wait_until(lambda: _replica_synced(rport), 10, "the replica to sync")
        sports = [free_port() for _ in range(3)]
        for port in sports:
            conf = log_dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {log_dir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {pport} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 500\n"
                f"sentinel failover-timeout {SERVICE} 2000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            argv = [redis_server_binary(), str(conf), "--sentinel"]
            procs.append(Proc(f"sentinel-{port}", argv, env, log_dir))
        for port in sports:
            wait_until(lambda p=port: _sentinel_ready(p), 20, f"sentinel {port} to see the set")
        yield SentinelSet(primary, pport, replica, rport, sports, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()
