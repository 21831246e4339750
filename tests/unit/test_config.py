"""The configuration contract (DESIGN.md §5).

File, environment and defaults, and errors that name the key.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from xmpp_push.config import (
    CONFIG_ENV,
    KEYS,
    ApnsConfig,
    ComponentConfig,
    Config,
    ConfigError,
    Key,
    default_config_toml,
    load_config,
    main,
    render_reference,
    resolve_config_path,
)

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "configuration.md"
EXAMPLE = REPO / "deploy" / "xmpp-push.example.toml"


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


# Keys are loaded at start, as `run` would: a check-config that passes must mean a
# provider that starts. Fresh throw-away keys, generated here.
PEM_KEY = _pem(ec.generate_private_key(ec.SECP256R1()))
RSA_PEM_KEY = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
SERVICE_ACCOUNT = {
    "type": "service_account",
    "project_id": "demo-project",
    "client_email": "push@demo-project.iam.gserviceaccount.com",
    "private_key": RSA_PEM_KEY,
    "token_uri": "https://127.0.0.1:8443/token",
}


def write_toml(directory: Path, text: str) -> Path:
    path = directory / "xmpp-push.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_text(directory: Path, text: str, environ: Mapping[str, str] | None = None) -> Config:
    return load_config(write_toml(directory, text), environ or {})


def config_error(
    directory: Path, text: str, environ: Mapping[str, str] | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_text(directory, text, environ)
    return caught.value


@pytest.fixture
def apns_key(tmp_path: Path) -> Path:
    path = tmp_path / "AuthKey_ABC123DEFG.p8"
    path.write_text(PEM_KEY, encoding="ascii")
    return path


@pytest.fixture
def service_account(tmp_path: Path) -> Path:
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(SERVICE_ACCOUNT), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- defaults


def test_no_file_and_no_environment_gives_the_documented_defaults() -> None:
    config = load_config(None, {})

    assert config.source is None
    assert config.component.jid == "push.localhost"
    assert config.component.port == 5347
    assert config.component.reconnect is True
    assert config.storage.url == "sqlite+aiosqlite:///xmpp-push.db"
    assert config.apns.environment == "production"
    assert config.apns.jwt_lifetime == 3000
    assert config.fcm.max_connections == 64
    assert config.policy.default_priority == "high"
    assert config.policy.retry_max_delay == 60.0
    assert config.log.format == "auto"


def test_defaults_leave_the_providers_and_the_http_listener_off() -> None:
    config = load_config(None, {})

    assert not config.apns.enabled
    assert not config.fcm.enabled
    assert not config.http.enabled
    assert config.http.listen_address is None


def test_default_secret_is_flagged_so_the_app_can_warn() -> None:
    assert load_config(None, {}).component.secret_is_default
    changed = load_config(None, {"XMPP_PUSH_COMPONENT_SECRET": "s3cret"})
    assert not changed.component.secret_is_default


def test_every_default_in_the_table_passes_its_own_rules() -> None:
    defaults = load_config(None, {})
    for key in KEYS:
        if key.dotted == "component.allowed_domains":
            continue  # derived from jid, checked on its own below
        assert getattr(getattr(defaults, key.section), key.name) == key.default, key.dotted


# --------------------------------------------------------------------------- allowed_domains


@pytest.mark.parametrize(
    ("jid", "expected"),
    [
        ("push.example.org", ("example.org",)),
        ("push.localhost", ("localhost",)),
        ("a.b.example.net", ("b.example.net",)),
    ],
)
def test_allowed_domains_default_to_the_parent_domain_of_the_jid(
    jid: str, expected: tuple[str, ...]
) -> None:
    config = load_config(None, {"XMPP_PUSH_COMPONENT_JID": jid})
    assert config.component.allowed_domains == expected


def test_a_one_label_jid_needs_allowed_domains(tmp_path: Path) -> None:
    error = config_error(tmp_path, '[component]\njid = "push"\n')
    assert error.key == "component.allowed_domains"
    assert "set it" in error.reason

    config = load_text(tmp_path, '[component]\njid = "push"\nallowed_domains = ["localhost"]\n')
    assert config.component.allowed_domains == ("localhost",)


def test_explicit_allowed_domains_are_kept_as_given(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[component]\nallowed_domains = ["a.example", "b.example"]\n')
    assert config.component.allowed_domains == ("a.example", "b.example")


# --------------------------------------------------------------------------- file and env


def test_values_from_the_file_are_used(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [component]
        jid = "push.example.org"
        secret = "s3cret"
        port = 5275
        reconnect = false

        [policy]
        default_priority = "normal"
        show_body = true

        [log]
        level = "debug"
        """,
    )
    config = load_config(path, {})

    assert config.source == path
    assert config.component.jid == "push.example.org"
    assert config.component.secret == "s3cret"
    assert config.component.port == 5275
    assert config.component.reconnect is False
    assert config.policy.default_priority == "normal"
    assert config.policy.show_body is True
    assert config.log.level == "debug"


