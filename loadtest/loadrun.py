"""``routerctl loadtest``: a headless Locust run through the gateway, then the providers' counts.

It runs against a cluster that is already up (``--host http://H:P``, with the client key in
the environment variable the config names, ``ROUTER_CLIENT_KEY``), or, without ``--host``,
against a local cluster it starts itself with ``routerctl up`` (the config's mock providers,
a private redis-server, ``--replicas`` replicas on a free port) and stops with SIGTERM at the
end. The Locust part is exactly this plain command, which works on its own too::

    ROUTER_CLIENT_KEY=<client key> locust --headless -f loadtest/locustfile.py \\
        --host http://127.0.0.1:8080 --users 20 --spawn-rate 5 --run-time 60s \\
        --csv loadtest/results/locust --html loadtest/results/locust.html

(``LOCUST_CHAT_WEIGHT``, ``LOCUST_STREAM_WEIGHT``, ``LOCUST_EMBED_WEIGHT``,
``LOCUST_CHAT_MODEL`` and ``LOCUST_EMBED_MODEL`` shape the traffic; see the locustfile.)

Before the run the mock providers' counters are reset (``POST /stats/reset``); after it each
one's ``GET /stats`` (base URLs from the config; only providers on loopback addresses are
asked) gives what it received and the 429s it sent, which must be none: the gateway keeps
every provider under its limits. They are printed and written to ``DIR/providers.json``.

The helpers here (``LocalCluster``, ``mock_roots``, ``reset_stats``, ``read_stats``) also
serve ``routerctl simulate``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

from loadtest.procs import free_port
from router.config import Config, load_config, masked_url
from router.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 30.0
POLL_S = 0.1
BANNER_END = "Ctrl-C stops everything."
STATS_FIELDS = ("received", "ok", "rate_limited", "in_flight_peak", "rpm_peak", "tpm_peak")
OUR_CHILDREN = (b"mock_provider", b"router", b"healthd", b"redis")


class ClusterError(Exception):
    """The cluster could not be started or reached; the text says why."""


@dataclass(frozen=True)
class Gateway:
    """Where a running cluster answers: its root URL, a client key, its Redis when known."""

    root: str
    key: str | None
    redis_url: str | None


def gateway_root(host: str) -> str:
    """``http://H:P``, ``http://H:P/`` or ``http://H:P/v1`` as the gateway's root URL."""
    return host.rstrip("/").removesuffix("/v1").rstrip("/")


def _found(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text, re.M)
    return match[1] if match else None


def parse_banner(out: str) -> Gateway:
    """The endpoint, client key and private Redis that ``routerctl up`` printed."""
    endpoint = _found(r"^  endpoint +(\S+)$", out)
    if endpoint is None:
        raise ClusterError("the launcher's banner names no endpoint")
    key = _found(r"^  client key +(\S+)$", out)
    redis_url = _found(r"^  store +private redis-server at (redis://\S+)$", out)
    return Gateway(gateway_root(endpoint), key, redis_url)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


