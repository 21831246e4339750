"""The benchmark's direct-mode pieces (bench/direct.py, bench/enables.py) say what they
claim to say.

The notify is one the component takes (parsed by its own `parse_notify` into an offline
wake for a loaded user), each notify names another user, and the sink's request log is
read line by line as nginx appends to it, never half a line. The delegated enables and
disables are read by the component's own delegation parser as the loaded registrations
(an enable again asks for exactly the loaded row), a component answers every one
`result` over the harness's XMPP server, and the harness counts a wrapped error as an
error, not as the wrapper's `result`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.direct import SERVER_DOMAIN, DirectWorkload, RequestLog, direct_database_url
from bench.enables import PHASES, EnablePlan, PhaseWorkload, delegated_enable
from bench.registrations import OWN_JIDS, PUSH_JID, Dataset
from bench.workload import COMPONENT_JID
from bench.xmppserver import ComponentLink, LoadServer
from xmpp_push.core.direct import DirectMode, EnableCommand, registration_request
from xmpp_push.core.wake import SessionState
from xmpp_push.storage.memory import MemoryStore
from xmpp_push.xmpp.component import ComponentSettings, PushComponent
from xmpp_push.xmpp.delegation import install_direct_mode
from xmpp_push.xmpp.errors import StanzaError
from xmpp_push.xmpp.plugin_link import NS_PLUGIN, parse_notify
from xmpp_push.xmpp.publish import PublishRequest
from xmpp_push.xmpp.push_stanzas import (
    NS_DELEGATION_2,
    DelegatedIq,
    PushDisable,
    PushEnable,
    parse_push_request,
    unwrap,
)

ROWS = 1_000


def workload(tmp_path: Path, notifies: int = 50) -> DirectWorkload:
    return DirectWorkload(
        "sqlite",
        f"sqlite+aiosqlite:///{tmp_path / 'registrations.db'}",
        rows=ROWS,
        notifies=notifies,
        cache=tmp_path,
    )


def test_a_notify_is_an_offline_wake_for_a_loaded_user(tmp_path: Path) -> None:
    direct = workload(tmp_path)
    iq_id, data = direct.stanza(3)
    iq = ET.fromstring(data)
    assert iq.attrib == {"to": COMPONENT_JID, "from": SERVER_DOMAIN, "id": iq_id, "type": "set"}
    assert len(iq_id) == 24  # Prosody's util.id.medium
    notify = iq.find(f"{{{NS_PLUGIN}}}notify")
    assert notify is not None
    event = parse_notify(notify, SERVER_DOMAIN)
    assert event.state is SessionState.OFFLINE
    assert event.owner == Dataset.owner(direct.users[3])
    assert event.count == 1
    assert event.message_type == "chat"
    assert event.sender is not None
    assert "/" in event.sender  # a full JID, as Prosody reports it
    assert (event.encrypted, event.call, event.mention) == (False, False, False)
    assert event.body is None


def test_each_notify_names_another_user_and_pushes_to_that_users_token(tmp_path: Path) -> None:
    direct = workload(tmp_path, notifies=ROWS)
    assert sorted(direct.users) == list(range(ROWS))
    tokens = {direct.token(index) for index in range(ROWS)}
    assert len(tokens) == ROWS
    user = direct.users[7]
    assert direct.token(7).decode() == direct.dataset.request(user, 0).token


def test_the_config_names_the_store_and_the_plugins_server(tmp_path: Path) -> None:
    sections = workload(tmp_path).config_sections()
    assert sections["storage"]["url"] == f"sqlite+aiosqlite:///{tmp_path / 'registrations.db'}"
    assert sections["component"]["allowed_domains"] == [SERVER_DOMAIN]


def test_the_request_log_is_read_from_its_end_and_by_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "requests.log"
    path.write_bytes(b"1700000000.001 /3/device/old\n")
    log = RequestLog(path)
    try:
        assert log.read() == []
        with path.open("ab") as nginx:
            nginx.write(b"1700000000.250 /3/device/aa11\n1700000000.5")
            nginx.flush()
            assert log.read() == [(1700000000.25, b"aa11")]
            nginx.write(b"00 /3/device/bb22\n")
            nginx.flush()
            assert log.read() == [(1700000000.5, b"bb22")]
    finally:
        log.close()


async def test_rows_an_interrupted_enable_run_left_are_removed_instead_of_loading_again(
    tmp_path: Path,
) -> None:
    direct = workload(tmp_path)
    await direct.prepare(tmp_path)
    assert direct.loading["reloaded"]
    database = tmp_path / "registrations.db"
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        # A new user's row, as an enable of bench.enables writes it: created now.
        connection.execute(
            "INSERT INTO registrations (key_hash, owner, push_jid, node, target, options,"
            " created_at, updated_at, failure_count)"
            " VALUES ('k', ?, ?, 'n', 'apns', '{}', ?, ?, 0)",
            (Dataset.owner(ROWS), PUSH_JID, 1_800_000_000_000_000, 1_800_000_000_000_000),
        )
    await direct.prepare(tmp_path)
    assert not direct.loading["reloaded"]
    assert direct.loading["removed_rows_not_loaded"] == 1
    with contextlib.closing(sqlite3.connect(database)) as connection:
        assert connection.execute("SELECT count(*) FROM registrations").fetchone() == (ROWS,)


def test_the_direct_database_sits_beside_the_scale_out_one() -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:5432/xmpp_push_bench"
    assert direct_database_url(url, 1_000_000).endswith("/xmpp_push_bench_direct")
    assert direct_database_url(url, 20_000).endswith("/xmpp_push_bench_direct_20000")


# ---------------------------------------------------------------- delegated enables

SECRET = "bench-secret"


def plan(count: int = 20, warmup: int = 5) -> EnablePlan:
    return EnablePlan(
        Dataset(owners=ROWS, devices=1, seed=5357, epoch_micros=0), count=count, warmup=warmup
    )


def read_delegated(data: bytes) -> DelegatedIq:
    """The bytes as the component's delegation handler reads them."""
    outer = ET.fromstring(data)
    assert outer.attrib == {
        "type": "set",
        "to": COMPONENT_JID,
        "from": SERVER_DOMAIN,
        "id": outer.get("id"),
    }
    return unwrap(outer, NS_DELEGATION_2, COMPONENT_JID)


