"""The lake's storage behind one small interface.

Keys are ``/``-separated paths relative to the lake root
(``raw/public.t/load_date=2026-11-27/....parquet``). A write is durable and
atomic when ``write_bytes`` returns: readers never see a partial file, and a
crash leaves either the old content or the new. Local: the file is written
beside its target, fsynced, renamed into place and the directory fsynced (and a folder
created for it fsynced into its parent, so a new ``load_date=`` folder survives a power loss).

Readers that want less than a whole file (parquet footers for ``cdc status``, a lazy
scan for ``cdc query``) use :meth:`Lake.arrow_filesystem`; Delta tables are opened at
:meth:`Lake.delta_location`. Callers never look at which backend they hold.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Protocol

import pyarrow.fs as pafs

from cdc.errors import ConfigError, LakeError
from cdc.lake.layout import check_key


class Lake(Protocol):
    """Where raw files, checkpoints and staged tables live."""

    @property
    def uri(self) -> str: ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` atomically and durably (replacing any old content)."""

    def write_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` at ``key`` only if nothing is there (atomic put-if-absent, durable
        like ``write_bytes``); False when ``key`` exists. The basis of leases."""

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error when it is not there)."""

    def read_bytes(self, key: str) -> bytes | None:
        """The content at ``key``, or None when there is none."""

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursively), sorted."""

    def check_writable(self) -> None:
        """Raise LakeError with a fix when the lake cannot be written."""

    def arrow_filesystem(self) -> pafs.SubTreeFileSystem:
        """A pyarrow filesystem in which lake keys are paths (reads ranges, not whole files).

        Its ``base_fs`` and ``base_path`` are the backend's own filesystem and the lake
        root in it.
        """

    def delta_location(self, key: str) -> tuple[str, dict[str, str] | None]:
        """The URI of the Delta table at ``key`` and the delta-rs storage options to open it."""


class LocalLake:
    """A lake in a local folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    @property
    def uri(self) -> str:
        return str(self.root)

    def path(self, key: str) -> Path:
        return self.root / key

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, data, exclusive=False)

    def write_if_absent(self, key: str, data: bytes) -> bool:
        return self._write(key, data, exclusive=True)

    def _write(self, key: str, data: bytes, *, exclusive: bool) -> bool:
        """Write beside the target, fsync, then rename (or, exclusive: hard-link, which
        fails when the target exists, so readers never see a partial file either way)."""
        target = self.path(check_key(key))
        if not target.resolve().is_relative_to(self.root.resolve()):  # a symlink out
            raise LakeError(f"refusing to write {target}: it resolves outside the lake "
                            f"{self.root}", fix="remove the symbolic link that leads out")
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            created = self._mkdirs(target.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                os.replace(tmp, target)
            _fsync_dir(target.parent)
            for folder in created:  # a new folder is durable once its parent says so
                _fsync_dir(folder.parent)
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise LakeError(f"cannot write {target}: {exc.strerror or exc}",
                            fix="check that the lake folder exists, is writable and has "
                            "free space") from exc

    def _mkdirs(self, folder: Path) -> list[Path]:
        """Create ``folder`` and missing parents; the ones created, deepest first."""
        created = []
        while not folder.is_dir():
            created.append(folder)
            folder = folder.parent
        for path in reversed(created):
            with contextlib.suppress(FileExistsError):  # a concurrent writer made it
                path.mkdir()
        return created

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise LakeError(f"cannot delete {self.path(key)}: {exc.strerror or exc}",
                            fix="check the lake folder's permissions") from exc

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LakeError(f"cannot read {self.path(key)}: {exc.strerror or exc}",
                            fix="check the lake folder's permissions") from exc

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not base.exists():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def check_writable(self) -> None:
        self.write_bytes("_cdc/.write-check", b"ok")

    def arrow_filesystem(self) -> pafs.SubTreeFileSystem:
        return pafs.SubTreeFileSystem(str(self.root), pafs.LocalFileSystem())

    def delta_location(self, key: str) -> tuple[str, dict[str, str] | None]:
        return str(self.path(key)), None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_lake(uri: str, *, s3_endpoint: str = "", s3_max_attempts: int = 10) -> Lake:
    """A lake from its URI: a local path, or ``s3://bucket/prefix`` (``cdc.lake.s3``).

    ``s3_endpoint`` names an S3-compatible endpoint (else ``AWS_ENDPOINT_URL``, else AWS).
    """
    if uri.startswith("s3://"):
        from cdc.lake.s3 import S3Lake

        return S3Lake(uri, endpoint=s3_endpoint or None, max_attempts=s3_max_attempts)
    if "://" in uri:
        raise ConfigError(f"lake {uri!r} has an unknown scheme",
                          fix="use a local folder or s3://bucket/prefix")
    return LocalLake(uri)
