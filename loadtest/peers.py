"""Two peer gateways for ``python -m loadtest.bench --peers``: install, configure, compare.

LiteLLM's proxy (from PyPI, in its own venv) and Portkey's gateway (from npm) are installed
once, pinned, under ``~/.cache/router-cluster/peers`` (``$ROUTER_CLUSTER_CACHE/peers`` when
set). Each is given the closest equivalent of the bench's router configuration: one model
routed over the rig's three nginx upstreams as OpenAI-compatible providers, balanced, with
the rig's Redis where the peer can use it:

- LiteLLM: ``litellm --config`` with the three upstreams as deployments of one model name,
  ``router_settings.routing_strategy`` usage-based-routing-v2 (RPM/TPM counted in Redis,
  limits that never bind, like the router's) or simple-shuffle, ``redis_host``/``redis_port``
  at the rig's Redis, a master key checked on each request (like the router's client key).
- Portkey: its gateway (``build/start-server.js --headless``) with an ``x-portkey-config``
  header: ``strategy.mode = loadbalance`` over the three upstreams (``custom_host``), equal
  weights; ``REDIS_CONNECTION_STRING`` at the rig's Redis (the open-source gateway has no
  shared rate limits: Redis only backs its cache, which the config leaves off); no client
  authentication (the open-source gateway has none).

This module holds what is pure (the configs, the comparison table) and the installs; the
bench runs the peers in its rig (``loadtest.bench.peers_comparison``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LITELLM_VERSION = "1.105.7"
"""The newest LiteLLM whose ``[proxy]`` extra resolves from PyPI here: from 1.109.3 on it
pins ``litellm-proxy-extras`` (and from 1.110 ``litellm-proxy``) releases PyPI does not have."""
PORTKEY_VERSION = "1.15.2"
LITELLM_SPEC = f"litellm[proxy]=={LITELLM_VERSION}"
PORTKEY_SPEC = f"@portkey-ai/gateway@{PORTKEY_VERSION}"
CA_FILE = Path("/etc/ssl/certs/ca-certificates.crt")
LITELLM_STRATEGIES = {"usage": "usage-based-routing-v2", "shuffle": "simple-shuffle"}
MODEL = "bench-model"
"""The model name the upstreams are asked for (the router's targets name it too)."""
LITELLM_UPSTREAM_MODEL = "gpt-4o-mini"
"""The model LiteLLM's deployments name (the nginx upstreams answer any): one in its price
list, as a real deployment's is; an unpriced one costs it a zero-cost diagnosis per answer,
and a price in the config a rebuild of its price index per request."""
INSTALL_TIMEOUT = 1200.0


def cache_dir() -> Path:
    """Where the peers are installed: ``$ROUTER_CLUSTER_CACHE/peers`` or the user cache."""
    base = os.environ.get("ROUTER_CLUSTER_CACHE")
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (root if base else root / "router-cluster") / "peers"


class PeerUnavailable(RuntimeError):
    """A peer could not be installed (or started): which one, and why."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer} could not be installed: {reason}")
        self.peer = peer
        self.reason = reason


# ---------------------------------------------------------------------------- installs


Runner = Callable[[list[str], dict[str, str], Path], "subprocess.CompletedProcess[str]"]


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT
    )


def _tail(text: str, lines: int = 12) -> str:
    """The last ``lines`` meaningful lines of an installer's output (pip's notes about local
    indexes that do not hold a package left out)."""
    keep = [x for x in text.splitlines() if x.strip() and "is ignored: it is neither" not in x]
    return "\n".join(keep[-lines:])


def _failed(peer: str, argv: Sequence[str], done: subprocess.CompletedProcess[str]) -> str:
    out = _tail(done.stdout + "\n" + done.stderr)
    unreachable = any(
        s in out
        for s in ("ConnectionError", "Max retries", "ENOTFOUND", "ECONNREFUSED", "ETIMEDOUT",
                  "EAI_AGAIN", "Temporary failure in name resolution", "CERTIFICATE",
                  "certificate", "Network is unreachable", "NewConnectionError",
                  "Could not fetch URL", "Connection refused")
    )  # fmt: skip
    hint = " (the registry looks unreachable from here)" if unreachable else ""
    if not hint and "(from versions: none)" in out:
        hint = " (no release found: the index is unreachable from here, or lacks this release)"
    return f"`{' '.join(argv)}` exited {done.returncode}{hint}:\n{out}"


def installer_env() -> dict[str, str]:
    """Our environment, with the system CA for pip and npm when this machine has one (an
    egress that re-signs TLS needs it) and none of the variables that would redirect a child."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if CA_FILE.exists():
        env.setdefault("PIP_CERT", str(CA_FILE))
        env.setdefault("NODE_EXTRA_CA_CERTS", str(CA_FILE))
    return env


