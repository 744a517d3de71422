"""What the device does with a received payload before its decoder: decode the features, conceal what the
link destroyed, and bound the latents. Used by the device service and by ``meg bench snr``, so the curves
measure exactly what a person gets back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from codec.base import Codec
from radio import ChannelSpec
from wire.payload import CodecError, EncodedPayload, TensorInfo

log = logging.getLogger(__name__)

#: Bound on received latents. Bit errors in float16 exponents and deep fades make huge values; VAE latents
#: (already divided by the scaling factor) stay well inside it for every family served here.
LATENT_CLAMP = 50.0


@dataclass
class Reception:
    """Decoded features, and whether they are a concealment of a lost payload."""

    tensors: dict[str, torch.Tensor]
    concealed: bool


def conceal(infos: list[TensorInfo]) -> dict[str, torch.Tensor]:
    """The concealment of a lost payload: the prior mean (zero latents), which decodes to a flat image."""
    return {info.name: torch.zeros(info.shape) for info in infos}


def link_may_have_damaged(spec: ChannelSpec, payload: EncodedPayload, erased: list[tuple[int, int]]) -> bool:
    """What a receiver can know, never the simulator's error count: a noisy channel may have damaged an
    unprotected (``fec: "none"``) digital payload, and the PHY reports which LDPC blocks failed their CRC.
    Analog payloads are never "damaged": noise is what their decoder is trained for."""
    if spec.noiseless or payload.kind == "analog":
        return False
    return spec.link.fec == "none" or bool(erased)


def receive_features(feature_codec: Codec, payload: EncodedPayload, link_damaged: bool,
                     bound: float | None = LATENT_CLAMP) -> Reception:
    """Decode ``payload``; when it does not decode and the link reported damage, conceal instead of failing.

    ``bound`` clamps the decoded values (latents); None leaves them as decoded (a language model's hidden
    states carry a few massive activations by design).

    A payload that does not decode although the link delivered it intact is a real fault (a bad stream or a
    codec mismatch) and raises :class:`CodecError`.
    """
    try:
        tensors = feature_codec.decode(payload)
    except CodecError as exc:
        if not link_damaged:
            raise
        log.info("payload lost to channel errors (%s); concealing", exc)
        return Reception(conceal(payload.tensors), True)
    if bound is None:
        return Reception(tensors, False)
    return Reception({k: v.clamp(-bound, bound) for k, v in tensors.items()}, False)

