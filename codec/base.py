"""The codec contract shared by edge and device.

A codec turns named feature tensors into what crosses the air and back. It is a pipeline of invertible
:class:`TensorStage` transforms followed by one terminal coder: a :class:`SourceCoder` (digital: real
bitstream bytes) or an :class:`AnalogMapper` (analog: complex channel symbols). Everything the device needs
to invert the pipeline besides its own weights travels in the stream header as ``params`` (strings); any
per-request side information that is data rather than configuration is counted in the bits sent.

Decoders never trust their input: every malformed payload raises :class:`CodecError` with a reason.
"""

from __future__ import annotations

import abc
import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from wire.payload import (  # noqa: F401  (re-exported: the codec contract's vocabulary)
    CodecError, EncodedPayload, PayloadKindName, TensorInfo, check_finite_shapes, tensor_infos,
)


@dataclass
class StageContext:
    """What stages may read and write while a payload is built or taken apart.

    ``params`` is the header's parameter map (shared by all stages, keys prefixed by the stage name);
    ``side`` collects per-request side-information bytes keyed by stage name.
    """

    params: dict[str, str]
    side: dict[str, bytes] = field(default_factory=dict)
    weights_dir: Path | None = None


class TensorStage(abc.ABC):
    """An invertible transform of named tensors (a distribution transform, token merging, packing ...)."""

    name: str = ""
    #: codec params a request may set (everything else in the header is the codec's own)
    request_params: ClassVar[tuple[str, ...]] = ()
    #: whether it reads fitted data from the model's codec set (so edge and device must hold the same set)
    uses_codec_set: ClassVar[bool] = False

    @abc.abstractmethod
    def forward(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        """Transform on the edge; record what the inverse needs in ``ctx``."""

    @abc.abstractmethod
    def inverse(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        """Undo :meth:`forward` on the device from ``ctx`` alone."""


class SourceCoder(abc.ABC):
    """Terminal digital stage: named tensors to a real bitstream and back."""

    name: str = ""
    #: codec params a request may set (everything else in the header is the codec's own)
    request_params: ClassVar[tuple[str, ...]] = ()
    #: whether it reads fitted data from the model's codec set (so edge and device must hold the same set)
    uses_codec_set: ClassVar[bool] = False

    @abc.abstractmethod
    def compress(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> bytes: ...

    @abc.abstractmethod
    def decompress(self, data: bytes, infos: list[TensorInfo], ctx: StageContext) -> dict[str, torch.Tensor]: ...


class AnalogMapper(abc.ABC):
    """Terminal analog stage: named tensors to complex channel symbols (average power 1) and back."""

    name: str = ""
    #: codec params a request may set (everything else in the header is the codec's own)
    request_params: ClassVar[tuple[str, ...]] = ()
    #: whether it reads fitted data from the model's codec set (so edge and device must hold the same set)
    uses_codec_set: ClassVar[bool] = False

    @abc.abstractmethod
    def to_symbols(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> np.ndarray: ...

    @abc.abstractmethod
    def from_symbols(self, symbols: np.ndarray, infos: list[TensorInfo], ctx: StageContext
                     ) -> dict[str, torch.Tensor]: ...


class Codec:
    """A named pipeline: stages, then one terminal coder. Encoding and decoding are pure functions of the
    tensors, the header params and the device's own weights."""

    def __init__(self, name: str, stages: list[TensorStage], terminal: SourceCoder | AnalogMapper,
                 params: dict[str, str] | None = None, weights_dir: Path | None = None) -> None:
        self.name = name
        self.stages = stages
        self.terminal = terminal
        self.params = dict(params or {})
        self.weights_dir = weights_dir

    @property
    def kind(self) -> PayloadKindName:
        return "analog" if isinstance(self.terminal, AnalogMapper) else "digital"

    def encode(self, tensors: dict[str, torch.Tensor]) -> EncodedPayload:
        ctx = StageContext(params=dict(self.params), weights_dir=self.weights_dir)
        originals = tensor_infos(tensors)
        current = {k: v.detach().to("cpu", torch.float32) for k, v in tensors.items()}
        for stage in self.stages:
            current = stage.forward(current, ctx)
        coded_infos = tensor_infos(current)
        # The device needs the shapes after every stage to invert the pipeline; they are configuration
        # derived from the request (not per-image data), so they travel as params.
        ctx.params["coded_tensors"] = _infos_to_str(coded_infos)
        if isinstance(self.terminal, AnalogMapper):
            payload = EncodedPayload("analog", originals, ctx.params,
                                     symbols=self.terminal.to_symbols(current, ctx).astype(np.complex64))
        else:
            payload = EncodedPayload("digital", originals, ctx.params, data=self.terminal.compress(current, ctx))
        if ctx.side:
            ctx.params["side_info"] = base64.b64encode(_pack_side(ctx.side)).decode("ascii")
        return payload

    def decode(self, payload: EncodedPayload) -> dict[str, torch.Tensor]:
        check_finite_shapes(payload.tensors)
        params = dict(payload.params)
        side = _unpack_side(payload.side_info) if params.get("side_info") else {}
        ctx = StageContext(params=params, side=side, weights_dir=self.weights_dir)
        coded_infos = _infos_from_str(params.get("coded_tensors", ""))
        check_finite_shapes(coded_infos)
        if payload.kind != self.kind:
            raise CodecError(f"codec {self.name!r} expects a {self.kind} payload, got {payload.kind}")
        if isinstance(self.terminal, AnalogMapper):
            current = self.terminal.from_symbols(payload.symbols, coded_infos, ctx)
        else:
            current = self.terminal.decompress(payload.data, coded_infos, ctx)
        for stage in reversed(self.stages):
            current = stage.inverse(current, ctx)
        out: dict[str, torch.Tensor] = {}
        for info in payload.tensors:
            if info.name not in current:
                raise CodecError(f"decoded payload lacks tensor {info.name!r}")
            t = current[info.name]
            if tuple(t.shape) != info.shape:
                raise CodecError(f"tensor {info.name!r} decoded with shape {tuple(t.shape)}, header says {info.shape}")
            # A damaged payload may decode to non-finite values; the decoder downstream must never see them.
            out[info.name] = torch.nan_to_num(t.float(), nan=0.0, posinf=0.0, neginf=0.0)
        return out


def _infos_to_str(infos: list[TensorInfo]) -> str:
    return ";".join(f"{i.name}:{'x'.join(str(s) for s in i.shape)}" for i in infos)


def _infos_from_str(text: str) -> list[TensorInfo]:
    if not text:
        raise CodecError("header lacks codec param 'coded_tensors'")
    infos = []
    try:
        for item in text.split(";"):
            name, shape = item.rsplit(":", 1)
            infos.append(TensorInfo(name, tuple(int(s) for s in shape.split("x"))))
    except ValueError as exc:
        raise CodecError(f"malformed codec param 'coded_tensors': {text[:80]!r}") from exc
    return infos


def _pack_side(side: dict[str, bytes]) -> bytes:
    out = bytearray()
    for key, blob in side.items():
        k = key.encode()
        out += len(k).to_bytes(1, "little") + k + len(blob).to_bytes(4, "little") + blob
    return bytes(out)


def _unpack_side(blob: bytes) -> dict[str, bytes]:
    side: dict[str, bytes] = {}
    pos = 0
    try:
        while pos < len(blob):
            klen = blob[pos]
            key = blob[pos + 1:pos + 1 + klen].decode()
            pos += 1 + klen
            n = int.from_bytes(blob[pos:pos + 4], "little")
            pos += 4
            if pos + n > len(blob):
                raise CodecError("side information is truncated")
            side[key] = blob[pos:pos + n]
            pos += n
    except (IndexError, UnicodeDecodeError) as exc:
        raise CodecError(f"malformed side information: {exc}") from exc
    return side
