"""The core stays free of adapters (STYLE.md: layout tells the architecture)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import xmpp_push

PACKAGE = Path(xmpp_push.__file__).parent
ADAPTER_LIBRARIES = {
    "slixmpp",
    "aiohttp",
    "h2",
    "hpack",
    "google",
    "requests",
    "sqlalchemy",
    "asyncpg",
}
ADAPTER_PACKAGES = {"xmpp_push.xmpp", "xmpp_push.providers", "xmpp_push.app", "xmpp_push.cli"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_no_adapter_library_and_no_adapter() -> None:
    core_files = sorted((PACKAGE / "core").rglob("*.py"))
    assert core_files, "the core package moved"
    offenders = []
    for path in core_files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in ADAPTER_LIBRARIES or any(
                name == adapter or name.startswith(adapter + ".") for adapter in ADAPTER_PACKAGES
            ):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offenders == []


def test_providers_do_not_import_the_xmpp_adapter() -> None:
    offenders = [
        f"{path.name} imports {name}"
        for path in sorted((PACKAGE / "providers").glob("*.py"))
        for name in imported_modules(path)
        if name.startswith(("xmpp_push.xmpp", "slixmpp"))
    ]
    assert offenders == []


# Builds the whole object graph from a config naming both push networks, as `run` does
# before it connects, and prints which of the heavy HTTP libraries got imported.
_COMPONENT_IMPORTS = """
import asyncio, sys
from pathlib import Path
from xmpp_push.app import build_application, build_providers, open_configured_store
from xmpp_push.config import load_config

async def main() -> None:
    config = load_config(Path(sys.argv[1]), {})
    providers = build_providers(config)
    store = await open_configured_store(config)
    build_application(config, store, providers)
    for provider in providers.values():
        await provider.aclose()
    await store.close()
    print(" ".join(sorted(name for name in ("aiohttp", "h2", "hpack") if name in sys.modules)))

asyncio.run(main())
"""


def test_the_component_with_apns_and_fcm_imports_no_aiohttp(tmp_path: Path) -> None:
    """Both providers speak HTTP/2 on our own framing; aiohttp (≈ 6 MiB resident) and
    the h2 library are for the tests and the benchmark's baseline only."""
    key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "AuthKey_ABCDE12345.p8").write_bytes(key_pem)
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    account = {
        "type": "service_account",
        "project_id": "demo-project",
        "client_email": "push@demo-project.iam.gserviceaccount.com",
        "private_key": rsa_pem.decode(),
        "token_uri": "https://127.0.0.1:9/token",
    }
    (tmp_path / "service-account.json").write_text(json.dumps(account))
    config = tmp_path / "xmpp-push.toml"
    config.write_text(
        "[apns]\n"
        'key_file = "AuthKey_ABCDE12345.p8"\nkey_id = "ABCDE12345"\n'
        'team_id = "FGHIJ67890"\ntopic = "org.example.chat"\n'
        '[fcm]\nservice_account_file = "service-account.json"\n'
        f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path / "push.db"}"\n'
    )

    done = subprocess.run(
        [sys.executable, "-c", _COMPONENT_IMPORTS, str(config)],
        capture_output=True,
        text=True,
        check=False,
        cwd=PACKAGE.parent,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
