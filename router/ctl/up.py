"""``routerctl up``: a whole local cluster in one command (mock providers, Redis, replicas).

Everything is checked before anything starts (config, secrets, ports, Redis); the ports are
claimed first (``router.ctl.local``), so of two launchers started at once on one port
exactly one goes on. Then the children start; once the gateway answering the port is ours
(replicas we started, accepting our client key) the cluster is recorded for the other
``routerctl`` commands and the banner says how to call and inspect it; every child's output
is streamed with a prefix until Ctrl-C, SIGTERM or the death of a child stops them all.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel

from loadtest.procs import free_port
from router.config import Config, Provider, SecretRef, load_config, masked_url, print_problems
from router.ctl.local import ClusterRecord, PortTaken, Registry
from router.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "examples" / "local.yaml"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# Paced like a real provider, so latency-aware strategies and streams have something to show.
MOCK_PACING = (
    "--latency-ms",
    "40",
    "--jitter-ms",
    "20",
    "--ttft-ms",
    "30",
    "--chunk-interval-ms",
    "15",
)
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
POLL_S = 0.05
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INSTALL_REDIS = "apt-get install -y redis-server"


def _die_with_us() -> list[str]:
    """Prefix for children's command lines: SIGTERM them when this process dies, even by
    SIGKILL (Linux's parent-death signal, set by util-linux's setpriv before it execs)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv and sys.platform == "linux" else []


_DIE_WITH_US = _die_with_us()


class LaunchError(Exception):
    """A problem that stops ``routerctl up``; its text is meant for the user."""


class Stopped(Exception):
    """A stop signal arrived while the cluster was still starting."""


@dataclass(frozen=True)
class MockPlan:
    """A mock provider to start in place of a provider on a loopback address."""

    provider: Provider
    host: str
    port: int

    def argv(self) -> list[str]:
        """The command line of this mock, with the provider's key and limits."""
        p = self.provider
        argv = [sys.executable, "-m", "loadtest.mock_provider", "--host", self.host]
        argv += ["--port", str(self.port), "--name", p.name, "--api", p.kind, *MOCK_PACING]
        argv += ["--tpm-accounting", p.limits.tpm_accounting.value]
        if p.api_key is not None:
            argv += ["--api-key", p.api_key.value.get_secret_value()]
        if p.limits.rpm:
            argv += ["--rpm", str(p.limits.rpm)]
        if p.limits.tpm:
            argv += ["--tpm", str(p.limits.tpm)]
        return argv


@dataclass(frozen=True)
class Plan:
    """Everything ``up`` will start, decided and checked before anything starts."""

    config_path: Path
    cfg: Config
    env: dict[str, str]
    generated: list[str]
    mocks: list[MockPlan]
    redis_server: str | None
    replicas: int
    host: str
    port: int
    registry: Registry
    """Where the ports are claimed and the running cluster is recorded."""


@dataclass
class Child:
    """One process started by the launcher, and the thread streaming its output."""

    name: str
    popen: subprocess.Popen[bytes]
    first_to_stop: bool
    pump: threading.Thread | None = field(default=None, repr=False)


def _secret_refs(node: object) -> Iterator[SecretRef]:
    """Every ``{env: NAME}`` in the config, wherever the model puts one now or later."""
    if isinstance(node, SecretRef):
        yield node
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _secret_refs(getattr(node, name))
    elif isinstance(node, list | tuple):
        for item in node:
            yield from _secret_refs(item)
    elif isinstance(node, dict):
        for item in node.values():
            yield from _secret_refs(item)


def prepare_config(
    path: Path, environ: Mapping[str, str]
) -> tuple[Config, dict[str, str], list[str]]:
    """Load ``path``, generating a random value for every secret the environment lacks."""
    env = dict(environ)
    generated: list[str] = []
    for ref in _secret_refs(load_config(path, env, resolve=False)):
        if not env.get(ref.env):
            env[ref.env] = secrets.token_urlsafe(24)
            generated.append(ref.env)
    return load_config(path, env), env, generated


def _loopback_address(base_url: str) -> tuple[str, int] | None:
    url = urlsplit(base_url)
    if url.scheme != "http" or url.hostname not in LOOPBACK:
        return None
    try:
        return url.hostname, url.port or 80
    except ValueError:
        raise LaunchError(f"{masked_url(base_url)}: invalid port") from None


def mock_plans(cfg: Config) -> list[MockPlan]:
    """One mock per loopback address named by a provider (the first provider's settings win)."""
    plans: dict[int, MockPlan] = {}
    for provider in cfg.providers:
        address = _loopback_address(provider.base_url)
        if address is not None and address[1] not in plans:
            plans[address[1]] = MockPlan(provider, *address)
    return list(plans.values())


