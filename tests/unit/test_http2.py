"""The push clients' HTTP/2 engine against `h2` acting as the server, bytes in memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    SettingsAcknowledged,
    StreamEnded,
)
from h2.events import StreamReset as H2StreamReset
from h2.settings import SettingCodes, Settings
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from xmpp_push.providers._hpack import LiteralEncoder
from xmpp_push.providers._http2 import (
    PREFACE,
    ClientConnection,
    ConnectionFailed,
    Data,
    ErrorCode,
    Event,
    GoAway,
    Headers,
    Http2Error,
    PingAcknowledged,
    SettingsChanged,
    StreamReset,
)

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"api.push.apple.com"),
    (b":path", b"/3/device/" + b"ab" * 32),
    (b"apns-topic", b"org.example.chat"),
]
STATUS_200 = b"\x88"  # HPACK: static table entry 8, `:status: 200`


def h2_server(**settings: int) -> H2Connection:
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    if settings:
        # As initial values (not an update) so they hold from the first frame on.
        server.local_settings = Settings(
            client=False,
            initial_values={SettingCodes[name.upper()]: value for name, value in settings.items()},
        )
    server.initiate_connection()
    return server


def connect(server: H2Connection) -> tuple[ClientConnection, list[Event]]:
    """A client that has exchanged prefaces and SETTINGS with `server`."""
    client = ClientConnection(LiteralEncoder())
    client.initiate()
    server.receive_data(client.data_to_send())
    events = client.receive(server.data_to_send())
    server.receive_data(client.data_to_send())  # our ACK of its SETTINGS
    return client, events


def to_server(client: ClientConnection, server: H2Connection) -> list[object]:
    return list(server.receive_data(client.data_to_send()))


def to_client(server: H2Connection, client: ClientConnection) -> list[Event]:
    return client.receive(server.data_to_send())


def received_body(events: list[object], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def raw(*frames: Frame) -> bytes:
    return b"".join(frame.serialize() for frame in frames)


def hand_made(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """A frame hyperframe refuses to build (it checks what we want to break)."""
    header = len(payload).to_bytes(3, "big") + bytes((frame_type, flags))
    return header + stream_id.to_bytes(4, "big") + payload


def parse(wire: bytes) -> list[Frame]:
    frames = []
    view = memoryview(wire)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


def answer(server: H2Connection, stream_id: int, status: bytes, body: bytes = b"") -> None:
    server.send_headers(stream_id, [(b":status", status), (b"apns-id", b"x")], not body)
    for start in range(0, len(body), 16_384):
        chunk = body[start : start + 16_384]
        server.send_data(stream_id, chunk, end_stream=start + len(chunk) == len(body))


# -- the exchange an APNs push is ----------------------------------------------------------


def test_settings_are_exchanged_and_acknowledged() -> None:
    server = h2_server(max_concurrent_streams=10)
    client = ClientConnection(LiteralEncoder())
    client.initiate()

    from_client = to_server(client, server)
    events = to_client(server, client)
    acknowledged = to_server(client, server)

    assert [type(e) for e in from_client] == [RemoteSettingsChanged]
    assert events == [SettingsChanged(max_concurrent_streams=10)]
    assert [type(e) for e in acknowledged] == [SettingsAcknowledged]


def test_our_settings_refuse_server_push() -> None:
    client = ClientConnection(LiteralEncoder())
    client.initiate()
    wire = client.data_to_send()

    assert wire.startswith(PREFACE)
    [settings] = parse(wire[len(PREFACE) :])
    assert isinstance(settings, SettingsFrame)
    assert settings.settings == {SettingsFrame.ENABLE_PUSH: 0}


def test_request_and_answer_with_body() -> None:
    server = h2_server()
    client, _ = connect(server)

    stream_id = client.send_request(REQUEST, b'{"aps":{}}')
    received = to_server(client, server)
    answer(server, stream_id, b"410", b'{"reason":"Unregistered"}')
    events = to_client(server, client)

    request = next(e for e in received if isinstance(e, RequestReceived))
    assert list(request.headers) == REQUEST
    assert received_body(received, stream_id) == b'{"aps":{}}'
    assert any(isinstance(e, StreamEnded) for e in received)
    assert events == [
        Headers(stream_id, [(b":status", b"410"), (b"apns-id", b"x")], False),
        Data(stream_id, b'{"reason":"Unregistered"}', True),
    ]
    assert client.open_streams == 0


def test_body_less_request_ends_with_its_headers() -> None:
    server = h2_server()
    client, _ = connect(server)

    client.send_request(REQUEST, b"")

    received = to_server(client, server)
    assert [type(e) for e in received] == [RequestReceived, StreamEnded]


def test_stream_ids_are_odd_and_rising_and_run_out() -> None:
    client, _ = connect(h2_server())

    assert [client.send_request(REQUEST, b"") for _ in range(3)] == [1, 3, 5]
    client._next_stream_id = 2**31 + 1
    with pytest.raises(Http2Error):
        client.send_request(REQUEST, b"")


# -- reading frames ------------------------------------------------------------------------


def scripted_answers() -> tuple[bytes, list[Event]]:
    """What the server sends for three requests, and the events it must give."""
    server = h2_server()
    client, _ = connect(server)
    ids = [client.send_request(REQUEST, b"{}") for _ in range(3)]
    to_server(client, server)
    answer(server, ids[0], b"200")
    answer(server, ids[1], b"400", b'{"reason":"BadDeviceToken"}')
    server.ping(b"pingping")
    # Huffman-coded and in the dynamic table: the second block refers to the first.
    answer(server, ids[2], b"429", b'{"reason":"TooManyRequests"}')
    wire = server.data_to_send()
    return wire, client.receive(wire)


def fresh_client() -> ClientConnection:
    client, _ = connect(h2_server())
    for _ in range(3):
        client.send_request(REQUEST, b"{}")
    client.data_to_send()
    return client


def test_frames_split_at_every_byte_boundary_give_the_same_events() -> None:
    wire, expected = scripted_answers()
    assert len(expected) == 5

    for split in range(1, len(wire)):
        client = fresh_client()
        events = client.receive(wire[:split]) + client.receive(wire[split:])
        assert events == expected, split


def test_frames_fed_one_byte_at_a_time() -> None:
    wire, expected = scripted_answers()
    client = fresh_client()

    events: list[Event] = []
    for i in range(len(wire)):
        events += client.receive(wire[i : i + 1])

    assert events == expected


def test_continuation_frames_in_both_directions() -> None:
    server = h2_server()
    client, _ = connect(server)
    big = b"v" * 40_000  # more than two 16 KiB frames either way

    stream_id = client.send_request([*REQUEST, (b"x-big", big)], b"")
    sent = client.data_to_send()
    received = server.receive_data(sent)
    server.send_headers(stream_id, [(b":status", b"200"), (b"x-big", big)], end_stream=True)
    wire = server.data_to_send()
    events = client.receive(wire)

    for frames in (parse(sent), parse(wire)):
        assert len(frames) >= 3
        assert isinstance(frames[0], HeadersFrame)
        assert all(isinstance(f, ContinuationFrame) for f in frames[1:])
    request = next(e for e in received if isinstance(e, RequestReceived))
    assert dict(request.headers)[b"x-big"] == big
    assert events == [Headers(stream_id, [(b":status", b"200"), (b"x-big", big)], True)]


def test_padding_and_priority_are_skipped() -> None:
    server = h2_server()
    client, _ = connect(server)
    stream_id = client.send_request(REQUEST, b"")
    headers = HeadersFrame(stream_id, STATUS_200, flags=["PADDED", "PRIORITY", "END_HEADERS"])
    headers.pad_length = 7
    headers.depends_on, headers.stream_weight = 0, 15
    body = DataFrame(stream_id, b"hello", flags=["PADDED", "END_STREAM"])
    body.pad_length = 20

    events = client.receive(raw(headers, body))

    assert events == [
        Headers(stream_id, [(b":status", b"200")], False),
        Data(stream_id, b"hello", True),
    ]


def test_unknown_frame_types_are_ignored() -> None:
    client, _ = connect(h2_server())
    stream_id = client.send_request(REQUEST, b"")
    unknown = b"\x00\x00\x03\xfa\x00\x00\x00\x00\x01abc"

    events = client.receive(
        unknown + raw(HeadersFrame(stream_id, STATUS_200, flags=["END_HEADERS", "END_STREAM"]))
    )

    assert events == [Headers(stream_id, [(b":status", b"200")], True)]


# -- flow control --------------------------------------------------------------------------


def test_body_larger_than_the_windows_waits_for_window_update() -> None:
    server = h2_server()
    client, _ = connect(server)
    body = bytes(range(256)) * 400  # 102,400 bytes: beyond both 65,535-byte windows

    stream_id = client.send_request(REQUEST, body)
    first = to_server(client, server)
    assert len(received_body(first, stream_id)) == 65_535
    assert to_server(client, server) == []  # nothing more until the server allows it

    received = first
    while not any(isinstance(e, StreamEnded) for e in received):
        for event in received:
            if isinstance(event, DataReceived):
                server.acknowledge_received_data(event.flow_controlled_length, stream_id)
        assert to_client(server, client) == []
        batch = to_server(client, server)
        assert batch, "a WINDOW_UPDATE must let the rest go"
        first += batch
        received = batch

    assert received_body(first, stream_id) == body
    assert max(len(e.data) for e in first if isinstance(e, DataReceived)) <= 16_384


def test_initial_window_size_changes_apply_to_open_streams() -> None:
    server = h2_server(initial_window_size=100)
    client, _ = connect(server)
    body = b"b" * 1000

    stream_id = client.send_request(REQUEST, body)
    received = to_server(client, server)
    assert len(received_body(received, stream_id)) == 100

    server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 400})  # +300 for the stream
    assert [type(e) for e in to_client(server, client)] == [SettingsChanged]
    received += to_server(client, server)
    assert len(received_body(received, stream_id)) == 400

    server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})  # -400: window now -400
    to_client(server, client)
    received += to_server(client, server)
    server.increment_flow_control_window(300, stream_id)
    to_client(server, client)
    received += to_server(client, server)
    assert len(received_body(received, stream_id)) == 400  # still -100

    server.increment_flow_control_window(700, stream_id)
    to_client(server, client)
    received += to_server(client, server)
    assert received_body(received, stream_id) == body
    assert any(isinstance(e, StreamEnded) for e in received)


def test_max_frame_size_of_the_server_is_used() -> None:
    server = h2_server(max_frame_size=20_000)
    client, _ = connect(server)

    client.send_request(REQUEST, b"f" * 30_000)
    frames = parse(client.data_to_send())

    assert [len(f.data) for f in frames if isinstance(f, DataFrame)] == [20_000, 10_000]


def test_long_answers_replenish_the_servers_windows() -> None:
    server = h2_server()
    client, _ = connect(server)
    stream_id = client.send_request(REQUEST, b"")
    to_server(client, server)
    server.send_headers(stream_id, [(b":status", b"200")])
    body = b"a" * 300_000  # 4.5 times both windows
    remaining = memoryview(body)

    got = bytearray()
    ended = False
    while not ended:
        window = server.local_flow_control_window(stream_id)
        size = min(window, server.max_outbound_frame_size, len(remaining))
        assert size > 0, "the server's window ran dry"
        server.send_data(stream_id, remaining[:size].tobytes(), end_stream=size == len(remaining))
        remaining = remaining[size:]
        for event in to_client(server, client):
            if isinstance(event, Data):
                got += event.data
                ended = event.end_stream
        to_server(client, server)

    assert got == body


def test_an_answer_before_the_whole_body_stops_the_body() -> None:
    server = h2_server(initial_window_size=100)
    client, _ = connect(server)
    stream_id = client.send_request(REQUEST, b"p" * 5000)
    to_server(client, server)

    answer(server, stream_id, b"413", b'{"reason":"PayloadTooLarge"}')
    events = to_client(server, client)
    received = to_server(client, server)

    assert events[-1] == Data(stream_id, b'{"reason":"PayloadTooLarge"}', True)
    [reset] = [e for e in received if isinstance(e, H2StreamReset)]
    assert reset.error_code == ErrorCode.NO_ERROR
    assert client.open_streams == 0
    assert client.receive(raw(WindowUpdateFrame(stream_id, 5000))) == []
    assert client.data_to_send() == b""  # the rest of the body stays unsent


# -- resets, PING, GOAWAY ------------------------------------------------------------------


def test_server_reset_is_reported() -> None:
    server = h2_server()
    client, _ = connect(server)
    stream_id = client.send_request(REQUEST, b"{}")
    to_server(client, server)

    server.reset_stream(stream_id, 7)  # REFUSED_STREAM

    assert to_client(server, client) == [StreamReset(stream_id, ErrorCode.REFUSED_STREAM)]
    assert client.open_streams == 0


def test_late_frames_on_a_stream_we_reset_are_ignored() -> None:
    server = h2_server()
    client, _ = connect(server)
    stream_id = client.send_request(REQUEST, b"{}")
    to_server(client, server)
    # An answer still under way when our reset crosses it.
    server.send_headers(stream_id, [(b":status", b"400"), (b"apns-id", b"late")])
    server.send_data(stream_id, b"x" * 16_384)
    server.send_data(stream_id, b"x" * 16_384)
    server.send_data(stream_id, b"x" * 7_232)

    client.reset_stream(stream_id)
    received = to_server(client, server)
    events = to_client(server, client)

    assert [type(e) for e in received] == [H2StreamReset]
    assert events == []
    # The late body still counted against the connection window and was given back
    # (once half the window was used up), not against the closed stream's.
    updates = [f for f in parse(client.data_to_send()) if isinstance(f, WindowUpdateFrame)]
    assert [(f.stream_id, f.window_increment) for f in updates] == [(0, 32_768)]
    # The decoder kept up with the late header block: the next answer decodes.
    next_id = client.send_request(REQUEST, b"")
    to_server(client, server)
    answer(server, next_id, b"400")
    assert to_client(server, client) == [
        Headers(next_id, [(b":status", b"400"), (b"apns-id", b"x")], True)
    ]


def test_server_ping_is_answered_and_ours_acknowledged() -> None:
    server = h2_server()
    client, _ = connect(server)

    server.ping(b"theirs!!")
    assert to_client(server, client) == []
    assert [type(e) for e in to_server(client, server)] == [PingAckReceived]

    client.ping(b"ours....")
    to_server(client, server)  # h2 answers by itself
    assert to_client(server, client) == [PingAcknowledged(b"ours....")]


def test_goaway_drops_streams_above_last_stream_id_and_lets_others_finish() -> None:
    server = h2_server()
    client, _ = connect(server)
    ids = [client.send_request(REQUEST, b"{}") for _ in range(3)]  # 1, 3, 5
    to_server(client, server)
    answer(server, 3, b"200")
    answer(server, 5, b"200")  # sent before the GOAWAY arrives: must be ignored

    goaway = GoAwayFrame(0, last_stream_id=3, error_code=0, additional_data=b"Shutdown")
    events = client.receive(raw(goaway) + server.data_to_send())
    answer(server, 1, b"200")
    events += to_client(server, client)

    assert events == [
        GoAway(last_stream_id=3, error_code=0, debug=b"Shutdown", dropped=(5,)),
        Headers(3, [(b":status", b"200"), (b"apns-id", b"x")], True),
        Headers(1, [(b":status", b"200"), (b"apns-id", b"x")], True),
    ]
    assert ids == [1, 3, 5]
    assert client.open_streams == 0
    with pytest.raises(Http2Error):
        client.send_request(REQUEST, b"")


def test_a_second_goaway_cannot_raise_the_limit() -> None:
    client, _ = connect(h2_server())
    for _ in range(3):
        client.send_request(REQUEST, b"")

    events = client.receive(raw(GoAwayFrame(0, last_stream_id=1), GoAwayFrame(0, last_stream_id=5)))

    assert [e.dropped for e in events if isinstance(e, GoAway)] == [(3, 5), ()]
    assert [e.last_stream_id for e in events if isinstance(e, GoAway)] == [1, 1]


def test_close_sends_goaway() -> None:
    server = h2_server()
    client, _ = connect(server)

    client.close()

    [terminated] = to_server(client, server)
    assert isinstance(terminated, ConnectionTerminated)
    assert (terminated.error_code, terminated.last_stream_id) == (ErrorCode.NO_ERROR, 0)
    assert client.receive(raw(RstStreamFrame(1))) == []


# -- protocol violations -------------------------------------------------------------------


def _violations() -> Iterator[tuple[str, bytes, ErrorCode]]:
    yield (
        "HEADERS on a stream never opened",
        raw(HeadersFrame(7, STATUS_200, flags=["END_HEADERS"])),
        ErrorCode.PROTOCOL_ERROR,
    )
    yield "DATA on stream 0", hand_made(0x0, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR
    yield "DATA before HEADERS", raw(DataFrame(1, b"x")), ErrorCode.PROTOCOL_ERROR
    push = PushPromiseFrame(1, promised_stream_id=2, data=STATUS_200, flags=["END_HEADERS"])
    yield "PUSH_PROMISE", raw(push), ErrorCode.PROTOCOL_ERROR
    yield (
        "CONTINUATION out of the blue",
        raw(ContinuationFrame(1, STATUS_200, flags=["END_HEADERS"])),
        ErrorCode.PROTOCOL_ERROR,
    )
    yield (
        "header block interrupted",
        raw(HeadersFrame(1, STATUS_200), DataFrame(1, b"x")),
        ErrorCode.PROTOCOL_ERROR,
    )
    yield "window overflow", raw(WindowUpdateFrame(0, 2**31 - 1)), ErrorCode.FLOW_CONTROL_ERROR
    yield "WINDOW_UPDATE of 0", raw(WindowUpdateFrame(1, 0)), ErrorCode.PROTOCOL_ERROR
    yield (
        "ENABLE_PUSH from the server",
        raw(SettingsFrame(0, {SettingsFrame.ENABLE_PUSH: 1})),
        ErrorCode.PROTOCOL_ERROR,
    )
    yield (
        "frame over our maximum size",
        raw(HeadersFrame(1, STATUS_200 * 16_385, flags=["END_HEADERS"])),
        ErrorCode.FRAME_SIZE_ERROR,
    )
    yield (
        "HPACK index out of range",
        raw(HeadersFrame(1, b"\xff\x10", flags=["END_HEADERS"])),
        ErrorCode.COMPRESSION_ERROR,
    )
    # One payload byte, the pad length, saying 5 bytes of padding follow.
    padded = hand_made(0x0, 0x8, 1, b"\x05")
    yield (
        "padding longer than the frame",
        raw(HeadersFrame(1, STATUS_200, flags=["END_HEADERS"])) + padded,
        ErrorCode.PROTOCOL_ERROR,
    )


@pytest.mark.parametrize(
    ("wire", "code"),
    [pytest.param(wire, code, id=name) for name, wire, code in _violations()],
)
def test_protocol_violation_sends_goaway_and_fails_the_connection(
    wire: bytes, code: ErrorCode
) -> None:
    server = h2_server()
    client, _ = connect(server)
    client.send_request(REQUEST, b"{}")
    to_server(client, server)

    events = client.receive(wire)

    assert isinstance(events[-1], ConnectionFailed)
    assert events[-1].error_code == code
    [goaway] = parse(client.data_to_send())
    assert isinstance(goaway, GoAwayFrame)
    assert (goaway.error_code, goaway.last_stream_id) == (code, 0)
    assert client.closed
    assert client.receive(raw(DataFrame(1, b"x"))) == []


def test_a_server_that_does_not_start_with_settings_is_refused() -> None:
    client = ClientConnection(LiteralEncoder())
    client.initiate()
    client.data_to_send()

    events = client.receive(raw(WindowUpdateFrame(0, 1000)))

    assert [type(e) for e in events] == [ConnectionFailed]
