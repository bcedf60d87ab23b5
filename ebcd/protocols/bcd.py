"""Packed BCD for resource codes (EBRID) and message ids (EBMID) on binary links.

A field of `size` bytes holds 2 × size nibbles: the digits right-aligned, every leading spare
nibble 0xF (an EBRID is 23 digits in 12 bytes, so one 0xF nibble leads; an EBMID is 35 in 18).
"""

from __future__ import annotations

from ebcd.model.codes import EBMID_DIGITS, EBRID_DIGITS

EBRID_BCD_BYTES = 12
EBMID_BCD_BYTES = 18
FILL_NIBBLE = 0xF


class BcdError(ValueError):
    """Digits that do not fit a BCD field, or BCD bytes that are not digits."""


def pack_digits(digits: str, size: int) -> bytes:
    """Pack decimal `digits` into `size` bytes, left-filled with 0xF nibbles."""
    if not (digits.isascii() and digits.isdigit()):
        raise BcdError(f"{digits!r} is not decimal digits")
    fill = 2 * size - len(digits)
    if fill < 0:
        raise BcdError(f"{len(digits)} digits do not fit in {size} BCD bytes")
    nibbles = [FILL_NIBBLE] * fill + [ord(c) - 0x30 for c in digits]
    return bytes((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, len(nibbles), 2))


def unpack_digits(data: bytes | memoryview, digits: int) -> str:
    """Unpack exactly `digits` decimal digits, requiring every leading spare nibble to be 0xF."""
    nibbles = [n for byte in bytes(data) for n in (byte >> 4, byte & 0xF)]
    fill = len(nibbles) - digits
    if fill < 0:
        raise BcdError(f"{len(data)} BCD bytes cannot hold {digits} digits")
    if any(n != FILL_NIBBLE for n in nibbles[:fill]):
        raise BcdError(f"BCD {bytes(data).hex()} lacks the 0xF fill nibble{'s' if fill > 1 else ''}")
    bad = [n for n in nibbles[fill:] if n > 9]
    if bad:
        raise BcdError(f"BCD {bytes(data).hex()} holds non-digit nibble 0x{bad[0]:X}")
    return "".join(chr(0x30 + n) for n in nibbles[fill:])


def pack_ebrid(code: str) -> bytes:
    """A 23-digit resource code as 12 BCD bytes."""
    if len(code) != EBRID_DIGITS:
        raise BcdError(f"resource code {code!r} has {len(code)} digits, expected {EBRID_DIGITS}")
    return pack_digits(code, EBRID_BCD_BYTES)


def unpack_ebrid(data: bytes | memoryview) -> str:
    """12 BCD bytes as a 23-digit resource code."""
    return unpack_digits(data, EBRID_DIGITS)


def pack_ebmid(ebmid: str) -> bytes:
    """A 35-digit broadcast message id as 18 BCD bytes."""
    if len(ebmid) != EBMID_DIGITS:
        raise BcdError(f"EBMID {ebmid!r} has {len(ebmid)} digits, expected {EBMID_DIGITS}")
    return pack_digits(ebmid, EBMID_BCD_BYTES)


def unpack_ebmid(data: bytes | memoryview) -> str:
    """18 BCD bytes as a 35-digit broadcast message id."""
    return unpack_digits(data, EBMID_DIGITS)