def find_redis_server(env: Mapping[str, str]) -> str | None:
    """The redis-server binary: ``$ROUTERCTL_REDIS_SERVER`` if set, else the one on PATH."""
    override = env.get("ROUTERCTL_REDIS_SERVER")
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which("redis-server", path=env.get("PATH"))


def find_haproxy(env: Mapping[str, str]) -> str | None:
    """The HAProxy binary (``ROUTERCTL_HAPROXY`` overrides; empty disables), if installed."""
    if "ROUTERCTL_HAPROXY" in env:
        return env["ROUTERCTL_HAPROXY"] or None
    return shutil.which("haproxy", path=env.get("PATH"))


def haproxy_config(host: str, port: int, replicas: list[int]) -> str:
    """A front for the replicas: round robin, in rotation while ``/readyz`` answers 200
    (a degraded replica answers 200 too, and keeps serving)."""
    servers = "\n".join(
        f"    server router-{i} 127.0.0.1:{p} check inter 1s fall 2 rise 1"
        for i, p in enumerate(replicas, 1)
    )
    return f"""global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 600s
    timeout server 600s
    option redispatch
    option http-no-delay
    retries 1
frontend gateway
    bind {host}:{port}
    default_backend routers
backend routers
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
{servers}
"""


def ensure_port_free(host: str, port: int, what: str, remedy: str) -> None:
    """Fail clearly when something already listens on ``host:port``, saying ``remedy``."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # create_server sets SO_REUSEADDR, so only a live listener (not TIME_WAIT) fails it
        with socket.create_server((host, port), family=family):
            pass
    except socket.gaierror as exc:
        raise LaunchError(f"{what}: cannot resolve {host!r}: {exc.strerror}") from None
    except OSError as exc:
        raise LaunchError(
            f"{what}: cannot listen on {host}:{port} ({os.strerror(exc.errno or 0)}): stop "
            f"whatever listens there, or {remedy}"
        ) from None


def _held_by(exc: PortTaken) -> str:
    pid = f" (pid {exc.holder})" if exc.holder else ""
    return f"port {exc.port} is taken by another `routerctl up`{pid}, starting or running"


def claim_ports(registry: Registry, port: int, mocks: list[MockPlan], held: ExitStack) -> None:
    """Claim the gateway's port, then each mock's, until ``held`` closes; the claim, not the
    port check after it, is what two launchers started at once cannot both pass."""
    if port in {m.port for m in mocks}:
        raise LaunchError(
            f"a mock provider of the config listens on port {port} too: pick "
            "another port with --port"
        )
    try:
        try:
            held.enter_context(registry.claim(port))
        except PortTaken as exc:
            raise LaunchError(
                f"{_held_by(exc)}: stop it, or pick another port with --port"
            ) from None
        for mock in mocks:
            try:
                held.enter_context(registry.claim(mock.port))
            except PortTaken as exc:
                raise LaunchError(
                    f"mock provider {mock.provider.name}: {_held_by(exc)}: stop it, or move "
                    "the provider to another port in the config"
                ) from None
    except OSError as exc:
        raise LaunchError(f"cannot claim ports in {registry.directory}: {exc.strerror}") from None


def make_plan(args: argparse.Namespace, environ: Mapping[str, str], held: ExitStack) -> Plan:
    """Load the config, claim the ports (until ``held`` closes) and check that everything
    can start; raise ``LaunchError`` if not."""
    path = Path(args.config).resolve()
    cfg, env, generated = prepare_config(path, environ)
    redis_server = None if cfg.redis_url else find_redis_server(env)
    if cfg.redis_url is None and redis_server is None and args.replicas > 1:
        raise LaunchError(
            f"--replicas {args.replicas} needs a Redis shared by the replicas and redis-server "
            f"was not found: install it ({INSTALL_REDIS}), or set REDIS_URL"
        )
    mocks = mock_plans(cfg)
    registry = Registry.for_user(environ)
    claim_ports(registry, args.port, mocks, held)
    for mock in mocks:
        name = mock.provider.name
        remedy = f"move {name} to another port in the config"
        ensure_port_free(mock.host, mock.port, f"mock provider {name}", remedy)
    ensure_port_free(args.host, args.port, "router", "pick another port with --port")
    return Plan(
        path,
        cfg,
        env,
        generated,
        mocks,
        redis_server,
        args.replicas,
        args.host,
        args.port,
        registry,
    )


def _client_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to ``host``."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def _exit_text(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _replica_pid(replica: str) -> int | None:
    """The PID in a replica's id (``host-PID-suffix``, see ``router.replica.gateway``)."""
    parts = replica.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def ctl_command(environ: Mapping[str, str]) -> str:
    """How to run this ``routerctl`` from a shell: bare when ``PATH`` finds this one (``up.sh``
    does not activate ``.venv``, so there it is the script's path)."""
    script = Path(sys.executable).parent / "routerctl"
    if not script.exists():
        return f"{sys.executable} -m router.ctl"
    found = shutil.which("routerctl", path=environ.get("PATH"))
    return "routerctl" if found and Path(found).resolve() == script.resolve() else str(script)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Launcher:
    """Starts the planned processes, streams their output and stops them all at the end."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.env = {**plan.env, "PYTHONUNBUFFERED": "1"}
        self.children: list[Child] = []
        self.stop = threading.Event()
        self.signal_name = ""
        self.store = masked_url(plan.cfg.redis_url) if plan.cfg.redis_url else ""
        self.base_url = f"http://{_client_host(plan.host)}:{plan.port}"
        self._out = threading.Lock()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="routerctl-up-"))
        self.front = ""
        self.published = False

    def run(self) -> int:
        """Start everything, then supervise until a signal (0) or a child's death (1)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            self.say(f"config {self.plan.config_path}; temp dir {self.tmpdir}")
            self._start_all()
            self._verify_ours()
            self._publish()
            self._banner()
            return self._supervise()
        except Stopped:
            self.say(f"{self.signal_name} received while starting: stopping all")
            return 0
        except LaunchError as exc:
            self.say(f"error: {exc}")
            return 1
        finally:
            self._withdraw()
            self._stop_all()
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.say(f"stopped; removed {self.tmpdir}")
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.stop.set()

    def say(self, text: str, prefix: str = "routerctl") -> None:
        """Print one line (or block) whole, so lines of different children never mix."""
        with self._out:
            try:
                sys.stdout.write(f"[{prefix}] {text}\n" if prefix else text)
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                pass  # nobody reads our output any more; the children still need stopping

    def _start_all(self) -> None:
        self._report_generated()
        listeners = [] if self.store else self._start_redis()
        for mock in self.plan.mocks:
            child = self._spawn(f"mock {mock.provider.name}", mock.argv())
            listeners.append((child, mock.host, mock.port))
        # Started together, awaited together: start-up lasts as long as the slowest one.
        for child, host, port in listeners:
            self._wait([child], partial(_accepts, host, port), f"it to listen on port {port}")
        self._start_replicas()
        self._start_healthd()

    def _start_healthd(self) -> None:
        """Two health daemons, one leading and one standing by, when Redis is shared."""
        if not (self.plan.cfg.redis_url or self.env.get("REDIS_URL")):
            return  # healthd cannot share the embedded store
        for n in (1, 2):
            port = free_port()
            argv = [sys.executable, "-m", "healthd.cli", "--config", str(self.plan.config_path)]
            child = self._spawn(f"healthd-{n}", [*argv, "--port", str(port)], first_to_stop=True)
            self._wait([child], partial(_accepts, "127.0.0.1", port), f"healthd on port {port}")

    def _report_generated(self) -> None:
        if not self.plan.generated:
            return
        names = ", ".join(self.plan.generated)
        self.say(f"generated random values for {names} (unset in the environment)")
        for p in self.plan.cfg.providers:
            remote = _loopback_address(p.base_url) is None
            if remote and p.api_key is not None and p.api_key.env in self.plan.generated:
                self.say(
                    f"WARNING: {p.name} is not mocked: a random key fails; export {p.api_key.env}"
                )

    def _start_redis(self) -> list[tuple[Child, str, int]]:
        binary = self.plan.redis_server
        if binary is None:
            self.say(
                "WARNING: redis-server not found: the replica runs on the embedded in-process "
                f"store, which serves ONE replica only. For more: {INSTALL_REDIS}"
            )
            self.store = "embedded in-process store (one replica only)"
            return []
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.tmpdir)]
        child = self._spawn("redis", argv)
        self.env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        self.store = f"private redis-server at {self.env['REDIS_URL']}"
        return [(child, "127.0.0.1", port)]

    def _start_replicas(self) -> None:
        argv = [sys.executable, "-m", "router.cli", "--config", str(self.plan.config_path)]
        n = self.plan.replicas
        haproxy = find_haproxy(self.env) if n > 1 else None
        if haproxy:
            # A real front load balancer: each replica on a port of its own, health-checked.
            ports = [free_port() for _ in range(n)]
            routers = [
                self._spawn(
                    f"router-{i}",
                    [*argv, "--host", "127.0.0.1", "--port", str(port)],
                    first_to_stop=True,
                )
                for i, port in enumerate(ports, 1)
            ]
            cfg = self.tmpdir / "haproxy.cfg"
            cfg.write_text(haproxy_config(self.plan.host, self.plan.port, ports))
            routers.append(self._spawn("haproxy", [haproxy, "-f", str(cfg), "-db"]))
            self.front = f"behind HAProxy on port {self.plan.port}"
        else:
            argv += ["--host", self.plan.host, "--port", str(self.plan.port)]
            if n > 1:
                argv.append("--reuse-port")
                self.front = f"sharing port {self.plan.port} (SO_REUSEPORT)"
            routers = [
                self._spawn(f"router-{i}", argv, first_to_stop=True) for i in range(1, n + 1)
            ]
        seen: set[str] = set()
        ours = {c.popen.pid for c in routers if c.name.startswith("router-")}
        what = f"{n} ready replica(s) at {self.base_url}/readyz ({self.store})"
        self._wait(routers, lambda: self._replicas_ready(seen, ours), what)

    def _replicas_ready(self, seen: set[str], ours: set[int]) -> bool:
        # A new connection per poll, so the kernel may hand it to any replica on the port.
        try:
            with httpx.Client(base_url=self.base_url, timeout=2.0, trust_env=False) as client:
                ready = client.get("/readyz")
                if ready.status_code != 200:
                    return False
                # one request per poll: a front balancing per request would otherwise send
                # a readyz/healthz pair to two replicas in lockstep, the same ones every time
                replica = str(ready.json()["replica"])
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        if _replica_pid(replica) not in ours:
            raise LaunchError(
                f"{self.base_url} is answered by replica {replica}, which we did not start: "
                "stop whatever else serves that port, or pick another port with --port"
            )
        seen.add(replica)
        return len(seen) >= self.plan.replicas

    def _verify_ours(self) -> None:
        """The banner is only for the gateway that answers: it must accept our client key."""
        key = self.plan.cfg.client_keys[0].value.get_secret_value()
        try:
            with httpx.Client(base_url=self.base_url, timeout=5.0, trust_env=False) as client:
                status = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        except httpx.HTTPError as exc:
            raise LaunchError(f"{self.base_url}/v1/models: {type(exc).__name__}: {exc}") from None
        if status.status_code != 200:
            raise LaunchError(
                f"{self.base_url}/v1/models answered {status.status_code} to our client key: "
                "the gateway there is not the one we started; pick another port with --port"
            )

    def _redis_url(self) -> str | None:
        """The Redis the replicas share: the private one, REDIS_URL, or the config's."""
        return self.env.get("REDIS_URL") or self.plan.cfg.redis_url

    def _publish(self) -> None:
        """Record the running cluster, for ``routerctl state`` and the others to find."""
        key = self.plan.cfg.client_keys[0]
        record = ClusterRecord(
            port=self.plan.port,
            endpoint=f"{self.base_url}/v1",
            config=str(self.plan.config_path),
            redis_url=self._redis_url(),
            pid=os.getpid(),
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            client_key=key.value.get_secret_value() if key.env in self.plan.generated else None,
        )
        try:
            self.plan.registry.publish(record)
        except OSError as exc:
            self.say(
                f"WARNING: cannot record the cluster in {self.plan.registry.directory} "
                f"({exc.strerror}): other routerctl commands need --config"
            )
            return
        self.published = True

    def _withdraw(self) -> None:
        if self.published:
            self.plan.registry.withdraw(self.plan.port)
            self.published = False

    def _spawn(self, name: str, argv: list[str], *, first_to_stop: bool = False) -> Child:
        popen = subprocess.Popen(
            [*_DIE_WITH_US, *argv],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Own process group: Ctrl-C reaches only us, and we stop the replicas before
            # Redis and the mocks they still need while draining.
            process_group=0,
        )
        child = Child(name, popen, first_to_stop)
        self.children.append(child)
        self.say(f"started {name} pid {popen.pid}")
        child.pump = threading.Thread(target=self._pump, args=(child,), daemon=True)
        child.pump.start()
        return child

    def _pump(self, child: Child) -> None:
        assert child.popen.stdout is not None
        for raw in child.popen.stdout:
            self.say(raw.decode(errors="replace").rstrip(), child.name)

    def _wait(self, children: list[Child], ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if self.stop.is_set():
                raise Stopped
            for child in children:
                if (code := child.popen.poll()) is not None:
                    raise LaunchError(f"{child.name} {_exit_text(code)} before {what}")
            if time.monotonic() > deadline:
                raise LaunchError(f"still waiting for {what} after {START_TIMEOUT_S:.0f} s")
            self.stop.wait(POLL_S)

    def _banner(self) -> None:
        key = self.plan.cfg.client_keys[0].value.get_secret_value()
        lines = ["", f"router-cluster is up: {self._summary()}"]
        lines += [f"  endpoint     {self.base_url}/v1", f"  client key   {key}"]
        admin = self.plan.cfg.admin_token
        if admin is not None and admin.env in self.plan.generated:
            lines.append(f"  admin token  {admin.value.get_secret_value()}")
        lines += [f"  store        {self.store}", *self._route_lines(), *self._inspect_lines()]
        lines += self._curl(key)
        lines += ["  Ctrl-C stops everything.", ""]
        self.say("\n".join(lines) + "\n", prefix="")

    def _summary(self) -> str:
        n = self.plan.replicas
        front = f", {self.front}" if self.front else ""
        return f"{n} replica{'s' if n > 1 else ''}{front}, {len(self.plan.mocks)} mock provider(s)"

    def _route_lines(self) -> list[str]:
        lines = []
        for n, route in enumerate(self.plan.cfg.routes):
            targets = ", ".join(t.provider for t in route.targets)
            label = "  routes       " if n == 0 else " " * 15
            lines.append(f"{label}{route.model} ({route.strategy.value}: {targets})")
        return lines

    def _inspect_lines(self) -> list[str]:
        """Ready-to-paste commands that read the shared state (no password: a URL is masked,
        and the private redis-server has none)."""
        redis_url = self._redis_url()
        if redis_url is None:
            return []  # the embedded store: the state is inside the replica
        state = f"{ctl_command(self.env)} state"
        if not self.published:
            state = f"REDIS_URL={masked_url(redis_url)} {state} --config {self.plan.config_path}"
        elif len(self.plan.registry.running()) > 1:
            state += f" --config {self.plan.config_path}"  # several are up: say which
        return [f"  inspect      {state}", f"               redis-cli -u {masked_url(redis_url)}"]

    def _curl(self, key: str) -> list[str]:
        model = self.plan.cfg.routes[0].model
        body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
        return [
            "  try it:",
            f"    curl -sS {self.base_url}/v1/chat/completions \\",
            f'      -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\',
            f"      -d '{body}'",
        ]

    def _supervise(self) -> int:
        while not self.stop.wait(POLL_S * 4):
            for child in self.children:
                if (code := child.popen.poll()) is not None:
                    pid = child.popen.pid
                    self.say(f"{child.name} (pid {pid}) {_exit_text(code)}: stopping all")
                    return 1
        self.say(f"{self.signal_name or 'signal'} received: stopping all")
        return 0

    def _stop_all(self) -> None:
        # Replicas first: while they drain they still need Redis and the providers.
        deadline = time.monotonic() + STOP_GRACE_S
        self._terminate([c for c in self.children if c.first_to_stop], deadline)
        rest = [c for c in reversed(self.children) if not c.first_to_stop]
        self._terminate(rest, max(deadline, time.monotonic() + 2.0))
        for child in self.children:
            if child.pump is not None:
                child.pump.join(2.0)
            if child.popen.stdout is not None and not (child.pump and child.pump.is_alive()):
                child.popen.stdout.close()

    def _terminate(self, children: list[Child], deadline: float) -> None:
        """SIGTERM each child by PID, wait until ``deadline``, then SIGKILL the stragglers."""
        for child in children:
            child.popen.send_signal(signal.SIGTERM)  # a no-op once the child is reaped
        for child in children:
            try:
                child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} (pid {child.popen.pid}) ignored SIGTERM: SIGKILL")
                child.popen.kill()
                child.popen.wait()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be within 1..65535, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``routerctl up``."""
    default = str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None
    parser.add_argument(
        "--config",
        default=default,
        required=default is None,
        help=f"router config; providers on loopback get a mock (default: {default})",
    )
    parser.add_argument(
        "--replicas", type=_positive, default=1, help="router processes sharing --port (default: 1)"
    )
    parser.add_argument(
        "--port", type=_port, default=8080, help="the gateway's port (default: 8080)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")


def up(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run ``routerctl up`` with parsed ``args``; return its exit status."""
    # the ports stay claimed until every child has stopped
    with ExitStack() as held:
        try:
            plan = make_plan(args, os.environ if environ is None else environ, held)
        except ConfigError as exc:
            print_problems(exc, f"routerctl up: {args.config}: invalid configuration:")
            return 2
        except LaunchError as exc:
            print(f"routerctl up: {exc}", file=sys.stderr)
            return 1
        return Launcher(plan).run()
