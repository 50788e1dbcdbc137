"""A test CA made with openssl, a server certificate it signed for 127.0.0.1, and how a
redis-server (or a sentinel) speaks only TLS with them; ACL users for the servers.

Made in the test's own directory, valid two days; the private keys never leave it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest


def openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing (Debian: apt-get install -y openssl)")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Certs:
    """A CA and the server certificate and key it signed (for 127.0.0.1 and localhost)."""

    ca: Path
    cert: Path
    key: Path
    mutual: bool = False
    """Servers want a client certificate the CA signed (``tls-auth-clients yes``); clients
    show the same certificate (no extended key usage: good for both ends)."""

    def query(self) -> str:
        """The URL query options naming the CA (``ssl_ca_certs=...``), and the client's
        certificate and key when ``mutual``."""
        q = f"ssl_ca_certs={quote(str(self.ca), safe='')}"
        if self.mutual:
            q += f"&ssl_certfile={quote(str(self.cert), safe='')}"
            q += f"&ssl_keyfile={quote(str(self.key), safe='')}"
        return q

    def server_lines(self, port: int) -> list[str]:
        """The config lines of a server (or sentinel) listening with TLS only on ``port`` and
        speaking TLS to the servers it connects to (its primary, the monitored ones)."""
        return [
            "port 0", f"tls-port {port}", f"tls-cert-file {self.cert}",
            f"tls-key-file {self.key}", f"tls-ca-cert-file {self.ca}",
            f"tls-auth-clients {'yes' if self.mutual else 'no'}", "tls-replication yes",
        ]  # fmt: skip

    def server_args(self, port: int) -> list[str]:
        """``server_lines`` as redis-server's command-line options."""
        return [arg for line in self.server_lines(port) for arg in _option(line)]

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py's arguments of a client trusting the CA (showing the certificate when
        ``mutual``)."""
        shown = (
            {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)} if self.mutual else {}
        )
        return {"ssl": True, "ssl_ca_certs": str(self.ca), **shown}


def make_certificates(d: Path) -> Certs:
    """A CA, and a server certificate it signed for 127.0.0.1 (both in ``d``)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = d / "ca.crt", d / "ca.key"
    openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", "/CN=router-cluster test CA")  # fmt: skip
    key, csr, cert = d / "server.key", d / "server.csr", d / "server.crt"
    openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = d / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return Certs(ca, cert, key)


def acl_lines(user: str, password: str) -> list[str]:
    """Config lines: ``user`` with ``password`` may do everything; ``default`` is off (a
    connection that does not log in as ``user`` can do nothing)."""
    return [f"user {user} on >{password} ~* &* +@all", "user default off"]


def acl_args(user: str, password: str) -> list[str]:
    """``acl_lines`` as redis-server's command-line options."""
    return [arg for line in acl_lines(user, password) for arg in _option(line)]


def _option(line: str) -> list[str]:
    name, *values = line.split()
    return [f"--{name}", *values]
