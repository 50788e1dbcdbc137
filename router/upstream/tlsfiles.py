"""Per-provider TLS contexts that follow their files.

A provider's ``tls`` names files (CA bundle, client certificate and key) that are renewed on
disk while the gateway runs: cert-manager rewrites a mounted secret, a CA bundle is rotated.
``TLSContexts`` makes each setting's context once and looks at its files' identity (inode,
size, modification time) again at most every ``TLS_RECHECK_S``, when a new connection asks
for the context; changed files make a new context for the connections opened after (those
open keep theirs). A file that cannot be read at a re-check (half written) leaves the last
good context in use until a later re-check reads it.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from router.config import ProviderTLS
from router.errors import UpstreamConnectError

log = logging.getLogger("router.upstream")

TLS_RECHECK_S = 10.0
"""Longest time a renewed certificate file waits before new connections use it."""

_Stamp = tuple[tuple[int, int, int] | None, ...]


def tls_context(settings: ProviderTLS | None) -> ssl.SSLContext:
    """A TLS context for a provider's ``tls`` settings (the system's CAs when none); raises
    ``UpstreamConnectError`` without the file's path when a file cannot be read."""
    if settings is None:
        return ssl.create_default_context()
    try:
        ctx = ssl.create_default_context(cafile=settings.ca_file)
        if settings.cert_file is not None:
            ctx.load_cert_chain(settings.cert_file, settings.key_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        what = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or "unreadable"
        raise UpstreamConnectError(f"TLS setup failed: the CA or client cert ({what})") from None
    if not settings.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _stamp(settings: ProviderTLS) -> _Stamp:
    """Each file's (inode, size, mtime in ns), ``None`` for one absent or unreadable."""
    out: list[tuple[int, int, int] | None] = []
    for path in (settings.ca_file, settings.cert_file, settings.key_file):
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        out.append(None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass(slots=True)
class _Entry:
    ctx: ssl.SSLContext
    stamp: _Stamp
    checked: float
    generation: int


class TLSContexts:
    """The TLS context of each distinct ``tls`` setting, re-made when its files change."""

    def __init__(
        self, recheck_s: float = TLS_RECHECK_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.recheck_s = recheck_s
        self._clock = clock
        self._entries: dict[ProviderTLS | None, _Entry] = {}

    def get(self, settings: ProviderTLS | None) -> tuple[ssl.SSLContext, int]:
        """The context for ``settings`` and its generation (0, then one more at each reload);
        ``UpstreamConnectError`` while the files have never been read."""
        now = self._clock()
        entry = self._entries.get(settings)
        if entry is None:
            stamp = _stamp(settings) if settings is not None else ()
            ctx = tls_context(settings)
            self._entries[settings] = _Entry(ctx, stamp, now, 0)
            return ctx, 0
        if settings is None or now - entry.checked < self.recheck_s:
            return entry.ctx, entry.generation
        entry.checked = now
        stamp = _stamp(settings)
        if stamp != entry.stamp:
            try:
                ctx = tls_context(settings)
            except UpstreamConnectError as exc:
                log.warning("a provider's TLS files changed but cannot be used yet: %s", exc)
                return entry.ctx, entry.generation
            entry.ctx, entry.stamp, entry.generation = ctx, stamp, entry.generation + 1
            log.info("a provider's TLS files changed: new connections use them")
        return entry.ctx, entry.generation