def test_an_integer_is_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[policy]\nreply_timeout = 3\n")
    assert config.policy.reply_timeout == 3.0
    assert isinstance(config.policy.reply_timeout, float)


def test_the_environment_beats_the_file(tmp_path: Path) -> None:
    environ = {
        "XMPP_PUSH_COMPONENT_PORT": "6000",
        "XMPP_PUSH_POLICY_SHOW_BODY": "no",
        "XMPP_PUSH_COMPONENT_ALLOWED_DOMAINS": "a.example, b.example",
    }
    config = load_text(
        tmp_path,
        '[component]\nport = 5275\nallowed_domains = ["c.example"]\n[policy]\nshow_body = true\n',
        environ,
    )

    assert config.component.port == 6000
    assert config.policy.show_body is False
    assert config.component.allowed_domains == ("a.example", "b.example")


def test_unrelated_environment_variables_are_ignored() -> None:
    environ = {"HOME": "/root", "XMPP_PUSHY": "x", CONFIG_ENV: "/nowhere.toml"}
    assert load_config(None, environ) == load_config(None, {})


def test_choices_are_read_case_insensitively() -> None:
    config = load_config(None, {"XMPP_PUSH_APNS_ENVIRONMENT": "Sandbox"})
    assert config.apns.environment == "sandbox"


def test_a_relative_path_in_the_file_is_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n", encoding="ascii")
    config_dir = tmp_path / "etc"
    config_dir.mkdir()

    config = load_text(config_dir, '[apns]\nca_file = "../keys/ca.pem"\n')

    assert Path(config.apns.ca_file).resolve() == (tmp_path / "keys" / "ca.pem").resolve()


def test_apns_is_enabled_by_a_complete_key(apns_key: Path) -> None:
    config = load_config(
        None,
        {
            "XMPP_PUSH_APNS_KEY_FILE": str(apns_key),
            "XMPP_PUSH_APNS_KEY_ID": "ABC123DEFG",
            "XMPP_PUSH_APNS_TEAM_ID": "DEF123GHIJ",
            "XMPP_PUSH_APNS_TOPIC": "org.example.chat",
        },
    )
    assert config.apns.enabled
    assert config.apns.key_file == str(apns_key)


def test_fcm_project_id_defaults_to_the_service_account_project(service_account: Path) -> None:
    config = load_config(None, {"XMPP_PUSH_FCM_SERVICE_ACCOUNT_FILE": str(service_account)})
    assert config.fcm.enabled
    assert config.fcm.project_id == "demo-project"


def test_an_explicit_fcm_project_id_wins_over_the_file(service_account: Path) -> None:
    environ = {
        "XMPP_PUSH_FCM_SERVICE_ACCOUNT_FILE": str(service_account),
        "XMPP_PUSH_FCM_PROJECT_ID": "other-project",
    }
    assert load_config(None, environ).fcm.project_id == "other-project"


def test_an_http_listener_is_refused_until_the_http_api_exists() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"XMPP_PUSH_HTTP_LISTEN": "127.0.0.1:8080"})
    assert caught.value.key == "http.listen"
    assert "not available in this version" in caught.value.reason


def test_an_apns_key_that_is_not_ec_p256_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "rsa.p8"
    key.write_text(RSA_PEM_KEY)
    error = config_error(
        tmp_path,
        f'[apns]\nkey_file = "{key}"\nkey_id = "ABCDE12345"\nteam_id = "TEAM123456"\n'
        'topic = "org.example"\n',
    )
    assert error.key == "apns.key_file"
    assert "EC P-256" in error.reason