def install_litellm(root: Path | None = None, run: Runner = _run) -> Path:
    """LiteLLM's proxy in its own venv (``root/litellm-venv``); its ``litellm`` executable.

    A marker file names the installed spec, so a later run reuses it; another pin reinstalls.
    """
    root = root or cache_dir()
    venv = root / "litellm-venv"
    exe, marker = venv / "bin" / "litellm", venv / ".router-cluster-installed"
    if exe.exists() and marker.exists() and marker.read_text().strip() == LITELLM_SPEC:
        return exe
    root.mkdir(parents=True, exist_ok=True)
    env = installer_env()
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", LITELLM_SPEC],
    ]
    for argv in steps:
        _install_step("LiteLLM", argv, env, root, run)
    if not exe.exists():
        raise PeerUnavailable("LiteLLM", f"pip installed {LITELLM_SPEC} but no {exe}")
    marker.write_text(LITELLM_SPEC + "\n")
    return exe


def _install_step(peer: str, argv: list[str], env: dict[str, str], cwd: Path, run: Runner) -> None:
    """Run one install command; ``PeerUnavailable`` naming ``peer`` when it fails."""
    try:
        done = run(argv, env, cwd)
    except (OSError, subprocess.SubprocessError) as e:
        raise PeerUnavailable(peer, f"`{' '.join(argv)}` failed: {e}") from e
    if done.returncode != 0:
        raise PeerUnavailable(peer, _failed(peer, argv, done))


def portkey_entry(root: Path) -> Path:
    """Portkey's built server inside ``root`` (its package's ``bin``)."""
    return (
        root / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    )


