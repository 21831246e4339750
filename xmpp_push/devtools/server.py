"""The life cycle every throw-away XMPP server shares, and the options every one takes.

A subclass says how to write its config, which command to run, how to tell that it has
finished starting and how to ask it to stop; `LoopbackServer` runs that command in a
session of its own, waits for the client and component ports, stops the whole process
group, and makes every failure carry the server's log.
"""

from __future__ import annotations

import subprocess
import time
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

from xmpp_push.devtools import (
    LOOPBACK,
    ServerError,
    read_tail,
    stop_process_group,
    wait_until_listening,
)

__all__ = ["LoopbackServer", "ServerOptions"]


@dataclass(frozen=True)
class ServerOptions:
    """What a test may vary on every server; each server's options add their own."""

    domain: str = "localhost"
    component_jid: str = "push.localhost"
    component_secret: str = "s3cret-push"
    delegation: bool = False
    """XEP-0355: the component handles `urn:xmpp:push:0` IQs instead of the server's
    own push module (Prosody speaks `urn:xmpp:delegation:2`, ejabberd `:1`)."""
    privilege: bool = False
    """XEP-0356: the component receives every user's presence (`managed_entity`)."""


OptionsT = TypeVar("OptionsT", bound=ServerOptions)


class LoopbackServer(ABC, Generic[OptionsT]):
    """One server process on loopback ports: `start()`, `stop()`, or use it as a context
    manager. The ports are chosen by the subclass, once, and kept across `restart()`,
    so that a component or client reconnects to the same address."""

    display_name: ClassVar[str]
    """How messages call the server ("Prosody", "ejabberd")."""

    def __init__(
        self,
        run_dir: Path,
        options: OptionsT,
        *,
        c2s_port: int,
        component_port: int,
        log_path: Path,
        console_path: Path,
    ) -> None:
        self.run_dir = run_dir.resolve()
        self.options = options
        self.c2s_port = c2s_port
        self.component_port = component_port
        self.log_path = log_path
        """The server's own log; `log_tail` and readiness checks read what it wrote
        since the last start."""
        self.console_path = console_path
        """Everything the process printed (config errors end up here)."""
        self._process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15) -> None:
        """Write the config, start the server in its own session, and return once the
        client and component ports accept connections and `_wait_until_started` is
        satisfied; otherwise stop it and raise ServerError with the log's tail."""
        if self._process is not None:
            raise ServerError(f"{self.display_name} in {self.run_dir} is already started")
        command = self._command()
        self._write_config()
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        deadline = time.monotonic() + timeout
        with self.console_path.open("ab") as console:
            self._process = subprocess.Popen(
                command,
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stop() signals the whole process group
                **self._popen_options(),
            )
        try:
            wait_until_listening(
                self._process, (self.c2s_port, self.component_port), timeout, self._failure
            )
            self._wait_until_started(self._process, deadline)
        except ServerError:
            self.stop()
            raise

    def stop(self) -> None:
        """Ask the server to shut down (`_request_shutdown`), then SIGTERM the process
        group, SIGKILL it after 10 s, and reap it. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            self._request_shutdown(process)
        stop_process_group(process)

    def restart(self, options: OptionsT | None = None) -> None:
        """Stop, optionally change the options, start again on the same ports.

        What the server stores on disk (accounts, registrations) survives; in-memory
        state (sessions, error counters) does not.
        """
        self.stop()
        if options is not None:
            self.options = options
        self.start()

    @abstractmethod
    def register(self, user: str, password: str) -> None:
        """Create the account `user@domain`."""

    def jid(self, user: str) -> str:
        return f"{user}@{self.options.domain}"

    def log_text(self) -> str:
        """Every log the server wrote and anything it printed, whole."""
        parts = []
        for path in self._log_files():
            if path.exists():
                parts.append(path.read_text("utf-8", "replace"))
        return "\n".join(parts)

    def log_tail(self, lines: int = 40) -> str:
        return (
            f"--- {self.console_path.name}\n{read_tail(self.console_path, lines)}\n"
            f"--- {self.log_path.name}\n{read_tail(self.log_path, lines, start=self._log_start)}"
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.run_dir)!r}, c2s={self.c2s_port}, "
            f"component={self.component_port}, running={self.running})"
        )

    # -- what a subclass provides -------------------------------------------------------

    @abstractmethod
    def _command(self) -> list[str]:
        """The command that runs the server in the foreground (ServerError if missing)."""

    @abstractmethod
    def _write_config(self) -> None:
        """Create the run directory and write every file the server reads."""

    def _popen_options(self) -> dict[str, Any]:
        """More `subprocess.Popen` arguments (`env`, `user`, ...)."""
        return {}

    @abstractmethod
    def _wait_until_started(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        """Called once the ports accept connections: raise `self._failure(...)` if the
        server is not (or will not be, by `deadline`) ready after all."""

    @abstractmethod
    def _request_shutdown(self, process: subprocess.Popen[bytes]) -> None:
        """Ask the still running server to stop cleanly; signals follow either way."""

    def _log_files(self) -> tuple[Path, ...]:
        return (self.console_path, self.log_path)

    # -- for subclasses ---------------------------------------------------------------

    def _new_log(self) -> str:
        """What the server logged since the last start."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log_file:
            log_file.seek(self._log_start)
            return log_file.read().decode("utf-8", "replace")

    def _failure(self, reason: str) -> ServerError:
        return ServerError(
            f"{self.display_name} (c2s port {self.c2s_port}, component port {self.component_port}, "
            f"run dir {self.run_dir}) did not come up: {reason}\n{self.log_tail()}"
        )
