"""Structured JSON logs, and the decision log: one line per balancing decision.

Log records never carry a secret: keys are resolved into ``SecretStr`` values that print
as stars, and no request header is ever logged.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from router.config import LogSettings, Route
from router.state.store import Decision

decision_log = logging.getLogger("router.decision")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
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
    # httpx logs every request with its full URL at INFO (a base_url may carry a query)
    for noisy in ("uvicorn.access", "aiohttp.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger(component).debug("logging configured")


def decisions_logged() -> bool:
    """Whether decisions are logged (the acquire script returns its figures only then)."""
    return decision_log.isEnabledFor(logging.INFO)


def log_decision(
    request_id: str, route: Route, decision: Decision, attempt: int, started_ns: int
) -> None:
    """Log one decision: every candidate's figures, the choice and why, and its cost."""
    if not decisions_logged():
        return
    chosen = decision.candidates[decision.index] if decision.index is not None else None
    fields = {
        "request_id": request_id,
        "route": route.model,
        "strategy": route.strategy.value,
        "attempt": attempt,
        "chosen": chosen.provider if chosen else None,
        "reason": _reason(route, decision),
        "wait_ms": decision.wait_ms if chosen is None else 0,
        "decision_us": (time.perf_counter_ns() - started_ns) // 1000,
        "candidates": [
            {
                "provider": c.provider,
                "state": c.code.name.lower(),
                "in_flight": c.in_flight,
                "rpm": c.rpm_used,
                "tpm": c.tpm_used,
                "score": c.score,
            }
            for c in decision.candidates
        ],
    }
    decision_log.info("decision", extra={"fields": fields})


_WHY = {
    "round_robin": "next in the shared rotation with room",
    "weighted": "largest smooth weighted round-robin weight",
    "least_connections": "fewest in flight per weight",
    "least_latency": "lowest expected latency x (in flight + 1)",
    "headroom": "most limit left",
}


def _reason(route: Route, decision: Decision) -> str:
    if decision.index is not None:
        return _WHY[route.strategy.value]
    states = sorted({c.code.name.lower() for c in decision.candidates})
    return "no target has room: " + ", ".join(states)
