"""The configuration: one TOML file, every key overridable by environment variable.

Each key is declared once, as a field of one of the section dataclasses below: its type
is the annotation, and `_key()` attaches the default, the help text and the rules the
value must pass. `KEYS` is the table derived from those fields; the loader, the
environment-variable names, `render_reference()` (docs/configuration.md) and
`default_config_toml()` (deploy/xmpp-push.example.toml) all read that table, so a key
cannot exist in one place and be missing from another.

Everything is checked at load. Any problem raises `ConfigError` naming the key, so the
process refuses to start with one clear message (the CLI turns it into exit code 2)
instead of failing on the first notification.

Regenerate the generated files with::

    python -m xmpp_push.config reference > docs/configuration.md
    python -m xmpp_push.config example > deploy/xmpp-push.example.toml
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import sys
import textwrap
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from enum import Enum
from inspect import cleandoc
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from xmpp_push.core.model import DEFAULT_BODY, MAX_TTL

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_FILE_NAME",
    "ENV_PREFIX",
    "KEYS",
    "ApnsConfig",
    "ComponentConfig",
    "Config",
    "ConfigError",
    "FcmConfig",
    "HttpConfig",
    "Key",
    "LogConfig",
    "PolicyConfig",
    "StorageConfig",
    "default_config_toml",
    "load_config",
    "render_reference",
    "resolve_config_path",
]

ENV_PREFIX = "XMPP_PUSH_"
CONFIG_ENV = "XMPP_PUSH_CONFIG"
DEFAULT_FILE_NAME = "xmpp-push.toml"

# Public on purpose: the service warns at start while it is in use.
_DEFAULT_SECRET = "xmpp-push"
# Bounds a read of a key file; a wrong path to something huge must not hang the start.
_MAX_KEY_FILE_BYTES = 1 << 20


class ConfigError(Exception):
    """A configuration problem, named by its key (`section.key`, a file or a variable)."""

    key: str
    reason: str

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


# --------------------------------------------------------------------------- rules


class _Rejected(Exception):
    """Raised by a rule; a distinct type so a bug's ValueError is not read as bad input."""


T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


@dataclass(frozen=True, slots=True)
class Rule(Generic[T_contra]):
    """A check on a typed value. `doc` says what passes, for the generated reference."""

    doc: str
    check: Callable[[T_contra], None]


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise _Rejected(reason)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _number_range(lo: float, hi: float | None, *, lo_exclusive: bool = False) -> Rule[float]:
    if hi is not None:
        doc = f"{_number(lo)} to {_number(hi)}"
    else:
        doc = f"greater than {_number(lo)}" if lo_exclusive else f"at least {_number(lo)}"

    def check(value: float) -> None:
        too_low = value <= lo if lo_exclusive else value < lo
        too_high = hi is not None and value > hi
        _require(not (too_low or too_high), f"must be {doc}, got {value!r}")

    return Rule(doc, check)


def _between(lo: float, hi: float) -> Rule[float]:
    return _number_range(lo, hi)


def _at_least(lo: float) -> Rule[float]:
    return _number_range(lo, None)


_positive = _number_range(0, None, lo_exclusive=True)


def _check_non_empty(value: str) -> None:
    # No value in the message: the keys that use this rule hold secrets.
    _require(value != "", "must not be empty")


_non_empty = Rule("not empty", _check_non_empty)


def _optional(rule: Rule[str]) -> Rule[str]:
    """Empty means "not configured"; anything else must pass `rule`."""

    def check(value: str) -> None:
        if value:
            rule.check(value)

    return Rule(f"empty, or {rule.doc}", check)


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _domain_problem(text: str) -> str | None:
    try:
        # IDNA turns an internationalised domain into the ASCII labels that DNS checks.
        ascii_form = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return f"{text!r} is not a valid domain name"
    if not ascii_form or len(ascii_form) > 253:
        return f"{text!r} is not a valid domain name"
    for label in ascii_form.split("."):
        if not _LABEL.fullmatch(label):
            return f"{text!r} is not a valid domain name (bad label {label!r})"
    return None


def _check_domain(value: str) -> None:
    problem = _domain_problem(value)
    _require(problem is None, problem or "")


def _host_problem(text: str) -> str | None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return _domain_problem(text)
    return None


def _check_host(value: str) -> None:
    problem = _host_problem(value)
    _require(problem is None, problem or "")


def _check_bare_domain_jid(value: str) -> None:
    _require(
        "@" not in value and "/" not in value,
        f"{value!r} must be a bare domain JID such as push.example.org (no '@', no '/')",
    )
    _check_domain(value)


def _check_each_domain(values: tuple[str, ...]) -> None:
    for value in values:
        _check_domain(value)


_host = Rule("a host name or IP address", _check_host)
_domain_jid = Rule("a domain JID such as `push.example.org`", _check_bare_domain_jid)
_domain_list = Rule("domain names", _check_each_domain)

