"""``replay``: reading hex dumps and pcap/pcapng captures, sending over UDP and TCP, the command.

Captures are written byte by byte here with ``struct``, so every link type, byte order and TCP
oddity under test is exactly the one named, with no capture tool needed.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hepsub_apiban.ingest.replay import ReplayError, main, parse_target, read_packets, send

from . import HEP_FIXTURES

FIXTURES = HEP_FIXTURES
SMALL, BIG, V1 = (
    "spec-rev37-example.hex",
    "heplify-server-decoder-test-hep3.hex",
    "heplify-server-decoder-test-hepv1.hex",
)


# ------------------------------------------------------------------------------ HEP test packets


@dataclass(frozen=True)
class Hep:
    small: bytes  # HEPv3
    big: bytes  # HEPv3, a few hundred bytes
    v1: bytes  # HEPv1


def _chunk(kind: int, body: bytes) -> bytes:
    return struct.pack("!HHH", 0, kind, 6 + len(body)) + body


def synthetic_hep3(payload: bytes, capture_id: int = 7) -> bytes:
    body = b"".join(
        [
            _chunk(1, b"\x02"),
            _chunk(2, b"\x11"),
            _chunk(3, socket.inet_aton("203.0.113.7")),
            _chunk(4, socket.inet_aton("192.0.2.1")),
            _chunk(7, struct.pack("!H", 5060)),
            _chunk(8, struct.pack("!H", 5060)),
            _chunk(9, struct.pack("!I", 1_700_000_000)),
            _chunk(10, struct.pack("!I", 0)),
            _chunk(11, b"\x01"),
            _chunk(12, struct.pack("!I", capture_id)),
            _chunk(15, payload),
        ]
    )
    return b"HEP3" + struct.pack("!H", 6 + len(body)) + body


@pytest.fixture(scope="module")
def hep() -> Hep:
    """The public fixture packets (tests/fixtures/hep)."""
    small, big, v1 = (bytes.fromhex((FIXTURES / name).read_text()) for name in (SMALL, BIG, V1))
    return Hep(small, big, v1)


# --------------------------------------------------------------------------- packet builders


def _checksum(data: bytes) -> int:
    data += b"\x00" * (len(data) % 2)
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(
    proto: int, payload: bytes, src: str = "198.51.100.1", dst: str = "198.51.100.2", **kw: int
) -> bytes:
    """An IPv4 packet; ``frag`` is the flags+offset field (offset in 8-byte units)."""
    length = kw.get("length", 20 + len(payload))
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, length, kw.get("ident", 1), kw.get("frag", 0), 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + payload


def ipv6(next_header: int, payload: bytes, src: str = "2001:db8::1", dst: str = "2001:db8::2") -> bytes:
    addresses = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + addresses + payload


def udp(payload: bytes, sport: int = 40000, dport: int = 9060) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(seq: int, payload: bytes = b"", flags: int = 0x18, sport: int = 40001, dport: int = 9060) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq % 2**32, 0, 5 << 4, flags, 65535, 0, 0) + payload


def ether(payload: bytes, ethertype: int = 0x0800, vlans: tuple[int, ...] = ()) -> bytes:
    tags = b"".join(struct.pack("!HH", 0x8100, vlan) for vlan in vlans)
    return (
        b"\x02\x00\x00\x00\x00\x01"
        + b"\x02\x00\x00\x00\x00\x02"
        + tags
        + struct.pack("!H", ethertype)
        + payload
    )


def sll(payload: bytes, proto: int = 0x0800) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\x00\x00\x00\x00\x01", proto) + payload


def sll2(payload: bytes, proto: int = 0x0800) -> bytes:
    return struct.pack("!HHIHBB8s", proto, 0, 2, 1, 0, 6, b"\x02\x00\x00\x00\x00\x01") + payload


def dns_query() -> bytes:
    # id 0x0102: the first byte is 1, like HEPv1, so only the family check keeps it out.
    return struct.pack("!HHHHHH", 0x0102, 0x0100, 1, 0, 0, 0) + b"\x07example\x03com\x00\x00\x01\x00\x01"


def pcap(frames: list[bytes], linktype: int = 1, endian: str = "<", nano: bool = False) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)]
    for number, frame in enumerate(frames):
        out.append(struct.pack(endian + "IIII", 1_700_000_000, number, len(frame), len(frame)) + frame)
    return b"".join(out)


def block(kind: int, body: bytes, endian: str) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(endian + "II", kind, length) + body + struct.pack(endian + "I", length)


def shb(endian: str) -> bytes:
    return block(0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1), endian)


def idb(linktype: int, endian: str) -> bytes:
    return block(1, struct.pack(endian + "HHI", linktype, 0, 65535), endian)


def epb(interface: int, frame: bytes, endian: str) -> bytes:
    return block(6, struct.pack(endian + "IIIII", interface, 0, 0, len(frame), len(frame)) + frame, endian)


def spb(frame: bytes, endian: str) -> bytes:
    return block(3, struct.pack(endian + "I", len(frame)) + frame, endian)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def eth_udp(payload: bytes, **kw: int) -> bytes:
    return ether(ipv4(17, udp(payload, **kw)))


# ------------------------------------------------------------------------------------ hex files


@pytest.mark.parametrize("name", [SMALL, BIG, V1])
def test_hex_fixture_reads_back_exact_bytes(name: str) -> None:
    path = FIXTURES / name
    assert read_packets(path) == [bytes.fromhex(path.read_text())]


def test_hex_ignores_whitespace_and_case(tmp_path: Path, hep: Hep) -> None:
    text = hep.small.hex().upper()
    spaced = "\n".join(text[i : i + 10] for i in range(0, len(text), 10)) + "\r\n\t "
    assert read_packets(write(tmp_path, "p.hex", spaced.encode())) == [hep.small]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"484550330", "odd number of hex digits"),
        (b"48455033zz", "not hex: unexpected 'z'"),
        (b" \n", "empty hex file"),
        (b"\x00\xff\xfe garbage", "not a pcap or pcapng capture nor a hex dump"),
    ],
)
def test_bad_hex_is_a_replay_error_naming_the_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = write(tmp_path, "bad.hex", content)
    with pytest.raises(ReplayError, match=re.escape(reason)) as info:
        read_packets(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_replay_error(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match=r"cannot read .*nope\.pcap"):
        read_packets(tmp_path / "nope.pcap")


# ----------------------------------------------------------------------------------------- pcap


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_ethernet_keeps_hep_in_capture_order(tmp_path: Path, hep: Hep, endian: str, nano: bool) -> None:
    frames = [
        eth_udp(hep.small),
        ether(b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\x00" * 20, ethertype=0x0806),  # ARP
        eth_udp(dns_query(), dport=53),
        ether(ipv4(17, udp(hep.big)), vlans=(100,)),
        ether(ipv4(17, udp(b"INVITE sip:bob@example.com SIP/2.0\r\n\r\n", dport=5060)), vlans=(10, 20)),
        eth_udp(hep.v1) + b"\x00" * 6,  # Ethernet padding after the IP packet is not payload
    ]
    packets = read_packets(write(tmp_path, "c.pcap", pcap(frames, endian=endian, nano=nano)))
    assert packets == [hep.small, hep.big, hep.v1]


@pytest.mark.parametrize(("linktype", "frame"), [(276, sll2), (113, sll)])
def test_pcap_linux_cooked(tmp_path: Path, hep: Hep, linktype: int, frame: object) -> None:
    assert callable(frame)
    frames = [
        frame(ipv4(17, udp(hep.small))),
        frame(ipv6(17, udp(hep.big)), 0x86DD),
        frame(b"\x00" * 40, 0x0806),
    ]
    assert read_packets(write(tmp_path, "sll.pcap", pcap(frames, linktype=linktype))) == [hep.small, hep.big]


@pytest.mark.parametrize("linktype", [229, 101])
def test_pcap_raw_ipv6_with_extension_header(tmp_path: Path, hep: Hep, linktype: int) -> None:
    hop_by_hop = bytes([17, 0]) + b"\x01\x04\x00\x00\x00\x00"  # next: UDP, 8 bytes, PadN
    frames = [
        ipv6(0, hop_by_hop + udp(hep.big)),
        ipv6(17, udp(hep.small)),
        ipv6(17, udp(dns_query(), dport=53)),
    ]
    assert read_packets(write(tmp_path, "v6.pcap", pcap(frames, linktype=linktype))) == [hep.big, hep.small]


def test_pcap_raw_ipv4_and_bsd_loopback(tmp_path: Path, hep: Hep) -> None:
    raw = read_packets(write(tmp_path, "raw.pcap", pcap([ipv4(17, udp(hep.small))], linktype=228)))
    af_inet6_macos = struct.pack("<I", 30)
    frames = [struct.pack("<I", 2) + ipv4(17, udp(hep.v1)), af_inet6_macos + ipv6(17, udp(hep.big))]
    null = read_packets(write(tmp_path, "null.pcap", pcap(frames, linktype=0)))
    assert (raw, null) == ([hep.small], [hep.v1, hep.big])


def test_ipv4_and_ipv6_fragments_are_reassembled(tmp_path: Path, hep: Hep) -> None:
    datagram = udp(hep.big)
    cut1, cut2 = 256, 512  # multiples of 8, as fragment offsets must be
    more = 0x2000
    fragments4 = [
        ipv4(17, datagram[cut2:], ident=9, frag=cut2 // 8),
        ipv4(17, datagram[:cut1], ident=9, frag=more),
        ipv4(17, b"\x00" * 16, ident=10, frag=more | 40),  # a lone later fragment of another datagram
        ipv4(17, datagram[cut1:cut2], ident=9, frag=more | cut1 // 8),
    ]

    def frag6(offset: int, data: bytes, last: bool) -> bytes:
        header = struct.pack("!BBHI", 17, 0, offset | (0 if last else 1), 77)
        return ipv6(44, header + data)

    fragments6 = [frag6(cut1, datagram[cut1:], True), frag6(0, datagram[:cut1], False)]
    frames = [ether(f) for f in fragments4] + [ether(f, 0x86DD) for f in fragments6]
    assert read_packets(write(tmp_path, "frag.pcap", pcap(frames))) == [hep.big, hep.big]


def test_snaplen_cut_datagram_is_skipped_with_a_note(
    tmp_path: Path, hep: Hep, caplog: pytest.LogCaptureFixture
) -> None:
    frames = [eth_udp(hep.big)[:200], eth_udp(hep.small)]
    with caplog.at_level(logging.WARNING, logger="hepsub_apiban.replay"):
        assert read_packets(write(tmp_path, "snap.pcap", pcap(frames))) == [hep.small]
    assert "cut short by the capture's snap length: 1" in caplog.text


def test_unsupported_link_type_is_noted(tmp_path: Path, hep: Hep, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hepsub_apiban.replay"):
        assert read_packets(write(tmp_path, "wifi.pcap", pcap([b"\x00" * 40], linktype=105))) == []
    assert "unsupported link type 105" in caplog.text


def test_gzipped_pcap(tmp_path: Path, hep: Hep) -> None:
    import gzip

    data = gzip.compress(pcap([eth_udp(hep.small)]))
    assert read_packets(write(tmp_path, "c.pcap.gz", data)) == [hep.small]


@pytest.mark.parametrize(
    ("keep", "reason"),
    [
        (lambda first, whole: whole - 10, "truncated pcap: packet at byte"),
        (lambda first, whole: 24 + 16 + first + 8, "truncated pcap: record header"),
        (lambda first, whole: 20, "truncated pcap file header"),
    ],
)
def test_truncated_pcap_is_a_replay_error(tmp_path: Path, hep: Hep, keep: object, reason: str) -> None:
    assert callable(keep)
    first = eth_udp(hep.small)
    data = pcap([first, eth_udp(hep.big)])
    path = write(tmp_path, "cut.pcap", data[: keep(len(first), len(data))])
    with pytest.raises(ReplayError, match=re.escape(reason)) as info:
        read_packets(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------- pcapng


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcapng_blocks_interfaces_and_byte_order(tmp_path: Path, hep: Hep, endian: str) -> None:
    first = b"".join(
        [
            shb(endian),
            idb(1, endian),  # interface 0: Ethernet
            idb(276, endian),  # interface 1: Linux SLL2
            block(4, b"\x00\x00\x00\x00", endian),  # name resolution block: skipped
            epb(0, eth_udp(hep.small), endian),
            block(0x40000BAD, b"custom", endian),  # custom block: skipped
            spb(eth_udp(hep.big), endian),  # simple packet block: always interface 0
            epb(1, sll2(ipv4(17, udp(dns_query(), dport=53))), endian),
            epb(1, sll2(ipv4(17, udp(hep.v1))), endian),
        ]
    )
    # A second section in the other byte order, with its own interface numbering.
    other = ">" if endian == "<" else "<"
    second = shb(other) + idb(229, other) + epb(0, ipv6(17, udp(hep.small)), other)
    packets = read_packets(write(tmp_path, "c.pcapng", first + second))
    assert packets == [hep.small, hep.big, hep.v1, hep.small]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (lambda e: shb(e) + idb(1, e) + epb(3, b"\x00" * 20, e), "unknown interface 3"),
        (lambda e: (shb(e) + idb(1, e) + epb(0, b"\x00" * 20, e))[:-6], "truncated pcapng"),
        (lambda e: shb(e) + idb(1, e)[:-4] + struct.pack(e + "I", 99), "does not end with its length"),
        (lambda e: shb(e)[:8] + b"\x00\x00\x00\x00" + shb(e)[12:], "bad byte-order magic"),
        (lambda e: shb(e) + struct.pack(e + "II", 6, 14) + b"\x00" * 8, "bad length (14)"),
    ],
)
def test_malformed_pcapng_is_a_replay_error(tmp_path: Path, data: object, reason: str) -> None:
    assert callable(data)
    path = write(tmp_path, "bad.pcapng", data("<"))
    with pytest.raises(ReplayError, match=re.escape(reason)):
        read_packets(path)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mangled_captures_give_packets_or_a_replay_error(
    fuzz_dir: Path, hep: Hep, data: st.DataObject
) -> None:
    frames = [eth_udp(hep.small), ether(ipv4(6, tcp(5, hep.big[:300])))]
    good = data.draw(st.sampled_from([pcap(frames), shb("<") + idb(1, "<") + epb(0, frames[0], "<")]))
    position = data.draw(st.integers(0, len(good) - 1))
    garbage = data.draw(st.binary(max_size=12))
    mangled = good[:position] + garbage + good[position + len(garbage) :]
    if data.draw(st.booleans()):
        mangled = mangled[: data.draw(st.integers(0, len(mangled)))]
    path = fuzz_dir / "f.pcap"
    path.write_bytes(mangled)
    try:
        packets = read_packets(path)
    except ReplayError:
        return
    assert all(isinstance(packet, bytes) for packet in packets)


# ----------------------------------------------------------------------------------------- TCP


def _tcp_frame(seq: int, payload: bytes = b"", flags: int = 0x18) -> bytes:
    return ether(ipv4(6, tcp(seq, payload, flags)))


def test_tcp_flow_out_of_order_with_retransmission(tmp_path: Path, hep: Hep) -> None:
    isn = 2**32 - 100  # the sequence numbers wrap around inside the stream
    stream = hep.small + hep.big
    a, b, c = stream[:3], stream[3:400], stream[400:]  # the first cut is inside the HEP3 header
    marker = synthetic_hep3(b"after the retransmission")
    frames = [
        _tcp_frame(isn, flags=0x02),  # SYN
        _tcp_frame(isn + 1 + 400, c),
        _tcp_frame(isn + 1, a),
        eth_udp(hep.v1),
        _tcp_frame(isn + 1 + 3, b),  # both HEP3 packets are complete from here
        eth_udp(marker),
        _tcp_frame(isn + 1, a),  # retransmission: adds nothing, so it must not move the packets after it
        ether(ipv4(6, tcp(0, b"HTTP/1.1 200 OK\r\n\r\n", sport=80, dport=40002))),  # other TCP
    ]
    assert read_packets(write(tmp_path, "tcp.pcap", pcap(frames))) == [hep.v1, hep.small, hep.big, marker]


def test_tcp_capture_started_mid_connection(tmp_path: Path, hep: Hep) -> None:
    stream = hep.big[-50:] + hep.small + hep.big  # starts inside a packet
    seq = 1_000_000
    frames = [
        _tcp_frame(seq + 300, stream[300:]),  # the first segment seen is not the first one sent
        _tcp_frame(seq, stream[:300]),
        _tcp_frame(seq, stream[:300]),
    ]
    assert read_packets(write(tmp_path, "mid.pcap", pcap(frames))) == [hep.small, hep.big]


def test_tcp_bad_framing_stops_that_flow_only(
    tmp_path: Path, hep: Hep, caplog: pytest.LogCaptureFixture
) -> None:
    broken = hep.small + b"HEP2" + hep.big[4:] + hep.small
    frames = [
        _tcp_frame(1, flags=0x02),
        _tcp_frame(2, broken),
        ether(ipv4(6, tcp(100, flags=0x02, sport=40003))),
        ether(ipv4(6, tcp(101, hep.big, sport=40003))),
    ]
    with caplog.at_level(logging.WARNING, logger="hepsub_apiban.replay"):
        assert read_packets(write(tmp_path, "bad.pcap", pcap(frames))) == [hep.small, hep.big]
    assert "bad HEP3 framing" in caplog.text


def test_tcp_gap_resynchronises_after_missing_segment(tmp_path: Path, hep: Hep) -> None:
    stream = hep.small + hep.big + hep.small
    lost = (len(hep.small) + 10, len(hep.small) + 20)
    frames = [
        _tcp_frame(0, flags=0x02),
        _tcp_frame(1, stream[: lost[0]]),
        _tcp_frame(1 + lost[1], stream[lost[1] :]),
    ]
    assert read_packets(write(tmp_path, "gap.pcap", pcap(frames))) == [hep.small, hep.small]


def test_captured_packets_decode_with_the_hep_codec(tmp_path: Path, hep: Hep) -> None:
    codec = pytest.importorskip("hepsub_apiban.formats.hep", reason="the HEP codec module is not there yet")
    stream = hep.small + hep.big
    frames = [_tcp_frame(0, flags=0x02), _tcp_frame(1 + 50, stream[50:]), _tcp_frame(1, stream[:50])]
    packets = read_packets(write(tmp_path, "codec.pcap", pcap([*frames, eth_udp(hep.v1)])))
    assert packets == [hep.small, hep.big, hep.v1]
    assert all(isinstance(codec.decode(packet, 0.0), codec.HepPacket) for packet in packets)
    split = codec.HepStream().feed(stream, 0.0)
    assert [type(item) for item in split] == [codec.HepPacket, codec.HepPacket]


# ---------------------------------------------------------------------------------------- tshark


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_the_same_udp_payloads_from_the_generated_capture(tmp_path: Path, hep: Hep) -> None:
    """tshark, an independent reader, sees the frames we wrote and the same UDP payloads we extract.

    Debian's tshark 4.0 has no HEP dissector, so the HEP bytes are compared as UDP payloads.
    """
    path = write(
        tmp_path, "c.pcap", pcap([eth_udp(hep.small), eth_udp(hep.big), eth_udp(dns_query(), dport=53)])
    )
    command = ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.protocols", "-e", "udp.payload"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == 3
    assert [row[0].split(":")[:4] for row in rows] == [["eth", "ethertype", "ip", "udp"]] * 3
    assert "dns" in rows[2][0].split(":")
    payloads = [bytes.fromhex(row[1].replace(":", "")) for row in rows]
    assert read_packets(path) == payloads[:2] == [hep.small, hep.big]


# --------------------------------------------------------------------------------------- sending


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.arrived = asyncio.Event()
        self.expected = 0

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.datagrams.append(data)
        if len(self.datagrams) >= self.expected:
            self.arrived.set()


@pytest.fixture
async def udp_collector() -> AsyncIterator[tuple[_Collector, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    yield protocol, transport.get_extra_info("sockname")[1]
    transport.close()


@pytest.fixture
async def tcp_collector() -> AsyncIterator[tuple[asyncio.Future[bytes], int]]:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the sender closes
        if not received.done():
            received.set_result(data)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield received, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_send_udp_one_datagram_per_packet(udp_collector: tuple[_Collector, int], hep: Hep) -> None:
    collector, port = udp_collector
    packets = [hep.small, hep.big, hep.v1]
    collector.expected = len(packets)
    assert await send(packets, f"udp:127.0.0.1:{port}", None) == 3
    await asyncio.wait_for(collector.arrived.wait(), 5)
    assert collector.datagrams == packets


async def test_send_udp_ipv6(hep: Hep) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support")
    loop = asyncio.get_running_loop()
    try:
        transport, collector = await loop.create_datagram_endpoint(_Collector, local_addr=("::1", 0))
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    try:
        collector.expected = 1
        assert await send([hep.small], f"udp:[::1]:{transport.get_extra_info('sockname')[1]}", None) == 1
        await asyncio.wait_for(collector.arrived.wait(), 5)
        assert collector.datagrams == [hep.small]
    finally:
        transport.close()


async def test_send_tcp_writes_packets_back_to_back(
    tcp_collector: tuple[asyncio.Future[bytes], int], hep: Hep
) -> None:
    received, port = tcp_collector
    packets = [hep.small, hep.big] * 50
    assert await send(packets, f"tcp:127.0.0.1:{port}", None) == 100
    assert await asyncio.wait_for(received, 5) == b"".join(packets)


async def test_send_paces_at_the_given_rate(udp_collector: tuple[_Collector, int], hep: Hep) -> None:
    collector, port = udp_collector
    collector.expected = 20
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await send([hep.small] * 20, f"udp:127.0.0.1:{port}", 200) == 20
    elapsed = loop.time() - started
    assert 0.085 <= elapsed < 2.0  # 19 intervals of 5 ms; lenient above for a busy machine
    await asyncio.wait_for(collector.arrived.wait(), 5)


async def test_send_hepv1_over_tcp_is_refused_before_connecting(hep: Hep) -> None:
    with pytest.raises(ReplayError, match="packet 2 is not HEPv3, and HEPv1/v2 only work over UDP"):
        await send([hep.small, hep.v1], f"tcp:127.0.0.1:{_closed_port()}", None)


async def test_send_tcp_connection_refused(hep: Hep) -> None:
    with pytest.raises(ReplayError, match="connection refused"):
        await send([hep.small], f"tcp:127.0.0.1:{_closed_port()}", None)


@pytest.mark.parametrize(
    "target",
    ["udp:127.0.0.1", "http:127.0.0.1:80", "udp:127.0.0.1:0", "tcp:127.0.0.1:70000", "udp:::1:9060",
     "tcp:[::1:9060", "udp:[::1]", "127.0.0.1:9060", "udp: host:9060"],
)  # fmt: skip
def test_bad_targets(target: str) -> None:
    with pytest.raises(ReplayError, match="bad target"):
        parse_target(target)


def test_targets() -> None:
    assert parse_target("udp:127.0.0.1:9060") == ("udp", "127.0.0.1", 9060)
    assert parse_target("tcp:[2001:db8::1]:9061") == ("tcp", "2001:db8::1", 9061)
    assert parse_target("udp:homer.example.com:9060") == ("udp", "homer.example.com", 9060)


@pytest.mark.parametrize("rate", [0.0, -5.0, float("nan"), float("inf")])
async def test_bad_rate(rate: float, hep: Hep) -> None:
    with pytest.raises(ReplayError, match="bad rate"):
        await send([hep.small], "udp:127.0.0.1:9", rate)


# ------------------------------------------------------------------------------------------ main


@pytest.fixture
def udp_sink() -> Iterator[tuple[socket.socket, int]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        yield sock, sock.getsockname()[1]


def test_main_sends_every_file_and_prints_one_line(
    tmp_path: Path, hep: Hep, udp_sink: tuple[socket.socket, int], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, port = udp_sink
    hex_file = write(tmp_path, "one.hex", hep.small.hex().encode())
    capture = write(tmp_path, "c.pcapng", shb("<") + idb(1, "<") + epb(0, eth_udp(hep.big), "<"))
    out = io.StringIO()
    assert main([str(hex_file), str(capture)], f"udp:127.0.0.1:{port}", None, out) == 0
    assert re.fullmatch(
        rf"sent 2 HEP packets from 2 files to udp:127\.0\.0\.1:{port} in \d+\.\d\d s\n", out.getvalue()
    )
    assert [sock.recv(65535), sock.recv(65535)] == [hep.small, hep.big]
    assert capsys.readouterr().err == ""


def _assert_one_line_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("hepsub-apiban: ")
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err


def test_main_bad_target(tmp_path: Path, hep: Hep, capsys: pytest.CaptureFixture[str]) -> None:
    hex_file = write(tmp_path, "one.hex", hep.small.hex().encode())
    out = io.StringIO()
    assert main([str(hex_file)], "udp:localhost", None, out) == 2
    assert out.getvalue() == ""
    _assert_one_line_error(capsys, "bad target 'udp:localhost'")


def test_main_bad_hex_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "bad.hex", b"48455033 0")
    assert main([str(bad)], "udp:127.0.0.1:9060", None, io.StringIO()) == 2
    _assert_one_line_error(capsys, str(bad), "odd number of hex digits")


def test_main_tcp_refused(tmp_path: Path, hep: Hep, capsys: pytest.CaptureFixture[str]) -> None:
    hex_file = write(tmp_path, "one.hex", hep.small.hex().encode())
    assert main([str(hex_file)], f"tcp:127.0.0.1:{_closed_port()}", None, io.StringIO()) == 2
    _assert_one_line_error(capsys, "connection refused")


def test_main_capture_without_hep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capture = write(tmp_path, "dns.pcap", pcap([eth_udp(dns_query(), dport=53)]))
    assert main([str(capture)], "udp:127.0.0.1:9060", None, io.StringIO()) == 2
    _assert_one_line_error(capsys, "no HEP packets found in")
