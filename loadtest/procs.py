"""Local processes for rigs, launchers and tests: a free port, and a child started with its
output in a log file and stopped by its PID (ours only, never by name)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` different TCP ports on ``host`` that nobody listens on right now (one
    ``free_port`` after another may give the same port twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class Proc:
    """A child process we started, its output kept in a log file; stopped by its PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as log:  # the child holds its own copy of the file
            self.popen = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int | None = None) -> str:
        """What the process printed so far (its last ``tail`` characters)."""
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process, if it still runs."""
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
