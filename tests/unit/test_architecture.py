"""The core stays free of adapters (STYLE.md: layout tells the architecture)."""

from __future__ import annotations

import ast
from pathlib import Path

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