_DATABASE_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg", "mysql+asyncmy", "mysql+aiomysql")


def _check_database_url(value: str) -> None:
    scheme, separator, rest = value.partition("://")
    # Only the scheme is ever quoted: the rest of a database URL may hold a password.
    _require(bool(separator and rest), "is not a URL of the form scheme://...")
    _require(
        scheme in _DATABASE_SCHEMES,
        f"unsupported scheme {scheme!r}; use one of {', '.join(_DATABASE_SCHEMES)}",
    )


_database_url = Rule(
    "a URL whose scheme is " + ", ".join(f"`{s}`" for s in _DATABASE_SCHEMES),
    _check_database_url,
)


def _https_url(*, origin_only: bool) -> Rule[str]:
    doc = "an `https://host[:port]` URL" if origin_only else "an `https://` URL"

    def check(value: str) -> None:
        parts = urlsplit(value)
        _require(parts.scheme == "https", f"must be {doc}, got {value!r}")
        _require(bool(parts.hostname), f"{value!r} has no host")
        try:
            parts.port  # noqa: B018 - reading it is what validates it
        except ValueError:
            raise _Rejected(f"{value!r} has an invalid port") from None
        _require(not parts.username and not parts.password, f"{value!r} must not hold credentials")
        _require(
            not parts.query and not parts.fragment, f"{value!r} must have no query or fragment"
        )
        if origin_only:
            _require(parts.path in ("", "/"), f"{value!r} must have no path (only host and port)")

    return Rule(doc, check)