def test_apple_ids_must_look_like_apples(tmp_path: Path) -> None:
    error = config_error(tmp_path, '[apns]\nkey_id = "ABC"\n')
    assert error.key == "apns.key_id"


def test_a_service_account_with_a_broken_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sa.json"
    path.write_text(
        json.dumps({**SERVICE_ACCOUNT, "private_key": "-----BEGIN PRIVATE KEY-----\nxx"})
    )
    error = config_error(tmp_path, f'[fcm]\nservice_account_file = "{path}"\n')
    assert error.key == "fcm.service_account_file"
    assert "private_key" in error.reason


def test_domains_are_compared_in_canonical_form(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, '[component]\njid = "Push.Example.ORG"\naliases = ["P2.Example.org"]\n'
    )
    assert config.component.jid == "push.example.org"
    assert config.component.allowed_domains == ("example.org",)
    assert config.component.aliases == ("p2.example.org",)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("XMPP_PUSH_APNS_ENDPOINT", "https://127.0.0.1:8443"),
        ("XMPP_PUSH_APNS_ENDPOINT", "https://apns.test/"),
        ("XMPP_PUSH_FCM_ENDPOINT", "https://127.0.0.1:9443/v1"),
        ("XMPP_PUSH_STORAGE_URL", "postgresql+asyncpg://push:pw@db/push"),
        ("XMPP_PUSH_STORAGE_URL", "mysql+aiomysql://push:pw@db/push"),
        ("XMPP_PUSH_COMPONENT_HOST", "::1"),
        ("XMPP_PUSH_COMPONENT_JID", "push.xn--bcher-kva.example"),
    ],
)
def test_valid_values_are_accepted(key: str, value: str) -> None:
    load_config(None, {key: value})


# --------------------------------------------------------------------------- deprecated keys


def test_fcm_connections_default_to_two_http2_connections() -> None:
    assert load_config(None, {}).fcm.connections == 2


