"""Structured JSON logs; the decision log, one line per balancing decision; and the access
log, one line per request.

Log records never carry a secret: keys are resolved into ``SecretStr`` values that print
as stars, and no request header or query string is ever logged.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any
from urllib.parse import quote

import orjson

from router.config import LogSettings

decision_log = logging.getLogger("router.decision")
access_log = logging.getLogger("router.access")

MAX_LOGGED_PATH = 256
"""A request's path is logged cut to this many characters (a client may send 64 KiB of it)."""
_PRINTABLE = "".join(map(chr, range(0x21, 0x7F)))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record, AccessRecord):
            return record.line
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(settings: LogSettings, component: str = "router") -> None:
    """Send every log line to stderr as JSON, at the configured levels."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # the model spells it one way (upper case, ``OFF`` for YAML's false); set both ways, so
    # that a second call (a test, a reload) can turn the log back on
    decision_log.disabled = settings.decisions == "OFF"
    if not decision_log.disabled:
        decision_log.setLevel(settings.decisions)
    if settings.access == "OFF":
        access_log.disabled = True
    else:
        access_log.setLevel(settings.access)
    # httpx logs every request with its full URL at INFO (a base_url may carry a query)
    for noisy in ("uvicorn.access", "aiohttp.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger(component).debug("logging configured")


def decisions_logged() -> bool:
    """Whether decisions are logged (the acquire script returns its figures only then)."""
    return decision_log.isEnabledFor(logging.INFO)


class AccessRecord(logging.LogRecord):
    """An access line as a log record, its JSON already written.

    Not made by ``LogRecord.__init__`` (the caller's frame, thread, process: 20 attributes)
    nor through ``Logger.info``: the usual path cost 16 to 23 µs of CPU a line here, this one
    7 to 9, most of it the write to stderr. The other attributes any handler or formatter may
    read are the class's, taken from a real record (``_level_record``).
    """

    def __init__(self, created: float, line: str) -> None:
        self.created, self.msecs, self.line = created, (created % 1) * 1000, line


def _level_record(level: int) -> type[AccessRecord]:
    template = vars(logging.LogRecord(access_log.name, level, "", 0, "access", None, None))
    return type(f"Access{logging.getLevelName(level).title()}Record", (AccessRecord,), template)


_RECORDS = {level: _level_record(level) for level in (logging.DEBUG, logging.INFO)}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info"}


def access_logged(level: int = logging.INFO) -> bool:
    """Whether requests logged at ``level`` are written (checked once per request)."""
    return access_log.isEnabledFor(level)


def log_access(
    method: str,
    path: str,
    status: int,
    route: str | None,
    provider: str | None,
    attempts: int | None,
    duration_s: float,
    request_id: str,
    outcome: str,
    sent: int,
    level: int = logging.INFO,
    tenant: str | None = None,
) -> None:
    """Write one access line (the caller checked ``access_logged``): what was asked, how it
    was answered, by whom, how long it took. Never a header, a query string or a body."""
    path = path[:MAX_LOGGED_PATH]
    if not (path.isascii() and path.isprintable()):
        # percent-encoded again: JSON lets U+2028 and the like through, which some readers
        # (and str.splitlines) take for the end of a line
        path = quote(path, safe=_PRINTABLE)
    now = time.time()
    line = orjson.dumps(
        {
            "ts": now,
            "level": _LEVEL_NAMES[level],
            "logger": "router.access",
            "msg": "access",
            "method": method,
            "path": path,
            "status": status,
            "tenant": tenant,
            "route": route,
            "provider": provider,
            "attempts": attempts,
            "duration_ms": round(duration_s * 1000, 3),
            "request_id": request_id,
            "outcome": outcome,
            "bytes": sent,
        }
    )
    access_log.handle(_RECORDS[level](now, line.decode()))