def installed_portkey_version(root: Path) -> str | None:
    import json

    pkg = root / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "package.json"
    try:
        return str(json.loads(pkg.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def install_portkey(root: Path | None = None, run: Runner = _run) -> Path:
    """Portkey's gateway from npm into ``root/portkey``; the server's script (run with node)."""
    root = root or cache_dir()
    entry = portkey_entry(root)
    if entry.exists() and installed_portkey_version(root) == PORTKEY_VERSION:
        return entry
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    if missing:
        raise PeerUnavailable(
            "Portkey", f"{' and '.join(missing)} not found: apt-get install -y nodejs npm"
        )
    target = root / "portkey"
    target.mkdir(parents=True, exist_ok=True)
    argv = [shutil.which("npm") or "npm", "install", "--no-audit", "--no-fund", "--prefix",
            str(target), PORTKEY_SPEC]  # fmt: skip
    _install_step("Portkey", argv, installer_env(), target, run)
    if not entry.exists():
        raise PeerUnavailable("Portkey", f"npm installed {PORTKEY_SPEC} but no {entry}")
    return entry


# ---------------------------------------------------------------------------- configs


def litellm_config(
    upstream_ports: Sequence[int], redis_port: int, master_key: str, strategy: str = "usage"
) -> dict[str, Any]:
    """LiteLLM's proxy config: one model name (``MODEL``) over the upstreams, balanced by
    ``strategy`` (a key of ``LITELLM_STRATEGIES``), its router state in the rig's Redis."""
    deployments = [
        {
            "model_name": MODEL,
            "litellm_params": {
                "model": f"openai/{LITELLM_UPSTREAM_MODEL}",
                "api_base": f"http://127.0.0.1:{port}/v1",
                "api_key": "sk-bench-upstream",
                # like the router's limits in the bench: counted, never binding
                "rpm": 10**9,
                "tpm": 10**12,
            },
            "model_info": {"id": f"up{i}"},
        }
        for i, port in enumerate(upstream_ports)
    ]
    return {
        "model_list": deployments,
        "router_settings": {
            "routing_strategy": LITELLM_STRATEGIES[strategy],
            "redis_host": "127.0.0.1",
            "redis_port": redis_port,
            "num_retries": 0,
        },
        "litellm_settings": {"drop_params": True, "request_timeout": 30},
        "general_settings": {"master_key": master_key},
    }


def portkey_config(upstream_ports: Sequence[int]) -> dict[str, Any]:
    """Portkey's ``x-portkey-config``: loadbalance, equal weights, over the upstreams."""
    return {
        "strategy": {"mode": "loadbalance"},
        "targets": [
            {
                "provider": "openai",
                "api_key": "sk-bench-upstream",
                "custom_host": f"http://127.0.0.1:{port}/v1",
                "weight": 1,
            }
            for port in upstream_ports
        ],
    }


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    """One system's figures in the comparison (None: not measured)."""

    key: str
    label: str
    rps: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    cpu_s_per_1k: float | None = None
    rss_mb: float | None = None
    errors: int = 0
    requests: int = 0
    noise_pct: float | None = None
    error: str | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


def row_from_scenario(key: str, s: dict[str, Any], a1_p50: float, a1_p99: float) -> Row:
    """A comparison row from a bench scenario (``measure``'s figures) or its error."""
    if "error" in s:
        return Row(key, s.get("label", key), error=str(s["error"]))
    runs = [s[c] for c in ("c1", "c8", "c32")]
    return Row(
        key,
        s["label"],
        rps=float(s["c32"]["rps"]),
        added_p50_ms=float(s["c1"]["p50_ms"]) - a1_p50,
        added_p99_ms=float(s["c1"]["p99_ms"]) - a1_p99,
        cpu_s_per_1k=float(s["cpu_s_per_1k"]),
        rss_mb=float(s["rss_load_mb"]),
        errors=sum(int(r["non2xx"]) + int(r["socket_errors"]) for r in runs),
        requests=sum(int(r["requests"]) for r in runs),
        noise_pct=s.get("foreign_cpu_pct"),
    )


def ratio(ours: float | None, peer: float | None) -> str:
    """``ours / peer`` as ``1.23x``; '-' when either is missing or the peer's is not > 0."""
    if ours is None or peer is None or peer <= 0:
        return "-"
    return f"{ours / peer:.2f}x"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _err(r: Row) -> str:
    rate = r.error_rate
    if rate is None:
        return "-"
    return f"{rate * 100:.2f}% ({r.errors:,})" if r.errors else "0"


def comparison_table(ours: Row, peers: Sequence[Row], also: Sequence[Row] = ()) -> list[str]:
    """Markdown: our row (and ``also``, our variants, without ratios), then each peer's, its
    figures and the ratios ours/peer.

    req/s: above 1x ours serves more. Added latency, CPU and RSS: below 1x ours costs less.
    A peer that failed shows its error instead of figures."""
    rows = [
        "| system | req/s @32 | added p50 / p99 @1 (ms) | CPU s/1k req | RSS peak (MB) "
        "| errors (non-2xx + socket) | req/s ours/peer | added p50 ours/peer "
        "| CPU ours/peer | RSS ours/peer | noise % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def figures(r: Row) -> str:
        return (
            f"| {r.label} | {_f(r.rps, ',.0f')} | {_f(r.added_p50_ms, '+.2f')} / "
            f"{_f(r.added_p99_ms, '+.2f')} | {_f(r.cpu_s_per_1k, '.3f')} "
            f"| {_f(r.rss_mb, '.0f')} | {_err(r)} "
        )

    def noise(r: Row) -> str:
        return f" {_f(r.noise_pct, '.1f')} |"

    def failed(r: Row) -> str:
        reason = " ".join((r.error or "").split())[:300].replace("|", "/")
        return f"| {r.label} | NOT MEASURED: {reason} | | | | | | | | | |"

    rows.append(figures(ours) + "| 1x | 1x | 1x | 1x |" + noise(ours))
    rows += [failed(r) if r.error else figures(r) + "| - | - | - | - |" + noise(r) for r in also]
    for p in peers:
        if p.error is not None:
            rows.append(failed(p))
            continue
        rows.append(
            figures(p) + f"| {ratio(ours.rps, p.rps)} | {ratio(ours.added_p50_ms, p.added_p50_ms)} "
            f"| {ratio(ours.cpu_s_per_1k, p.cpu_s_per_1k)} | {ratio(ours.rss_mb, p.rss_mb)} |"
            + noise(p)
        )
    return rows


def versions() -> dict[str, str]:
    """The peers' pins, for the results."""
    return {"litellm": LITELLM_SPEC, "portkey": PORTKEY_SPEC}
