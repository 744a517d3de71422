"""``POST /v1/generate`` as the serving contract: validate → run through the link → decode and answer."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import torch
from PIL import Image

import codec
from codec.image_sets import image_set_dir
from codec.registry import uses_codec_set
from codec.sets import IMAGE_SOURCE, IMAGE_SPLIT, codec_set_identity
from device_client.decoders import DecoderBank, DecoderUnavailableError
from device_client.finisher import SplitFinisher
from device_client.link import DeviceLink, LinkError
from device_client.quality import ms_ssim_score, psnr_db
from device_client.receiver import link_may_have_damaged, receive_features
from device_client.schemas import GenerateIn, GenerateOut, Timings, channel_spec, codec_problem
from meg.v1 import meg_pb2
from radio import ChannelError, ChannelSpec
from serving.contract import CallContext, RequestError, Status, StreamingApi
from telemetry.metrics import MegMetrics
from wire.framing import ReceivedStream
from wire.payload import CodecError

log = logging.getLogger(__name__)


class CodecSetMismatchError(CodecError):
    """The edge coded the features with another image codec set than this device holds."""


@dataclass
class GenerateDefaults:
    steps: int
    guidance_scale: float
    codec: str
    request_timeout_s: float
    max_in_flight: int
    max_pixel_steps: int


@dataclass
class GenerateWork:
    body: GenerateIn
    request: meg_pb2.GenerateRequest
    spec: ChannelSpec
    decoder: str
    started: float
    api_key: str | None = None


@dataclass
class Decoded:
    work: GenerateWork
    received: ReceivedStream
    image: torch.Tensor
    reference: torch.Tensor | None
    concealed: bool
    decode_s: float


def to_png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class ImageGeneration(StreamingApi[GenerateIn, GenerateWork, Decoded, GenerateOut]):
    """Prompt in, image out: the edge's features cross the link, the device decodes them."""

    service = "device"

    def __init__(self, link: DeviceLink, decoders: DecoderBank, finisher: SplitFinisher, defaults: GenerateDefaults,
                 metrics: MegMetrics, model_dir: Path | None = None) -> None:
        self.link = link
        self.decoders = decoders
        self.finisher = finisher
        self.defaults = defaults
        self.metrics = metrics
        self.in_flight = 0
        # This device's image codec set (the model's <model dir>/codecs/image-k0), read once: sets change only
        # with a restart. Fitted codecs decode with it alone, and only a payload coded with the same set.
        folder = Path(model_dir if model_dir is not None else decoders.model_dir).expanduser().resolve()
        self.codec_set_dir = image_set_dir(folder)
        self.codec_set = codec_set_identity(self.codec_set_dir, folder.name, IMAGE_SPLIT, IMAGE_SOURCE)

    def metric_labels(self, body: GenerateIn) -> tuple[str, str]:
        return body.codec or self.defaults.codec, body.channel.model

    async def decode_request(self, body: GenerateIn, ctx: CallContext) -> GenerateWork:
        if self.in_flight >= self.defaults.max_in_flight:
            raise RequestError(Status.OVERLOADED, f"device has {self.in_flight} requests in flight "
                               f"(limit {self.defaults.max_in_flight})", retry_after_s=1.0, label="device_overloaded")
        request = self._grpc_request(body, ctx.request_id)
        problem = codec_problem(request.codec, body)
        if request.split_step and request.split_step >= request.steps:
            problem = f"split_step: must be below steps ({request.steps}), got {request.split_step}"
        cost = (request.height or 0) * (request.width or 0) * request.steps
        if cost > self.defaults.max_pixel_steps:
            problem = (f"steps: {request.height}×{request.width} pixels × {request.steps} steps = {cost} pixel-steps "
                       f"is over this device's budget of {self.defaults.max_pixel_steps}")
        if problem:
            raise RequestError(Status.INVALID, problem)
        spec = channel_spec(body.channel)
        try:
            decoder = self.decoders.resolve(body.decoder, not spec.noiseless)
        except DecoderUnavailableError as exc:
            raise RequestError(Status.INVALID, f"decoder: {exc}") from exc
        return GenerateWork(body, request, spec, decoder, time.perf_counter())

    def _grpc_request(self, body: GenerateIn, request_id: str) -> meg_pb2.GenerateRequest:
        d = self.defaults
        request = meg_pb2.GenerateRequest(
            request_id=request_id, prompt=body.prompt,
            seed=body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little"),
            steps=body.steps or d.steps,
            guidance_scale=body.guidance_scale if body.guidance_scale is not None else d.guidance_scale,
            codec=body.codec or d.codec, codec_params=body.codec_params, split_step=body.split_step,
            reference=body.reference, height=body.height or 0, width=body.width or 0)
        try:
            channel_spec(body.channel).to_proto(request.channel)
        except ChannelError as exc:  # validated by the schema already; kept for callers that bypass it
            raise RequestError(Status.INVALID, str(exc)) from exc
        return request

    async def run(self, work: GenerateWork, ctx: CallContext) -> Decoded:
        self.in_flight += 1
        try:
            received = await self.link.generate(work.request, self.defaults.request_timeout_s)
        except LinkError as exc:
            retry = float(exc.retry_after_s) if exc.retry_after_s else None
            raise RequestError(Status.from_http(exc.http_status), exc.reason, retry, exc.kind) from exc
        finally:
            self.in_flight -= 1
        t_dec = time.perf_counter()
        try:
            image, reference, concealed = await asyncio.to_thread(self._decode, received, work.spec, work.decoder)
        except CodecSetMismatchError as exc:
            raise RequestError(Status.BAD_STREAM, str(exc), label="codec_set_mismatch") from exc
        except (DecoderUnavailableError, CodecError, ValueError) as exc:
            raise RequestError(Status.BAD_STREAM, f"device could not decode the features: {exc}",
                               label="decode_failed") from exc
        return Decoded(work, received, image, reference, concealed, time.perf_counter() - t_dec)

    def _decode(self, received: ReceivedStream, spec: ChannelSpec, decoder_kind: str
                ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Features → image (and the clean reference image when the edge sent reference features)."""
        header = received.header
        self.check_codec_set(header)
        feature_codec = codec.build_codec(header.codec_id, dict(header.codec_params), self.codec_set_dir)
        if header.choice.fec:  # link adaptation chose a digital transceiver: the receiver knows which
            spec = spec.with_digital_link(header.choice.modulation, header.choice.fec, header.choice.code_rate or None)
        erased = [(r.start, r.end) for r in received.trailer.channel.erased]
        damaged = link_may_have_damaged(spec, received.payload, erased)
        reception = receive_features(feature_codec, received.payload, damaged)
        decoder = self.decoders.get(decoder_kind)

        def to_image(features: dict[str, torch.Tensor]) -> torch.Tensor:
            if "noisy_latents" in features:
                latents = self.finisher.finish(features["noisy_latents"], header.prompt, header.split_step,
                                               header.total_steps, header.guidance_scale)
            else:
                latents = features["latents"]
            return decoder.decode(latents)

        reference = to_image(received.reference) if received.reference else None
        return to_image(reception.tensors), reference, reception.concealed

    def check_codec_set(self, header: meg_pb2.StreamHeader) -> None:
        """Refuse a payload whose codec reads fitted data when the edge's set (named in the header) is not this
        device's: decoding it with other ranges, centres or weights would give a plausible-looking wrong image.

        Only the content hash decides (two folders with the same files are the same set, whatever the model
        folders are called); codecs without fitted data (raw, uint8, analog) decode whatever the sets.
        """
        try:
            needs_set = uses_codec_set(header.codec_id)
        except CodecError:
            return  # an unknown codec is refused by build_codec with its own message
        if needs_set and header.codec_set_hash != self.codec_set[1]:
            raise CodecSetMismatchError(
                f"codec set mismatch: the edge coded {header.codec_id!r} with image codec set "
                f"{header.codec_set or '?'!r} ({header.codec_set_hash[:16] or 'none'}), this device holds "
                f"{self.codec_set[0]!r} ({self.codec_set[1][:16] or f'none at {self.codec_set_dir}'}); edge and "
                f"device need the same set (the one beside the model they run)")

    async def encode_response(self, d: Decoded, ctx: CallContext) -> AsyncIterator[tuple[GenerateOut, bytes]]:
        quality: dict[str, float] = {}
        if d.reference is not None:
            quality = {"psnr_db": psnr_db(d.image, d.reference), "ms_ssim": ms_ssim_score(d.image, d.reference)}
        png = await asyncio.to_thread(to_png, d.image[0])
        out = self._response(d, quality, ctx)
        self._observe(d, out, ctx)
        yield out, png

    def _response(self, d: Decoded, quality: dict[str, float], ctx: CallContext) -> GenerateOut:
        h, report, req = d.received.header, d.received.trailer.channel, d.work.request
        total_s = time.perf_counter() - d.work.started
        image_id = ctx.request_id + os.urandom(8).hex()
        return GenerateOut(
            id=image_id, image_url=f"/v1/images/{image_id}.png", width=int(d.image.shape[-1]),
            height=int(d.image.shape[-2]), codec=req.codec, channel=channel_echo(d.work.spec, report),
            bits_sent=d.received.payload.bits_sent, symbols_sent=int(report.symbols), airtime_ms=report.airtime_ms,
            timings_ms=Timings(edge=h.timings.queue_ms + h.timings.text_encode_ms + h.timings.denoise_ms,
                               encode=h.timings.encode_ms, channel=report.channel_ms, decode=1e3 * d.decode_s,
                               total=1e3 * total_s),
            quality=quality, model=h.model_id, decoder=d.work.decoder, bit_errors=int(report.bit_errors),
            concealed=d.concealed, batch_size=h.timings.batch_size, prompt=req.prompt, seed=req.seed,
            steps=req.steps, guidance_scale=req.guidance_scale, codec_choice=codec_choice(h))

    def _observe(self, d: Decoded, out: GenerateOut, ctx: CallContext) -> None:
        labels = self.metrics.labels(out.model, ctx.labels["codec"], d.work.spec.model, d.work.spec.snr_db)
        if out.quality:
            self.metrics.image_psnr_db.labels(**labels).observe(out.quality["psnr_db"])
            self.metrics.image_ms_ssim.labels(**labels).observe(out.quality["ms_ssim"])
        self.metrics.observe_stage(labels, "decode", d.decode_s)
        self.metrics.observe_stage(labels, "end_to_end", out.timings_ms.total / 1e3)
        self.metrics.payload_bytes.labels(**labels).observe(out.bits_sent / 8)
        self.metrics.request_symbols.labels(**labels).observe(out.symbols_sent)
        log.info("%s over %s: %d bits, %d symbols, %.1f ms", out.codec, d.work.spec.model, out.bits_sent,
                 out.symbols_sent, out.timings_ms.total)


def codec_choice(header: meg_pb2.StreamHeader) -> dict[str, Any] | None:
    """What link adaptation chose and why (None unless the request asked for codec "auto")."""
    if not header.HasField("choice"):
        return None
    c = header.choice
    link = {"modulation": c.modulation, "fec": c.fec, "code_rate": c.code_rate or None} if c.fec else None
    return {"scheme": c.chosen, "codec": header.codec_id, "link": link, "reason": c.reason,
            "snr_estimate_db": c.snr_estimate_db if math.isfinite(c.snr_estimate_db) else None,
            "expected_psnr_db": c.expected_quality}


def channel_echo(spec: ChannelSpec, report: meg_pb2.ChannelReport) -> dict[str, Any]:
    """The link as it was applied: the request's validated channel with its defaults filled in."""
    echo = spec.to_mapping()
    echo["modulation"] = report.modulation or echo.get("modulation")
    if spec.link.trace is not None:  # the SNR the payload met when it left (the trace moves on meanwhile)
        echo["snr_applied_db"] = report.snr_db
    return echo
