"""Mapping between encoded payloads and the ``meg.v1`` response stream (header, chunks, reference, trailer).

Shared by the edge (which builds streams), the channel emulator (which rewrites them) and the device (which
reassembles them). :class:`StreamAssembler` is strict: frames out of order, missing, duplicated, oversized
or inconsistent with the header or trailer raise :class:`StreamError` naming the problem.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import numpy as np
import torch

from wire.payload import EncodedPayload, TensorInfo, check_finite_shapes
from meg.v1 import meg_pb2

WIRE_VERSION = "meg.v1"
CHUNK_BYTES = 32 * 1024
CHUNK_SYMBOLS = 8 * 1024
#: The most a device accepts in one stream (bytes or 8-byte symbols): bounds memory against bad peers.
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024

_KIND_TO_PB = {"digital": meg_pb2.PAYLOAD_KIND_DIGITAL, "analog": meg_pb2.PAYLOAD_KIND_ANALOG}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}


class StreamError(ValueError):
    """A response stream that is truncated, corrupted or inconsistent."""


def symbols_to_floats(symbols: np.ndarray) -> np.ndarray:
    """Complex symbols to interleaved (re, im) float32."""
    return np.ascontiguousarray(np.asarray(symbols, dtype=np.complex64)).view(np.float32)


def floats_to_symbols(values: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.size % 2:
        raise StreamError("analog chunk holds an odd number of floats")
    return values.view(np.complex64)


def payload_crc(payload: EncodedPayload) -> int:
    if payload.kind == "analog":
        return zlib.crc32(symbols_to_floats(payload.symbols).astype("<f4").tobytes())
    return zlib.crc32(payload.data)


def tensor_specs(infos: list[TensorInfo]) -> list[meg_pb2.TensorSpec]:
    return [meg_pb2.TensorSpec(name=i.name, shape=list(i.shape), dtype=i.dtype) for i in infos]


def header_frame(payload: EncodedPayload, **fields: object) -> meg_pb2.GenerateResponse:
    """The stream header for ``payload``; ``fields`` fill the remaining StreamHeader fields."""
    header = meg_pb2.StreamHeader(
        wire_version=WIRE_VERSION,
        codec_params=payload.params,
        tensors=tensor_specs(payload.tensors),
        payload_kind=_KIND_TO_PB[payload.kind],
        payload_bytes=len(payload.data),
        payload_symbols=payload.symbols_sent,
        **fields,
    )
    return meg_pb2.GenerateResponse(header=header)


def chunk_frames(payload: EncodedPayload) -> Iterator[meg_pb2.GenerateResponse]:
    if payload.kind == "analog":
        floats = symbols_to_floats(payload.symbols)
        step = 2 * CHUNK_SYMBOLS
        for seq, start in enumerate(range(0, floats.size, step)):
            yield meg_pb2.GenerateResponse(chunk=meg_pb2.PayloadChunk(seq=seq, symbols=floats[start:start + step]))
    else:
        for seq, start in enumerate(range(0, len(payload.data), CHUNK_BYTES)):
            yield meg_pb2.GenerateResponse(chunk=meg_pb2.PayloadChunk(seq=seq, data=payload.data[start:start + CHUNK_BYTES]))


def reference_frame(tensors: dict[str, torch.Tensor]) -> meg_pb2.GenerateResponse:
    infos = [TensorInfo(k, tuple(int(s) for s in v.shape)) for k, v in tensors.items()]
    blob = b"".join(v.detach().cpu().float().numpy().astype("<f4").tobytes() for v in tensors.values())
    return meg_pb2.GenerateResponse(reference=meg_pb2.ReferenceFeatures(tensors=tensor_specs(infos), float32_data=blob))


def trailer_frame(payload: EncodedPayload, chunks: int, channel: meg_pb2.ChannelReport | None = None
                  ) -> meg_pb2.GenerateResponse:
    trailer = meg_pb2.StreamTrailer(total_chunks=chunks, total_bytes=len(payload.data),
                                    total_symbols=payload.symbols_sent, crc32=payload_crc(payload))
    if channel is not None:
        trailer.channel.CopyFrom(channel)
    return meg_pb2.GenerateResponse(trailer=trailer)


def infos_from_specs(specs: list[meg_pb2.TensorSpec]) -> list[TensorInfo]:
    infos = [TensorInfo(s.name, tuple(int(d) for d in s.shape), s.dtype or "float32") for s in specs]
    try:
        check_finite_shapes(infos)
    except ValueError as exc:
        raise StreamError(str(exc)) from exc
    return infos


@dataclass
class ReceivedStream:
    """A fully reassembled and validated stream."""

    header: meg_pb2.StreamHeader
    payload: EncodedPayload
    trailer: meg_pb2.StreamTrailer
    reference: dict[str, torch.Tensor] = field(default_factory=dict)


class StreamAssembler:
    """Feed frames in arrival order with :meth:`add`; :meth:`finish` validates and returns the stream."""

    def __init__(self, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.header: meg_pb2.StreamHeader | None = None
        self.trailer: meg_pb2.StreamTrailer | None = None
        self._data = bytearray()
        self._floats: list[np.ndarray] = []
        self._n_floats = 0
        self._next_seq = 0
        self._reference: meg_pb2.ReferenceFeatures | None = None

    def add(self, frame: meg_pb2.GenerateResponse) -> None:
        kind = frame.WhichOneof("frame")
        if kind is None:
            raise StreamError("empty frame")
        if self.trailer is not None:
            raise StreamError(f"{kind} frame after the trailer")
        if kind == "header":
            if self.header is not None:
                raise StreamError("second header in one stream")
            if frame.header.wire_version != WIRE_VERSION:
                raise StreamError(f"wire version {frame.header.wire_version!r} is not {WIRE_VERSION!r}")
            if frame.header.payload_kind not in _PB_TO_KIND:
                raise StreamError("header has no payload kind")
            announced = frame.header.payload_bytes + 8 * frame.header.payload_symbols
            if announced > self.max_payload_bytes:
                raise StreamError(f"header announces {announced} bytes, over the {self.max_payload_bytes} limit")
            self.header = frame.header
            return
        if self.header is None:
            raise StreamError(f"{kind} frame before the header")
        if kind == "chunk":
            chunk = frame.chunk
            if chunk.seq != self._next_seq:
                raise StreamError(f"chunk {chunk.seq} arrived where chunk {self._next_seq} was due")
            self._next_seq += 1
            if self.header.payload_kind == meg_pb2.PAYLOAD_KIND_ANALOG:
                floats = np.asarray(chunk.symbols, dtype=np.float32)
                self._n_floats += floats.size
                if self._n_floats > 2 * self.header.payload_symbols:
                    raise StreamError("more symbols than the header announced")
                self._floats.append(floats)
            else:
                self._data += chunk.data
                if len(self._data) > self.header.payload_bytes:
                    raise StreamError("more bytes than the header announced")
        elif kind == "reference":
            self._reference = frame.reference
        elif kind == "trailer":
            self.trailer = frame.trailer

    def finish(self) -> ReceivedStream:
        if self.header is None:
            raise StreamError("stream ended before the header")
        if self.trailer is None:
            raise StreamError(f"stream truncated: no trailer after {self._next_seq} chunks")
        h, t = self.header, self.trailer
        if t.total_chunks != self._next_seq:
            raise StreamError(f"trailer counts {t.total_chunks} chunks, {self._next_seq} arrived")
        infos = infos_from_specs(list(h.tensors))
        kind = _PB_TO_KIND[h.payload_kind]
        if kind == "analog":
            floats = np.concatenate(self._floats) if self._floats else np.zeros(0, np.float32)
            symbols = floats_to_symbols(floats)
            if symbols.size != h.payload_symbols or symbols.size != t.total_symbols:
                raise StreamError(f"received {symbols.size} symbols; header says {h.payload_symbols}, "
                                  f"trailer {t.total_symbols}")
            payload = EncodedPayload("analog", infos, dict(h.codec_params), symbols=symbols)
        else:
            if len(self._data) != h.payload_bytes or len(self._data) != t.total_bytes:
                raise StreamError(f"received {len(self._data)} bytes; header says {h.payload_bytes}, "
                                  f"trailer {t.total_bytes}")
            payload = EncodedPayload("digital", infos, dict(h.codec_params), data=bytes(self._data))
        if payload_crc(payload) != t.crc32:
            raise StreamError("payload CRC-32 does not match the trailer (corrupted in transport)")
        return ReceivedStream(h, payload, t, self._decode_reference())

    def _decode_reference(self) -> dict[str, torch.Tensor]:
        if self._reference is None:
            return {}
        infos = infos_from_specs(list(self._reference.tensors))
        blob = self._reference.float32_data
        if len(blob) != 4 * sum(i.numel for i in infos):
            raise StreamError("reference features have the wrong size")
        out, pos = {}, 0
        for info in infos:
            n = 4 * info.numel
            out[info.name] = torch.from_numpy(np.frombuffer(blob[pos:pos + n], "<f4").reshape(info.shape).copy())
            pos += n
        return out


async def assemble_call(call: AsyncIterator[meg_pb2.GenerateResponse]) -> ReceivedStream:
    """Reassemble a whole response stream (a gRPC call's frames). A stream that breaks the rules raises
    :class:`StreamError`; whatever ends the wait early (a bad stream, the caller going away) cancels the call,
    so the work upstream stops too. gRPC errors propagate as they are."""
    assembler = StreamAssembler()
    try:
        async for frame in call:
            assembler.add(frame)
        return assembler.finish()
    except BaseException:
        # A bad stream or a caller that went away: stop the work upstream (a no-op for a call that failed).
        call.cancel()  # type: ignore[attr-defined]
        raise


# ------------------------------------------------------------------------------ LLM session messages


def hidden_message(payload: EncodedPayload, position: int, rows: int, header: meg_pb2.StreamHeader
                   ) -> meg_pb2.HiddenStates:
    """One session message carrying ``payload`` (hidden states are small: one message, no chunking)."""
    head = meg_pb2.StreamHeader()
    head.CopyFrom(header)
    head.wire_version = WIRE_VERSION
    head.codec_params.clear()
    head.codec_params.update(payload.params)
    del head.tensors[:]
    head.tensors.extend(tensor_specs(payload.tensors))
    head.payload_kind = _KIND_TO_PB[payload.kind]
    head.payload_bytes = len(payload.data)
    head.payload_symbols = payload.symbols_sent
    msg = meg_pb2.HiddenStates(position=position, rows=rows, header=head, crc32=payload_crc(payload))
    if payload.kind == "analog":
        msg.symbols.extend(symbols_to_floats(payload.symbols).tolist())
    else:
        msg.data = payload.data
    return msg


def payload_of_hidden(msg: meg_pb2.HiddenStates, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> EncodedPayload:
    """The payload a session message carries, checked against its header and CRC (raises StreamError)."""
    h = msg.header
    if h.wire_version != WIRE_VERSION:
        raise StreamError(f"wire version {h.wire_version!r} is not {WIRE_VERSION!r}")
    if h.payload_kind not in _PB_TO_KIND:
        raise StreamError("hidden states without a payload kind")
    if h.payload_bytes + 8 * h.payload_symbols > max_payload_bytes:
        raise StreamError("hidden-state payload over the size limit")
    infos = infos_from_specs(list(h.tensors))
    if _PB_TO_KIND[h.payload_kind] == "analog":
        symbols = floats_to_symbols(np.asarray(msg.symbols, dtype=np.float32))
        if symbols.size != h.payload_symbols:
            raise StreamError(f"received {symbols.size} symbols; header says {h.payload_symbols}")
        payload = EncodedPayload("analog", infos, dict(h.codec_params), symbols=symbols)
    else:
        if len(msg.data) != h.payload_bytes:
            raise StreamError(f"received {len(msg.data)} bytes; header says {h.payload_bytes}")
        payload = EncodedPayload("digital", infos, dict(h.codec_params), data=bytes(msg.data))
    if payload_crc(payload) != msg.crc32:
        raise StreamError("hidden-state payload CRC-32 does not match (corrupted in transport)")
    return payload
