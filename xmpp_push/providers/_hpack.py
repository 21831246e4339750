"""HPACK (RFC 7541): decoding the header blocks an HTTP/2 server sends us, and
encoding ours without compression.

`hpack.Decoder` spent about half of the APNs client's remaining CPU on answers of a
handful of fields: Huffman decoding bit by bit in Python, plus its table upkeep and
str/bytes conversions, ~50 µs per answer from nginx (`:status`, `server`, `date`,
`content-length`, `apns-id`); this decoder takes ~9 µs. It does the whole of RFC 7541
for the receiving side, names and values as bytes, and is fast where it matters:

* Huffman strings are decoded a byte at a time by a state machine (the states are
  the inner nodes of the code tree) whose table is built at import from the RFC's
  code lengths; and a decoded string is remembered per connection, keyed by its
  encoded octets: servers send the same `server`, `content-type`, `date` (for a
  second) and header names answer after answer, so only values such as `apns-id`
  are decoded again.
* The dynamic table is kept exactly (sizes count the decoded octets, RFC 7541 §4.1)
  as a deque of the fields the caller gets, newest first.

Whatever is malformed raises `HpackError`, which HTTP/2 makes a COMPRESSION_ERROR.

Our own header blocks need no compression: `LiteralEncoder` writes every field as a
literal with raw strings and keeps no dynamic table.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final

__all__ = [
    "DEFAULT_TABLE_SIZE",
    "STATIC_TABLE",
    "Decoder",
    "HpackError",
    "LiteralEncoder",
    "encode_integer",
    "huffman_codes",
    "huffman_decode",
]

DEFAULT_TABLE_SIZE: Final = 4096
"""SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 9113 §6.5.2)."""

STATIC_TABLE: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)
"""RFC 7541 Appendix A; index i is STATIC_TABLE[i - 1]."""

_STATIC_SIZE: Final = len(STATIC_TABLE)
_ENTRY_OVERHEAD: Final = 32
"""Octets an entry costs beyond its name and value (RFC 7541 §4.1)."""
_MAX_INTEGER_OCTETS: Final = 4
"""Continuation octets we accept after an integer's prefix: 28 bits, far beyond any
length, index or table size a 64 KiB header block can use (§5.1 lets a decoder bound
integers, in value or in octets)."""
_CACHE_SIZE: Final = 512
"""Decoded Huffman strings remembered per decoder; the cache restarts when full, as
unique values (one `apns-id` per answer) would otherwise crowd it forever."""
_CACHE_MAX_OCTETS: Final = 64
"""Longer Huffman strings are not remembered: answers' fields are short, and this
bounds the cache to some 100 KB whatever a server sends."""


class HpackError(Exception):
    """A header block that breaks RFC 7541: the connection's compression state is lost."""


# --------------------------------------------------------------------------------------
# Huffman decoding (RFC 7541 §5.2, Appendix B)

_CODE_LENGTHS: Final = bytes.fromhex(
    "0d171c1c1c1c1c1c1c181e1c1c1e1c1c1c1c1c1c1c1c1e1c1c1c1c1c1c1c1c1c060a0a0c0d06080b"
    "0a0a080b080606060505050606060606060607080f060c0a0d060707070707070707070707070707"
    "07070707070707070807080d130d0e060f0506050605060606050707060606050607060505060707"
    "0707070f0b0e0d1c1416141416161617161717171717181718181617181717171715161716171718"
    "16151416161717151716161815161717151516151716171714161616171616171a1a141316171619"
    "1a1a1a1b1b1a181913151a1b1b1a1b1815151a1a1c1b1b1b14181415161515171616191918181a17"
    "1a1b1a1a1b1b1b1b1b1c1b1b1b1b1b1a1e"
)
"""The code length of each symbol 0-255 and of EOS (256), Appendix B's "len" column.
The code is canonical (codes ascend with length, then symbol), so the lengths alone
give the codes; tests/unit/test_hpack.py checks them against Appendix B."""
_EOS: Final = 256
_OCTETS: Final = [bytes((octet,)) for octet in range(256)]


def huffman_codes() -> list[tuple[int, int]]:
    """(code, length in bits) of every symbol, EOS last: the canonical code of the lengths."""
    codes = [(0, 0)] * len(_CODE_LENGTHS)
    code = -1
    previous = 0
    for symbol in sorted(range(len(_CODE_LENGTHS)), key=lambda s: (_CODE_LENGTHS[s], s)):
        length = _CODE_LENGTHS[symbol]
        code = (code + 1) << (length - previous)
        previous = length
        codes[symbol] = (code, length)
    return codes


