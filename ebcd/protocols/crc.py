"""CRC-32/MPEG-2 as the terminal frame uses it: poly 0x04C11DB7, init 0xFFFFFFFF, no reflection, no xorout."""

from __future__ import annotations

CRC32_MPEG2_POLY = 0x04C11DB7
CRC32_MPEG2_INIT = 0xFFFFFFFF
CRC32_MPEG2_CHECK = 0x0376E6E7  # the catalogue check value: CRC of b"123456789"
_MASK_32 = 0xFFFFFFFF


def _make_table() -> tuple[int, ...]:
    """The 256-entry MSB-first lookup table for the polynomial."""
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ CRC32_MPEG2_POLY) if crc & 0x80000000 else (crc << 1)
        table.append(crc & _MASK_32)
    return tuple(table)


_TABLE = _make_table()


def crc32_mpeg2(data: bytes | bytearray | memoryview, crc: int = CRC32_MPEG2_INIT) -> int:
    """CRC-32/MPEG-2 of `data`; pass a previous result as `crc` to continue over more bytes."""
    table = _TABLE
    for byte in bytes(data):
        crc = ((crc << 8) & _MASK_32) ^ table[(crc >> 24) ^ byte]
    return crc
