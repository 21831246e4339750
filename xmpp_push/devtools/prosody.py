"""A throw-away Prosody 0.12 on loopback ports, for integration tests and the demo.

Everything it writes stays in `run_dir`: the config, the accounts and archives
(`data/`), the log. It speaks plain TCP only (no TLS, no s2s, no HTTP) and runs as
the current user, root included (`run_as_root`). Needs the Debian packages
`prosody` and `prosody-modules` (mod_cloud_notify, mod_delegation, mod_privilege).
See PROTOCOLS.md §9 for the measurements behind the defaults.
"""

from __future__ import annotations

import subprocess
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from xmpp_push.devtools import (
    LOOPBACK,
    ServerError,
    free_loopback_ports,
    read_tail,
    require_binary,
    stop_process_group,
    wait_until_listening,
)

__all__ = ["Prosody", "ProsodyOptions"]

INSTALL_HINT = "the Debian packages prosody and prosody-modules"

NS_PUSH = "urn:xmpp:push:0"


@dataclass(frozen=True)
class ProsodyOptions:
    """What a test may vary between two Prosody instances."""

    domain: str = "localhost"
    component_jid: str = "push.localhost"
    component_secret: str = "s3cret-push"
    delegation: bool = False
    """XEP-0355: the component handles `urn:xmpp:push:0` IQs instead of mod_cloud_notify."""
    privilege: bool = False
    """XEP-0356: the component receives every user's presence (`managed_entity`)."""
    cloud_notify: bool = True
    smacks_hibernation_time: int = 300
    smacks_max_ack_delay: int = 5
    extra_global: str = ""
    """Lua lines for the global section, e.g. `push_notification_with_body = true`."""
    extra_plugin_paths: tuple[str, ...] = ()
    extra_modules: tuple[str, ...] = ()
    """Loaded globally: on the VirtualHost, and on the component where Prosody allows it."""


class Prosody:
    """One Prosody process: `start()`, `register()`, `stop()`, or use it as a context manager.

    The ports are chosen once, here, and kept across `restart()`, so that a component
    or client reconnects to the same address.
    """

    def __init__(
        self,
        run_dir: Path,
        options: ProsodyOptions = ProsodyOptions(),
    ) -> None:
        self.run_dir = run_dir.resolve()
        self.options = options
        self.c2s_port, self.component_port = free_loopback_ports(2)
        self.config_path = self.run_dir / "prosody.cfg.lua"
        self.log_path = self.run_dir / "prosody.log"
        self.console_path = self.run_dir / "prosody.console.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15) -> None:
        """Write the config, start `prosody -F` in its own session, and return once the
        client and component ports accept connections."""
        if self._process is not None:
            raise ServerError(f"Prosody in {self.run_dir} is already started")
        prosody = require_binary("prosody", INSTALL_HINT)
        self._write_config()
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.console_path.open("ab") as console:
            self._process = subprocess.Popen(
                [prosody, "--config", str(self.config_path), "-F"],
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stop() signals its whole process group
            )
        try:
            wait_until_listening(
                self._process, (self.c2s_port, self.component_port), timeout, self._failure
            )
            # Prosody keeps running when a port is taken; whoever answered is not us.
            if "Failed to open server port" in self._new_log():
                raise self._failure("a port was taken by another process")
        except ServerError:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM (Prosody saves its state on it), SIGKILL after 10 s; idempotent."""
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process)

    def restart(self, options: ProsodyOptions | None = None) -> None:
        """Stop, optionally change the options, start again on the same ports.

        Accounts and stored registrations survive; in-memory state (sessions, error
        counters) does not.
        """
        self.stop()
        if options is not None:
            self.options = options
        self.start()

    def register(self, user: str, password: str) -> None:
        """Create an account with `prosodyctl register`; works whether Prosody runs or not."""
        prosodyctl = require_binary("prosodyctl", INSTALL_HINT)
        self._write_config()
        done = subprocess.run(
            [
                prosodyctl,
                "--config",
                str(self.config_path),
                "register",
                user,
                self.options.domain,
                password,
            ],
            cwd=self.run_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(
                f"prosodyctl register {user}@{self.options.domain} failed "
                f"({done.returncode}): {done.stdout.strip()} {done.stderr.strip()}"
            )

    def jid(self, user: str) -> str:
        return f"{user}@{self.options.domain}"

    def log_text(self) -> str:
        """Prosody's debug log and anything it printed (config errors go to the console)."""
        parts = []
        for path in (self.console_path, self.log_path):
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
            f"Prosody({str(self.run_dir)!r}, c2s={self.c2s_port}, "
            f"component={self.component_port}, running={self.running})"
        )

    def _new_log(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log_file:
            log_file.seek(self._log_start)
            return log_file.read().decode("utf-8", "replace")

    def _failure(self, reason: str) -> ServerError:
        return ServerError(
            f"Prosody (c2s port {self.c2s_port}, component port {self.component_port}, "
            f"run dir {self.run_dir}) did not come up: {reason}\n{self.log_tail()}"
        )

    def _write_config(self) -> None:
        for directory in (self.run_dir, self.run_dir / "data", self.run_dir / "certs"):
            directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            render_config(
                self.options,
                run_dir=self.run_dir,
                c2s_port=self.c2s_port,
                component_port=self.component_port,
            )
        )


