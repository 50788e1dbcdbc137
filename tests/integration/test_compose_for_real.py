"""docker-compose.yml run for real: ``deploy/containers/stack.sh up`` builds the image and
starts the stack (Docker when a daemon answers, else rootful podman with Debian's
docker-compose; where no registry is reachable, the upstream images are local stand-ins, and
Grafana, which has none, is not started), and these tests drive it through its published
ports, as a user would:

- the openai SDK through the front load balancer, plain and streamed;
- Prometheus sees every router and healthd up;
- a router killed under a steady load: only the requests in flight on it fail, and HAProxy
  marks it down within its check interval;
- the healthd leader stopped: the standby leads;
- Redis restarted: the routers go degraded, keep answering, and come back;
- the image runs as non-root, read-only, with no capabilities, and its HEALTHCHECK passes;
- ``stack.sh down`` leaves nothing running (the module's teardown).

Nothing here is skipped: where no engine can be installed (not root, no apt-get) the stack
fails to come up and the tests fail saying why.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loadtest.procs import free_port
from tests.helpers import ROOT, wait_until

# the first test waits for the stack: from nothing, installing the engine, making the
# stand-ins and the image take minutes (the suite's default per-test timeout is 120 s)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STACK = ROOT / "deploy" / "containers" / "stack.sh"
PROJECT = "rc-compose-test"
CLIENT_KEY = "change-me"  # docker-compose.yml's demo defaults
ADMIN_TOKEN = "change-me-admin"
CHAT = {"model": "chat-default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
CHECK_S = 1 + 1 + 0.5 + 1
"""haproxy.cfg: the next check (inter 1s), its timeout (timeout check 1s), one more after
fastinter 500ms and its timeout (fall 2): the longest a dead router stays in rotation."""


@dataclass
class Stack:
    env: dict[str, str]
    gateway: str
    prometheus: str
    engine: str

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["bash", str(STACK), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        assert done.returncode == 0, f"stack.sh {' '.join(args)}:\n{done.stderr[-3000:]}"
        return done

    def compose(self, *args: str) -> str:
        return self.run("compose", *args).stdout

    def in_network(self, url: str) -> str:
        """GET ``url`` from inside the compose network (from router-1's container)."""
        code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).read().decode())"
        return self.compose("exec", "-T", "router-1", "python", "-c", code)

    def haproxy(self) -> dict[str, str]:
        """Each router's status as HAProxy's stats page says (UP, DOWN...)."""
        rows = csv.DictReader(io.StringIO(self.in_network("http://lb:8404/stats;csv").lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "routers"}

    def container_of(self, service: str) -> str:
        """The short id (the hostname the processes name themselves by) of ``service``."""
        return self.compose("ps", "-q", service).strip()[:12]

    def admin_state(self) -> dict[str, Any]:
        r = httpx.get(f"{self.gateway}/admin/state", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    env = {
        **os.environ,
        "ROUTER_COMPOSE_PROJECT": PROJECT,
        "ROUTER_GATEWAY_PORT": str(free_port()),
        "ROUTER_PROMETHEUS_PORT": str(free_port()),
        "ROUTER_GRAFANA_PORT": str(free_port()),
        "ROUTER_STACK_STATE": f"/tmp/{PROJECT}",
    }
    try:  # down whatever happens, an interrupted up too
        up = subprocess.run(["bash", str(STACK), "up"], env=env, capture_output=True,
                            text=True, timeout=840)  # fmt: skip
        print(up.stderr)  # which images are upstream and which are stand-ins
        assert up.returncode == 0, f"the stack did not come up:\n{up.stderr[-4000:]}"
        engine = subprocess.run(["bash", str(STACK), "engine"], env=env, capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        yield Stack(env, f"http://127.0.0.1:{env['ROUTER_GATEWAY_PORT']}",
                    f"http://127.0.0.1:{env['ROUTER_PROMETHEUS_PORT']}", engine)  # fmt: skip
    finally:
        down = subprocess.run(["bash", str(STACK), "down"], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert down.returncode == 0, f"stack.sh down:\n{down.stderr[-3000:]}"


def test_the_openai_sdk_through_the_front(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=CLIENT_KEY, max_retries=0)
    answer = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert answer.choices[0].message.content
    chunks = list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # and what the router cannot take is refused in the API's shape, through the front too
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key="wrong", max_retries=0) \
            .chat.completions.create(**CHAT)  # type: ignore[call-overload]  # fmt: skip


def test_prometheus_sees_every_router_and_healthd_up(stack: Stack) -> None:
    def all_up() -> dict[str, str] | None:
        try:
            r = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=5).json()
        except (httpx.HTTPError, json.JSONDecodeError):
            return None
        seen = {t["scrapeUrl"]: t["health"] for t in r["data"]["activeTargets"]}
        return seen if len(seen) == 5 and set(seen.values()) == {"up"} else None

    seen = wait_until(all_up, 60, "every target up in Prometheus")
    assert sorted(u.split("//")[1].split("/")[0] for u in seen) == [
        "healthd-1:9090", "healthd-2:9090", "router-1:8080", "router-2:8080", "router-3:8080",
    ]  # fmt: skip


@dataclass(eq=False)
class Load(threading.Thread):
    """``clients`` connections asking through the front back to back until stopped."""

    url: str
    clients: int = 4
    log: list[tuple[float, float, int | str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)

    def one(self) -> None:
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as c:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    status: int | str = c.post(
                        f"{self.url}/v1/chat/completions", json=CHAT
                    ).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.log.append((sent, time.monotonic(), status))

    def run(self) -> None:
        workers = [threading.Thread(target=self.one, daemon=True) for _ in range(self.clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def end(self) -> None:
        self.stop.set()
        self.join(90)


def test_a_killed_router_fails_only_what_was_in_flight_on_it(stack: Stack) -> None:
    load = Load(stack.gateway)
    load.start()
    wait_until(lambda: len(load.log) >= 20, 30, "the load to flow")
    killed_at = time.monotonic()
    stack.compose("kill", "router-2")
    killed = time.monotonic()
    wait_until(lambda: stack.haproxy().get("router-2", "").startswith("DOWN"), 30,
               "HAProxy to mark router-2 down")  # fmt: skip
    marked = time.monotonic()
    wait_until(lambda: sum(1 for s, *_ in load.log if s > marked) >= 20, 30, "load after")
    load.end()
    failed = [(sent, status) for sent, _, status in load.log if status != 200]
    slow = [sent for sent, done, _ in load.log if done - sent > 2.0 and sent > killed]
    print(f"\nkill took {killed - killed_at:.2f} s; HAProxy marked router-2 down "
          f"{marked - killed:.2f} s after; {len(load.log)} requests, failed {failed}, "
          f"{len(slow)} slowed (sent to the dead router, then to another)")  # fmt: skip
    # only requests in flight on router-2 when it died: sent before the kill returned, at
    # most one per client
    assert len(failed) <= load.clients, failed
    assert all(sent <= killed for sent, _ in failed), failed
    # HAProxy stops sending it traffic within its check interval (and a check's own time)
    assert marked - killed <= CHECK_S + 1.0  # + reading the stats page (podman exec)
    stack.compose("start", "router-2")
    wait_until(lambda: stack.haproxy().get("router-2") == "UP", 60, "router-2 back in rotation")


def test_the_standby_healthd_leads_when_the_leader_stops(stack: Stack) -> None:
    before = stack.admin_state()["healthd"]
    ids = {stack.container_of(s): s for s in ("healthd-1", "healthd-2")}
    leader = next(s for cid, s in ids.items() if str(before["leader"]).startswith(cid))
    standby = next(s for s in ids.values() if s != leader)
    started = time.monotonic()
    stack.compose("stop", leader)

    def standby_leads() -> bool:
        now = stack.admin_state()["healthd"]
        return str(now["leader"]).startswith(stack.container_of(standby))

    wait_until(standby_leads, 30, f"{standby} to lead")
    print(f"\n{standby} leads {time.monotonic() - started:.1f} s after {leader} was stopped")
    assert stack.admin_state()["healthd"]["epoch"] > before["epoch"]
    stack.compose("start", leader)


def test_redis_restarted_the_routers_go_degraded_and_come_back(stack: Stack) -> None:
    def statuses() -> dict[str, str]:
        seen: dict[str, str] = {}
        for _ in range(12):  # the front goes round the three routers
            body = httpx.get(f"{stack.gateway}/readyz", timeout=5).json()
            seen[body["replica"]] = body["status"]
        return seen

    assert set(statuses().values()) == {"ready"}
    load = Load(stack.gateway, clients=2)
    load.start()
    stack.compose("stop", "redis")
    wait_until(lambda: set(statuses().values()) == {"degraded"}, 60, "every router degraded")
    during = len(load.log)
    stack.compose("start", "redis")
    wait_until(lambda: set(statuses().values()) == {"ready"}, 90, "every router back on Redis")
    load.end()
    statuses_seen = {status for *_, status in load.log}
    print(f"\n{len(load.log)} requests ({during} before Redis came back): {statuses_seen}")
    assert statuses_seen == {200}, statuses_seen  # degraded: served from local state


def test_the_image_runs_as_non_root_read_only_without_capabilities(
    stack: Stack, tmp_path: Path
) -> None:
    engine = stack.engine
    config = tmp_path / "config.yaml"
    config.write_text(
        "client_keys: [{env: ROUTER_CLIENT_KEY}]\n"
        "providers: [{name: p, kind: openai, base_url: 'http://127.0.0.1:9/v1'}]\n"
        "routes: [{model: m, targets: [{provider: p, model: x}]}]\n"
    )
    config.chmod(0o644)
    run = subprocess.run(
        [engine, "run", "-d", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
         "--security-opt", "no-new-privileges", "-e", "ROUTER_CLIENT_KEY=k",
         "-v", f"{config}:/etc/router-cluster/config.yaml:ro", "router-cluster:local"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    cid = run.stdout.strip()
    try:

        def healthy() -> bool:
            if engine == "podman":
                check = subprocess.run(["podman", "healthcheck", "run", cid],
                                       capture_output=True, text=True)  # fmt: skip
                return check.returncode == 0
            status = subprocess.run(
                ["docker", "inspect", "--format", "{{.State.Health.Status}}", cid],
                capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            return status == "healthy"

        wait_until(healthy, 60, "the container's HEALTHCHECK to pass")
        uid = subprocess.run([engine, "exec", cid, "id", "-u"], capture_output=True, text=True)
        assert uid.stdout.strip() == "10001"
        write = subprocess.run([engine, "exec", cid, "touch", "/app/x"], capture_output=True)
        assert write.returncode != 0  # the root file system is read-only
        size = subprocess.run(
            [engine, "image", "inspect", "--format", "{{.Size}}", "router-cluster:local"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        print(f"\nrouter-cluster:local is {int(size) / 1e6:.0f} MB")
    finally:
        subprocess.run([engine, "rm", "-f", cid], capture_output=True, timeout=60)
