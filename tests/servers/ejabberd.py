"""A throw-away ejabberd 23.01 on loopback ports, for integration tests.

Everything lives in `run_dir`: `etc/` (ejabberd.yml, ejabberdctl.cfg, inetrc),
`db/` (Mnesia), `log/`, and the Erlang cookie (HOME points there).

How it is run, and why (PROTOCOLS.md §9):

* `ejabberdctl` insists on running as the `ejabberd` user (as root it would `su`).
  We start it as that user ourselves: the whole process tree then stays in the
  session we created, so one signal to the group reaches beam too, and no `su`
  parent is left to linger as `<defunct>`. `run_dir` is therefore owned by
  `ejabberd`, and its parent directories are made traversable for it.
* Erlang distribution on a fixed, free port (`ERL_DIST_PORT`) and `ERL_EPMD_PORT`
  pointing at a closed port: no epmd is started, asked or registered with, so the
  machine's own epmd (RabbitMQ's, on 4369) is neither needed nor disturbed, and
  several instances do not collide.
* `inetrc` resolves `localhost` from a file (no DNS); `s2s_access: none` keeps
  everything on loopback.
* With `xmpp_push_plugin`, plugins/ejabberd/mod_xmpp_push.erl is compiled by its own
  build.sh (once per source version: the `.beam` is kept in a world-readable directory
  of the temp dir named after the source's hash) and loaded from there with `-pa`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmpp_push.devtools import LOOPBACK, ServerError, free_loopback_ports, require_binary
from xmpp_push.devtools.server import LoopbackServer, ServerOptions

__all__ = ["Ejabberd", "EjabberdOptions"]

INSTALL_HINT = "the Debian package ejabberd"
SYSTEM_USER = "ejabberd"
NS_PUSH = "urn:xmpp:push:0"
STARTED_LINE = " is started in the node "
PLUGIN_SOURCE_DIR = Path(__file__).resolve().parents[2] / "plugins" / "ejabberd"
PLUGIN_MODULE = "mod_xmpp_push"


@dataclass(frozen=True)
class EjabberdOptions(ServerOptions):
    """What a test may vary between two ejabberd instances (on top of ServerOptions)."""

    push: bool = True
    """Load mod_push and mod_push_keepalive."""
    include_body: bool | str = "New message"
    """mod_push `include_body`: the text put in `last-message-body`, true for the real
    body, false for none."""
    include_sender: bool = False
    mam: bool = True
    """With mod_mam, offline publishes come from the MAM hook (PROTOCOLS.md §1.4)."""
    resume_timeout: int = 300
    ack_timeout: int = 15
    loglevel: str = "info"
    extra_modules: str = ""
    """YAML for more entries under `modules:`, indented as top-level keys
    (e.g. "mod_foo:\\n  opt: 1"); indented for you."""
    extra_components: Mapping[str, str] = field(default_factory=dict)
    """More XEP-0114 components on the same listener, JID → secret (e.g. a second
    push service, or a component that is not the plugin's)."""
    code_paths: tuple[str, ...] = ()
    """Directories with extra `.beam` files, added to Erlang's code path (`-pa`)."""
    xmpp_push_plugin: bool = False
    """Build plugins/ejabberd/mod_xmpp_push.erl and load it with `component` set to
    `component_jid` (docs/plugin-protocol.md)."""


class Ejabberd(LoopbackServer[EjabberdOptions]):
    """One ejabberd node: `start()`, `register()` (while running), `stop()`, or use it
    as a context manager. Ports are chosen here and kept across `restart()`, and so is
    the node name (so Mnesia, and with it every account, survives a restart)."""

    display_name = "ejabberd"

    def __init__(
        self,
        run_dir: Path,
        options: EjabberdOptions = EjabberdOptions(),
    ) -> None:
        run_dir = run_dir.resolve()
        c2s_port, component_port, self.dist_port = free_loopback_ports(3)
        super().__init__(
            run_dir,
            options,
            c2s_port=c2s_port,
            component_port=component_port,
            log_path=run_dir / "log" / "ejabberd.log",
            console_path=run_dir / "ejabberd.console.log",
        )
        self.node = f"xmpp-push-{self.dist_port}@localhost"
        self.etc_dir = self.run_dir / "etc"
        self.log_dir = self.run_dir / "log"
        self.db_dir = self.run_dir / "db"

    def start(self, timeout: float = 60) -> None:
        """Write the config, run `ejabberdctl foreground` in its own session, and return
        once ejabberd logged that it started and both ports accept connections.
        (A port taken by someone else makes ejabberd exit, which is reported.)"""
        super().start(timeout)

    def register(self, user: str, password: str) -> None:
        """Create an account (ServerError if it exists); ejabberd must be running.
        About 0.5 s a call: each `ejabberdctl` boots an Erlang VM."""
        if not self.running:
            raise ServerError("ejabberd must be running to register accounts")
        self.ctl("register", user, self.options.domain, password)

    def ctl(self, *arguments: str, timeout: float = 30) -> str:
        """Run one `ejabberdctl` command against this node; its output, or ServerError."""
        ejabberdctl = require_binary("ejabberdctl", INSTALL_HINT)
        try:
            done = subprocess.run(
                [ejabberdctl, *self._ctl_options(), *arguments],
                cwd=self.run_dir,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                **self._as_system_user(),
            )
        except subprocess.TimeoutExpired as expired:
            raise ServerError(f"ejabberdctl {arguments[0]} took over {timeout:g} s") from expired
        if done.returncode != 0:
            raise ServerError(
                f"ejabberdctl {' '.join(arguments[:2])} failed ({done.returncode}): "
                f"{done.stdout.strip()} {done.stderr.strip()}"
            )
        output: str = done.stdout
        return output

    def _command(self) -> list[str]:
        ejabberdctl = require_binary("ejabberdctl", INSTALL_HINT)
        return [ejabberdctl, *self._ctl_options(), "foreground"]

    def _popen_options(self) -> dict[str, Any]:
        # As the `ejabberd` user from the start: beam stays in our session (see above).
        return {"env": self._environment(), **self._as_system_user()}

    def _wait_until_started(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        # Listeners open before the last modules finish starting; this line comes last.
        while STARTED_LINE not in self._new_log():
            if process.poll() is not None or time.monotonic() > deadline:
                raise self._failure("it never logged that it started")
            time.sleep(0.05)

    def _request_shutdown(self, process: subprocess.Popen[bytes]) -> None:
        """`ejabberdctl stop`, so that Mnesia is flushed."""
        try:
            self.ctl("stop", timeout=30)
            process.wait(20)
        except (ServerError, subprocess.TimeoutExpired):
            pass  # the signals that follow take care of it

    def _log_files(self) -> tuple[Path, ...]:
        return (self.console_path, self.log_path, self.log_dir / "error.log")

    def _ctl_options(self) -> list[str]:
        return [
            "--config-dir",
            str(self.etc_dir),
            "--config",
            str(self.etc_dir / "ejabberd.yml"),
            "--ctl-config",
            str(self.etc_dir / "ejabberdctl.cfg"),
            "--logs",
            str(self.log_dir),
            "--spool",
            str(self.db_dir),
        ]

    def _environment(self) -> dict[str, str]:
        # Inherited Erlang settings (ERL_EPMD_PORT, ERL_FLAGS, ...) could send the node to
        # the machine's epmd or change its flags; HOME holds this instance's cookie.
        environment = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("ERL_", "EJABBERD_"))
        }
        environment["HOME"] = str(self.run_dir)
        # With ERL_DIST_PORT every node finds ours without epmd, but beam still tries to
        # register with an epmd, and would with whichever runs on 4369 (RabbitMQ's here).
        # Port 1 is privileged, outside the ephemeral range and closed: the attempt is
        # refused at once and the node carries on (measured on OTP 25).
        environment["ERL_EPMD_PORT"] = "1"
        return environment

    def _as_system_user(self) -> dict[str, Any]:
        """Popen arguments that run ejabberdctl as `ejabberd` (when we are root)."""
        if os.geteuid() != 0:
            if pwd.getpwuid(os.geteuid()).pw_name != SYSTEM_USER:
                raise ServerError(f"ejabberdctl runs only as root or as {SYSTEM_USER!r}")
            return {}
        account = pwd.getpwnam(SYSTEM_USER)
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def _write_config(self) -> None:
        for directory in (self.run_dir, self.etc_dir, self.log_dir, self.db_dir):
            directory.mkdir(parents=True, exist_ok=True)
        (self.etc_dir / "ejabberd.yml").write_text(
            render_config(self.options, c2s_port=self.c2s_port, component_port=self.component_port)
        )
        (self.etc_dir / "ejabberdctl.cfg").write_text(self._ctl_config())
        (self.etc_dir / "inetrc").write_text(
            '{lookup,["file"]}.\n{host,{127,0,0,1}, ["localhost"]}.\n'
        )
        if os.geteuid() == 0:
            self._hand_over_to_system_user()

    def _ctl_config(self) -> str:
        erl_options = ["-env ERL_CRASH_DUMP_BYTES 0"]
        code_paths = list(self.options.code_paths)
        if self.options.xmpp_push_plugin:
            code_paths.append(str(build_plugin()))
        for path in code_paths:
            if any(char.isspace() or char in "\"'$`\\" for char in path):
                raise ValueError(f"code path must not contain spaces or quotes: {path!r}")
            erl_options.append(f"-pa {path}")
        return (
            "# Written by tests.servers.ejabberd; sourced by ejabberdctl (bash).\n"
            f"ERLANG_NODE={self.node}\n"
            f"ERL_DIST_PORT={self.dist_port}\n"
            f"INET_DIST_INTERFACE={LOOPBACK}\n"
            f"EJABBERD_PID_PATH={self.run_dir / 'ejabberd.pid'}\n"
            "EJABBERD_BYPASS_WARNINGS=true\n"
            f'ERL_OPTIONS="{" ".join(erl_options)}"\n'
        )

    def _hand_over_to_system_user(self) -> None:
        account = pwd.getpwnam(SYSTEM_USER)
        for path in [self.run_dir, *self.run_dir.rglob("*")]:
            os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
        # pytest's tmp dirs are 0700 root: without search permission on every parent,
        # ejabberd cannot reach run_dir at all.
        for parent in self.run_dir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def render_config(options: EjabberdOptions, *, c2s_port: int, component_port: int) -> str:
    """The whole ejabberd.yml for these options (strings JSON-quoted: valid YAML)."""
    q = json.dumps
    component = q(options.component_jid)
    lines = [
        "# Written by tests.servers.ejabberd for a throw-away server; rewritten on start.",
        "hosts:",
        f"  - {q(options.domain)}",
        f"loglevel: {options.loglevel}",
        "log_rotate_count: 0",
        "hide_sensitive_log_data: false",
        "certfiles: []",
        "acme:",
        "  auto: false",
        # Never open outgoing s2s; a missing component then bounces `forbidden` at once.
        "s2s_access: none",
        "auth_method: internal",
        "default_db: mnesia",
        "listen:",
        f"  - port: {c2s_port}",
        f'    ip: "{LOOPBACK}"',
        "    module: ejabberd_c2s",
        "    max_stanza_size: 262144",
        "    shaper: none",
        "    access: c2s",
        "    starttls: false",
        f"  - port: {component_port}",
        f'    ip: "{LOOPBACK}"',
        "    module: ejabberd_service",
        "    access: all",
        "    shaper: none",
        "    hosts:",
        f"      {component}:",
        f"        password: {q(options.component_secret)}",
    ]
    if options.extra_components:
        for jid, secret in options.extra_components.items():
            lines += [f"      {q(jid)}:", f"        password: {q(secret)}"]
        # By default every component connection on this listener routes *all* of its
        # hosts, so one component would receive the stanzas meant for another.
        lines.append("    global_routes: false")
    lines += [
        "acl:",
        "  local:",
        '    user_regexp: ""',
        "  push_component:",
        f"    server: {component}",
        "access_rules:",
        "  local:",
        "    allow: local",
        "  c2s:",
        "    allow: all",
        "  register:",
        "    deny: all",
        "  push_component_rule:",
        "    allow: push_component",
        "shaper_rules:",
        "  max_user_sessions: 10",
        "  max_user_offline_messages: 5000",
        "modules:",
        "  mod_disco: {}",
        "  mod_roster: {}",
        "  mod_carboncopy: {}",
        "  mod_ping: {}",
        "  mod_client_state: {}",
        "  mod_offline:",
        "    access_max_user_messages: max_user_offline_messages",
        "  mod_stream_mgmt:",
        f"    resume_timeout: {int(options.resume_timeout)}",
        f"    ack_timeout: {int(options.ack_timeout)}",
        "    resend_on_timeout: if_offline",
    ]
    if options.mam:
        lines += [
            "  mod_mam:",
            "    db_type: mnesia",
            "    default: always",
            "    assume_mam_usage: true",
        ]
    if options.push:
        include_body = (
            q(options.include_body)
            if isinstance(options.include_body, str)
            else str(options.include_body).lower()
        )
        lines += [
            "  mod_push:",
            f"    include_body: {include_body}",
            f"    include_sender: {str(options.include_sender).lower()}",
            "  mod_push_keepalive: {}",
        ]
    if options.delegation:
        lines += [
            "  mod_delegation:",
            "    namespaces:",
            f"      {q(NS_PUSH)}:",
            "        access: push_component_rule",
        ]
    if options.privilege:
        lines += [
            "  mod_privilege:",
            "    presence:",
            "      managed_entity: push_component_rule",
        ]
    if options.xmpp_push_plugin:
        lines += [
            f"  {PLUGIN_MODULE}:",
            f"    component: {component}",
        ]
    lines += ["  " + line for line in options.extra_modules.splitlines()]
    return "\n".join(lines) + "\n"