def _build_decoding_table() -> tuple[list[bytes], list[int], frozenset[int], int]:
    """The byte-at-a-time decoding tables, the accepting end states and the dead state.

    A state is an inner node of the code tree: the bits of a code read so far. Reading
    `octet` in `state` emits `emitted[state * 256 + octet]` (0-2 symbols: codes have 5
    bits or more) and leads to `following[state * 256 + octet]`, kept times 256 so that
    the decoding loop adds the next octet without a multiplication. Reading EOS leads to
    a dead state that stays dead. Both are composed from a nibble-at-a-time table:
    16 times fewer tree walks than bit by bit, ~20 ms at import. Two flat lists of
    bytes and ints rather than one of (bytes, int) tuples: a third quicker to build and
    ~4 MB smaller, for ~10 % more time per octet.
    """
    children: list[list[int]] = [[0, 0]]
    """Per inner node, its 0 and 1 child: an inner node (> 0) or ~symbol for a leaf.
    0, the root, is nobody's child and marks a child not yet made."""
    for symbol, (code, length) in enumerate(huffman_codes()):
        node = 0
        for shift in range(length - 1, 0, -1):
            bit = code >> shift & 1
            child = children[node][bit]
            if not child:
                child = len(children)
                children.append([0, 0])
                children[node][bit] = child
            node = child
        children[node][code & 1] = ~symbol
    dead = len(children)

    # Per state * 16 + nibble: what the nibble emits (0 or 1 symbol) and the next state.
    nibble_emitted: list[bytes] = []
    nibble_following: list[int] = []
    for state in range(dead + 1):
        for nibble in range(16):
            node = state
            emitted = b""
            for shift in (3, 2, 1, 0):
                if node == dead:
                    break
                child = children[node][nibble >> shift & 1]
                if child >= 0:
                    node = child
                elif ~child == _EOS:
                    node = dead
                else:
                    emitted = _OCTETS[~child]
                    node = 0
            nibble_emitted.append(emitted)
            nibble_following.append(node)

    # An octet is its high nibble, then the low one from where the high one led.
    premultiplied = [state * 256 for state in nibble_following]
    emitted_table: list[bytes] = []
    following_table: list[int] = []
    for high, middle in zip(nibble_emitted, nibble_following, strict=True):
        low = middle * 16
        if high:
            emitted_table += [high + octets for octets in nibble_emitted[low : low + 16]]
        else:
            emitted_table += nibble_emitted[low : low + 16]
        following_table += premultiplied[low : low + 16]

    # Padding is a prefix of EOS (all ones) shorter than 8 bits, after a whole code.
    accepting = [0]
    for _ in range(7):
        accepting.append(children[accepting[-1]][1])
    return (
        emitted_table,
        following_table,
        frozenset(state * 256 for state in accepting),
        dead * 256,
    )


_EMITTED, _FOLLOWING, _ACCEPTING, _DEAD = _build_decoding_table()


def huffman_decode(data: bytes) -> bytes:
    """The octets Huffman-coded in `data` (RFC 7541 §5.2)."""
    emitted = _EMITTED
    following = _FOLLOWING
    out = bytearray()
    state = 0
    for octet in data:
        index = state + octet
        out += emitted[index]
        state = following[index]
    if state not in _ACCEPTING:
        if state == _DEAD:
            raise HpackError("Huffman string contains EOS")
        raise HpackError("invalid Huffman padding")
    return bytes(out)


# --------------------------------------------------------------------------------------
# Header blocks