def _split_listen(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into its parts; the one parser for `http.listen`."""
    host, separator, port_text = value.rpartition(":")
    _require(bool(separator and host), f"{value!r} is not host:port (e.g. 127.0.0.1:8080)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Rejected(f"{host!r} in {value!r} is not an IPv6 address") from None
    else:
        _require(
            ":" not in host, f"write an IPv6 address in brackets, e.g. [::1]:8080, not {value!r}"
        )
        _require(
            _host_problem(host) is None, f"{host!r} in {value!r} is not a host name or address"
        )
    _require(port_text.isdigit() and 1 <= int(port_text) <= 65535, f"{value!r} has no valid port")
    return host, int(port_text)


def _check_listen(value: str) -> None:
    _split_listen(value)


_listen = Rule("`host:port`, e.g. `127.0.0.1:8080` or `[::1]:8080`", _check_listen)


def _read_file(value: str) -> bytes:
    try:
        with Path(value).open("rb") as stream:
            data = stream.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as error:
        raise _Rejected(f"cannot read {value}: {error.strerror or error}") from None
    _require(len(data) <= _MAX_KEY_FILE_BYTES, f"{value} is too large to be a key file")
    return data


def _check_readable_file(value: str) -> None:
    _read_file(value)


_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:EC )?PRIVATE KEY-----")


def _check_pem_private_key(value: str) -> None:
    data = _read_file(value)
    _require(
        _PEM_PRIVATE_KEY.search(data) is not None,
        f"{value} does not look like a PEM private key "
        "(expected Apple's .p8 file, starting with -----BEGIN PRIVATE KEY-----)",
    )
    # What `run` would do with it: a key that passes here must sign JWTs there.
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise _Rejected(f"{value} cannot be loaded as a private key: {error}") from None
    _require(
        isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1",
        f"{value} is not an EC P-256 key (APNs token keys are ES256 .p8 files)",
    )


_SERVICE_ACCOUNT_FIELDS = ("client_email", "private_key", "token_uri")


def _service_account(value: str) -> dict[str, Any]:
    try:
        document = json.loads(_read_file(value))
    except ValueError:
        raise _Rejected(f"{value} is not JSON (expected a Firebase service account key)") from None
    _require(
        isinstance(document, dict) and document.get("type") == "service_account",
        f'{value} is not a service account key (no "type": "service_account")',
    )
    missing = [name for name in _SERVICE_ACCOUNT_FIELDS if not isinstance(document.get(name), str)]
    _require(not missing, f"{value} lacks {', '.join(missing)}")
    try:
        serialization.load_pem_private_key(document["private_key"].encode(), password=None)
    except (ValueError, TypeError) as error:
        raise _Rejected(f"{value}: its private_key cannot be loaded: {error}") from None
    return dict(document)


def _check_service_account(value: str) -> None:
    _service_account(value)


_APPLE_ID = re.compile(r"[A-Z0-9]{10}")


def _check_apple_id(value: str) -> None:
    _require(
        not value or _APPLE_ID.fullmatch(value) is not None,
        f"{value!r} is not 10 capital letters or digits, as Apple's IDs are",
    )


def _check_http_not_yet(value: str) -> None:
    _require(not value, "the HTTP listener is not available in this version; leave it empty")


_http_not_yet = Rule("empty (the HTTP API comes in a later version)", _check_http_not_yet)
_apple_id = Rule("empty, or 10 capital letters or digits", _check_apple_id)
_readable_file = Rule("a readable file", _check_readable_file)
_pem_private_key = Rule("a readable PEM private key file (Apple's `.p8`)", _check_pem_private_key)
_service_account_file = Rule("a readable Google service account JSON file", _check_service_account)


# --------------------------------------------------------------------------- declaring keys

_META = "xmpp_push.config"


@dataclass(frozen=True, slots=True)
class _KeyInfo:
    help: str
    rules: tuple[Rule[Any], ...]
    sensitive: bool
    is_path: bool
    deprecated: str | None


def _key(
    default: T,
    help: str,
    *rules: Rule[T],
    sensitive: bool = False,
    is_path: bool = False,
    deprecated: str | None = None,
) -> T:
    """Declare a key as a dataclass field.

    `sensitive` keeps the value out of `repr()` and out of error messages; `is_path`
    makes a relative path from the file relative to the file's directory. A key with
    `deprecated` (what to do instead) is still accepted, so old files keep loading,
    but setting it earns a warning at start; the example file leaves it out.
    """
    info = _KeyInfo(cleandoc(help), rules, sensitive, is_path, deprecated)
    return field(default=default, repr=not sensitive, metadata={_META: info})


# --------------------------------------------------------------------------- the sections


@dataclass(frozen=True, slots=True)
class ComponentConfig:
    """How the component reaches the XMPP server (XEP-0114) and whose publishes it accepts."""

    jid: str = _key(
        "push.localhost",
        """The component's own JID, as declared in the server's component configuration.
        Clients name it in `<enable jid='...'/>`.""",
        _domain_jid,
    )
    secret: str = _key(
        _DEFAULT_SECRET,
        """Shared secret of the component handshake; the same as in the server's component
        configuration. The default is public: the service warns at start while it is used.""",
        _non_empty,
        sensitive=True,
    )
    host: str = _key("127.0.0.1", "Host name or address of the server's component listener.", _host)
    port: int = _key(5347, "TCP port of the server's component listener.", _between(1, 65535))
    reconnect: bool = _key(
        True,
        "Reconnect, with growing delays, when the link to the server drops.",
    )
    reconnect_max_delay: float = _key(
        30.0, "Longest wait, in seconds, between two reconnection attempts.", _positive
    )
    allowed_domains: tuple[str, ...] = _key(
        (),
        """Server domains whose publishes are accepted. Empty: the parent domain of `jid`
        (`example.org` for `push.example.org`); a one-label `jid` needs this set.""",
        _domain_list,
    )
    default_service: Literal["", "apns", "fcm"] = _key(
        "",
        """For a publish whose publish-options name no device: when set, its node is taken
        as a device token of this service (as fpush does). Empty: the node must be a
        registration made earlier.""",
    )
    aliases: tuple[str, ...] = _key(
        (),
        """Other JIDs clients may name in `<enable jid='...'/>` for this component (an old
        push service's address, say). Enables naming any other JID are kept as forward
        registrations to that app server.""",
        _domain_list,
    )

    @property
    def secret_is_default(self) -> bool:
        return self.secret == _DEFAULT_SECRET


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Where registrations are kept."""

    url: str = _key(
        "sqlite+aiosqlite:///xmpp-push.db",
        """Database URL (SQLAlchemy form). SQLite suits one process on a small site;
        PostgreSQL or MySQL/MariaDB when several processes share the registrations.
        A relative SQLite path is relative to the working directory.""",
        _database_url,
        sensitive=True,
    )
    pool_size: int = _key(
        8, "Database connections kept open (PostgreSQL, MySQL).", _between(1, 200)
    )


@dataclass(frozen=True, slots=True)
class ApnsConfig:
    """Apple Push Notification service, with token (`.p8` key) authentication.

    APNs is off while `key_file` is empty. With neither APNs nor FCM set up, notifications
    go to the log instead, so a first run needs no Apple or Google key."""

    key_file: str = _key(
        "",
        """Path of the APNs authentication key (`AuthKey_<key id>.p8`) from the Apple
        developer account. Empty: APNs is off.""",
        _optional(_pem_private_key),
        is_path=True,
    )
    key_id: str = _key(
        "", "Key ID of that key (10 characters). Required with `key_file`.", _apple_id
    )
    team_id: str = _key(
        "", "Apple developer team ID (10 characters). Required with `key_file`.", _apple_id
    )
    topic: str = _key(
        "",
        """Bundle ID of the app (`apns-topic`) for devices whose registration or publish
        names none. Required with `key_file`.""",
    )
    environment: Literal["production", "sandbox"] = _key(
        "production",
        """APNs environment for devices whose registration does not say: `production` for
        App Store and TestFlight builds, `sandbox` for builds run from Xcode.""",
    )
    endpoint: str = _key(
        "",
        """APNs server to use instead of Apple's for the environment, for tests and
        staging. Empty: Apple's.""",
        _optional(_https_url(origin_only=True)),
    )
    ca_file: str = _key(
        "",
        """CA certificates (PEM) to trust for the APNs server instead of the system's,
        for tests and staging. Empty: the system's.""",
        _optional(_readable_file),
        is_path=True,
    )
    request_timeout: float = _key(
        10.0, "Seconds to wait for APNs to answer one notification.", _positive
    )
    connections: int = _key(1, "HTTP/2 connections kept open to APNs.", _between(1, 64))
    jwt_lifetime: int = _key(
        3000,
        """Seconds a signed provider token (JWT) is reused. Apple refuses tokens older than
        an hour and throttles new ones signed more often than every 20 minutes.""",
        _between(1200, 3600),
    )

    @property
    def enabled(self) -> bool:
        return self.key_file != ""


@dataclass(frozen=True, slots=True)
class FcmConfig:
    """Firebase Cloud Messaging (HTTP v1 API). FCM is off while `service_account_file` is empty."""

    service_account_file: str = _key(
        "",
        """Path of the Firebase service account key (JSON; Firebase console, Project
        settings, Service accounts). Empty: FCM is off.""",
        _optional(_service_account_file),
        is_path=True,
    )
    project_id: str = _key(
        "", "Firebase project ID. Empty: the `project_id` of the service account file."
    )
    endpoint: str = _key(
        "",
        """FCM v1 API base URL to use instead of Google's, for tests and staging.
        Empty: Google's.""",
        _optional(_https_url(origin_only=False)),
    )
    ca_file: str = _key(
        "",
        """CA certificates (PEM) to trust for the FCM server instead of the system's,
        for tests and staging. Empty: the system's.""",
        _optional(_readable_file),
        is_path=True,
    )
    request_timeout: float = _key(
        10.0, "Seconds to wait for FCM to answer one notification.", _positive
    )
    connections: int = _key(
        2,
        """HTTP/2 connections kept open to FCM. Each carries as many notifications at once
        as the server allows (its MAX_CONCURRENT_STREAMS).""",
        _between(1, 64),
    )
    max_connections: int = _key(
        64,
        """Deprecated, without effect: the most HTTP/1.1 connections to FCM, from before
        FCM was reached over HTTP/2. Use `connections`.""",
        _between(1, 1000),
        deprecated="remove it; FCM is reached over HTTP/2 now, many sends per "
        "connection, and fcm.connections sets how many connections",
    )

    @property
    def enabled(self) -> bool:
        return self.service_account_file != ""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTP listener: admin API, MongoosePush v3 API, `/metrics` and `/health`."""

    listen: str = _key(
        "",
        """Address to listen on, `host:port`. Empty: no HTTP listener. The HTTP API is
        not in this version yet: anything but empty is refused, so nobody relies on a
        listener that is not there.""",
        _optional(_listen),
        _http_not_yet,
    )
    token: str = _key(
        "",
        """Token that HTTP clients present as `Authorization: Bearer <token>`. Empty: none
        is asked for, so keep `listen` on loopback or behind an authenticating proxy.""",
        sensitive=True,
    )

    @property
    def enabled(self) -> bool:
        return self.listen != ""

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """`listen` as (host, port), IPv6 without brackets; None when off."""
        return _split_listen(self.listen) if self.listen else None


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """What notifications show and how deliveries are retried."""

    default_priority: Literal["high", "normal"] = _key(
        "high",
        """Priority when the registration or publish does not say: `high` wakes the device
        at once; `normal` lets the phone pick a moment that saves battery.""",
    )
    show_body: bool = _key(
        False,
        """Put the message body in the notification when the server sends one. Off: the
        text is `body_placeholder`, so message content does not pass through Apple or
        Google.""",
    )
    show_sender: bool = _key(False, "Put the sender's address in the notification.")
    body_placeholder: str = _key(
        DEFAULT_BODY, "Text of a visible notification when the body is not shown."
    )
    default_ttl: int = _key(
        86400,
        """Seconds the push network keeps trying to reach an offline device (0: now or
        never). FCM allows at most 28 days. Also bounds our own retries.""",
        _between(0, MAX_TTL),
    )
    reply_timeout: float = _key(
        5.0,
        """Seconds a publish waits for the provider before it is answered; retries then go
        on in the background.""",
        _positive,
    )
    retry_initial_delay: float = _key(
        1.0,
        "Seconds before the first retry of a transient failure; the delay then grows.",
        _positive,
    )
    retry_max_delay: float = _key(
        60.0,
        "Longest delay between two retries; at least `retry_initial_delay`.",
        _positive,
    )
    max_pending_retries: int = _key(
        10000,
        """Most notifications waiting for a retry in this process; beyond it a failure is
        answered `wait` instead of being queued.""",
        _at_least(0),
    )
    quarantine: int = _key(
        86400,
        """Seconds a token the provider refused (bad token, wrong topic) is not tried
        again; operators can see and undo it meanwhile.""",
        _at_least(0),
    )
    drain_timeout: float = _key(
        10.0,
        "Seconds SIGTERM waits for in-flight deliveries before the process exits.",
        _at_least(0),
    )
    max_registrations_per_user: int = _key(
        10,
        """Most direct-mode registrations one user may hold; an enable beyond it drops the
        user's least recently enabled one (logged).""",
        _between(1, 1000),
    )
    undecided_delay: float = _key(
        5.0,
        """Direct mode: seconds a session with push enabled may leave a message
        unacknowledged (XEP-0198) before the server plugin reports it undecided and the
        device is woken. The plugin follows this value (docs/plugin-protocol.md).""",
        _between(0.1, 600),
    )
    hibernation_keepalive: int = _key(
        259200,
        """Direct mode: seconds a hibernated session with push enabled stays resumable in
        the server (instead of the server's own resumption timeout), so the woken app
        resumes it; 0 keeps the server's timeout.""",
        _between(0, 30 * 86400),
    )
    coalesce_window: float = _key(
        2.0,
        """Direct mode: the first message for a device is pushed at once; more within
        this many seconds are merged into one push at the end of the window, with the
        count of the whole burst as its badge. 0 pushes every message.""",
        _between(0, 300),
    )
    groupchat: Literal["mentions", "all", "none"] = _key(
        "mentions",
        """Direct mode, groupchat messages: `mentions` alerts for a mention and wakes the
        app silently for the rest; `all` alerts for every one; `none` pushes only
        mentions.""",
    )


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging (structlog)."""

    level: Literal["debug", "info", "warning", "error"] = _key("info", "Lowest level logged.")
    format: Literal["auto", "json", "console"] = _key(
        "auto",
        """`json`: one JSON object a line; `console`: for people; `auto`: console on a
        terminal, JSON otherwise.""",
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, checked. Build it with `load_config()`."""

    component: ComponentConfig
    storage: StorageConfig
    apns: ApnsConfig
    fcm: FcmConfig
    http: HttpConfig
    policy: PolicyConfig
    log: LogConfig
    source: Path | None
    """The file it was read from; None when it runs on defaults and environment only."""
    warnings: tuple[str, ...] = ()
    """What is accepted but should change (deprecated keys), for the log at start."""


# --------------------------------------------------------------------------- the table


class _Kind(Enum):
    STR = ("a string", "string")
    INT = ("an integer", "integer")
    FLOAT = ("a number", "number")
    BOOL = ("a boolean", "boolean")
    LIST = ("a list of strings", "list of strings")
    CHOICE = ("one of", "one of")

    def __init__(self, expected: str, noun: str) -> None:
        self.expected = expected
        self.noun = noun


_KIND_OF_TYPE: dict[object, _Kind] = {
    str: _Kind.STR,
    int: _Kind.INT,
    float: _Kind.FLOAT,
    bool: _Kind.BOOL,
    tuple[str, ...]: _Kind.LIST,
}


@dataclass(frozen=True, slots=True)
class Key:
    """One row of the table: a configuration key as the loader and the docs see it."""

    section: str
    name: str
    kind: _Kind
    choices: tuple[str, ...]
    default: object
    help: str
    rules: tuple[Rule[Any], ...]
    sensitive: bool
    is_path: bool
    deprecated: str | None = None
    """What to do instead, for a key kept only so that old files still load."""

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env_var(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.name.upper()}"


def _row(section: str, spec: Field[Any], hint: object) -> Key:
    info = spec.metadata[_META]
    assert isinstance(info, _KeyInfo), f"{section}.{spec.name} is not declared with _key()"
    if get_origin(hint) is Literal:
        kind, choices = _Kind.CHOICE, tuple(str(choice) for choice in get_args(hint))
    else:
        kind, choices = _KIND_OF_TYPE[hint], ()
    return Key(
        section=section,
        name=spec.name,
        kind=kind,
        choices=choices,
        default=spec.default,
        help=info.help,
        rules=info.rules,
        sensitive=info.sensitive,
        is_path=info.is_path,
        deprecated=info.deprecated,
    )


def _sections() -> dict[str, type[Any]]:
    hints = get_type_hints(Config)
    return {
        spec.name: hints[spec.name]
        for spec in fields(Config)
        if spec.name not in {"source", "warnings"}
    }


def _build_table() -> tuple[Key, ...]:
    rows: list[Key] = []
    for section, section_class in _SECTIONS.items():
        hints = get_type_hints(section_class)
        rows.extend(_row(section, spec, hints[spec.name]) for spec in fields(section_class))
    return tuple(rows)


_SECTIONS = _sections()
KEYS: tuple[Key, ...] = _build_table()
_BY_DOTTED = {key.dotted: key for key in KEYS}
_BY_ENV = {key.env_var: key for key in KEYS}


# --------------------------------------------------------------------------- parsing values

_TOML_TYPE_NAMES: dict[type, str] = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "float",
    list: "array",
    dict: "table",
}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _expected(key: Key) -> str:
    if key.kind is _Kind.CHOICE:
        return "one of " + ", ".join(repr(choice) for choice in key.choices)
    return key.kind.expected