_built_plugins: dict[str, Path] = {}


def build_plugin() -> Path:
    """The directory holding mod_xmpp_push.beam built from the current source, built
    by plugins/ejabberd/build.sh the first time this source version is asked for.

    The directory lives in the temp dir, is named after the hash of the source and
    the build script, and is readable by everyone (ejabberd runs as its own user);
    a build goes to a scratch directory first and is renamed into place, so that a
    half-written `.beam` is never loaded."""
    digest = hashlib.sha256()
    for name in (f"{PLUGIN_MODULE}.erl", "build.sh"):
        digest.update((PLUGIN_SOURCE_DIR / name).read_bytes())
    key = digest.hexdigest()[:16]
    if key in _built_plugins:
        return _built_plugins[key]
    target = Path(tempfile.gettempdir()) / f"xmpp-push-ejabberd-plugin-{os.geteuid()}-{key}"
    beam = target / f"{PLUGIN_MODULE}.beam"
    if not (beam.is_file() and target.stat().st_uid == os.geteuid()):
        shutil.rmtree(target, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix="xmpp-push-ejabberd-build-"))
        try:
            done = subprocess.run(
                ["sh", str(PLUGIN_SOURCE_DIR / "build.sh"), str(scratch)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0 or not (scratch / beam.name).is_file():
                raise ServerError(
                    f"building {PLUGIN_MODULE} failed ({done.returncode}): "
                    f"{done.stdout.strip()} {done.stderr.strip()}"
                )
            # erlc warnings (on stdout) are errors here: the module must build cleanly.
            if "Warning:" in done.stdout + done.stderr:
                raise ServerError(f"{PLUGIN_MODULE} built with warnings: {done.stdout.strip()}")
            scratch.chmod(0o755)
            (scratch / beam.name).chmod(0o644)
            try:
                scratch.rename(target)
            except OSError:
                if not beam.is_file():  # not a parallel run that got there first
                    raise
                shutil.rmtree(scratch, ignore_errors=True)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    _built_plugins[key] = target
    return target
