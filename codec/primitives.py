"""Small readers and writers the coders share: LEB128 varints (length fields, index deltas) and bounded
numeric codec params. Both parse what a header or payload claims, so both fail with :class:`CodecError`."""

from __future__ import annotations

import math

from codec.base import CodecError


def varint(value: int) -> bytes:
    """``value`` (≥ 0) as an unsigned LEB128 varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(data: bytes, pos: int, end: int, max_shift: int, error: str) -> tuple[int, int]:
    """(value, new position) of the varint at ``data[pos:end]``; ``error`` when it runs past ``end`` or past
    ``max_shift`` bits of shift (a forged length must not make the reader build huge numbers)."""
    value = shift = 0
    while True:
        if pos >= end or shift > max_shift:
            raise CodecError(error)
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def int_param(params: dict[str, str], key: str, default: int, lo: int, hi: int) -> int:
    """An integer codec param in ``[lo, hi]``; a clear :class:`CodecError` otherwise."""
    text = params.get(key, str(default))
    try:
        value = int(text)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"codec param {key!r} must be an integer, got {text!r}") from exc
    if not lo <= value <= hi:
        raise CodecError(f"codec param {key!r} must be in [{lo}, {hi}], got {value}")
    return value


def float_param(params: dict[str, str], key: str, default: float, lo: float, hi: float) -> float:
    """A finite number codec param in ``[lo, hi]``; a clear :class:`CodecError` otherwise."""
    text = params.get(key, str(default))
    try:
        value = float(text)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"codec param {key!r} must be a number, got {text!r}") from exc
    if not (math.isfinite(value) and lo <= value <= hi):
        raise CodecError(f"codec param {key!r} must be in [{lo}, {hi}], got {text!r}")
    return value
