"""Throw-away XMPP servers and a small XMPP client, for tests and `xmpp-push demo`.

Nothing in here runs in production. It lives in the package (not under `tests/`)
because the `demo` command needs it too. This module holds the helpers every
throw-away server uses: loopback ports, a process in its own session, a log's tail;
`xmpp_push.devtools.server.LoopbackServer` is the life cycle built on them, which
Prosody (here) and ejabberd (`tests.servers.ejabberd`) share.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "LOOPBACK",
    "ServerError",
    "ServerNotInstalledError",
    "find_binary",
    "free_loopback_ports",
    "port_accepts",
    "read_tail",
    "require_binary",
    "stop_process_group",
    "wait_until_listening",
]

LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """A throw-away server could not be configured, started or driven."""


class ServerNotInstalledError(ServerError):
    """The server's program is not on PATH."""


SYSTEM_DIRECTORIES = ("/usr/local/sbin", "/usr/sbin", "/sbin")
"""Searched after PATH: ejabberdctl lives in /usr/sbin, which a non-login PATH may lack."""


def find_binary(name: str) -> str | None:
    """The full path of program `name` on PATH or in the sbin directories, or None."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SYSTEM_DIRECTORIES])
    return shutil.which(name, path=search)


def require_binary(name: str, install_hint: str) -> str:
    """The full path of `name`, or a ServerNotInstalledError that says how to get it."""
    path = find_binary(name)
    if path is None:
        raise ServerNotInstalledError(
            f"`{name}` is not on PATH: install {install_hint} (./scripts/bootstrap does it)"
        )
    return path


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nobody listens on right now.

    The kernel picks them from the ephemeral range (all probes are held open
    together, so no port comes back twice). Another process could take one before
    the server binds it; that is rare enough that servers report a failed bind
    clearly instead of retrying.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind((LOOPBACK, 0))
            ports.append(int(probe.getsockname()[1]))
        return ports


def port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until_listening(
    process: subprocess.Popen[bytes],
    ports: Iterable[int],
    timeout: float,
    failure: Callable[[str], ServerError],
) -> None:
    """Poll until every port accepts a connection; raise `failure(reason)` if the
    process exits first or the deadline passes."""
    pending = list(ports)
    deadline = time.monotonic() + timeout
    while pending:
        returncode = process.poll()
        if returncode is not None:
            raise failure(f"it exited with status {returncode} before listening")
        if time.monotonic() > deadline:
            raise failure(f"port(s) {pending} did not accept connections within {timeout:g} s")
        if port_accepts(pending[0]):
            pending.pop(0)
        else:
            time.sleep(0.02)


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the session the process leads, SIGKILL it after `timeout`, and reap it.

    The process must have been started with `start_new_session=True`, so that its
    process group holds everything it spawned and nothing else.
    """
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout)
    # Children the leader left behind (it may exit before them) must not outlive it.
    _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    # ProcessLookupError: nobody is left in the group; PermissionError: only a zombie
    # that belongs to someone else is.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def read_tail(path: Path, lines: int = 40, *, start: int = 0) -> str:
    """The last `lines` lines of a log file from byte `start` on, or a note if there is none."""
    try:
        with path.open("rb") as log_file:
            log_file.seek(start)
            text = log_file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else f"({path} is empty)"
