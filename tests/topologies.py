"""Redis topologies as real processes on loopback: a Sentinel-watched primary and its
replica, a Redis Cluster, each plain or TLS-only (a CA made by the test, ACL users: the data
nodes' and the sentinels' own); and the traffic (openai SDK) their failover tests send.

Every process is started here and stopped here by its PID; nothing is written outside the
test's own directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import redis

from loadtest.procs import Proc, free_port, free_ports
from tests.helpers import (
    ADMIN_TOKEN,
    CLIENT_KEY,
    ENV,
    Cluster,
    Gateway,
    Mock,
    ctl,
    port_open,
    redis_argv,
    redis_server_binary,
    start_gateway,
    wait_until,
)
from tests.tls import Certs, acl_args, acl_lines

SERVICE = "routerprimary"
"""The primary's name in the sentinels' configuration (the URL's path)."""
PASSWORD = "sentinel-set-password-7c1e"
"""The sentinel set's data nodes require it (the URL carries it): printed nowhere."""
TLS_USER = "router-app"
TLS_PASSWORD = "tls-topology-password-4b9e"
"""A TLS topology's data nodes admit this ACL user only (``default`` is off)."""
SENTINEL_USER = "watcher"
SENTINEL_PASSWORD = "sentinel-own-password-91d2"
"""A TLS sentinel set's sentinels admit this ACL user only (and log in to each other as it)."""


@dataclass(frozen=True)
class Login:
    """How a test's own client logs in to a server: user, password, TLS (the test CA)."""

    username: str | None = None
    password: str | None = None
    certs: Certs | None = None

    def kwargs(self) -> dict[str, Any]:
        tls = self.certs.client_kwargs() if self.certs else {}
        return {"username": self.username, "password": self.password, **tls}


@dataclass
class SentinelSet:
    """One primary, one replica, three sentinels (quorum 2)."""

    primary: Proc
    primary_port: int
    replica: Proc
    replica_port: int
    sentinel_ports: list[int]
    procs: list[Proc] = field(default_factory=list)
    certs: Certs | None = None
    """The test CA of a TLS-only set (``None``: plain, as before)."""
    plain_sentinels: bool = False
    """With ``certs``: the sentinels answer clients on a plain port and want a password
    (``requirepass``) instead of their ACL user; they speak TLS to the data nodes and to each
    other (on a TLS port of their own)."""

    @property
    def data(self) -> Login:
        if self.certs:
            return Login(TLS_USER, TLS_PASSWORD, self.certs)
        return Login(password=PASSWORD)

    @property
    def sentinels(self) -> Login:
        if self.certs is None:
            return Login()
        if self.plain_sentinels:
            return Login(password=SENTINEL_PASSWORD)
        return Login(SENTINEL_USER, SENTINEL_PASSWORD, self.certs)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        if self.certs is None:
            return f"redis+sentinel://:{PASSWORD}@{hosts}/{SERVICE}/0"
        query = f"{self.certs.query()}&sentinel_password={SENTINEL_PASSWORD}"
        if self.plain_sentinels:
            query += "&sentinel_ssl=false"
        else:
            query += f"&sentinel_username={SENTINEL_USER}"
        return f"rediss+sentinel://{TLS_USER}:{TLS_PASSWORD}@{hosts}/{SERVICE}/0?{query}"

    def primary_addresses(self) -> set[tuple[str, int] | None]:
        """Where each sentinel says the primary is (``None``: it did not answer)."""
        found: set[tuple[str, int] | None] = set()
        for port in self.sentinel_ports:
            addr = ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE, login=self.sentinels)
            found.add((str(addr[0]), int(addr[1])) if addr else None)
        return found


def ask(port: int, *command: str, login: Login = Login()) -> Any:
    """One command to the server on ``port``, logged in as ``login`` says; ``None`` if it
    does not answer."""
    with (
        contextlib.suppress(redis.RedisError),
        redis.Redis(port=port, socket_timeout=1, decode_responses=True, **login.kwargs()) as r,
    ):
        return r.execute_command(*command)
    return None


