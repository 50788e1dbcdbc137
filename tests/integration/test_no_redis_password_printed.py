"""No user or password of a Redis URL is ever printed: ``routerctl check-config``, ``state``
and ``keys``, ``routerctl up``'s banner, and the start-up logs of its replicas and healthd.

The real CLIs as subprocesses, against a private Redis that only lets in a user with a
password (so the credentials are really used, not merely carried)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    ENV,
    Mock,
    Proc,
    free_port,
    launcher_env,
    local_config,
    port_open,
    redis_argv,
    wait_until,
    write_config,
)

USER = "ops-user-q7"
PASSWORD = "pw-S3cret-x9"
ROUTES = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]


def url(port: int) -> str:
    return f"redis://{USER}:{PASSWORD}@127.0.0.1:{port}/0"


def masked(port: int) -> str:
    return f"redis://***@127.0.0.1:{port}/0"


def assert_clean(text: str) -> None:
    assert PASSWORD not in text
    assert USER not in text


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A private Redis whose default user is off: only USER with PASSWORD gets in."""
    port = free_port()
    argv = redis_argv(port, tmp_path_factory.mktemp("redis-acl"))
    argv += ["--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"]
    proc = Proc(f"redis-{port}", argv, dict(os.environ), tmp_path_factory.mktemp("log"))
    try:
        wait_until(lambda: port_open(port), 10, "redis-server to listen")
        yield port
    finally:
        proc.stop()


def routerctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "router.ctl", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def no_redis_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ROUTER_CONFIG")}
    return {**env, **extra}


def test_check_config_masks_the_url_in_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "router.yaml", url(6390), [Mock("a")], ROUTES)
    done = routerctl("check-config", str(config), env=no_redis_env(**ENV))
    assert done.returncode == 0, done.stdout + done.stderr
    assert masked(6390) in done.stdout
    assert_clean(done.stdout + done.stderr)


def test_check_config_masks_the_url_from_the_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path / "router.yaml", None, [Mock("a")], ROUTES)
    done = routerctl("check-config", str(config), env=no_redis_env(**ENV, REDIS_URL=url(6391)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert masked(6391) in done.stdout
    assert_clean(done.stdout + done.stderr)


def test_check_config_no_env_checks_the_file_without_the_secrets(tmp_path: Path) -> None:
    config = write_config(tmp_path / "router.yaml", url(6392), [Mock("a")], ROUTES)
    bare = no_redis_env()  # no secret set: what a CI pipeline has
    for name in ENV:
        bare.pop(name, None)
    refused = routerctl("check-config", str(config), env=bare)
    assert refused.returncode == 1  # by default a missing variable is an error
    assert "environment variable ROUTER_CLIENT_KEY is not set" in refused.stdout

    done = routerctl("check-config", "--no-env", str(config), env=bare)
    assert done.returncode == 0, done.stdout + done.stderr
    assert masked(6392) in done.stdout
    assert "environment not checked (--no-env)" in done.stdout
    assert "P_KEY, ROUTER_ADMIN_TOKEN, ROUTER_CLIENT_KEY must be set" in done.stdout
    assert_clean(done.stdout + done.stderr)

    broken = tmp_path / "broken.yaml"
    broken.write_text(config.read_text() + "bogus: 1\n")
    done = routerctl("check-config", "--no-env", str(broken), env=bare)
    assert done.returncode == 1  # everything else is still checked
    assert done.stdout.splitlines() == ["bogus: unknown field"]


@pytest.mark.slow
def test_launcher_replicas_healthd_and_state_never_print_them(
    tmp_path: Path, redis_port: int
) -> None:
    config = local_config(tmp_path)
    argv = [sys.executable, "-m", "router.ctl", "up", "--config", str(config)]
    env = launcher_env(REDIS_URL=url(redis_port), ROUTERCTL_HAPROXY="")
    proc = Proc("routerctl-up", [*argv, "--port", str(free_port())], env, tmp_path)
    try:
        # the banner, then the start-up logs of the replica and both health daemons
        wait_until(lambda: "Ctrl-C stops everything." in proc.output(), 90, "the banner")
        wait_until(lambda: proc.output().count('"msg":"started"') == 2, 30, "both healthd")
        out = proc.output()
        assert f"  store        {masked(redis_port)}\n" in out
        assert '"msg":"replica started"' in out
        assert out.count(f'"store":"{masked(redis_port)}"') == 3  # the replica, 2 healthd
        assert_clean(out)

        ctl_env = {**env, "ROUTER_CLIENT_KEY": "k", "ROUTER_ADMIN_TOKEN": "t"}
        for args in (["state"], ["state", "--json"], ["keys"]):
            done = routerctl(*args, "--config", str(config), env=ctl_env)
            assert done.returncode == 0, done.stdout + done.stderr
            assert_clean(done.stdout + done.stderr)
            if args == ["state"]:
                assert masked(redis_port) in done.stdout  # the header names the Redis read
    finally:
        proc.stop(timeout=30)
        assert_clean(proc.output())
