"""The local clusters of ``routerctl up``: the ports they hold, and the records others find.

Two launchers started at the same moment both passed the port check, both printed a banner
with their own key, and one gateway answered for both. So ``routerctl up`` takes an exclusive
``flock`` per TCP port it will listen on (the gateway's and each mock's), on a file in the
per-user runtime dir, before any port check, and holds it until its children have stopped:
the loser fails at once, having started nothing.

Once its gateway answers, the launcher records the cluster there (``port-P.json``, mode 0600:
the config path, the Redis URL, the endpoint, its PID, when it started, and the client key
when it generated one); the file goes when it stops. ``state``, ``keys``, ``drain``,
``enable``, ``loadtest`` and ``simulate`` read these records when no flag or variable names a
cluster. A record whose launcher is gone (a SIGKILL leaves it behind) is ignored and removed.
A record holds nothing the same user cannot already read in ``/proc/PID/environ`` of the
launcher's children.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.config import masked_url

SUBDIR = "router-cluster"
PROC = Path("/proc")
CLAIM_TRIES = 10


class ClusterRecord(BaseModel):
    """A running local cluster, as its launcher recorded it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    port: int = Field(gt=0, lt=65536)
    endpoint: str
    config: str
    """The config file's absolute path, as the launcher used it."""
    redis_url: str | None
    """``None``: the embedded in-process store, whose state only the replica sees."""
    pid: int = Field(gt=0)
    started: str
    client_key: str | None = Field(default=None, repr=False)
    """Only a key the launcher generated (a key from the user's environment stays there)."""

    def describe(self) -> str:
        """Which cluster this is, for a line saying whom a command talks to (no secret)."""
        store = masked_url(self.redis_url) if self.redis_url else "embedded store"
        return (
            f"the local cluster on port {self.port} (routerctl up, pid {self.pid}): "
            f"config {self.config}, {store}"
        )


class PortTaken(Exception):
    """Another launcher of this user holds the port (``holder``: its PID, when it said)."""

    def __init__(self, port: int, holder: int | None) -> None:
        super().__init__(f"port {port} is held by pid {holder}")
        self.port = port
        self.holder = holder


class PortClaim:
    """An exclusive claim on a TCP port among this user's launchers, until ``release``."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def release(self) -> None:
        """Remove the lock file while still holding it, then let go: a launcher that opened
        it meanwhile finds it unlinked once it gets the lock, and takes a new one."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)

    def __enter__(self) -> PortClaim:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def launcher_alive(pid: int) -> bool:
    """True while ``pid`` is a live ``routerctl`` (not a zombie, not a recycled PID)."""
    if not (PROC / "self").exists():  # no procfs: whether the PID exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes()  # empty for a zombie
    except OSError:
        return False
    return b"routerctl" in cmdline or b"router.ctl" in cmdline


class Registry:
    """The per-user directory of port claims and cluster records."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def for_user(cls, environ: Mapping[str, str]) -> Registry:
        """``$XDG_RUNTIME_DIR/router-cluster`` (a per-user tmpfs, emptied at logout), else
        ``~/.cache/router-cluster``."""
        runtime = environ.get("XDG_RUNTIME_DIR")
        if runtime and Path(runtime).is_dir():
            return cls(Path(runtime) / SUBDIR)
        home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
        return cls(home / ".cache" / SUBDIR)

    def _path(self, port: int, suffix: str) -> Path:
        return self.directory / f"port-{port}.{suffix}"

    def claim(self, port: int) -> PortClaim:
        """Take ``port`` for this process, or raise ``PortTaken`` at once (never waits)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(port, "lock")
        for _ in range(CLAIM_TRIES):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise PortTaken(port, int(holder) if holder.isdigit() else None) from None
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return PortClaim(fd, path)
            os.close(fd)  # released and removed by its holder meanwhile: take the new file
        raise PortTaken(port, None)

    def publish(self, record: ClusterRecord) -> None:
        """Record a running cluster (mode 0600; replaced whole, never read half-written)."""
        path = self._path(record.port, "json")
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(fd, 0o600)
            out.write(record.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)

    def withdraw(self, port: int) -> None:
        """Remove the record of the cluster on ``port`` (its launcher is stopping)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(port, "json").unlink()

    def running(self) -> list[ClusterRecord]:
        """The clusters whose launcher still runs, by port; stale records are removed."""
        found = []
        for path in sorted(self.directory.glob("port-*.json")):
            try:
                text = path.read_text(encoding="utf-8")
                record = ClusterRecord.model_validate_json(text)
            except (OSError, ValidationError):
                continue  # not ours to judge: left alone
            if launcher_alive(record.pid):
                found.append(record)
            else:
                _remove_if_unchanged(path, text)
        return sorted(found, key=lambda r: r.port)


def _same_file(fd: int, path: Path) -> bool:
    try:
        held, named = os.fstat(fd), path.stat()
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _remove_if_unchanged(path: Path, text: str) -> None:
    """Remove a stale record unless a new launcher on that port has just replaced it."""
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            path.unlink()