def test_a_deprecated_key_in_the_file_still_loads_with_a_warning(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[fcm]\nmax_connections = 128\n")

    assert config.fcm.max_connections == 128
    [warning] = config.warnings
    assert warning.startswith("fcm.max_connections is deprecated and ignored: ")
    assert "fcm.connections" in warning


def test_a_deprecated_key_from_the_environment_names_its_variable() -> None:
    config = load_config(None, {"XMPP_PUSH_FCM_MAX_CONNECTIONS": "8"})

    [warning] = config.warnings
    assert "(set by XMPP_PUSH_FCM_MAX_CONNECTIONS)" in warning


def test_a_config_without_deprecated_keys_has_no_warnings(tmp_path: Path) -> None:
    assert load_config(None, {}).warnings == ()
    assert load_text(tmp_path, "[fcm]\nconnections = 4\n").warnings == ()


def test_deprecated_keys_are_marked_in_the_reference() -> None:
    reference = render_reference()
    deprecated = [key for key in KEYS if key.deprecated]
    assert deprecated, "fcm.max_connections is deprecated"
    for key in deprecated:
        section = reference.split(f"### `{key.dotted}`")[1].split("###")[0]
        assert f"- deprecated: {key.deprecated}" in section


def test_the_service_logs_each_deprecated_key_at_start(tmp_path: Path) -> None:
    from xmpp_push.app import _announce

    config = load_text(tmp_path, "[fcm]\nmax_connections = 64\n")

    with capture_logs() as logs:
        _announce(config, {})

    [entry] = [entry for entry in logs if entry["event"] == "deprecated_config_key"]
    assert entry["log_level"] == "warning"
    assert entry["hint"].startswith("fcm.max_connections is deprecated and ignored")


def test_check_config_prints_the_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xmpp_push.cli import main as cli_main

    path = write_toml(tmp_path, "[fcm]\nmax_connections = 64\n")

    assert cli_main(["check-config", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "xmpp-push: warning: fcm.max_connections is deprecated and ignored" in err


# --------------------------------------------------------------------------- errors


def test_config_error_reads_key_colon_reason() -> None:
    error = ConfigError("component.port", "must be 1 to 65535, got 0")
    assert str(error) == "component.port: must be 1 to 65535, got 0"
    assert (error.key, error.reason) == ("component.port", "must be 1 to 65535, got 0")


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        # unknown names, with a suggestion for typos
        ("[component]\nprot = 1\n", "component.prot", "unknown key (did you mean port?)"),
        ("[componnet]\njid = 'x.example'\n", "componnet", "did you mean component?"),
        ("[metrics]\n", "metrics", "unknown section [metrics]"),
        ('jid = "push.example.org"\n', "jid", "did you mean component.jid?"),
        ("component = 1\n", "component", "expected a table"),
        # wrong types name the expected type
        ('[component]\nport = "abc"\n', "component.port", "expected an integer, got string 'abc'"),
        ("[component]\nport = true\n", "component.port", "expected an integer, got boolean"),
        ("[component]\nport = 5347.0\n", "component.port", "expected an integer"),
        ('[component]\nreconnect = "yes"\n', "component.reconnect", "expected a boolean"),
        ("[component]\nallowed_domains = [1]\n", "component.allowed_domains", "list of strings"),
        ('[policy]\nreply_timeout = "5"\n', "policy.reply_timeout", "expected a number"),
        ("[policy]\nreply_timeout = inf\n", "policy.reply_timeout", "expected a number"),
        ("[policy]\nreply_timeout = nan\n", "policy.reply_timeout", "expected a number"),
        # out of range
        ("[component]\nport = 0\n", "component.port", "must be 1 to 65535, got 0"),
        ("[component]\nport = 65536\n", "component.port", "must be 1 to 65535"),
        ("[component]\nreconnect_max_delay = 0\n", "component.reconnect_max_delay", "greater"),
        ("[apns]\nconnections = 65\n", "apns.connections", "must be 1 to 64"),
        ("[apns]\njwt_lifetime = 600\n", "apns.jwt_lifetime", "must be 1200 to 3600"),
        ("[fcm]\nmax_connections = 0\n", "fcm.max_connections", "must be 1 to 1000"),
        ("[policy]\ndefault_ttl = 2419201\n", "policy.default_ttl", "0 to 2419200"),
        ("[policy]\nquarantine = -1\n", "policy.quarantine", "at least 0"),
        ("[policy]\ndrain_timeout = -0.5\n", "policy.drain_timeout", "at least 0"),
        (
            "[policy]\nretry_initial_delay = 10.0\nretry_max_delay = 5.0\n",
            "policy.retry_max_delay",
            "at least policy.retry_initial_delay",
        ),
        # bad choices
        ('[apns]\nenvironment = "staging"\n', "apns.environment", "'production', 'sandbox'"),
        ('[policy]\ndefault_priority = "urgent"\n', "policy.default_priority", "'high'"),
        ('[log]\nlevel = "trace"\n', "log.level", "expected one of"),
        ('[log]\nformat = "xml"\n', "log.format", "expected one of"),
        ('[component]\ndefault_service = "gcm"\n', "component.default_service", "'fcm'"),
        # values that are the right type but wrong
        ('[component]\nsecret = ""\n', "component.secret", "must not be empty"),
        ('[component]\njid = "user@example.org"\n', "component.jid", "bare domain JID"),
        ('[component]\njid = "push.example.org/res"\n', "component.jid", "bare domain JID"),
        ('[component]\njid = "push..example.org"\n', "component.jid", "not a valid domain"),
        ('[component]\njid = "-push.example.org"\n', "component.jid", "bad label"),
        ('[component]\nhost = "bad host"\n', "component.host", "not a valid domain"),
        (
            '[component]\nallowed_domains = ["ok.example", "no pe"]\n',
            "component.allowed_domains",
            "'no pe'",
        ),
        ('[storage]\nurl = "postgres://db/push"\n', "storage.url", "unsupported scheme 'postgres'"),
        ('[storage]\nurl = "xmpp-push.db"\n', "storage.url", "scheme://"),
        ('[apns]\nendpoint = "http://127.0.0.1:8443"\n', "apns.endpoint", "https://"),
        ('[apns]\nendpoint = "https://h.test/3/device"\n', "apns.endpoint", "no path"),
        ('[apns]\nendpoint = "https://h.test:99999"\n', "apns.endpoint", "invalid port"),
        ('[fcm]\nendpoint = "ftp://h.test"\n', "fcm.endpoint", "https://"),
        ('[fcm]\nendpoint = "https://"\n', "fcm.endpoint", "no host"),
        ('[http]\nlisten = "8080"\n', "http.listen", "not host:port"),
        ('[http]\nlisten = "127.0.0.1:http"\n', "http.listen", "no valid port"),
        ('[http]\nlisten = "127.0.0.1:0"\n', "http.listen", "no valid port"),
        ('[http]\nlisten = "::1:8080"\n', "http.listen", "in brackets"),
        ('[http]\nlisten = "[nope]:8080"\n', "http.listen", "not an IPv6 address"),
    ],
)
def test_a_bad_file_value_names_its_key(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    error = config_error(tmp_path, toml)
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("variable", "value", "key", "reason"),
    [
        ("XMPP_PUSH_COMPONENT_PORT", "abc", "component.port", "expected an integer, got 'abc'"),
        ("XMPP_PUSH_COMPONENT_PORT", "70000", "component.port", "must be 1 to 65535"),
        ("XMPP_PUSH_COMPONENT_RECONNECT", "maybe", "component.reconnect", "expected a boolean"),
        ("XMPP_PUSH_POLICY_REPLY_TIMEOUT", "soon", "policy.reply_timeout", "expected a number"),
        ("XMPP_PUSH_POLICY_REPLY_TIMEOUT", "inf", "policy.reply_timeout", "expected a number"),
        ("XMPP_PUSH_LOG_LEVEL", "loud", "log.level", "expected one of"),
        ("XMPP_PUSH_APNS_KEY_FILE", "/nonexistent/key.p8", "apns.key_file", "cannot read"),
    ],
)
def test_a_bad_environment_value_names_its_key_and_variable(
    variable: str, value: str, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {variable: value})
    assert caught.value.key == key
    assert reason in caught.value.reason
    assert variable in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("XMPP_PUSH_COMPONENT_PROT", "XMPP_PUSH_COMPONENT_PORT"),
        ("XMPP_PUSH_APNS_KEYFILE", "XMPP_PUSH_APNS_KEY_FILE"),
        ("XMPP_PUSH_CONFIGFILE", "XMPP_PUSH_CONFIG"),
        ("XMPP_PUSH_", None),
    ],
)
def test_an_environment_variable_naming_no_key_is_an_error(
    variable: str, suggestion: str | None
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {variable: "1"})
    assert caught.value.key == variable
    assert "names no configuration key" in caught.value.reason
    if suggestion:
        assert f"did you mean {suggestion}?" in caught.value.reason


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[component]\njid = "push.example.org"\nport = \n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.key == f"{path}:3"
    assert caught.value.reason.startswith("invalid TOML at column 8:")


