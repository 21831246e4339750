"""Our HPACK decoder against RFC 7541's examples and the `hpack` package (its encoder
as a peer, its decoder as a second opinion)."""

from __future__ import annotations

from collections.abc import Iterable

import hpack
import pytest
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from xmpp_push.providers._hpack import (
    STATIC_TABLE,
    Decoder,
    HpackError,
    huffman_codes,
    huffman_decode,
)

Fields = list[tuple[bytes, bytes]]

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def _size(entries: Iterable[tuple[bytes, bytes]]) -> int:
    """A dynamic table's size as RFC 7541 §4.1 counts it."""
    return sum(len(name) + len(value) + 32 for name, value in entries)


def test_huffman_code_is_appendix_b() -> None:
    assert huffman_codes() == list(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True))


def test_static_table_is_appendix_a() -> None:
    assert STATIC_TABLE == hpack.table.HeaderTable.STATIC_TABLE


# --------------------------------------------------------------------------------------
# RFC 7541 Appendix C, byte for byte


def test_c2_field_representations() -> None:
    decoder = Decoder()
    block = bytes.fromhex("400a637573746f6d2d6b65790d637573746f6d2d686561646572")
    assert decoder.decode(block) == [(b"custom-key", b"custom-header")]
    assert decoder.entries == ((b"custom-key", b"custom-header"),)
    assert decoder.table_size == 55

    decoder = Decoder()
    assert decoder.decode(bytes.fromhex("040c2f73616d706c652f70617468")) == [
        (b":path", b"/sample/path")
    ]
    assert decoder.decode(bytes.fromhex("100870617373776f726406736563726574")) == [
        (b"password", b"secret")
    ]
    assert decoder.decode(b"\x82") == [(b":method", b"GET")]
    assert decoder.table_size == 0


