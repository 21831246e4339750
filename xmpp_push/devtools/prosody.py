"""A throw-away Prosody 0.12 on loopback ports, for integration tests and the demo.

Everything it writes stays in `run_dir`: the config, the accounts and archives
(`data/`), the log. It speaks plain TCP only (no TLS, no s2s, no HTTP) and runs as
the current user, root included (`run_as_root`). Needs the Debian packages
`prosody` and `prosody-modules` (mod_cloud_notify, mod_delegation, mod_privilege).
With `xmpp_push_plugin` it also loads the project's own server plugin from the
checkout's plugins/prosody. See PROTOCOLS.md §9 for the measurements behind the defaults.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xmpp_push.devtools import LOOPBACK, ServerError, free_loopback_ports, require_binary
from xmpp_push.devtools.server import LoopbackServer, ServerOptions

__all__ = ["Prosody", "ProsodyOptions"]

INSTALL_HINT = "the Debian packages prosody and prosody-modules"

NS_PUSH = "urn:xmpp:push:0"

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "prosody"
"""plugins/prosody in a source checkout: where mod_xmpp_push.lua lives."""


@dataclass(frozen=True)
class ProsodyOptions(ServerOptions):
    """What a test may vary between two Prosody instances (on top of ServerOptions)."""

    cloud_notify: bool = True
    smacks_hibernation_time: int = 300
    smacks_max_ack_delay: int = 5
    extra_global: str = ""
    """Lua lines for the global section, e.g. `push_notification_with_body = true`."""
    extra_plugin_paths: tuple[str, ...] = ()
    extra_modules: tuple[str, ...] = ()
    """Loaded globally: on the VirtualHost, and on the component where Prosody allows it."""
    extra_components: Mapping[str, str] = field(default_factory=dict)
    """More XEP-0114 components, JID → secret (e.g. a second push service)."""
    xmpp_push_plugin: bool = False
    """Load the project's server plugin (plugins/prosody/mod_xmpp_push.lua) on the
    VirtualHost, reporting to `component_jid` (docs/plugin-protocol.md)."""
    xmpp_push_plugin_path: str | None = None
    """The directory holding mod_xmpp_push.lua; by default the repository's
    plugins/prosody next to this package (a source checkout)."""
    log_level: str = "debug"
    """Lowest level of the file log (prosody.log): debug for tests, which read it when
    they fail; info where Prosody's own logging would weigh on what is measured."""


class Prosody(LoopbackServer[ProsodyOptions]):
    """One Prosody process: `start()`, `register()`, `stop()`, or use it as a context manager.
    Its two ports are chosen here and kept across `restart()`."""

    display_name = "Prosody"

    def __init__(
        self,
        run_dir: Path,
        options: ProsodyOptions = ProsodyOptions(),
    ) -> None:
        run_dir = run_dir.resolve()
        c2s_port, component_port = free_loopback_ports(2)
        super().__init__(
            run_dir,
            options,
            c2s_port=c2s_port,
            component_port=component_port,
            log_path=run_dir / "prosody.log",
            console_path=run_dir / "prosody.console.log",
        )
        self.config_path = self.run_dir / "prosody.cfg.lua"

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

    def _command(self) -> list[str]:
        """`prosody -F`: in the foreground, so that the process we start is Prosody."""
        prosody = require_binary("prosody", INSTALL_HINT)
        return [prosody, "--config", str(self.config_path), "-F"]

    def _wait_until_started(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        # Prosody keeps running when a port is taken; whoever answered is not us.
        if "Failed to open server port" in self._new_log():
            raise self._failure("a port was taken by another process")

    def _request_shutdown(self, process: subprocess.Popen[bytes]) -> None:
        """Nothing to ask: SIGTERM is Prosody's clean shutdown (it saves its state)."""

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
    plugin_paths = list(options.extra_plugin_paths)
    vhost_modules = list(host_modules)
    if options.xmpp_push_plugin:
        # On the VirtualHost only: its user sessions are what the plugin watches.
        plugin_paths.insert(0, str(_plugin_dir(options)))
        vhost_modules.append("xmpp_push")

    lines = [
        "-- Written by xmpp_push.devtools.prosody for a throw-away server; rewritten on start.",
        "run_as_root = true",
        f"pidfile = {_lua(str(run_dir / 'prosody.pid'))}",
        f"data_path = {_lua(str(run_dir / 'data'))}",
        # An empty certs dir keeps the certificate manager from searching /etc.
        f"certificates = {_lua(str(run_dir / 'certs'))}",
        f"plugin_paths = {_lua_list(plugin_paths)}",
        "log = {",
        f'\t{{ levels = {{ min = {_lua(options.log_level)} }}, to = "file", '
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
        f"\tmodules_enabled = {_lua_list(vhost_modules)}",
    ]
    if options.delegation:
        lines.append(f"\tdelegations = {{ [{_lua(NS_PUSH)}] = {{ jid = {component} }}; }}")
    if options.privilege:
        lines.append(
            f'\tprivileged_entities = {{ [{component}] = {{ presence = "managed_entity" }}; }}'
        )
    if options.xmpp_push_plugin:
        lines.append(f"\txmpp_push_component = {component}")
    lines += [
        "",
        f"Component {component}",
        f"\tcomponent_secret = {_lua(options.component_secret)}",
        f"\tmodules_enabled = {_lua_list(host_modules)}",
        "",
    ]
    for jid, secret in options.extra_components.items():
        lines += [f"Component {_lua(jid)}", f"\tcomponent_secret = {_lua(secret)}", ""]
    return "\n".join(lines)


def _plugin_dir(options: ProsodyOptions) -> Path:
    directory = Path(options.xmpp_push_plugin_path) if options.xmpp_push_plugin_path else PLUGIN_DIR
    if not (directory / "mod_xmpp_push.lua").is_file():
        raise ServerError(
            f"xmpp_push_plugin is set but {directory} has no mod_xmpp_push.lua "
            "(set xmpp_push_plugin_path to the repository's plugins/prosody)"
        )
    return directory.resolve()


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