def test_a_toml_error_at_the_end_of_the_file_names_the_last_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[component]\njid = "push.example.org')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.key == f"{path}:2"
    assert "end of the file" in caught.value.reason


def test_a_config_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[policy]\nbody_placeholder = "Célia"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, {})


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.key == str(path)
    assert "cannot read config file" in caught.value.reason


def test_missing_apns_keys_are_named(apns_key: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"XMPP_PUSH_APNS_KEY_FILE": str(apns_key)})
    assert caught.value.key == "apns.key_id"
    assert "required when apns.key_file is set" in caught.value.reason
    assert "apns.team_id, apns.topic" in caught.value.reason

    environ = {
        "XMPP_PUSH_APNS_KEY_FILE": str(apns_key),
        "XMPP_PUSH_APNS_KEY_ID": "ABC123DEFG",
        "XMPP_PUSH_APNS_TEAM_ID": "DEF123GHIJ",
    }
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ)
    assert caught.value.key == "apns.topic"


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("XMPP_PUSH_APNS_KEY_FILE", "apns.key_file"),
        ("XMPP_PUSH_APNS_CA_FILE", "apns.ca_file"),
        ("XMPP_PUSH_FCM_SERVICE_ACCOUNT_FILE", "fcm.service_account_file"),
        ("XMPP_PUSH_FCM_CA_FILE", "fcm.ca_file"),
    ],
)
def test_a_missing_file_names_its_key(tmp_path: Path, variable: str, key: str) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as caught:
        load_config(None, {variable: str(missing)})
    assert caught.value.key == key
    assert f"cannot read {missing}" in caught.value.reason


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"XMPP_PUSH_APNS_CA_FILE": str(tmp_path)})
    assert caught.value.key == "apns.ca_file"