def _choice(key: Key, text: str, shown: str) -> str:
    normalised = text.strip().lower()
    _require(normalised in key.choices, f"expected {_expected(key)}, got {shown}")
    return normalised


def _finite(key: Key, number: float, shown: str) -> float:
    # inf and nan would slip past every range check (nan compares false to everything).
    _require(math.isfinite(number), f"expected {_expected(key)}, got {shown}")
    return number


def _from_toml(key: Key, value: object) -> object:
    """Check a TOML value against the key's type; TOML already typed it, so no coercion."""
    type_name = _TOML_TYPE_NAMES.get(type(value), type(value).__name__)
    shown = f"{type_name} (value hidden)" if key.sensitive else f"{type_name} {value!r}"
    wrong = _Rejected(f"expected {_expected(key)}, got {shown}")
    match key.kind:
        case _Kind.STR:
            if isinstance(value, str):
                return value
        case _Kind.CHOICE:
            if isinstance(value, str):
                return _choice(key, value, shown)
        case _Kind.BOOL:
            if isinstance(value, bool):
                return value
        case _Kind.INT:
            # bool is a subclass of int; `port = true` is a mistake, not 1.
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        case _Kind.FLOAT:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return _finite(key, float(value), shown)
        case _Kind.LIST:
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                return tuple(value)
    raise wrong


