"""Direct mode in `bench/run`: clients' `<enable/>` and `<disable/>`, delegated to the component.

In direct mode the server delegates `urn:xmpp:push:0` to the component (XEP-0355), so
every `<enable/>` a client sends (at each app start) and every `<disable/>` reaches the
component wrapped in `<delegation><forwarded>`, and the component answers only once
the store has the change (xmpp_push.xmpp.delegation). So here, unlike the notifies
(bench.direct), the answer is the figure: the harness plays the server and sends the
wrapped IQs with a window of outstanding ones, as the publish runs do, and reads the
answers.

Three phases, each on the store loaded by bench.direct (`--direct-rows` users with one
APNs registration each), in this order:

* **enable_new**: enables of users who are not among the loaded rows
  (`user<rows + k>@bench.example`): each inserts a row;
* **enable_again**: enables of loaded users with exactly what they registered
  (node, token, form), as every app start sends again: each rewrites its row, and only
  `updated_at` changes;
* **disable**: disables (with the node) of what enable_new added, which leaves the
  table as it was loaded.

**The IQ** is the wrapped enable Prosody 0.12.3 with mod_delegation forwarded
(PROTOCOLS.md §2, as captured; attribute order as there): the wrapper from the server
domain with a 12-character id (`util.id.short`), no `to` on the inner IQ, the client's
id 32 hex digits, `xml:lang='en'`; in it the enable of the loaded rows'
(`bench.registrations.Dataset.command`): `jid` the component's alias
`push.bench.example`, the node, and the publish-options form with `service=apns`, the
64-hex `device_id`, `topic`, `mode` and `secret`. The disable is the same wrapper
around `<disable jid=… node=…/>`.

**Rows**: before and after each phase the harness counts the table (`count(*)`) and
the phase's users' rows, and how many of those were written since the phase began
(`updated_at`), straight in the database. A run that stopped half-way leaves rows
the load did not write; `bench.direct.ensure_registrations` removes them (they are
the rows created after the load) instead of loading everything again.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from xml.sax.saxutils import escape

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.direct import SERVER_DOMAIN
from bench.registrations import Dataset
from bench.workload import COMPONENT_JID
from xmpp_push.core.direct import EnableCommand
from xmpp_push.storage.sql import registrations

__all__ = [
    "ADVERTISEMENT",
    "PHASES",
    "PHASE_TITLES",
    "EnablePlan",
    "PhaseRows",
    "PhaseWorkload",
    "count_phase_rows",
    "delegated_disable",
    "delegated_enable",
]

PHASES: Final = ("enable_new", "enable_again", "disable")
PHASE_TITLES: Final = {
    "enable_new": "enable, new registration",
    "enable_again": "enable again, same token",
    "disable": "disable one node",
}
SEED: Final = 3557
"""Of the sample of loaded users enabled again (the notifies use bench.direct's)."""
DELEGATION: Final = "urn:xmpp:delegation:2"
"""Prosody's mod_delegation; ejabberd's is :1 and its inner IQ has a `to`."""
PUBLISH_OPTIONS: Final = "http://jabber.org/protocol/pubsub#publish-options"
ADVERTISEMENT: Final = (
    f"<message from='{SERVER_DOMAIN}' to='{COMPONENT_JID}'><delegation xmlns='{DELEGATION}'>"
    "<delegated namespace='urn:xmpp:push:0'/></delegation></message>"
).encode()
"""What Prosody sends once it routes `urn:xmpp:push:0` to the component."""
_LOOKUP_CHUNK: Final = 500


def _attr(value: str) -> str:
    return escape(value, {"'": "&apos;"})


def _wrapped(outer_id: str, inner_id: str, sender: str, payload: str) -> str:
    """Prosody 0.12.3's wrapper around a client's IQ, attribute order as captured."""
    return (
        f"<iq type='set' to='{COMPONENT_JID}' from='{SERVER_DOMAIN}' id='{_attr(outer_id)}'>"
        f"<delegation xmlns='{DELEGATION}'><forwarded xmlns='urn:xmpp:forward:0'>"
        f"<iq type='set' xmlns='jabber:client' from='{_attr(sender)}' id='{_attr(inner_id)}' "
        f"xml:lang='en'>{payload}</iq></forwarded></delegation></iq>"
    )


def _sender_and_node(command: EnableCommand) -> tuple[str, str]:
    if not command.node or not command.resource:
        raise ValueError("the harness's enables come from a full JID and name a node")
    return f"{command.owner}/{command.resource}", command.node


def delegated_enable(command: EnableCommand, outer_id: str, inner_id: str) -> str:
    """`command` as the client's `<enable/>`, wrapped as Prosody forwards it."""
    sender, node = _sender_and_node(command)
    fields = "".join(
        f"<field var='{_attr(var)}'><value>{escape(value)}</value></field>"
        for var, value in command.options.items()
    )
    enable = (
        f"<enable jid='{_attr(command.jid)}' node='{_attr(node)}' "
        "xmlns='urn:xmpp:push:0'><x type='submit' xmlns='jabber:x:data'>"
        f"<field var='FORM_TYPE'><value>{PUBLISH_OPTIONS}</value></field>{fields}</x></enable>"
    )
    return _wrapped(outer_id, inner_id, sender, enable)


def delegated_disable(command: EnableCommand, outer_id: str, inner_id: str) -> str:
    """The `<disable/>` of `command`'s node, wrapped as Prosody forwards it."""
    sender, node = _sender_and_node(command)
    disable = f"<disable jid='{_attr(command.jid)}' node='{_attr(node)}' xmlns='urn:xmpp:push:0'/>"
    return _wrapped(outer_id, inner_id, sender, disable)


class EnablePlan:
    """Who each phase enables or disables: `count` users a phase after `warmup` ones.

    enable_new takes users `rows`, `rows + 1`, …; enable_again a seeded sample of the
    loaded ones; disable the users enable_new added, in the same order.
    """

    def __init__(self, dataset: Dataset, *, count: int, warmup: int, seed: int = SEED) -> None:
        rows = dataset.owners
        if warmup + count > rows:
            raise ValueError(
                f"{warmup + count:,} enables again need as many loaded users; {rows:,} are loaded"
            )
        self.dataset = dataset
        self.count = count
        self.warmup = warmup
        new = list(range(rows, rows + warmup + count))
        again = random.Random(seed).sample(range(rows), warmup + count)
        self._users = {"enable_new": new, "enable_again": again, "disable": new}

    def users(self, phase: str, *, warmup: bool = False) -> list[int]:
        users = self._users[phase]
        return users[: self.warmup] if warmup else users[self.warmup :]

    def owners(self, phase: str) -> list[str]:
        """The bare JIDs of the measured users of `phase`."""
        return [Dataset.owner(user) for user in self.users(phase)]

    def workload(self, phase: str, *, warmup: bool = False) -> PhaseWorkload:
        return PhaseWorkload(self.dataset, phase, self.users(phase, warmup=warmup), warmup)

    def describe(self) -> dict[str, object]:
        example = self.workload("enable_again")
        return {
            "phases": {phase: PHASE_TITLES[phase] for phase in PHASES},
            "count": self.count,
            "warmup": self.warmup,
            "new_users": f"user<{self.dataset.owners:,} + k>@{SERVER_DOMAIN}, not loaded",
            "again_users": f"a sample without repeats (seed {SEED}) of the "
            f"{self.dataset.owners:,} loaded users, each with its loaded node and form",
            "delegation": DELEGATION,
            "shape": "Prosody 0.12.3 mod_delegation: wrapper from the server domain, "
            "no inner `to`, 12-character wrapper id, 32-hex client id",
            "example": example.stanza(0)[1].decode() if example.users else None,
        }


class PhaseWorkload:
    """One phase's wrapped IQs (a `bench.workload.Workload`; `stanza(i)` is for the
    i-th user of the phase)."""

    mode = "direct"
    service = "apns"

    def __init__(self, dataset: Dataset, phase: str, users: Sequence[int], warmup: bool) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.dataset = dataset
        self.phase = phase
        self.users = list(users)
        self.name = f"direct-{phase}"
        self._salt = f"{SEED}:{phase}:{'warmup' if warmup else 'run'}:".encode()

    def config_sections(self) -> dict[str, dict[str, object]]:
        return {}

    async def prepare(self, directory: Path) -> None:
        return None

    def stanza(self, index: int) -> tuple[str, bytes]:
        digest = hashlib.sha256(self._salt + b"%d" % index).digest()
        outer_id = base64.urlsafe_b64encode(digest[:9]).decode("ascii")  # util.id.short
        inner_id = digest[9:25].hex()
        command = self.dataset.command(self.users[index], 0)
        if self.phase == "disable":
            text = delegated_disable(command, outer_id, inner_id)
        else:
            text = delegated_enable(command, outer_id, inner_id)
        return outer_id, text.encode()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "phase": self.phase, "users": len(self.users)}


# --------------------------------------------------------------------------------------
# What the store holds


@dataclass(frozen=True, slots=True)
class PhaseRows:
    table: int
    """Every row of the table."""
    users: int
    """Rows of the phase's users."""
    written: int
    """Rows of the phase's users written (`updated_at`) at or after the given time."""


async def count_phase_rows(url: str, owners: Sequence[str], since_micros: int) -> PhaseRows:
    """Count straight in the database, beside the component's own connections."""
    t = registrations.c
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            count_all = sa.select(sa.func.count()).select_from(registrations)
            table = (await connection.execute(count_all)).scalar_one()
            recent = sa.func.coalesce(
                sa.func.sum(sa.case((t.updated_at >= since_micros, 1), else_=0)), 0
            )
            users = written = 0
            for start in range(0, len(owners), _LOOKUP_CHUNK):
                chunk = list(owners[start : start + _LOOKUP_CHUNK])
                found = (
                    await connection.execute(
                        sa.select(sa.func.count(), recent).where(t.owner.in_(chunk))
                    )
                ).one()
                users += int(found[0])
                written += int(found[1])
    finally:
        await engine.dispose()
    return PhaseRows(int(table), users, written)
