"""Start and stop ``dagster dev`` (webserver + daemon + code server) so that it can always be stopped.

A shell-backgrounded ``dagster dev`` starts with SIGINT ignored, and Dagster copies that handler onto
SIGTERM, so it then ignores both. Here the child gets default handlers back and its own session (process
group): ``stop_dagster_dev`` sends SIGTERM to the leader, then to the whole group, and SIGKILL only as a
last resort.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Exec'd by the child: default SIGINT/SIGTERM handlers (an ignored signal stays ignored across exec), then
# the real command. No preexec_fn, so nothing runs between fork and exec in this (threaded) process.
_EXEC_WITH_DEFAULT_SIGNALS = (
    "import os, signal, sys; "
    "[signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)]; "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def start_dagster_dev(
    *,
    dagster_home: Path,
    workspace: Path,
    port: int,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    output: IO | None = None,
) -> subprocess.Popen:
    """Launch ``dagster dev`` on ``host:port`` with the given instance and workspace; returns at once."""
    cmd = [sys.executable, "-c", _EXEC_WITH_DEFAULT_SIGNALS,
           "-m", "dagster", "dev", "-w", str(workspace), "-h", host, "-p", str(port)]
    full_env = {**os.environ, "DAGSTER_HOME": str(dagster_home), **(env or {})}
    stderr = subprocess.STDOUT if output is not None else None
    return subprocess.Popen(cmd, env=full_env, start_new_session=True, stdout=output, stderr=stderr)


def wait_until_ready(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> dict:
    """Poll ``<url>/server_info`` until it answers; raises if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited with code {proc.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"dagster dev did not answer at {url} within {timeout:.0f} s")


def stop_dagster_dev(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the server, then its process group; SIGKILL whatever is left after ``timeout``."""
    pgid = proc.pid  # start_new_session made the child its own process group leader
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(pgid):
            break
        _signal_group(pgid, sig)
        deadline = time.monotonic() + timeout / 2
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    if proc.poll() is None:
        proc.wait(5)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies of others' children included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