def _from_env(key: Key, text: str) -> object:
    """Parse an environment variable's text into the key's type."""
    shown = "something else (value hidden)" if key.sensitive else repr(text)
    wrong = _Rejected(f"expected {_expected(key)}, got {shown}")
    match key.kind:
        case _Kind.STR:
            return text
        case _Kind.CHOICE:
            return _choice(key, text, shown)
        case _Kind.BOOL:
            lowered = text.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
        case _Kind.INT:
            try:
                return int(text.strip())
            except ValueError:
                pass
        case _Kind.FLOAT:
            try:
                return _finite(key, float(text.strip()), shown)
            except ValueError:
                pass
        case _Kind.LIST:
            return tuple(item.strip() for item in text.split(",") if item.strip())
    raise wrong


# --------------------------------------------------------------------------- loading


def resolve_config_path(cli_path: str | None, environ: Mapping[str, str], cwd: Path) -> Path | None:
    """The file to read: `--config`, else `$XMPP_PUSH_CONFIG`, else `./xmpp-push.toml` if present.

    A path that was asked for explicitly is returned even if missing, so that loading it
    fails loudly instead of silently running on defaults.
    """
    for asked in (cli_path, environ.get(CONFIG_ENV)):
        if asked:
            return cwd / asked
    fallback = cwd / DEFAULT_FILE_NAME
    return fallback if fallback.is_file() else None


