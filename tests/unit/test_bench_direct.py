"""The benchmark's direct-mode pieces (bench/direct.py) say what they claim to say.

The notify is one the component takes (parsed by its own `parse_notify` into an offline
wake for a loaded user), each notify names another user, and the sink's request log is
read line by line as nginx appends to it, never half a line.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from bench.direct import SERVER_DOMAIN, DirectWorkload, RequestLog, direct_database_url
from bench.registrations import Dataset
from bench.workload import COMPONENT_JID
from xmpp_push.core.wake import SessionState
from xmpp_push.xmpp.plugin_link import NS_PLUGIN, parse_notify

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


def test_the_direct_database_sits_beside_the_scale_out_one() -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:5432/xmpp_push_bench"
    assert direct_database_url(url, 1_000_000).endswith("/xmpp_push_bench_direct")
    assert direct_database_url(url, 20_000).endswith("/xmpp_push_bench_direct_20000")
