"""A throwaway local PostgreSQL cluster with ``wal_level=logical``.

Serves the demo and the test suite: both need a real server they can start
and stop without touching the machine's own clusters. ``initdb`` and
``postgres`` refuse to run as root, so when we are root the server runs as the
``postgres`` user, with its data and socket in a directory that user owns.

A process killed with SIGKILL (a test run cut short) cannot stop its cluster, so each
cluster's owner is recorded beside it (``cdc-pg-XXXX.owner``: pid, the kernel's start time of
that process, host and pid namespace), and starting a cluster first reaps the clusters whose
owner is gone (:func:`reap_orphans`). A cluster whose owner lives — another test run on this
machine — or one without a record is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cdc.errors import SetupError
from cdc.owner import gone as owner_gone
from cdc.owner import this_process

DEFAULT_SETTINGS: Mapping[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "40",
    "max_wal_senders": "40",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "128MB",
    "max_connections": "100",
    "listen_addresses": "127.0.0.1",
    "logical_decoding_work_mem": "64MB",
}


def find_pg_bin(name: str) -> str:
    """Return the path of a PostgreSQL server binary (PATH first, then Debian's layout)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if candidates:
        return str(candidates[0])
    raise SetupError(
        f"PostgreSQL server binary {name!r} not found",
        fix="install the server packages (apt-get install postgresql) or put them on PATH",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


OWNER = ".owner"  # suffix of the record beside a cluster's directory


def reap_orphans(base_dir: Path | None = None) -> list[Path]:
    """Stop and remove the clusters in ``base_dir`` (default: the temp folder) whose owner
    process is gone; the directories reaped."""
    root = Path(base_dir or tempfile.gettempdir())
    reaped = []
    for record in sorted(root.glob(f"cdc-pg-*{OWNER}")):
        cluster = record.with_name(record.name[:-len(OWNER)])
        try:
            owner = json.loads(record.read_text())
            if not owner_gone(owner):
                continue
            if os.geteuid() != 0 and cluster.exists() and cluster.stat().st_uid != os.geteuid():
                continue  # not ours to stop
            claim = record.with_name(f"{record.name}.reaping-{os.getpid()}")
            os.rename(record, claim)  # one reaper per orphan: the others' rename fails
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written, just claimed by another reaper, or not a record of ours
        _stop_orphan(cluster)
        shutil.rmtree(cluster, ignore_errors=True)
        claim.unlink(missing_ok=True)
        reaped.append(cluster)
    return reaped


def _stop_orphan(cluster: Path) -> None:
    data = cluster / "data"
    if not (data / "postmaster.pid").exists():
        return
    uid = cluster.stat().st_uid
    user = pwd.getpwuid(uid).pw_name if os.geteuid() == 0 and uid != 0 else None
    with contextlib.suppress(Exception):
        subprocess.run([find_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                        "stop"], user=user, check=False, capture_output=True, cwd=str(cluster),
                       timeout=60)


@dataclass
class LocalCluster:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1."""

    settings: Mapping[str, str] = field(default_factory=dict)
    base_dir: Path | None = None
    port: int = 0
    _dir: Path | None = None
    _user: str | None = None

    @property
    def data_dir(self) -> Path:
        assert self._dir is not None
        return self._dir / "data"

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), user=self._user, check=check, capture_output=True, text=True,
            cwd=str(self._dir), env={**os.environ, "LC_ALL": "C.UTF-8"},
        )

    @property
    def _owner_path(self) -> Path:
        assert self._dir is not None
        return self._dir.with_name(self._dir.name + OWNER)

    def start(self) -> LocalCluster:
        with contextlib.suppress(Exception):  # clean-up of killed runs must never stop this one
            reap_orphans(self.base_dir)
        self._dir = Path(tempfile.mkdtemp(prefix="cdc-pg-", dir=self.base_dir))
        written = self._dir.with_name(self._dir.name + OWNER + ".tmp")
        written.write_text(json.dumps(this_process()))
        written.replace(self._owner_path)  # before the server exists: never an unowned one
        if os.geteuid() == 0:
            self._user = "postgres"
            try:
                pw = pwd.getpwnam(self._user)
            except KeyError as exc:
                raise SetupError(
                    "running as root but there is no 'postgres' user to run the server",
                    fix="install the postgresql package (it creates the user) or run as non-root",
                ) from exc
            os.chown(self._dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self._dir, 0o700)
        self.port = self.port or free_port()
        try:
            self._run(find_pg_bin("initdb"), "-D", str(self.data_dir), "-U", "postgres",
                      "-A", "trust", "-E", "UTF8", "--no-sync")
        except subprocess.CalledProcessError as exc:
            raise SetupError(f"initdb failed: {exc.stderr.strip()}",
                             fix="check the PostgreSQL installation") from exc
        conf = {**DEFAULT_SETTINGS, **self.settings, "port": str(self.port),
                "unix_socket_directories": str(self._dir)}
        with open(self.data_dir / "postgresql.conf", "a") as f:
            for key, value in conf.items():
                f.write(f"{key} = '{value}'\n")
        with open(self.data_dir / "pg_hba.conf", "a") as f:
            f.write("host replication all 127.0.0.1/32 trust\n")
        try:
            self._run(find_pg_bin("pg_ctl"), "-D", str(self.data_dir), "-l",
                      str(self._dir / "server.log"), "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as exc:
            log = (self._dir / "server.log").read_text(errors="replace")[-2000:]
            raise SetupError(f"PostgreSQL failed to start: {log}",
                             fix="see the server log above") from exc
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self._dir is None:
            return
        with contextlib.suppress(Exception):
            self._run(find_pg_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                      "-w", "stop", check=False)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._owner_path.unlink(missing_ok=True)
        self._dir = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