_TOML_LOCATION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError(
            str(path), f"cannot read config file: {error.strerror or error}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "config file is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # tomllib on 3.11 carries the position only inside its message.
        message = str(error)
        found = _TOML_LOCATION.search(message)
        if found is None:  # pragma: no cover - every tomllib message ends with a position
            raise ConfigError(str(path), f"invalid TOML: {message}") from None
        line, column = found.groups()
        where = f"at column {column}" if column else "at the end of the file"
        line = line or str(text.count("\n") + 1)
        reason = f"invalid TOML {where}: {message[: found.start()]}"
        raise ConfigError(f"{path}:{line}", reason) from None


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


@dataclass(frozen=True, slots=True)
class _Setting:
    value: object
    origin: str | None
    """The environment variable that set it, for error messages; None for file or default."""


def _settings_from_file(document: Mapping[str, Any], path: Path) -> dict[Key, _Setting]:
    settings: dict[Key, _Setting] = {}
    for section, table in document.items():
        if section not in _SECTIONS and not isinstance(table, dict):
            owners = [key.dotted for key in KEYS if key.name == section]
            hint = f" (did you mean {' or '.join(owners)}?)" if owners else ""
            raise ConfigError(
                section, "a key outside any section; keys belong in [section]s" + hint
            )
        if section not in _SECTIONS:
            reason = f"unknown section [{section}]; known: {', '.join(_SECTIONS)}"
            raise ConfigError(section, reason + _did_you_mean(section, list(_SECTIONS)))
        if not isinstance(table, dict):
            raise ConfigError(section, f"expected a table [{section}], got a value")
        names = [key.name for key in KEYS if key.section == section]
        for name, raw in table.items():
            key = _BY_DOTTED.get(f"{section}.{name}")
            if key is None:
                raise ConfigError(f"{section}.{name}", "unknown key" + _did_you_mean(name, names))
            try:
                value = _from_toml(key, raw)
            except _Rejected as error:
                raise ConfigError(key.dotted, str(error)) from None
            if key.is_path and isinstance(value, str) and value:
                # Relative to the file, not to wherever the service happens to be started.
                value = str(path.parent / value)
            settings[key] = _Setting(value, None)
    return settings


def _settings_from_env(environ: Mapping[str, str]) -> dict[Key, _Setting]:
    settings: dict[Key, _Setting] = {}
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable == CONFIG_ENV:
            continue
        key = _BY_ENV.get(variable)
        if key is None:
            known = [*_BY_ENV, CONFIG_ENV]
            reason = "environment variable names no configuration key"
            raise ConfigError(variable, reason + _did_you_mean(variable, known))
        try:
            value = _from_env(key, environ[variable])
        except _Rejected as error:
            raise ConfigError(key.dotted, f"{error} (from {variable})") from None
        settings[key] = _Setting(value, variable)
    return settings


def _check_rules(key: Key, setting: _Setting) -> None:
    for rule in key.rules:
        try:
            rule.check(setting.value)
        except _Rejected as error:
            origin = f" (from {setting.origin})" if setting.origin else ""
            raise ConfigError(key.dotted, f"{error}{origin}") from None


def _normalise_domain(text: str) -> str:
    return text.strip().encode("idna").decode("ascii").lower()


def _normalise_domains(component: dict[str, Any]) -> None:
    """Servers send `from` in canonical (lower-case, ASCII) form; compare against the
    same, or a `Push.Example.org` in the file makes every publish look foreign, and
    ejabberd deletes a registration at the first `forbidden`."""
    component["jid"] = _normalise_domain(component["jid"])
    for key in ("allowed_domains", "aliases"):
        component[key] = tuple(_normalise_domain(domain) for domain in component[key])


def _derive_allowed_domains(component: dict[str, Any]) -> None:
    if component["allowed_domains"]:
        return
    jid: str = component["jid"]
    _, dot, parent = jid.partition(".")
    if not dot:
        raise ConfigError(
            "component.allowed_domains",
            f"cannot be derived from component.jid {jid!r}, which has no parent domain; "
            "set it to the server domains whose publishes are accepted",
        )
    component["allowed_domains"] = (parent,)


def _check_apns_complete(apns: dict[str, Any]) -> None:
    if not apns["key_file"]:
        return
    missing = [f"apns.{name}" for name in ("key_id", "team_id", "topic") if not apns[name]]
    if missing:
        also = f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""
        raise ConfigError(missing[0], f"required when apns.key_file is set{also}")


def _derive_fcm_project(fcm: dict[str, Any]) -> None:
    if not fcm["service_account_file"] or fcm["project_id"]:
        return
    try:
        project = _service_account(fcm["service_account_file"]).get("project_id")
    except _Rejected as error:  # pragma: no cover - the file passed this check moments ago
        raise ConfigError("fcm.service_account_file", str(error)) from None
    if not isinstance(project, str) or not project:
        raise ConfigError(
            "fcm.project_id",
            f"not set, and {fcm['service_account_file']} has no project_id to take it from",
        )
    fcm["project_id"] = project


def _check_retry_delays(policy: dict[str, Any]) -> None:
    if policy["retry_max_delay"] < policy["retry_initial_delay"]:
        raise ConfigError(
            "policy.retry_max_delay",
            f"must be at least policy.retry_initial_delay ({policy['retry_max_delay']!r} < "
            f"{policy['retry_initial_delay']!r})",
        )


def load_config(path: Path | None, environ: Mapping[str, str]) -> Config:
    """Read `path` (None: no file), apply `XMPP_PUSH_*` overrides, check everything.

    Raises ConfigError for the first problem found.
    """
    settings = _settings_from_file(_read_toml(path), path) if path is not None else {}
    settings.update(_settings_from_env(environ))  # the environment beats the file

    values: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for key in KEYS:
        setting = settings.get(key, _Setting(key.default, None))
        _check_rules(key, setting)
        values[key.section][key.name] = setting.value

    _normalise_domains(values["component"])
    _derive_allowed_domains(values["component"])
    _check_apns_complete(values["apns"])
    _derive_fcm_project(values["fcm"])
    _check_retry_delays(values["policy"])
    warnings = tuple(
        f"{key.dotted} is deprecated and ignored"
        + (f" (set by {setting.origin})" if setting.origin else "")
        + f": {key.deprecated}"
        for key, setting in settings.items()
        if key.deprecated is not None
    )

    return Config(
        component=ComponentConfig(**values["component"]),
        storage=StorageConfig(**values["storage"]),
        apns=ApnsConfig(**values["apns"]),
        fcm=FcmConfig(**values["fcm"]),
        http=HttpConfig(**values["http"]),
        policy=PolicyConfig(**values["policy"]),
        log=LogConfig(**values["log"]),
        source=path,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- generated docs


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string without ASCII escaping is a valid TOML basic string.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _type_doc(key: Key) -> str:
    if key.kind is _Kind.CHOICE:
        return "one of " + ", ".join(f"`{choice}`" if choice else '`""`' for choice in key.choices)
    if key.kind is _Kind.BOOL:
        return "boolean"
    if key.kind is _Kind.LIST:
        return "list of strings (environment: comma-separated)"
    return key.kind.noun


_REFERENCE_INTRO = f"""\
<!-- Generated by `python -m xmpp_push.config reference > docs/configuration.md`
     from the key table in xmpp_push/config.py. Edit that file, not this one. -->

# Configuration reference

xmpp-push reads one TOML file. It takes the first of:

1. `--config FILE` on the command line;
2. the `{CONFIG_ENV}` environment variable;
3. `{DEFAULT_FILE_NAME}` in the working directory, if it exists.

Without any, it runs on the defaults below: a server on this machine, SQLite, and no
Apple or Google key (notifications are written to the log), so a first run needs
nothing but the XMPP server. Every key is optional.
`deploy/xmpp-push.example.toml` lists every key with its default (but the deprecated
ones).

Relative paths (`key_file`, `ca_file`, `service_account_file`) are relative to the
file's directory when they are written in the file, and to the working directory when
they come from an environment variable.

## Environment variables

Every key can also be set by the environment variable `{ENV_PREFIX}<SECTION>_<KEY>`, in
upper case, for example `{ENV_PREFIX}COMPONENT_SECRET` or `{ENV_PREFIX}APNS_KEY_FILE`.
A variable beats the file. Values are read as the key's type: booleans as
`true`/`false`, `yes`/`no`, `on`/`off` or `1`/`0`; lists as comma-separated items.
A variable that starts with `{ENV_PREFIX}` but names no key is an error, so a typo
cannot pass silently.

## Errors

The whole configuration is checked at start, and `xmpp-push check-config` runs the same
checks without starting. An unknown section or key, a wrong type, a value out of range,
a missing or unreadable file stops the process with exit code 2 and one line that names
the key (and the environment variable or file line, when that is where it came from):

```
apns.key_id: required when apns.key_file is set
component.port: expected an integer, got 'abc' (from {ENV_PREFIX}COMPONENT_PORT)
/etc/xmpp-push/xmpp-push.toml:12: invalid TOML at column 8: Invalid value
```

A deprecated key is still accepted, so an older file keeps working, but it is ignored
and named in a warning at start (`deprecated_config_key`) and by `check-config`.
"""


def render_reference() -> str:
    """The Markdown reference of every key (docs/configuration.md), made from the table."""
    parts = [_REFERENCE_INTRO]
    for section, section_class in _SECTIONS.items():
        parts.append(f"\n## [{section}]\n\n{cleandoc(section_class.__doc__ or '')}\n")
        for key in (key for key in KEYS if key.section == section):
            details = [f"- deprecated: {key.deprecated}"] if key.deprecated else []
            details.append(f"- type: {_type_doc(key)}")
            details.extend(f"- accepted: {rule.doc}" for rule in key.rules)
            details.append(f"- default: `{_toml_value(key.default)}`")
            details.append(f"- environment: `{key.env_var}`")
            help_text = textwrap.fill(" ".join(key.help.split()), 88)
            parts.append(f"\n### `{key.dotted}`\n\n{help_text}\n\n" + "\n".join(details) + "\n")
    return "".join(parts)


def _comment(text: str, width: int = 88) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(" ".join(text.split()), width - 2)]


def default_config_toml() -> str:
    """An example config file listing every key at its default, with its help as comments."""
    lines = [
        "# xmpp-push configuration (TOML). Every key is shown at its default value;",
        "# delete what you do not change. Reference: docs/configuration.md.",
        f"# Each key can also be set by environment variable, e.g. {ENV_PREFIX}COMPONENT_SECRET.",
        "# Generated by `python -m xmpp_push.config example`.",
    ]
    for section, section_class in _SECTIONS.items():
        lines.extend(["", f"[{section}]"])
        lines.extend(_comment(cleandoc(section_class.__doc__ or "")))
        for key in (key for key in KEYS if key.section == section and not key.deprecated):
            lines.append("")
            lines.extend(_comment(key.help))
            if key.kind is _Kind.CHOICE:
                lines.append("# One of: " + ", ".join(_toml_value(c) for c in key.choices) + ".")
            lines.append(f"{key.name} = {_toml_value(key.default)}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m xmpp_push.config [reference|example]`: print a generated file."""
    args = list(sys.argv[1:] if argv is None else argv)
    what = args[0] if args else "reference"
    generators = {"reference": render_reference, "example": default_config_toml}
    if len(args) > 1 or what not in generators:
        print("usage: python -m xmpp_push.config [reference|example]", file=sys.stderr)
        return 2
    sys.stdout.write(generators[what]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