def _sentinel_ready(port: int, login: Login) -> bool:
    """The sentinel on ``port`` sees the primary, its replica and the two other sentinels."""
    state = ask(port, "SENTINEL", "MASTER", SERVICE, login=login)
    if not state:
        return False
    info = dict(zip(state[::2], state[1::2], strict=True)) if isinstance(state, list) else state
    return int(info["num-slaves"]) >= 1 and int(info["num-other-sentinels"]) >= 2


def _replica_synced(port: int, login: Login) -> bool:
    info = ask(port, "INFO", "replication", login=login)
    return bool(info) and info.get("master_link_status") == "up"


def _data_auth(certs: Certs | None) -> list[str]:
    """A data node's options: who may log in, and how it logs in to its primary."""
    if certs is None:
        return ["--requirepass", PASSWORD, "--masterauth", PASSWORD]
    return [*acl_args(TLS_USER, TLS_PASSWORD), "--masteruser", TLS_USER,
            "--masterauth", TLS_PASSWORD]  # fmt: skip


def _sentinel_conf(
    port: int, log_dir: Path, primary_port: int, certs: Certs | None, plain: bool
) -> str:
    listen = [f"port {port}"]
    auth = [f"sentinel auth-pass {SERVICE} {PASSWORD}"]
    if certs is not None and plain:
        # clients on the plain port; the peers on the TLS one, which it announces to them (with
        # tls-replication a sentinel reaches everything over TLS: peers too); requirepass is
        # also what it logs in to its peers with
        peers = certs.server_lines(free_port())[1:]  # not "port 0"
        listen = [f"port {port}", *peers, f"requirepass {SENTINEL_PASSWORD}"]
    elif certs is not None:  # TLS only; its own ACL user, which it also logs in to peers as
        listen = [*certs.server_lines(port), *acl_lines(SENTINEL_USER, SENTINEL_PASSWORD),
                  f"sentinel sentinel-user {SENTINEL_USER}",
                  f"sentinel sentinel-pass {SENTINEL_PASSWORD}"]  # fmt: skip
    if certs is not None:
        auth = [f"sentinel auth-user {SERVICE} {TLS_USER}",
                f"sentinel auth-pass {SERVICE} {TLS_PASSWORD}"]  # fmt: skip
    lines = [
        *listen, "bind 127.0.0.1", f"dir {log_dir}",
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2", *auth,
        f"sentinel down-after-milliseconds {SERVICE} 500",
        f"sentinel failover-timeout {SERVICE} 2000", f"sentinel parallel-syncs {SERVICE} 1",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def sentinel_set(
    log_dir: Path, certs: Certs | None = None, plain_sentinels: bool = False
) -> Iterator[SentinelSet]:
    """Start the set and wait until every sentinel sees the whole of it; stop it all after.
    With ``certs``, every process speaks TLS only and admits ACL users only (but see
    ``SentinelSet.plain_sentinels``)."""
    procs: list[Proc] = []
    env = dict(os.environ)
    try:
        pport, rport, *sentinel_ports = free_ports(5)  # five different ports
        (log_dir / "primary").mkdir()
        (log_dir / "replica").mkdir()
        auth = _data_auth(certs)
        primary_argv = [*redis_argv(pport, log_dir / "primary", certs), *auth]
        primary = Proc(f"redis-primary-{pport}", primary_argv, env, log_dir)
        procs.append(primary)
        replica_argv = [
            *redis_argv(rport, log_dir / "replica", certs), *auth,
            "--replicaof", "127.0.0.1", str(pport),
        ]  # fmt: skip
        replica = Proc(f"redis-replica-{rport}", replica_argv, env, log_dir)
        procs.append(replica)
        found = SentinelSet(primary, pport, replica, rport, [], procs, certs, plain_sentinels)
        wait_until(lambda: port_open(pport) and port_open(rport), 10, "primary and replica")
        wait_until(lambda: _replica_synced(rport, found.data), 10, "the replica to sync")
        found.sentinel_ports = sentinel_ports
        for port in found.sentinel_ports:
            conf = log_dir / f"sentinel-{port}.conf"
            conf.write_text(_sentinel_conf(port, log_dir, pport, certs, plain_sentinels))
            argv = [redis_server_binary(), str(conf), "--sentinel"]
            procs.append(Proc(f"sentinel-{port}", argv, env, log_dir))
        for port in found.sentinel_ports:
            wait_until(
                lambda p=port: _sentinel_ready(p, found.sentinels), 20,
                f"sentinel {port} to see the set",
            )  # fmt: skip
        yield found
    finally:
        for proc in reversed(procs):
            proc.stop()


@dataclass
class ClusterSet:
    """A Redis Cluster of three primaries, each with one replica."""

    nodes: dict[int, Proc]
    """Every node's process by its port."""
    certs: Certs | None = None
    """The test CA of a TLS-only cluster with an ACL user (``None``: plain, no password)."""

    @property
    def login(self) -> Login:
        return Login(TLS_USER, TLS_PASSWORD, self.certs) if self.certs else Login()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in list(self.nodes)[:3])
        if self.certs is None:
            return f"redis+cluster://{hosts}"
        return f"rediss+cluster://{TLS_USER}:{TLS_PASSWORD}@{hosts}?{self.certs.query()}"

    def owner(self, key: str) -> int | None:
        """The port of the primary serving ``key``'s slot, as a live node says now."""
        for port, proc in self.nodes.items():
            if not proc.alive():
                continue
            slot = ask(port, "CLUSTER", "KEYSLOT", key, login=self.login)
            shards = ask(port, "CLUSTER", "SLOTS", login=self.login)
            if slot is None or not shards:
                continue
            for first, last, primary, *_ in shards:
                if int(first) <= int(slot) <= int(last):
                    return int(primary[1])
        return None

    def replica_of(self, primary_port: int) -> int:
        """The port of the replica following the primary on ``primary_port``."""
        for port in self.nodes:
            info = ask(port, "INFO", "replication", login=self.login)
            if info and info.get("role") == "slave" and int(info["master_port"]) == primary_port:
                return port
        raise LookupError(f"no replica follows {primary_port}")

    def healthy(self) -> bool:
        """Every live node says ``cluster_state:ok``."""
        for port, proc in self.nodes.items():
            if proc.alive():
                info = ask(port, "CLUSTER", "INFO", login=self.login)
                if not info or "cluster_state:ok" not in str(info):
                    return False
        return True

    def synced(self) -> bool:
        """Three replicas, each with its link to its primary up."""
        infos = [ask(p, "INFO", "replication", login=self.login) or {} for p in self.nodes]
        replicas = sum(info.get("role") == "slave" for info in infos)
        return replicas == 3 and all(i.get("master_link_status", "up") == "up" for i in infos)


