"""What the benchmark's XMPP server sends: XEP-0357 publishes in the servers' own shapes.

The stanzas are PROTOCOLS.md §1.2 byte for byte (attribute order, quotes, field types
and labels as Prosody 0.12 and ejabberd 23.01 wrote them), except for three values
that each publish varies: the IQ id (Prosody: 64 hex digits; ejabberd:
`rr-<n>-<n>-<base64>-<n>`), the node and the device in the publish-options form. The
device is named the way app-server mode reads it (`service` + `device_id`, as
MongooseIM clients and the README register), drawn at random from a fixed set of
distinct tokens per push service.

Mix, by publish index: 5 in 10 Prosody (offline message, "New Message!"), 4 in 10
ejabberd with its summary form, 1 in 10 ejabberd body-less (a chat state to a pending
session: `<notification/>` with no form, which becomes a silent push).

Extension point: a `Workload` decides what the component needs besides the sinks
(`config_sections`, e.g. a `[storage]` URL), what must exist before the run
(`prepare`, e.g. a database of registrations) and each stanza (`stanza`). Direct mode
is one (`bench.direct.DirectWorkload`: the server plugin's `notify` IQs for users of
1,000,000 loaded registrations); it runs as a scenario of its own, since its figure is
taken at the sink. Publish workloads plug in `bench.cli.WORKLOADS` (`--mode`).
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

__all__ = [
    "COMPONENT_JID",
    "SERVER_DOMAIN",
    "AppServerWorkload",
    "Shape",
    "TokenSet",
    "Workload",
    "shape_of",
]

SERVER_DOMAIN = "localhost"
COMPONENT_JID = "push.localhost"


class Shape(StrEnum):
    PROSODY = "prosody"
    EJABBERD = "ejabberd"
    EJABBERD_BODYLESS = "ejabberd-bodyless"


def shape_of(index: int) -> Shape:
    slot = index % 10
    if slot < 5:
        return Shape.PROSODY
    if slot < 9:
        return Shape.EJABBERD
    return Shape.EJABBERD_BODYLESS


_OPTIONS_SINGLE = (
    "<publish-options><x xmlns='jabber:x:data' type='submit'>"
    "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value>"
    "</field><field var='service'><value>{service}</value></field>"
    "<field var='device_id'><value>{token}</value></field></x></publish-options>"
)
_OPTIONS_EJABBERD = (
    "<publish-options><x type='submit' xmlns='jabber:x:data'>"
    "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value>"
    "</field><field var='service'><value>{service}</value></field>"
    "<field var='device_id'><value>{token}</value></field></x></publish-options>"
)
_OPTIONS_EJABBERD_DOUBLE = (
    '<publish-options><x type="submit" xmlns="jabber:x:data">'
    '<field var="FORM_TYPE"><value>http://jabber.org/protocol/pubsub#publish-options</value>'
    '</field><field var="service"><value>{service}</value></field>'
    '<field var="device_id"><value>{token}</value></field></x></publish-options>'
)

_TEMPLATES: Mapping[Shape, str] = {
    Shape.PROSODY: (
        "<iq id='{id}' type='set' from='{domain}' to='{jid}'>"
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item>"
        "<notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='form'>"
        "<field type='hidden' var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field>"
        "<field type='text-single' var='message-count'><value>1</value></field>"
        "<field type='text-single' var='pending-subscription-count'/>"
        "<field type='jid-single' var='last-message-sender'/>"
        "<field type='text-single' var='last-message-body'><value>New Message!</value></field>"
        "</x></notification></item></publish>" + _OPTIONS_SINGLE + "</pubsub></iq>"
    ),
    Shape.EJABBERD: (
        "<iq to='{jid}' from='{domain}' type='set' id='{id}'>"
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item>"
        "<notification xmlns='urn:xmpp:push:0'><x type='submit' xmlns='jabber:x:data'>"
        "<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:push:summary</value></field>"
        "<field var='last-message-body' type='text-single' "
        "label='The body text of the last received message'><value>New message</value>"
        "</field></x></notification></item></publish>" + _OPTIONS_EJABBERD + "</pubsub></iq>"
    ),
    Shape.EJABBERD_BODYLESS: (
        '<iq to="{jid}" from="{domain}" type="set" id="{id}">'
        '<pubsub xmlns="http://jabber.org/protocol/pubsub"><publish node="{node}"><item>'
        '<notification xmlns="urn:xmpp:push:0" /></item></publish>'
        + _OPTIONS_EJABBERD_DOUBLE
        + "</pubsub></iq>"
    ),
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


@dataclass(frozen=True)
class TokenSet:
    """`count` distinct device tokens of one push service, each with its own node.

    Made from a hash of the index, so every run addresses the same devices.
    """

    service: str
    count: int
    tokens: tuple[str, ...] = field(init=False, repr=False)
    nodes: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        tokens: list[str] = []
        nodes: list[str] = []
        for index in range(self.count):
            seed = f"{self.service}-{index}".encode()
            if self.service == "apns":
                tokens.append(hashlib.sha256(seed).hexdigest())  # 64 hex digits, like Apple's
            else:
                # FCM's shape: an instance id, ':', then "APA91b" and ~140 URL-safe chars.
                raw = hashlib.shake_256(seed).digest(114)
                tokens.append(f"{_b64url(raw[:8])}:APA91b{_b64url(raw[8:])}")
            # p2-style node: base64 of 9 bytes, 12 characters, '+' and '/' included.
            nodes.append(_b64(hashlib.blake2s(seed, digest_size=9).digest()))
        object.__setattr__(self, "tokens", tuple(tokens))
        object.__setattr__(self, "nodes", tuple(nodes))


class Workload(Protocol):
    """What one scenario publishes; see the module docstring for the extension point."""

    name: str
    mode: str
    """"appserver" (publishes) or "direct" (the server plugin's notifies)."""
    service: str

    def config_sections(self) -> dict[str, dict[str, object]]:
        """Extra TOML sections for the component's config (none in app-server mode)."""
        ...

    async def prepare(self, directory: Path) -> None:
        """Make whatever the component must find at start (nothing in app-server mode)."""
        ...

    def stanza(self, index: int) -> tuple[str, bytes]:
        """The IQ id and the bytes of stanza number `index`."""
        ...

    def describe(self) -> dict[str, object]:
        """What the results file records about this workload."""
        ...


class AppServerWorkload:
    """App-server mode: the server's publish carries the device in its publish-options."""

    mode = "appserver"

    def __init__(self, tokens: TokenSet, *, seed: int = 357) -> None:
        self.tokens = tokens
        self.service = tokens.service
        self.name = f"appserver-{tokens.service}"
        self._salt = b"%d:" % seed
        self._epoch_ms = 1_795_394_374_376
        self._tail = str(random.Random(seed).randrange(10**7, 10**8))

    def config_sections(self) -> dict[str, dict[str, object]]:
        return {}

    async def prepare(self, directory: Path) -> None:
        return None

    def stanza(self, index: int) -> tuple[str, bytes]:
        shape = shape_of(index)
        # One hash of the index gives both the id and the device, so publish `index`
        # is the same stanza in every run and in every process.
        digest = hashlib.sha256(self._salt + b"%d" % index).digest()
        pick = int.from_bytes(digest[:8], "big") % self.tokens.count
        if shape is Shape.PROSODY:
            iq_id = digest.hex()
        else:
            big = int.from_bytes(digest[8:16], "big")
            iq_id = f"rr-{self._epoch_ms + index}-{big}-{_b64(digest[12:32])}-{self._tail}"
        text = _TEMPLATES[shape].format(
            id=iq_id,
            jid=COMPONENT_JID,
            domain=SERVER_DOMAIN,
            node=self.tokens.nodes[pick],
            service=self.service,
            token=self.tokens.tokens[pick],
        )
        return iq_id, text.encode()

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "mode": self.mode,
            "service": self.service,
            "distinct_tokens": self.tokens.count,
            "token_choice": f"uniform, sha256 of (seed {self._salt.decode()[:-1]}, index)",
            "shapes": {
                Shape.PROSODY.value: 0.5,
                Shape.EJABBERD.value: 0.4,
                Shape.EJABBERD_BODYLESS.value: 0.1,
            },
            "example_bytes": {shape.value: len(self.stanza(i)[1]) for i, shape in _FIRST_OF_EACH},
        }


_FIRST_OF_EACH = ((0, Shape.PROSODY), (5, Shape.EJABBERD), (9, Shape.EJABBERD_BODYLESS))