def test_an_enable_again_asks_the_store_for_exactly_the_loaded_row() -> None:
    enables = plan()
    workload = enables.workload("enable_again")
    iq_id, data = workload.stanza(3)
    request = read_delegated(data)
    user = workload.users[3]
    assert request.outer_id == iq_id
    assert len(iq_id) == 12  # Prosody's util.id.short
    assert (request.sender, request.to, request.type) == (
        f"{Dataset.owner(user)}/phone-0",
        None,
        "set",
    )
    [payload] = request.payload
    enable = parse_push_request(payload)
    assert isinstance(enable, PushEnable)
    command = EnableCommand(
        owner=Dataset.owner(user),
        resource="phone-0",
        jid=enable.jid,
        node=enable.node,
        options=enable.options,
    )
    assert enable.options["service"] == "apns"
    assert len(enable.options["device_id"]) == 64
    assert registration_request(command, OWN_JIDS) == enables.dataset.request(user, 0)


def test_new_enables_are_for_users_not_loaded_and_disables_take_their_nodes_away() -> None:
    enables = plan()
    new = enables.workload("enable_new")
    disable = enables.workload("disable")
    assert new.users == disable.users
    assert min(new.users) >= ROWS
    assert not set(enables.users("enable_new", warmup=True)) & set(new.users)
    for index in (0, len(new.users) - 1):
        [enable_payload] = read_delegated(new.stanza(index)[1]).payload
        [disable_payload] = read_delegated(disable.stanza(index)[1]).payload
        enabled = parse_push_request(enable_payload)
        disabled = parse_push_request(disable_payload)
        assert isinstance(enabled, PushEnable)
        assert isinstance(disabled, PushDisable)
        assert (
            (disabled.jid, disabled.node)
            == (enabled.jid, enabled.node)
            == (
                PUSH_JID,
                enables.dataset.command(new.users[index], 0).node,
            )
        )


def test_each_iq_of_a_run_has_an_id_of_its_own() -> None:
    enables = plan(count=200)
    ids = {
        enables.workload(phase, warmup=warmup).stanza(index)[0]
        for phase in PHASES
        for warmup in (False, True)
        for index in range(len(enables.users(phase, warmup=warmup)))
    }
    assert len(ids) == 3 * (200 + 5)  # 200 measured and 5 warm-up IQs a phase


@dataclass
class Rig:
    link: ComponentLink
    store: MemoryStore


async def no_publishes(_request: PublishRequest) -> StanzaError | None:
    raise AssertionError("no publish expected here")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """The component with direct mode, connected to the harness's XMPP server."""
    server = LoadServer(SECRET)
    await server.start()
    component = PushComponent(
        ComponentSettings(
            jid=COMPONENT_JID,
            secret=SECRET,
            port=server.port,
            allowed_domains=frozenset({SERVER_DOMAIN}),
        ),
        no_publishes,
    )
    store = MemoryStore()
    own_jids = frozenset({COMPONENT_JID, PUSH_JID})
    install_direct_mode(component, DirectMode(store, own_jids=own_jids, max_per_owner=5))
    component.start()
    try:
        yield Rig(await server.next_link(timeout=10), store)
    finally:
        await component.close()
        await server.stop()


async def test_the_component_answers_every_phase_result_and_the_store_follows(rig: Rig) -> None:
    enables = plan(count=20, warmup=0)
    for user in enables.users("enable_again"):
        await rig.store.enable(enables.dataset.request(user, 0), max_per_owner=5, now=1.0)
    counts = []
    for phase in PHASES:
        result = await rig.link.run(
            enables.workload(phase), label=phase, start=0, count=20, window=8, stall_timeout=5
        )
        assert (result.sent, result.answered, result.results) == (20, 20, 20), result.errors
        counts.append(await rig.store.count())
    assert counts == [40, 40, 20]
    again = await rig.store.list(Dataset.owner(enables.users("enable_again")[0]))
    assert [row.updated_at for row in again] != [1.0]  # written again


class BadForms(PhaseWorkload):
    """Enables the component must refuse: a push service it does not know."""

    def stanza(self, index: int) -> tuple[str, bytes]:
        iq_id = f"bad{index}"
        command = EnableCommand(
            owner=Dataset.owner(index),
            resource="phone",
            jid=PUSH_JID,
            node=f"n{index}",
            options={"service": "pigeon", "device_id": "ab" * 32},
        )
        return iq_id, delegated_enable(command, iq_id, f"inner{index}").encode()


async def test_the_harness_counts_a_wrapped_error_as_an_error(rig: Rig) -> None:
    workload = BadForms(plan().dataset, "enable_new", range(5), warmup=False)
    result = await rig.link.run(workload, label="bad", start=0, count=5, window=5, stall_timeout=5)
    assert (result.answered, result.results) == (5, 0)
    assert result.errors == {"modify/bad-request": 5}
    assert await rig.store.count() == 0