def test_an_apns_key_file_must_look_like_a_pem_private_key(tmp_path: Path) -> None:
    not_a_key = tmp_path / "cert.pem"
    not_a_key.write_text("-----BEGIN CERTIFICATE-----\n", encoding="ascii")
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"XMPP_PUSH_APNS_KEY_FILE": str(not_a_key)})
    assert caught.value.key == "apns.key_file"
    assert "PEM private key" in caught.value.reason


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not json", "is not JSON"),
        (json.dumps(["service_account"]), "not a service account key"),
        (json.dumps({**SERVICE_ACCOUNT, "type": "authorized_user"}), "not a service account key"),
        (
            json.dumps({"type": "service_account", "private_key": PEM_KEY}),
            "lacks client_email, token_uri",
        ),
    ],
)
def test_an_fcm_service_account_file_must_be_a_service_account_key(
    tmp_path: Path, content: str, reason: str
) -> None:
    path = tmp_path / "sa.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"XMPP_PUSH_FCM_SERVICE_ACCOUNT_FILE": str(path)})
    assert caught.value.key == "fcm.service_account_file"
    assert reason in caught.value.reason


def test_fcm_without_any_project_id_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({**SERVICE_ACCOUNT, "project_id": ""}), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"XMPP_PUSH_FCM_SERVICE_ACCOUNT_FILE": str(path)})
    assert caught.value.key == "fcm.project_id"


def test_secrets_stay_out_of_errors_and_repr(tmp_path: Path) -> None:
    error = config_error(tmp_path, "[component]\nsecret = 424242\n")
    assert error.key == "component.secret"
    assert "424242" not in str(error)

    error = config_error(tmp_path, '[storage]\nurl = "postgres://push:hunter2@db/push"\n')
    assert "hunter2" not in str(error)

    config = load_config(
        None,
        {
            "XMPP_PUSH_COMPONENT_SECRET": "hunter2",
            "XMPP_PUSH_HTTP_TOKEN": "hunter2",
            "XMPP_PUSH_STORAGE_URL": "postgresql+asyncpg://push:hunter2@db/push",
        },
    )
    assert "hunter2" not in repr(config)


def test_section_dataclasses_are_frozen() -> None:
    config = load_config(None, {})
    with pytest.raises(AttributeError):
        config.component.port = 1  # type: ignore[misc]
    assert ComponentConfig().port == 5347
    assert not ApnsConfig().enabled


# --------------------------------------------------------------------------- path resolution


def test_the_cli_path_comes_first(tmp_path: Path) -> None:
    write_toml(tmp_path, "")
    environ = {CONFIG_ENV: "/etc/from-env.toml"}
    assert resolve_config_path("/etc/cli.toml", environ, tmp_path) == Path("/etc/cli.toml")


def test_the_environment_path_comes_second(tmp_path: Path) -> None:
    write_toml(tmp_path, "")
    environ = {CONFIG_ENV: "/etc/from-env.toml"}
    assert resolve_config_path(None, environ, tmp_path) == Path("/etc/from-env.toml")


def test_the_working_directory_file_comes_third(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "")
    assert resolve_config_path(None, {}, tmp_path) == path
    assert resolve_config_path(None, {CONFIG_ENV: ""}, tmp_path) == path


def test_without_any_file_there_is_no_path(tmp_path: Path) -> None:
    assert resolve_config_path(None, {}, tmp_path) is None


def test_relative_paths_are_relative_to_the_given_working_directory(tmp_path: Path) -> None:
    assert resolve_config_path("conf/a.toml", {}, tmp_path) == tmp_path / "conf" / "a.toml"
    assert resolve_config_path(None, {CONFIG_ENV: "b.toml"}, tmp_path) == tmp_path / "b.toml"


def test_an_explicit_path_is_returned_even_if_missing_so_loading_fails_loudly(
    tmp_path: Path,
) -> None:
    path = resolve_config_path("absent.toml", {}, tmp_path)
    assert path == tmp_path / "absent.toml"
    with pytest.raises(ConfigError):
        load_config(path, {})


