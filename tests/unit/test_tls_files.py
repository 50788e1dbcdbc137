"""``TLSContexts``: a provider's TLS context follows its files, re-checked at most every
``recheck_s``; a file that cannot be read at a re-check keeps the last good context."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from router.config import ProviderTLS
from router.errors import UpstreamConnectError
from router.upstream.tlsfiles import TLSContexts


def _ca(path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing (Debian: apt-get install -y openssl)")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(path.with_suffix(".key")), "-out", str(path), "-days", "1",
         "-subj", f"/CN={path.stem}"],
        check=True, capture_output=True,
    )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_changed_files_make_a_new_context_at_the_next_check(tmp_path: Path) -> None:
    first, second, ca = tmp_path / "first.pem", tmp_path / "second.pem", tmp_path / "ca.pem"
    _ca(first)
    _ca(second)
    shutil.copyfile(first, ca)
    settings = ProviderTLS(ca_file=str(ca))
    clock = Clock()
    contexts = TLSContexts(recheck_s=10, clock=clock)
    ctx, gen = contexts.get(settings)
    assert gen == 0
    assert isinstance(ctx, ssl.SSLContext)
    assert contexts.get(settings) == (ctx, 0)

    second_bytes = second.read_bytes()
    ca.write_bytes(second_bytes + b"\n")  # another size: seen whatever the clock's grain
    clock.now = 5
    assert contexts.get(settings) == (ctx, 0)  # not re-checked yet
    clock.now = 10
    renewed, gen = contexts.get(settings)
    assert gen == 1
    assert renewed is not ctx
    assert [c["subject"] for c in renewed.get_ca_certs()] == [((("commonName", "second"),),)]

    ca.write_text("half written")  # unreadable at the next check: the last good one stays
    clock.now = 20
    assert contexts.get(settings) == (renewed, 1)
    ca.write_bytes(first.read_bytes())  # readable again: used at the next check
    clock.now = 30
    again, gen = contexts.get(settings)
    assert gen == 2
    assert [c["subject"] for c in again.get_ca_certs()] == [((("commonName", "first"),),)]


def test_files_never_read_are_an_error_every_time(tmp_path: Path) -> None:
    settings = ProviderTLS(ca_file=str(tmp_path / "missing.pem"))
    contexts = TLSContexts(recheck_s=0)
    for _ in range(2):
        with pytest.raises(UpstreamConnectError, match="TLS setup failed"):
            contexts.get(settings)