class LocalCluster:
    """``routerctl up`` as a child process: started, awaited until its banner, then stopped
    with SIGTERM by its PID (the launcher stops its own children)."""

    def __init__(
        self, config: Path, replicas: int, log_path: Path, environ: Mapping[str, str] | None = None
    ) -> None:
        self.argv = [sys.executable, "-m", "router.ctl", "up", "--config", str(config)]
        self.argv += ["--port", str(free_port()), "--replicas", str(replicas)]
        self.log_path = log_path
        self.env = {**(os.environ if environ is None else environ), "PYTHONUNBUFFERED": "1"}
        self.popen: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Gateway:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                process_group=0,  # Ctrl-C reaches us; we stop the launcher ourselves
            )  # fmt: skip
        try:
            return self._await_banner(self.popen)
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def output(self) -> str:
        """Everything the launcher and its children printed so far."""
        return self.log_path.read_text(errors="replace")

    def _await_banner(self, popen: subprocess.Popen[bytes]) -> Gateway:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            out = self.output()
            if BANNER_END in out:
                return parse_banner(out)
            if (code := popen.poll()) is not None:
                raise ClusterError(f"routerctl up exited with code {code}:\n{_tail(out)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"routerctl up not ready after {START_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """SIGTERM the launcher and wait; SIGKILL it (and children it left) if it hangs."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
            self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Only after the launcher was killed: its children, by the PIDs it printed."""
        for pid in re.findall(r"^\[routerctl\] started .+ pid (\d+)$", self.output(), re.M):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if any(word in cmdline for word in OUR_CHILDREN):  # not a recycled PID
                    os.kill(int(pid), signal.SIGKILL)


def wait_ready(root: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until the gateway at ``root`` answers ``GET /readyz`` with 200."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{root}/readyz", timeout=2.0, trust_env=False)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(POLL_S)
    raise ClusterError(f"{masked_url(root)}/readyz not ready after {timeout:.0f} s ({last})")


def client_key(cfg: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """The client key from the environment variable the config's first client key names."""
    env = os.environ if environ is None else environ
    return env.get(cfg.client_keys[0].env) or None


def connect(host: str, cfg: Config) -> Gateway:
    """A cluster that is already running at ``host``, once it is ready."""
    root = gateway_root(host)
    wait_ready(root)
    return Gateway(root, client_key(cfg), cfg.redis_url)


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def mock_roots(cfg: Config, names: Iterable[str] | None = None) -> dict[str, str]:
    """Root URL of each provider (of ``names``) served on loopback: where a mock answers."""
    wanted = None if names is None else set(names)
    roots = {}
    for p in cfg.providers:
        url = urlsplit(p.base_url)
        mine = wanted is None or p.name in wanted
        if mine and url.scheme == "http" and _is_loopback(url.hostname):
            roots[p.name] = f"http://{url.netloc}"
    return roots


def reset_stats(roots: Mapping[str, str]) -> None:
    """Zero the counters and windows of each mock (``POST /stats/reset``)."""
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        for root in sorted(set(roots.values())):
            with contextlib.suppress(httpx.HTTPError):
                client.post(f"{root}/stats/reset")


def read_stats(roots: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each provider's own counts (``GET /stats``), or ``{"error": ...}`` if it does not say."""
    out: dict[str, dict[str, Any]] = {}
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        for name, root in roots.items():
            try:
                stats = client.get(f"{root}/stats").raise_for_status().json()
                out[name] = {k: int(stats.get(k, 0)) for k in STATS_FIELDS}
                out[name]["by_status"] = dict(stats.get("by_status", {}))
            except (httpx.HTTPError, ValueError, TypeError) as exc:
                out[name] = {"error": f"{root}/stats: {exc}"}
    return out


def locust_argv(args: argparse.Namespace, root: str, out: Path) -> list[str]:
    """The headless Locust command line (see the module docstring)."""
    return [
        sys.executable, "-m", "locust", "--headless", "-f", str(LOCUSTFILE), "--host", root,
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
        "--run-time", f"{args.duration}s", "--stop-timeout", "5s",
        "--csv", str(out / "locust"), "--html", str(out / "locust.html"),
    ]  # fmt: skip


def _stats_table(stats: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [f"{'provider':<16}{'received':>9}{'ok':>9}{'429s sent':>11}{'in-flight peak':>16}"]
    for name, s in stats.items():
        if "error" in s:
            lines.append(f"{name:<16} {s['error']}")
            continue
        lines.append(
            f"{name:<16}{s['received']:>9}{s['ok']:>9}{s['rate_limited']:>11}"
            f"{s['in_flight_peak']:>16}"
        )
    return "\n".join(lines)


def _gateway(
    args: argparse.Namespace, cfg: Config, out: Path, stack: contextlib.ExitStack
) -> Gateway:
    if args.host:
        return connect(args.host, cfg)
    cluster = LocalCluster(Path(args.config), args.replicas, out / "cluster.log")
    print(f"starting a local cluster (routerctl up; its log: {cluster.log_path})", flush=True)
    return stack.enter_context(cluster)


def _run(args: argparse.Namespace, cfg: Config, out: Path) -> tuple[int, dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        gw = _gateway(args, cfg, out, stack)
        if gw.key is None:
            name = cfg.client_keys[0].env
            raise ClusterError(f"no client key: set {name} (the config's first client key)")
        roots = mock_roots(cfg)
        reset_stats(roots)
        argv = locust_argv(args, gw.root, out)
        print("running:", " ".join(argv), flush=True)
        env = {**os.environ, "ROUTER_CLIENT_KEY": gw.key}
        code = subprocess.run(argv, env=env, check=False, timeout=args.duration + 300).returncode
        stats = read_stats(roots)
    return code, {"host": masked_url(gw.root), "locust_exit_code": code, "providers": stats}


def loadtest(args: argparse.Namespace) -> int:
    """Run ``routerctl loadtest`` with parsed ``args``; return its exit status."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        code, report = _run(args, load_config(args.config, resolve=False), out)
    except ConfigError as exc:
        for where, message in exc.problems:
            print(f"routerctl loadtest: {where}: {message}", file=sys.stderr)
        return 2
    except ClusterError as exc:
        print(f"routerctl loadtest: {exc}", file=sys.stderr)
        return 2
    stats = report["providers"]
    sent_429 = sum(int(s.get("rate_limited", 0)) for s in stats.values())
    report["received"] = sum(int(s.get("received", 0)) for s in stats.values())
    report["rate_limited"] = sent_429
    (out / "providers.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nproviders' own counts ({out / 'providers.json'}):\n{_stats_table(stats)}")
    if sent_429:
        print(f"FAIL: the providers sent {sent_429} 429s: the gateway let them over a limit")
        return 1
    return code
