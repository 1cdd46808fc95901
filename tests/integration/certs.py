"""Test certificates made with the openssl command: a CA, and certificates it signs for `localhost`."""

from __future__ import annotations

import subprocess
from pathlib import Path

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str = "cdc test CA") -> Path:
    """`ca.crt` and `ca.key` in `directory`; returns the certificate."""
    openssl("req", "-x509", *_EC_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", f"/CN={name}",
            cwd=directory)
    return directory / "ca.crt"


def issue_localhost_cert(directory: Path, stem: str) -> tuple[Path, Path]:
    """`{stem}.crt` and `{stem}.key`, signed by the CA in `directory`, naming `localhost` only (not
    127.0.0.1, so that verifying the host name can be seen to fail)."""
    openssl("req", *_EC_KEY, "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", "/CN=localhost", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{stem}.crt", "-days", "2", "-extfile", "san.ext", cwd=directory)
    return directory / f"{stem}.crt", directory / f"{stem}.key"
