"""The per-user registry of ``routerctl up``: exclusive port claims, private records, stale
records ignored and removed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.ctl.local import ClusterRecord, PortTaken, Registry
from tests.helpers import wait_until

SLEEP = "import time; time.sleep(60)"


def record(port: int, pid: int) -> ClusterRecord:
    return ClusterRecord(
        port=port, endpoint=f"http://127.0.0.1:{port}/v1", config="/x/local.yaml",
        redis_url="redis://127.0.0.1:6390/0", pid=pid, started="2024-01-01T00:00:00+00:00",
        client_key="generated-key",
    )  # fmt: skip


@pytest.fixture
def launcher() -> Iterator[int]:
    """The PID of a live process whose command line names routerctl, as a launcher's does."""
    with subprocess.Popen([sys.executable, "-c", SLEEP, "routerctl", "up"]) as proc:
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline")
            wait_until(lambda: b"routerctl" in cmdline.read_bytes(), 10, "the exec")
            yield proc.pid
        finally:
            proc.kill()


def gone_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass", "routerctl"])
    proc.wait()
    return proc.pid


def test_a_claimed_port_cannot_be_claimed_again_until_released(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "rc")
    first = registry.claim(8080)
    with pytest.raises(PortTaken) as taken:
        registry.claim(8080)  # another open file description: flock refuses it too
    assert (taken.value.port, taken.value.holder) == (8080, os.getpid())
    with registry.claim(8081):  # other ports are free
        pass
    first.release()
    assert not (tmp_path / "rc" / "port-8080.lock").exists()
    with registry.claim(8080):
        pass


def test_a_claim_is_held_against_other_processes(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "rc")
    code = (
        "import sys; from pathlib import Path; from router.ctl.local import Registry, "
        "PortTaken\ntry:\n    Registry(Path(sys.argv[1])).claim(8080)\nexcept PortTaken as e:\n"
        "    print(e.holder); sys.exit(3)"
    )
    with registry.claim(8080):
        done = subprocess.run(
            [sys.executable, "-c", code, str(registry.directory)], capture_output=True, text=True
        )
    assert (done.returncode, done.stdout.strip()) == (3, str(os.getpid())), done.stderr


def test_the_directory_and_records_are_private(tmp_path: Path, launcher: int) -> None:
    registry = Registry(tmp_path / "rc")
    with registry.claim(8080):
        registry.publish(record(8080, launcher))
    assert stat.S_IMODE((tmp_path / "rc").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "rc" / "port-8080.json").stat().st_mode) == 0o600
    assert "generated-key" not in repr(record(8080, launcher))
    assert "generated-key" not in record(8080, launcher).describe()


def test_a_record_of_a_gone_launcher_is_ignored_and_removed(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "rc")
    registry.directory.mkdir()
    registry.publish(record(8080, gone_pid()))
    (registry.directory / "port-8081.json").write_text("not json")  # not ours: left alone
    assert registry.running() == []
    assert not (registry.directory / "port-8080.json").exists()
    assert (registry.directory / "port-8081.json").exists()


def test_a_pid_that_is_not_a_routerctl_counts_as_gone(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "rc")
    registry.directory.mkdir()
    with subprocess.Popen([sys.executable, "-c", SLEEP]) as sleeper:
        try:
            registry.publish(record(8080, sleeper.pid))  # a recycled PID: alive, not ours
            assert registry.running() == []
        finally:
            sleeper.kill()


def test_records_of_live_launchers_are_found_by_port(tmp_path: Path, launcher: int) -> None:
    registry = Registry(tmp_path / "rc")
    assert registry.running() == []  # no directory yet: nothing runs
    registry.directory.mkdir()
    registry.publish(record(8081, launcher))
    registry.publish(record(8080, launcher))
    assert [r.port for r in registry.running()] == [8080, 8081]
    registry.withdraw(8080)
    assert [r.port for r in registry.running()] == [8081]


def test_the_runtime_dir_is_per_user(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    found = Registry.for_user({"XDG_RUNTIME_DIR": str(runtime)}).directory
    assert found == runtime / "router-cluster"
    home = {"XDG_RUNTIME_DIR": str(tmp_path / "missing"), "HOME": str(tmp_path)}
    assert Registry.for_user(home).directory == tmp_path / ".cache" / "router-cluster"
