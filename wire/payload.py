"""What crosses the air for one request: digital bytes or analog symbols plus the header parameters.

Neutral ground shared by the codecs, the channel emulator and the device: it imports neither the codecs
(CompressAI and friends) nor any service, so the emulator can carry payloads without loading a coder.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch


class CodecError(ValueError):
    """A payload or parameter set that cannot be decoded; the message says why."""


PayloadKindName = Literal["digital", "analog"]


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one tensor the device reconstructs."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class EncodedPayload:
    """What one request sends: digital bytes or analog symbols, plus header parameters.

    ``side_info`` is per-request data the receiver needs besides the payload (a merge map, say). It travels
    in the header as params["side_info"] (base64, error-free control channel) and is counted in
    :attr:`bits_sent`.
    """

    kind: PayloadKindName
    tensors: list[TensorInfo]
    params: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    symbols: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.complex64))

    @property
    def side_info(self) -> bytes:
        encoded = self.params.get("side_info", "")
        try:
            return base64.b64decode(encoded, validate=True) if encoded else b""
        except ValueError as exc:
            raise CodecError(f"side_info is not valid base64: {exc}") from exc

    @property
    def bits_sent(self) -> int:
        """Bits that cross the air: the real payload size plus counted side information."""
        return 8 * (len(self.data) + len(self.side_info))

    @property
    def symbols_sent(self) -> int:
        return int(self.symbols.size)


def tensor_infos(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    return [TensorInfo(name, tuple(int(s) for s in t.shape), "float32") for name, t in tensors.items()]


def check_finite_shapes(infos: list[TensorInfo], max_elements: int = 1 << 28) -> None:
    """Reject tensor descriptions that would make the device allocate absurd memory."""
    total = 0
    for info in infos:
        if any(s <= 0 for s in info.shape):
            raise CodecError(f"tensor {info.name!r} has a non-positive dimension {info.shape}")
        total += info.numel
    if total > max_elements:
        raise CodecError(f"tensors describe {total} elements, over the limit of {max_elements}")