@contextlib.contextmanager
def redis_cluster(log_dir: Path, certs: Certs | None = None) -> Iterator[ClusterSet]:
    """Start six cluster-enabled servers, join them (one replica per primary), and wait until
    every node says the cluster is ok; stop them all after. With ``certs``, the clients, the
    replication and the cluster bus all speak TLS only, and an ACL user is the only login."""
    env = dict(os.environ)
    nodes: dict[int, Proc] = {}
    tls: list[str] = []
    if certs is not None:
        tls = ["--tls-cluster", "yes", *_data_auth(certs)]
    try:
        ports = free_ports(12)  # six nodes' and their buses': twelve different ports
        for port, bus in zip(ports[:6], ports[6:], strict=True):
            d = log_dir / f"node-{port}"
            d.mkdir()
            argv = [
                *redis_argv(port, d, certs), "--cluster-enabled", "yes",
                "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "1000",
                # its bus port, else port + 10000: past 65535 for a high free port
                "--cluster-port", str(bus), *tls,
            ]  # fmt: skip
            nodes[port] = Proc(f"redis-node-{port}", argv, env, log_dir)

        def listening() -> bool:
            for proc in nodes.values():  # a node that could not start says why
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-2000:]}")
            return all(port_open(p) for p in nodes)

        wait_until(listening, 10, "the cluster's nodes")
        redis_cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        cli_env = env
        login: list[str] = []
        if certs is not None:  # the password from the environment: not on a command line
            login = ["--tls", "--cacert", str(certs.ca), "--user", TLS_USER]
            cli_env = {**env, "REDISCLI_AUTH": TLS_PASSWORD}
        create = [redis_cli, *login, "--cluster", "create", *(f"127.0.0.1:{p}" for p in nodes),
                  "--cluster-replicas", "1", "--cluster-yes"]  # fmt: skip
        subprocess.run(create, check=True, capture_output=True, timeout=60, env=cli_env)
        cluster = ClusterSet(nodes, certs)
        wait_until(cluster.healthy, 30, "cluster_state:ok on every node")
        wait_until(cluster.synced, 30, "every replica in sync")
        yield cluster
    finally:
        for proc in reversed(nodes.values()):
            proc.stop()


