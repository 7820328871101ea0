"""One writer per storage root: the lease a `hyperinf run` holds on its root for the whole invocation.

The lease is an exclusive ``flock`` on ``<root>/.hyperinf.lease``. The operating system drops it when the process
ends, however it ends (a crash or ``kill -9`` never leaves a stale lease); the file also names the holder (pid,
host, config, start time, invocation id), only for the message a refused run prints. A step of a Dagster run
that no holder launched (the UI, automation) takes the same lock *shared* for as long as it runs (`share_root`):
it refuses to start while a `hyperinf run` holds the root, and a `hyperinf run` refuses to start while such a
step runs. Steps of the holder's own runs carry its invocation id in the run tag ``INVOCATION_TAG`` and take
nothing.

What is guaranteed: on one host, for a local root (and for a network file system whose ``flock`` is real, e.g.
NFSv4 on Linux). An ``s3://`` root has no file to lock: its lease is a local file named after the root's URI
(under the temp folder), so runs on one host never overlap; runs on two hosts writing one bucket prefix are not
prevented.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from hyperinf_ops.errors import ConfigError, HyperinfError
from hyperinf_ops.location import is_object_store

__all__ = ["INVOCATION_TAG", "LEASE_FILE", "LeaseHolder", "RootInUseError", "hold_root", "lease_path", "process_alive",
           "share_root"]

LEASE_FILE = ".hyperinf.lease"
# The run tag that names the `hyperinf run` invocation a Dagster run belongs to (filter the UI's runs by it).
INVOCATION_TAG = "hyperinf/invocation"
# Leases of object-store roots, which have no file of their own that a flock could hold.
REMOTE_LEASES = Path(tempfile.gettempdir()) / "hyperinf-leases"


class RootInUseError(HyperinfError):
    """Another run holds the storage root; the message names it."""


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a root: written into the lease file, read back only to name it in a refusal."""

    pid: int
    host: str
    config: str
    started_at: str
    invocation: str

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{where}, config {self.config}, since {self.started_at}"


def lease_path(root: str | os.PathLike[str]) -> Path:
    """The lease file of `root`: in the root for a local folder, under the temp folder for an object store."""
    if is_object_store(root):
        return REMOTE_LEASES / f"{hashlib.sha256(os.fspath(root).encode()).hexdigest()[:24]}.lease"
    return Path(root) / LEASE_FILE


@contextmanager
def hold_root(root: str | os.PathLike[str], config_path: str | os.PathLike[str]) -> Iterator[LeaseHolder]:
    """Hold `root` exclusively until the block ends (or the process dies); RootInUseError naming the holder at
    once, never waiting, if another run holds it. A root folder created here for the lease alone (the run ended
    before writing anything) is removed again."""
    path = lease_path(root)
    created = not path.parent.exists()
    fd = _lock(path, fcntl.LOCK_EX)
    if fd is None:
        raise RootInUseError(f"storage root {root} is in use by {_describe_exclusion(path)}: wait for it, or use "
                             "another storage_root")
    holder = LeaseHolder(pid=os.getpid(), host=socket.gethostname(), config=str(config_path),
                         started_at=time.strftime("%Y-%m-%d %H:%M:%S"), invocation=uuid.uuid4().hex[:12])
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
        yield holder
    finally:
        # Clear the holder so that a step holding the lock shared is not mistaken for this run later.
        os.ftruncate(fd, 0)
        if created and set(os.listdir(path.parent)) == {path.name}:
            path.unlink()  # safe while locked: `_lock` checks that the file it locked is still the one at `path`
            path.parent.rmdir()
        os.close(fd)


@contextmanager
def share_root(root: str | os.PathLike[str], invocation: str | None) -> Iterator[None]:
    """For a step about to write under `root`: nothing to do if the root's holder is `invocation` (a step of
    the holder's own runs); else hold the lease shared until the block ends, RootInUseError naming the holder
    if a `hyperinf run` holds it."""
    path = lease_path(root)
    holder = _live_holder(path)
    if invocation is not None and holder is not None and holder.invocation == invocation:
        yield
        return
    fd = _lock(path, fcntl.LOCK_SH)
    if fd is None:
        who = f" ({holder.describe()})" if holder is not None else ""
        raise RootInUseError(f"storage root {root} is in use by a hyperinf run{who}: this run writes nothing; "
                             "launch it again once that one has ended")
    try:
        yield
    finally:
        os.close(fd)


def _lock(path: Path, kind: int) -> int | None:
    """An open descriptor of `path` locked with `kind` (LOCK_EX or LOCK_SH), or None if another holds a lock
    that excludes it. Retries when the locked file was removed meanwhile (`hold_root` removes the file of a root
    it created), so two processes never hold locks on two different files of one path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. storage_root under /proc, or in a read-only folder
        raise ConfigError(f"storage_root: cannot create {path.parent}: {err.strerror}; give a folder this user can "
                          "write") from err
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _describe_exclusion(path: Path) -> str:
    """Who keeps `path` from being locked exclusively. A shared lock that can be taken means only steps of
    Dagster runs hold it; otherwise a `hyperinf run` holds it exclusively, and its record is read (a holder that
    has just taken the lock writes its record a moment later: read again for up to a second)."""
    shared = _lock(path, fcntl.LOCK_SH)
    if shared is not None:
        os.close(shared)
        return "a Dagster run launched from the UI or by automation"
    for _ in range(20):
        holder = _live_holder(path)
        if holder is not None:
            return f"another hyperinf run ({holder.describe()})"
        time.sleep(0.05)
    return "another hyperinf run"


def _live_holder(path: Path) -> LeaseHolder | None:
    """The holder written in the lease file, if its process still runs (a crashed run's record is stale; on
    another host liveness cannot be checked and the record is trusted)."""
    try:
        holder = LeaseHolder(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if holder.host == socket.gethostname() and not process_alive(holder.pid):
        return None
    return holder


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
