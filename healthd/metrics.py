"""healthd's metrics, rendered by hand in the Prometheus text format (version 0.0.4).

Hand-written because there are five series; a later change moves them to OpenTelemetry.
Label values are provider names and fixed words only: never a URL, a header or a key.
"""

from __future__ import annotations

from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RESULTS = ("ok", "fail")
STATES = ("up", "down")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


class Metrics:
    """Probe counts, last latencies and transitions, per provider."""

    def __init__(self, providers: Iterable[str]) -> None:
        self.providers = tuple(providers)
        # every known series starts at 0, so a rate() over the first scrape is right
        self.probes = {(p, r): 0 for p in self.providers for r in RESULTS}
        self.transitions = {(p, s): 0 for p in self.providers for s in STATES}
        self.latency_s: dict[str, float] = {}

    def probed(self, provider: str, ok: bool, latency_ms: float) -> None:
        """Count one probe and keep its latency."""
        self.probes[provider, "ok" if ok else "fail"] += 1
        self.latency_s[provider] = latency_ms / 1000

    def transitioned(self, provider: str, to: str) -> None:
        """Count one health transition of ``provider`` to ``to`` (up or down)."""
        if to in STATES:
            self.transitions[provider, to] += 1

    def render(self, leading: bool, epoch: int) -> str:
        """The whole exposition, as served on ``GET /metrics``."""
        lines = [
            *_family("healthd_leader", "gauge", "1 while this daemon holds the leader lease.",
                     [f"healthd_leader {int(leading)}"]),
            *_family("healthd_epoch", "gauge", "The healthd epoch (fencing token) last seen.",
                     [f"healthd_epoch {epoch}"]),
            *_family("healthd_probes_total", "counter", "Probes sent by this daemon, by result.",
                     (f"healthd_probes_total{_labels(provider=p, result=r)} {n}"
                      for (p, r), n in self.probes.items())),
            *_family("healthd_probe_latency_seconds", "gauge", "Latency of the last probe.",
                     (f"healthd_probe_latency_seconds{_labels(provider=p)} {s:.6f}"
                      for p, s in self.latency_s.items())),
            *_family("healthd_transitions_total", "counter",
                     "Health transitions this daemon recorded, by new state.",
                     (f"healthd_transitions_total{_labels(provider=p, to=s)} {n}"
                      for (p, s), n in self.transitions.items())),
        ]  # fmt: skip
        return "\n".join(lines) + "\n"