_C3_C4_FIELDS: list[Fields] = [
    [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
    ],
    [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
        (b"cache-control", b"no-cache"),
    ],
    [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/index.html"),
        (b":authority", b"www.example.com"),
        (b"custom-key", b"custom-value"),
    ],
]
_C3_C4_TABLES: list[tuple[Fields, int]] = [
    ([(b":authority", b"www.example.com")], 57),
    ([(b"cache-control", b"no-cache"), (b":authority", b"www.example.com")], 110),
    (
        [
            (b"custom-key", b"custom-value"),
            (b"cache-control", b"no-cache"),
            (b":authority", b"www.example.com"),
        ],
        164,
    ),
]
_C5_C6_FIELDS: list[Fields] = [
    [
        (b":status", b"302"),
        (b"cache-control", b"private"),
        (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        (b"location", b"https://www.example.com"),
    ],
    [
        (b":status", b"307"),
        (b"cache-control", b"private"),
        (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        (b"location", b"https://www.example.com"),
    ],
    [
        (b":status", b"200"),
        (b"cache-control", b"private"),
        (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
        (b"location", b"https://www.example.com"),
        (b"content-encoding", b"gzip"),
        (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
    ],
]
_C5_C6_TABLES: list[tuple[Fields, int]] = [
    (
        [
            (b"location", b"https://www.example.com"),
            (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
            (b"cache-control", b"private"),
            (b":status", b"302"),
        ],
        222,
    ),
    (
        [
            (b":status", b"307"),
            (b"location", b"https://www.example.com"),
            (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
            (b"cache-control", b"private"),
        ],
        222,
    ),
    (
        [
            (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
            (b"content-encoding", b"gzip"),
            (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
        ],
        215,
    ),
]

_C3 = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
_C4 = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]
_C5 = [
    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120"
    "474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
    "4803333037c1c0bf",
    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738"
    "666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d33"
    "3630303b2076657273696f6e3d31",
]
_C6 = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad1718"
    "63c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7"
    "b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


@pytest.mark.parametrize(
    ("blocks", "fields", "tables", "table_size"),
    [
        pytest.param(_C3, _C3_C4_FIELDS, _C3_C4_TABLES, 4096, id="C.3 requests"),
        pytest.param(_C4, _C3_C4_FIELDS, _C3_C4_TABLES, 4096, id="C.4 requests, Huffman"),
        pytest.param(_C5, _C5_C6_FIELDS, _C5_C6_TABLES, 256, id="C.5 responses"),
        pytest.param(_C6, _C5_C6_FIELDS, _C5_C6_TABLES, 256, id="C.6 responses, Huffman"),
    ],
)
def test_appendix_c_examples(
    blocks: list[str], fields: list[Fields], tables: list[tuple[Fields, int]], table_size: int
) -> None:
    # C.5 and C.6 assume a 256-octet table: the peer announced that, then signalled it.
    decoder = Decoder(table_size)
    for block, expected, (entries, size) in zip(blocks, fields, tables, strict=True):
        assert decoder.decode(bytes.fromhex(block)) == expected
        assert decoder.entries == tuple(entries)
        assert decoder.table_size == size


def test_huffman_strings_of_appendix_c() -> None:
    assert huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"
    assert huffman_decode(bytes.fromhex("a8eb10649cbf")) == b"no-cache"
    assert huffman_decode(b"") == b""


# --------------------------------------------------------------------------------------
# Against hpack's encoder: whatever it sends, we read


_names = st.binary(min_size=1, max_size=20) | st.sampled_from(
    [name for name, _ in STATIC_TABLE] + [b"apns-id", b"apns-unique-id"]
)
_values = st.binary(max_size=60) | st.sampled_from([b"200", b"gzip, deflate", b"", b"x" * 300])
_field_lists = st.lists(st.tuples(_names, _values, st.booleans()), max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    blocks=st.lists(
        st.tuples(_field_lists, st.none() | st.integers(0, 4096)), min_size=1, max_size=8
    ),
    huffman=st.booleans(),
)
def test_round_trip_with_hpack_encoder(
    blocks: list[tuple[list[tuple[bytes, bytes, bool]], int | None]], huffman: bool
) -> None:
    encoder = hpack.Encoder()
    reference = hpack.Decoder()
    decoder = Decoder()
    for fields, table_size in blocks:
        if table_size is not None:
            encoder.header_table_size = table_size  # signalled at the next block's start
        headers = [
            NeverIndexedHeaderTuple(name, value) if sensitive else HeaderTuple(name, value)
            for name, value, sensitive in fields
        ]
        block = encoder.encode(headers, huffman=huffman)
        assert decoder.decode(block) == [(name, value) for name, value, _ in fields]
        reference.decode(block, raw=True)
        assert decoder.table_size == _size(reference.header_table.dynamic_entries)
        assert decoder.max_table_size == reference.header_table_size
        assert decoder.entries == tuple(reference.header_table.dynamic_entries)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_huffman_round_trip(data: bytes) -> None:
    assert huffman_decode(_HUFFMAN.encode(data)) == data


# --------------------------------------------------------------------------------------
# Blocks of any representation, hpack's decoder as the second opinion


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    encoded = encode_integer(value, prefix_bits)
    encoded[0] |= flags
    return bytes(encoded)


def _string(data: bytes, huffman: bool) -> bytes:
    if huffman:
        data = _HUFFMAN.encode(data)
    return _integer(len(data), 7, 0x80 if huffman else 0) + data


@st.composite
def _representations(draw: st.DrawFn) -> bytes:
    """One block: size updates first, then fields of any kind, indexes possibly stale."""
    block = b"".join(
        _integer(size, 5, 0x20) for size in draw(st.lists(st.integers(0, 4096), max_size=2))
    )
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["indexed", "incremental", "without", "never"]))
        index = draw(st.integers(1, 61) | st.integers(62, 70))
        if kind == "indexed":
            block += _integer(index, 7, 0x80)
            continue
        prefix, flags = {"incremental": (6, 0x40), "without": (4, 0x00), "never": (4, 0x10)}[kind]
        if draw(st.booleans()):
            block += _integer(index, prefix, flags)
        else:
            block += _integer(0, prefix, flags) + _string(draw(_names), draw(st.booleans()))
        block += _string(draw(_values), draw(st.booleans()))
    return block


@settings(max_examples=300, deadline=None)
@given(st.lists(_representations(), min_size=1, max_size=6))
def test_any_representation_as_hpack_decodes_it(blocks: list[bytes]) -> None:
    reference = hpack.Decoder()
    reference.max_header_list_size = 2**32  # we set no limit of our own
    decoder = Decoder()
    for block in blocks:
        try:
            expected = reference.decode(block, raw=True)
        except hpack.HPACKError:
            with pytest.raises(HpackError):
                decoder.decode(block)
            return  # the connection is over
        assert decoder.decode(block) == [(bytes(name), bytes(value)) for name, value in expected]
        assert decoder.table_size == _size(reference.header_table.dynamic_entries)
        assert decoder.entries == tuple(reference.header_table.dynamic_entries)


# --------------------------------------------------------------------------------------
# Dynamic table upkeep


def test_entry_larger_than_the_table_empties_it() -> None:
    decoder = Decoder(100)
    decoder.decode(b"\x40" + _string(b"a", False) + _string(b"b", False))
    assert decoder.table_size == 34
    # 1 + 68 + 32 = 101 octets: nothing fits, everything goes (RFC 7541 §4.4).
    assert decoder.decode(b"\x40" + _string(b"c", False) + _string(b"d" * 68, False)) == [
        (b"c", b"d" * 68)
    ]
    assert decoder.entries == ()
    assert decoder.table_size == 0


def test_size_update_evicts_and_bounds_later_entries() -> None:
    decoder = Decoder()
    first = _integer(0, 6, 0x40) + _string(b"k1", True) + _string(b"v" * 30, True)
    second = _integer(0, 6, 0x40) + _string(b"k2", True) + _string(b"w" * 30, True)
    decoder.decode(first + second)
    assert decoder.table_size == 128
    assert decoder.decode(_integer(100, 5, 0x20) + b"\xbe") == [(b"k2", b"w" * 30)]
    assert decoder.entries == ((b"k2", b"w" * 30),)
    assert decoder.max_table_size == 100
    decoder.decode(_integer(0, 5, 0x20) + _integer(4096, 5, 0x20))
    assert list(decoder.entries) == []  # (a list: mypy narrowed the tuple above)
    assert decoder.max_table_size == 4096


def test_literal_names_from_the_dynamic_table() -> None:
    decoder = Decoder()
    decoder.decode(b"\x40" + _string(b"apns-id", True) + _string(b"one", True))
    block = b"\x0f\x2f" + _string(b"two", False) + b"\x1f\x2f" + _string(b"three", True)
    assert decoder.decode(block) == [(b"apns-id", b"two"), (b"apns-id", b"three")]
    assert decoder.decode(b"\x7e" + _string(b"four", False)) == [(b"apns-id", b"four")]
    assert decoder.entries == ((b"apns-id", b"four"), (b"apns-id", b"one"))


def test_huffman_cache_changes_no_string() -> None:
    decoder = Decoder()
    # More strings than the cache holds, and one too long to be kept, each twice.
    values = [str(n).encode() for n in range(600)] + [b"x" * 100]
    for _ in range(2):
        for value in values:
            block = b"\x00" + _string(b"apns-id", True) + _string(value, True)
            assert decoder.decode(block) == [(b"apns-id", value)]


# --------------------------------------------------------------------------------------
# Errors: each would leave the two ends' tables out of step


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        pytest.param(b"\x80", "index 0", id="index 0"),
        pytest.param(b"\xbe", "beyond the dynamic table", id="index beyond an empty dynamic table"),
        pytest.param(_integer(5000, 7, 0x80), "beyond the dynamic table", id="index far beyond"),
        pytest.param(
            b"\x7e" + _string(b"v", False),
            "beyond the dynamic table",
            id="name index beyond the table",
        ),
        pytest.param(
            b"\x40" + _string(b"n", False), "truncated before a string", id="value missing"
        ),
        pytest.param(b"\x40", "truncated before a string", id="name missing"),
        pytest.param(
            b"\x00\x05abc", "longer than the header block", id="string longer than the block"
        ),
        pytest.param(b"\x00\x7f", "truncated in an integer", id="string length truncated"),
        pytest.param(b"\xff\x80", "truncated in an integer", id="integer truncated"),
        pytest.param(b"\xff\x80\x80\x80\x80\x01", "integer too large", id="integer too long"),
        pytest.param(
            b"\x00\x7f\xff\xff\xff\xff\x0f", "integer too large", id="string length too large"
        ),
        pytest.param(
            _integer(4097, 5, 0x20), "above the 4096 allowed", id="table size above the maximum"
        ),
        pytest.param(b"\x82\x20", "after a field", id="table size update after a field"),
        pytest.param(b"\x00\x81\x1f\x81\xff", "Huffman padding", id="Huffman padding of 8 bits"),
        pytest.param(
            b"\x00\x81\x1f\x82\x1f\xff", "Huffman padding", id="Huffman padding of 11 bits"
        ),
        pytest.param(b"\x00\x81\x1f\x81\x18", "Huffman padding", id="Huffman padding not all ones"),
        pytest.param(
            b"\x00\x81\x1f\x84\xff\xff\xff\xff", "contains EOS", id="EOS in a Huffman string"
        ),
        pytest.param(
            b"\x00\x81\x1f\x85\x1f\xff\xff\xff\xff", "contains EOS", id="EOS after a symbol"
        ),
    ],
)
def test_malformed_blocks_raise(block: bytes, reason: str) -> None:
    with pytest.raises(HpackError, match=reason):
        Decoder().decode(block)


def test_table_size_bound_is_the_one_we_allow() -> None:
    decoder = Decoder(256)
    with pytest.raises(HpackError):
        decoder.decode(_integer(257, 5, 0x20))
    assert decoder.decode(_integer(256, 5, 0x20)) == []


def test_huffman_padding_of_up_to_seven_ones_is_accepted() -> None:
    # 'a' is 00011: 3 bits of padding; '0' is 00000, twice 10 bits: 6 bits of padding.
    assert huffman_decode(b"\x1f") == b"a"
    assert huffman_decode(b"\x00\x3f") == b"00"