def render_config(
    options: ProsodyOptions, *, run_dir: Path, c2s_port: int, component_port: int
) -> str:
    """The whole prosody.cfg.lua for these options."""
    modules = [
        "disco",
        "roster",
        "saslauth",
        "carbons",
        "ping",
        "mam",
        "smacks",
        # Autoloaded by 0.12 anyway; listed because the offline publish path needs it.
        "offline",
    ]
    if options.cloud_notify:
        modules.append("cloud_notify")
    modules.extend(options.extra_modules)
    # XEP-0355/0356 modules must run on the component host too, or the component
    # never gets the advertisement and delegated IQs are not routed (PROTOCOLS.md §9).
    host_modules = []
    if options.delegation:
        host_modules.append("delegation")
    if options.privilege:
        host_modules.append("privilege")
    component = _lua(options.component_jid)

    lines = [
        "-- Written by xmpp_push.devtools.prosody for a throw-away server; rewritten on start.",
        "run_as_root = true",
        f"pidfile = {_lua(str(run_dir / 'prosody.pid'))}",
        f"data_path = {_lua(str(run_dir / 'data'))}",
        # An empty certs dir keeps the certificate manager from searching /etc.
        f"certificates = {_lua(str(run_dir / 'certs'))}",
        f"plugin_paths = {_lua_list(options.extra_plugin_paths)}",
        "log = {",
        f'\t{{ levels = {{ min = "debug" }}, to = "file", '
        f"filename = {_lua(str(run_dir / 'prosody.log'))} }};",
        '\t{ levels = { min = "warn" }, to = "console" };',
        "}",
        f"interfaces = {_lua_list([LOOPBACK])}",
        f"local_interfaces = {_lua_list([LOOPBACK])}",
        f"c2s_interfaces = {_lua_list([LOOPBACK])}",
        f"component_interfaces = {_lua_list([LOOPBACK])}",
        f"c2s_ports = {{ {c2s_port} }}",
        "c2s_direct_tls_ports = { }",
        "legacy_ssl_ports = { }",
        f"component_ports = {{ {component_port} }}",
        "s2s_ports = { }",
        "http_ports = { }",
        "https_ports = { }",
        f"modules_enabled = {_lua_list(modules)}",
        'modules_disabled = { "s2s"; "s2s_auth_certs"; "tls" }',
        'authentication = "internal_hashed"',
        'storage = "internal"',
        "c2s_require_encryption = false",
        "allow_unencrypted_plain_auth = true",
        "allow_registration = false",
        # No rate limits: tests send bursts.
        "limits = { }",
        'archive_expires_after = "1d"',
        f"smacks_hibernation_time = {int(options.smacks_hibernation_time)}",
        f"smacks_max_ack_delay = {int(options.smacks_max_ack_delay)}",
        "push_max_errors = 16",
        'push_notification_important_body = "New Message!"',
        options.extra_global,
        "",
        f"VirtualHost {_lua(options.domain)}",
        f"\tmodules_enabled = {_lua_list(host_modules)}",
    ]
    if options.delegation:
        lines.append(f"\tdelegations = {{ [{_lua(NS_PUSH)}] = {{ jid = {component} }}; }}")
    if options.privilege:
        lines.append(
            f'\tprivileged_entities = {{ [{component}] = {{ presence = "managed_entity" }}; }}'
        )
    lines += [
        "",
        f"Component {component}",
        f"\tcomponent_secret = {_lua(options.component_secret)}",
        f"\tmodules_enabled = {_lua_list(host_modules)}",
        "",
    ]
    return "\n".join(lines)


def _lua(value: str) -> str:
    """A Lua string literal; every byte that could end or bend it is escaped."""
    escaped = []
    for char in value:
        if char in '\\"':
            escaped.append("\\" + char)
        elif char.isprintable() and char.isascii():
            escaped.append(char)
        else:
            escaped.extend(f"\\{byte}" for byte in char.encode("utf-8"))
    return '"' + "".join(escaped) + '"'


def _lua_list(values: tuple[str, ...] | list[str]) -> str:
    if not values:
        return "{ }"
    return "{ " + "; ".join(_lua(value) for value in values) + "; }"