def chat(url: str, model: str, key: str = CLIENT_KEY) -> int:
    """One chat completion through the openai SDK; the HTTP status (no retries)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    except openai.APIStatusError as exc:
        return exc.status_code
    finally:
        client.close()
    return 200


def burst(gw: Gateway, model: str, n: int) -> Counter[int]:
    """``n`` requests alternating the replicas; the statuses counted."""
    urls = itertools.cycle(gw.urls)
    return Counter(chat(next(urls), model) for _ in range(n))


def status(url: str) -> str:
    try:
        return str(httpx.get(f"{url}/readyz", timeout=2).json()["status"])
    except httpx.HTTPError:
        return "unreachable"


class Traffic(threading.Thread):
    """Chat requests alternating the replicas until stopped; every status kept."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__(daemon=True)
        self.gw = gw
        self.statuses: Counter[int] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        urls = itertools.cycle(self.gw.urls)
        while not self.stop.is_set():
            self.statuses[chat(next(urls), "chat")] += 1

    def served(self) -> int:
        return sum(self.statuses.values())

    def end(self, more: int = 10) -> dict[int, int]:
        """Stop after ``more`` answers from now (traffic served after the episode); the
        5xx statuses seen, by status."""
        served = self.served()
        wait_until(lambda: self.served() >= served + more, 10, "traffic after")
        self.stop.set()
        self.join(30)
        return {s: n for s, n in self.statuses.items() if s >= 500}


def start_healthd(cluster: Cluster, config: Path) -> Proc:
    """One healthd on the gateway's config; waits until it serves /healthz."""
    port = free_port()
    argv = [sys.executable, "-m", "healthd.cli", "--config", str(config), "--port", str(port)]
    proc = cluster.start("healthd", argv, {**ENV, "REDIS_URL": ""})

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"healthd exited:\n{proc.output()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        return False

    wait_until(up, 20, "healthd to serve")
    return proc


def state(gw: Gateway) -> dict[str, Any]:
    """``routerctl state --json``."""
    return dict(json.loads(ctl(gw, "state", "--json")))


def healthd_leads_and_publishes(gw: Gateway) -> None:
    """healthd holds the lease and its probes are in Redis (``routerctl state``) and, through
    pub/sub, in both replicas' views (``/readyz``)."""

    def seen() -> bool:
        s = state(gw)
        up = all(p["health"] == "up" for p in s["providers"])
        views = [httpx.get(f"{u}/readyz", timeout=2).json()["providers"] for u in gw.urls]
        return (
            bool(s["healthd"]["leader"])
            and up
            and all(all(p["health"] == "up" for p in v.values()) for v in views)
        )

    wait_until(seen, 20, "healthd's probes in Redis and in both replicas")


def tenant_key_on_both_replicas(gw: Gateway, name: str) -> None:
    """A tenant created and a key issued on one replica (the registry, its channel) admit a
    request on the other."""
    first, second = gw.urls
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = httpx.post(f"{first}/admin/tenants", json={"name": name}, headers=headers, timeout=10)
    assert r.status_code == 201, r.text
    r = httpx.post(f"{first}/admin/tenants/{name}/keys", headers=headers, timeout=10)
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    wait_until(lambda: chat(second, "chat", key) == 200, 5, "the new key on the other replica")