def _integer(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """The integer whose N-bit prefix was all ones (`value`), continued at `pos` (§5.1);
    returns it and the position after it."""
    shift = 0
    limit = pos + _MAX_INTEGER_OCTETS
    stop = min(len(data), limit)
    while pos < stop:
        octet = data[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if not octet & 0x80:
            return value, pos
        shift += 7
    if stop < limit:
        raise HpackError("header block truncated in an integer")
    raise HpackError("integer too large")


class Decoder:
    """The decoding context of one connection: its dynamic table and size limits."""

    __slots__ = ("_cache", "_max_allowed", "_max_size", "_size", "_table")

    def __init__(self, max_allowed_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self._max_allowed = max_allowed_table_size
        """Our SETTINGS_HEADER_TABLE_SIZE: the server may size the table up to it."""
        self._max_size = max_allowed_table_size
        self._size = 0
        self._table: deque[tuple[bytes, bytes]] = deque()
        """Newest first: dynamic index 62 is `_table[0]`."""
        self._cache: dict[bytes, bytes] = {}
        """Huffman-coded octets -> decoded octets."""

    @property
    def entries(self) -> tuple[tuple[bytes, bytes], ...]:
        """The dynamic table, newest first (index 62 onwards)."""
        return tuple(self._table)

    @property
    def table_size(self) -> int:
        """The dynamic table's current size in octets (RFC 7541 §4.1)."""
        return self._size

    @property
    def max_table_size(self) -> int:
        """The dynamic table's maximum size, as the server last set it."""
        return self._max_size

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The fields of one complete header block, in order; updates the table."""
        headers: list[tuple[bytes, bytes]] = []
        end = len(block)
        pos = 0
        while pos < end:
            first = block[pos]
            pos += 1
            if first & 0x80:  # §6.1 indexed field
                index = first & 0x7F
                if index == 0x7F:
                    index, pos = _integer(block, pos, index)
                headers.append(self._field(index))
            elif first & 0x40:  # §6.2.1 literal with incremental indexing
                index = first & 0x3F
                if index == 0x3F:
                    index, pos = _integer(block, pos, index)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                field = (name, value)
                headers.append(field)
                self._add(field)
            elif first & 0x20:  # §6.3 dynamic table size update
                if headers:
                    # §4.2: only at the start of a block (h2spec hpack/4.2 checks).
                    raise HpackError("table size update after a field")
                size = first & 0x1F
                if size == 0x1F:
                    size, pos = _integer(block, pos, size)
                if size > self._max_allowed:
                    raise HpackError(f"table size {size} above the {self._max_allowed} allowed")
                self._max_size = size
                self._evict(0)
            else:  # §6.2.2 without indexing, §6.2.3 never indexed: the same to an end point
                index = first & 0x0F
                if index == 0x0F:
                    index, pos = _integer(block, pos, index)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                headers.append((name, value))
        return headers

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if index <= _STATIC_SIZE:
            if index == 0:
                raise HpackError("index 0")
            return STATIC_TABLE[index - 1]
        position = index - _STATIC_SIZE - 1
        if position >= len(self._table):
            raise HpackError(f"index {index} beyond the dynamic table")
        return self._table[position]

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """The string literal at `pos` (§5.2) and the position after it."""
        if pos >= len(data):
            raise HpackError("header block truncated before a string")
        first = data[pos]
        length = first & 0x7F
        pos += 1
        if length == 0x7F:
            length, pos = _integer(data, pos, length)
        end = pos + length
        if end > len(data):
            raise HpackError("string longer than the header block")
        octets = data[pos:end]
        if first & 0x80:
            cache = self._cache
            decoded = cache.get(octets)
            if decoded is None:
                decoded = huffman_decode(octets)
                if length <= _CACHE_MAX_OCTETS:
                    if len(cache) >= _CACHE_SIZE:
                        cache.clear()
                    cache[octets] = decoded
            octets = decoded
        return octets, end

    def _add(self, field: tuple[bytes, bytes]) -> None:
        """§4.4: evict for room, then insert; an entry larger than the table empties it."""
        size = len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        if size > self._max_size:
            self._table.clear()
            self._size = 0
            return
        self._evict(size)
        self._table.appendleft(field)
        self._size += size

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until `room` more octets fit in the maximum size."""
        table = self._table
        limit = self._max_size - room
        while self._size > limit:
            name, value = table.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD


# --------------------------------------------------------------------------------------
# Encoding our requests, without the parts that cost and gain nothing here


def encode_integer(value: int, prefix_bits: int, first_byte: int) -> bytes:
    """RFC 7541 §5.1: `value` with an N-bit prefix, high bits of the first byte set."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_string(data: bytes) -> bytes:
    return encode_integer(len(data), 7, 0x00) + data  # H=0: raw octets, no Huffman


_STATIC_FIELDS: Final = {field: i for i, field in enumerate(STATIC_TABLE, 1)}
_STATIC_NAMES: Final = {name: i for i, (name, _) in reversed(list(enumerate(STATIC_TABLE, 1)))}
_NEVER_INDEXED: Final = frozenset({b"authorization"})
_ENCODED_FIELDS_KEPT: Final = 256


class LiteralEncoder:
    """HPACK with no compression work: every field a literal with raw strings.

    hpack's encoder Huffman-codes every string and searches and maintains a dynamic
    table; for push requests (a fresh path or id each time, a bearer token worth
    sending as a never-indexed literal anyway) that was 27 % of the CPU per APNs push
    (docs/performance.md) to save a few dozen bytes on fast links. The first block sets
    our dynamic table to size 0, so no later SETTINGS change can oblige us to signal
    anything.

    Fields that repeat (method, authority, topic, the token until it rotates...) are
    encoded once and remembered; those named in `varying` change with every request
    and are not worth remembering.
    """

    def __init__(self, varying: Iterable[bytes] = ()) -> None:
        self._varying = frozenset(varying)
        self._table_off = False
        self._fields: dict[tuple[bytes, bytes], bytes] = {}

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        out = bytearray()
        if not self._table_off:
            out += encode_integer(0, 5, 0x20)  # dynamic table size update: 0
            self._table_off = True
        fields = self._fields
        for field in headers:
            encoded = fields.get(field)
            if encoded is None:
                encoded = _encode_field(*field)
                if field[0] not in self._varying:
                    if len(fields) >= _ENCODED_FIELDS_KEPT:  # tokens rotate: forget old ones
                        fields.clear()
                    fields[field] = encoded
            out += encoded
        return bytes(out)


def _encode_field(name: bytes, value: bytes) -> bytes:
    full = _STATIC_FIELDS.get((name, value))
    if full is not None:
        return encode_integer(full, 7, 0x80)  # indexed field
    first = 0x10 if name in _NEVER_INDEXED else 0x00
    index = _STATIC_NAMES.get(name)
    if index is not None:
        return encode_integer(index, 4, first) + _encode_string(value)
    return encode_integer(0, 4, first) + _encode_string(name) + _encode_string(value)