# --------------------------------------------------------------------------- env round trip

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_BOOL_SPELLINGS = {True: ["true", "1", "yes", "on"], False: ["false", "0", "no", "off"]}


def _random_case(text: str, data: st.DataObject) -> str:
    flips = data.draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


@given(st.integers(1, 65535))
def test_env_integers_round_trip(port: int) -> None:
    config = load_config(None, {"XMPP_PUSH_COMPONENT_PORT": str(port)})
    assert config.component.port == port


@given(st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False))
def test_env_numbers_round_trip(seconds: float) -> None:
    config = load_config(None, {"XMPP_PUSH_POLICY_REPLY_TIMEOUT": repr(seconds)})
    assert config.policy.reply_timeout == seconds


@given(st.booleans(), st.data())
def test_env_booleans_round_trip_in_every_spelling(value: bool, data: st.DataObject) -> None:
    spelling = _random_case(data.draw(st.sampled_from(_BOOL_SPELLINGS[value])), data)
    config = load_config(None, {"XMPP_PUSH_POLICY_SHOW_BODY": f" {spelling} "})
    assert config.policy.show_body is value


@given(st.lists(_DOMAIN, min_size=1, max_size=5), st.sampled_from([",", ", ", " ,"]))
def test_env_lists_round_trip(domains: list[str], separator: str) -> None:
    environ = {"XMPP_PUSH_COMPONENT_ALLOWED_DOMAINS": separator.join(domains)}
    assert load_config(None, environ).component.allowed_domains == tuple(domains)


@given(st.text(alphabet=st.characters(blacklist_characters="\x00")))
def test_env_strings_are_taken_verbatim(text: str) -> None:
    config = load_config(None, {"XMPP_PUSH_POLICY_BODY_PLACEHOLDER": text})
    assert config.policy.body_placeholder == text


@given(st.sampled_from([key for key in KEYS if key.choices]), st.data())
def test_env_choices_round_trip(key: Key, data: st.DataObject) -> None:
    choice = data.draw(st.sampled_from(key.choices))
    config = load_config(None, {key.env_var: _random_case(choice, data)})
    assert getattr(getattr(config, key.section), key.name) == choice


# --------------------------------------------------------------------------- the table and docs


def test_section_names_are_single_words_so_env_names_are_unambiguous() -> None:
    assert all(set(key.section) <= set(string.ascii_lowercase) for key in KEYS)
    assert len({key.env_var for key in KEYS}) == len(KEYS)


def test_every_key_has_help() -> None:
    assert all(len(key.help) > 10 for key in KEYS)


def test_the_reference_mentions_every_key_and_its_variable() -> None:
    reference = render_reference()
    for key in KEYS:
        assert f"`{key.dotted}`" in reference
        assert f"`{key.env_var}`" in reference


def test_the_example_lists_every_key_but_the_deprecated_ones() -> None:
    example = default_config_toml()
    for key in KEYS:
        listed = f"\n{key.name} = " in example
        assert listed is (key.deprecated is None), key.dotted


def test_docs_configuration_md_is_current() -> None:
    assert DOCS.read_text(encoding="utf-8") == render_reference(), (
        "docs/configuration.md is out of date; regenerate it with:\n"
        "  .venv/bin/python -m xmpp_push.config reference > docs/configuration.md"
    )


def test_deploy_example_is_current() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == default_config_toml(), (
        "deploy/xmpp-push.example.toml is out of date; regenerate it with:\n"
        "  .venv/bin/python -m xmpp_push.config example > deploy/xmpp-push.example.toml"
    )


def test_the_example_config_loads_to_the_defaults() -> None:
    # The file-path keys are left empty in it, so it loads with no key files around.
    config = load_config(EXAMPLE, {})
    assert config.source == EXAMPLE
    defaults = load_config(None, {})
    for section in ("component", "storage", "apns", "fcm", "http", "policy", "log"):
        assert getattr(config, section) == getattr(defaults, section)


def test_the_module_prints_the_generated_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reference"]) == 0
    assert capsys.readouterr().out == render_reference()
    assert main(["example"]) == 0
    assert capsys.readouterr().out == default_config_toml()
    assert main(["nonsense"]) == 2
    assert "usage" in capsys.readouterr().err