RPM = 20
"""The RPM limit of the exactness checks' providers (the router's and the mock's own)."""
FAST = {"interval_s": 0.3, "timeout_s": 0.5, "rise": 2, "fall": 2}
"""healthd's probes, fast enough for a failover test."""


def topology_gateway(cluster: Cluster, tmp: Path, redis_url: str) -> Gateway:
    """Two replicas on ``redis_url``: route ``chat`` round robin over a, b, c; ``limited`` and
    ``limited-after`` each on one provider with an RPM limit (before and after a failover)."""
    mocks = [Mock(p, "--latency-ms", "5", health=FAST) for p in "abc"]
    mocks += [Mock(p, "--rpm", str(RPM), limits={"rpm": RPM}, health=FAST) for p in ("r1", "r2")]
    routes = [
        {"model": "chat", "strategy": "round_robin",
         "targets": [{"provider": p, "model": "m"} for p in "abc"]},
        {"model": "limited", "targets": [{"provider": "r1", "model": "m"}]},
        {"model": "limited-after", "targets": [{"provider": "r2", "model": "m"}]},
    ]  # fmt: skip
    return start_gateway(cluster, tmp, redis_url, mocks, routes, replicas=2)


def global_round_robin(gw: Gateway) -> dict[str, int]:
    """Round robin is one counter in Redis: each of a, b, c gets 20 of 60 requests (+-1) sent
    alternately to both replicas. Returns the providers' counts."""
    assert burst(gw, "chat", 60) == {200: 60}
    counts = gw.counts()
    assert all(abs(counts[p] - 20) <= 1 for p in "abc"), counts
    return counts


def exact_rpm(gw: Gateway, route: str, provider: str) -> dict[int, int]:
    """The RPM limit is exact: of 2 x RPM requests, RPM are served and RPM refused by the
    router; the provider never answers 429. Returns the statuses."""
    statuses = burst(gw, route, 2 * RPM)
    assert statuses == {200: RPM, 429: RPM}, statuses
    assert gw.mocks[provider].stats()["rate_limited"] == 0
    return dict(statuses)


def node_id(port: int) -> str:
    """The cluster node id of the server on ``port``."""
    return str(ask(port, "CLUSTER", "MYID"))


def primaries(nodes: ClusterSet) -> list[int]:
    """The ports of the live primaries."""
    return [
        p
        for p, proc in nodes.nodes.items()
        if proc.alive() and (ask(p, "INFO", "replication") or {}).get("role") == "master"
    ]


def migrate_slot(
    nodes: ClusterSet, slot: int, source: int, target: int, batch: int = 5,
    between: Callable[[], None] | None = None,
) -> dict[str, int]:  # fmt: skip
    """Move ``slot`` from the primary on ``source`` to the one on ``target`` as
    ``redis-cli --cluster reshard`` does: IMPORTING on the target, MIGRATING on the source,
    the keys moved ``batch`` at a time (``MIGRATE ... KEYS``; ``between`` called after each
    batch, e.g. to let traffic meet the slot half moved), then ``SETSLOT NODE`` on every
    primary, the two concerned first. Returns the keys moved and the batches."""
    src, dst = node_id(source), node_id(target)
    assert ask(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src) == "OK"
    assert ask(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst) == "OK"
    moved = batches = 0
    while keys := ask(source, "CLUSTER", "GETKEYSINSLOT", str(slot), str(batch)):
        done = ask(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys)
        assert done in ("OK", "NOKEY"), done
        moved, batches = moved + len(keys), batches + 1
        if between is not None:
            between()
    for port in [target, source, *(p for p in primaries(nodes) if p not in (source, target))]:
        assert ask(port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst) == "OK"
    return {"keys": moved, "batches": batches}


def errorstats(port: int) -> dict[str, int]:
    """The redirections and refusals a node answered (``INFO errorstats``): ASK, MOVED,
    TRYAGAIN counts."""
    info = ask(port, "INFO", "errorstats") or {}
    return {
        name: int(info.get(f"errorstat_{name}", {}).get("count", 0))
        for name in ("ASK", "MOVED", "TRYAGAIN")
    }


def metric(url: str, name: str) -> float:
    """The sum of a replica's metric ``name`` over its labels (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total
