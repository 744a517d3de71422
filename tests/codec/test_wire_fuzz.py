"""Fuzzing of the wire format and of every codec's decode path.

Whatever arrives — random bytes, truncated or reordered streams, real payloads with flipped bits, forged
header parameters — the device must answer with the project's clean errors (:class:`codec.framing.StreamError`,
:class:`codec.base.CodecError`) or a valid result: never another exception type (a 500), never a hang.
The same holds one level down for the gRPC servers: undecodable requests get a clean status and the server
stays healthy.

Hypothesis runs derandomized (fixed examples, no example database) so CI failures reproduce; example counts
are sized so the whole module runs in well under a minute on two cores. Codecs whose decode runs a neural
entropy decoder (learned coders, JSCC) get fewer of the examples that reach it.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path
from typing import Callable
from unittest import mock

import grpc
import httpx
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import codec
from wire import framing
from codec.base import Codec, CodecError, EncodedPayload, TensorInfo
from codec.registry import resolve_spec
from meg.v1 import meg_pb2

from conftest import Testbed

#: The embedded model's image codec set: image codecs are fuzzed with the fitted data the edge and device use.
WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "shapes_v1" / "codecs" / "image-k0"
#: The embedded LLM's fitted codec set (k = 2): hidden-state codecs are fuzzed on hidden states with it.
LLM_SET = Path(__file__).resolve().parents[2] / "models" / "shapes_llm_v1" / "codecs" / "llm-hidden-k2"
HIDDEN_SHAPE = (1, 6, 128)
#: Compositions besides the presets, so every stage's inverse (token merging, FCM, DT-UFC, tiling) is fuzzed
#: even while the presets that use it wait for their weights.
COMPOSITIONS = ("merge+linear-analog", "merge+fp16", "fcm+fp16", "dtufc+rans8", "tile+fp16")
CODECS = [*codec.codec_names(), *COMPOSITIONS]
LATENT_SHAPE = (1, 4, 16, 16)
#: Terminal coders whose decode runs a network: examples that reach it cost 0.1-1 s each on CPU.
DEEP_TERMINALS = ("learned", "jscc")
#: Terminal coders that are slow to build (rANS tables, weights), which forged headers make the device do.
SLOW_BUILD_TERMINALS = (*DEEP_TERMINALS, "rans8")
#: Header parameter keys the stages read, fuzzed besides the ones a payload carries.
PARAM_KEYS = ("coded_tensors", "side_info", "tile_shapes", "tile_mode", "merge_shapes", "merge_ratio",
              "learned_model", "learned_domain", "learned_quality", "learned_set", "bits", "fcm_lo", "fcm_hi",
              "fcm_stats", "dtufc_centres", "dtufc_bits", "jscc_model", "jscc_snr_db", "channel_snr_db")
NASTY_VALUES = ("", "0", "-1", "1", "2", "16", "99", "nan", "inf", "-inf", "1e309", "0.5", "x", ";", ":", "x:",
                ":1x2", "latents:", "latents:0x4", "latents:-1x4x16x16", "latents:1x4x16x16", "latents:1x1x32x32",
                "latents:16x16", "latents:1x4x256", "latents:1x4x16x16;latents:1x4x16x16", "latents:axb",
                "latents:1x4x16x16x", "AAAA", "!!!!", "AAAAAAAA", "grid", "native", "identity", "dtufc", "fcm",
                "hyperprior", "elic", "factorized", "mshyperprior", "shapes_v1", "../shapes_v1", "/etc/passwd",
                "jscc_full", "jscc_e2e", "jscc_../../x", "\x00", "é")


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def is_deep(name: str) -> bool:
    return resolve_spec(name)[0].split("+")[-1] in DEEP_TERMINALS


def is_slow_to_build(name: str) -> bool:
    return resolve_spec(name)[0].split("+")[-1] in SLOW_BUILD_TERMINALS


def crc_framed(name: str) -> bool:
    """Learned payloads end in a CRC-32 of everything before it."""
    return resolve_spec(name)[0].split("+")[-1] == "learned"


def for_hidden_states(name: str) -> bool:
    """A codec only for LLM hidden states (its fitted data is the LLM's codec set)."""
    return name not in codec.codec_names("image") and name in codec.codec_names("llm-hidden")


def weights_for(name: str) -> Path:
    return LLM_SET if for_hidden_states(name) else WEIGHTS


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> tuple[Codec, EncodedPayload] | str:
    try:
        built = codec.build_codec(name, {}, weights_for(name))
    except CodecError as exc:
        if "missing" in str(exc):
            return f"codec {name!r} skipped: its weights are not in {weights_for(name)} yet ({exc})"
        raise
    generator = torch.Generator().manual_seed(0)
    if for_hidden_states(name):
        return built, built.encode({"hidden": 3.0 * torch.randn(HIDDEN_SHAPE, generator=generator)})
    latents = 1.5 * torch.randn(LATENT_SHAPE, generator=generator)
    return built, built.encode({"latents": latents})


def reference(name: str) -> tuple[Codec, EncodedPayload]:
    """The built codec and a real payload of it; skips codecs whose weights have not landed."""
    ref = _reference(name)
    if isinstance(ref, str):
        pytest.skip(ref)
    return ref


def decode_cleanly(built: Codec, payload: EncodedPayload) -> bool:
    """Decode ``payload``: a CodecError is fine; a result must match the header and be finite.
    Any other exception propagates and fails the test. True when it decoded."""
    try:
        out = built.decode(payload)
    except CodecError:
        return False
    for info in payload.tensors:
        assert tuple(out[info.name].shape) == info.shape
        assert torch.isfinite(out[info.name]).all()
    return True


def device_decode(codec_id: str, payload: EncodedPayload) -> bool:
    """What the device does with a received stream: build the codec from the header, then decode."""
    try:
        built = codec.build_codec(codec_id, dict(payload.params), weights_for(codec_id))
    except CodecError:
        return False
    return decode_cleanly(built, payload)


def with_body(payload: EncodedPayload, data: bytes | None = None, symbols: np.ndarray | None = None,
              params: dict[str, str] | None = None, tensors: list[TensorInfo] | None = None) -> EncodedPayload:
    return EncodedPayload(payload.kind, list(payload.tensors if tensors is None else tensors),
                          dict(payload.params if params is None else params),
                          data=payload.data if data is None else data,
                          symbols=payload.symbols if symbols is None else symbols)


def reframe_crc(body: bytes) -> bytes:
    """Append a valid CRC-32, so a forged learned payload gets past the CRC into the entropy decoder."""
    return body + zlib.crc32(body).to_bytes(4, "little")


complex_values = st.complex_numbers(width=64, allow_nan=True, allow_infinity=True)


def symbol_arrays(expected: int) -> st.SearchStrategy[np.ndarray]:
    size = st.one_of(st.just(expected), st.integers(0, 2 * expected + 2))
    return size.flatmap(lambda n: arrays(np.complex64, n, elements=complex_values))


# ------------------------------------------------------------------------------------------ sanity


@pytest.mark.parametrize("name", CODECS)
def test_real_payload_round_trips(name: str) -> None:
    """The fuzzed payloads start from real ones: they decode (so the tests below can tell breakage)."""
    built, payload = reference(name)
    assert device_decode(name, payload)


# ------------------------------------------------------------------------------ codec decode paths


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CODECS)
def test_random_bodies_decode_cleanly(name: str) -> None:
    """Random bytes or symbols under a real header."""
    built, payload = reference(name)
    if payload.kind == "analog":
        @fuzz_settings(5 if is_deep(name) else 150)
        @given(symbols=symbol_arrays(payload.symbols_sent))
        def run(symbols: np.ndarray) -> None:
            decode_cleanly(built, with_body(payload, symbols=symbols))
    else:
        @fuzz_settings(150)
        @given(body=st.binary(max_size=2 * len(payload.data) + 16), forge=st.booleans())
        def run(body: bytes, forge: bool) -> None:
            data = reframe_crc(body) if forge and crc_framed(name) else body
            decode_cleanly(built, with_body(payload, data=data))
    run()


mutation = st.tuples(st.sampled_from(["flip", "set", "truncate", "extend", "zero_tail"]),
                     st.integers(0, 1 << 20), st.integers(0, 255))


def mutate_bytes(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, value in ops:
        if op == "flip" and out:
            out[pos % len(out)] ^= 1 << (value % 8)
        elif op == "set" and out:
            out[pos % len(out)] = value
        elif op == "truncate":
            del out[pos % (len(out) + 1):]
        elif op == "extend":
            out += bytes([value]) * (1 + pos % 64)
        elif op == "zero_tail" and out:
            start = pos % len(out)
            out[start:] = bytes(len(out) - start)
    return bytes(out)


def mutate_symbols(symbols: np.ndarray, ops: list[tuple[str, int, int]]) -> np.ndarray:
    out = symbols.copy()
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30, 3.0 + 4.0j, np.nan * 1j], np.complex64)
    for op, pos, value in ops:
        if op in ("flip", "set") and out.size:
            out[pos % out.size] = specials[value % specials.size]
        elif op == "truncate":
            out = out[:pos % (out.size + 1)]
        elif op == "extend":
            out = np.concatenate([out, np.full(1 + pos % 64, specials[value % specials.size], np.complex64)])
        elif op == "zero_tail" and out.size:
            out[pos % out.size:] = 0
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CODECS)
def test_mutated_real_payloads_decode_cleanly(name: str) -> None:
    """Bit flips, overwritten bytes, truncation and extension of a real payload; for learned coders also
    with the CRC recomputed, so the damage reaches the rANS decoder and the synthesis network."""
    built, payload = reference(name)
    deep_examples = 3 if is_deep(name) else 200  # examples that run the whole decoder

    if payload.kind == "analog":
        @fuzz_settings(deep_examples)
        @given(ops=st.lists(mutation, min_size=1, max_size=4))
        def run(ops: list[tuple[str, int, int]]) -> None:
            decode_cleanly(built, with_body(payload, symbols=mutate_symbols(payload.symbols, ops)))
        run()
        return

    @fuzz_settings(150)
    @given(ops=st.lists(mutation, min_size=1, max_size=4))
    def as_received(ops: list[tuple[str, int, int]]) -> None:
        decode_cleanly(built, with_body(payload, data=mutate_bytes(payload.data, ops)))
    as_received()

    if crc_framed(name):
        @fuzz_settings(deep_examples)
        @given(ops=st.lists(mutation, min_size=1, max_size=3))
        def forged(ops: list[tuple[str, int, int]]) -> None:
            body = mutate_bytes(payload.data[:-4], ops)
            decode_cleanly(built, with_body(payload, data=reframe_crc(body)))
        forged()


#: Forged tensor descriptions stay small: the sizes a header may describe are bounded by check_finite_shapes
#: and each coder's own limit, and a large forged shape would cost seconds of synthesis per example.
tensor_infos = st.lists(
    st.builds(TensorInfo, st.sampled_from(["latents", "noisy_latents", "x"]),
              st.lists(st.integers(-1, 40), min_size=0, max_size=5).map(tuple)),
    min_size=0, max_size=2)
param_edit = st.tuples(st.sampled_from(["set", "drop"]), st.sampled_from(PARAM_KEYS),
                       st.one_of(st.sampled_from(NASTY_VALUES), st.text(max_size=24)))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CODECS)
def test_forged_headers_decode_cleanly(name: str) -> None:
    """Header parameters and tensor descriptions forged or dropped (the device builds the codec from them)."""
    _, payload = reference(name)

    @fuzz_settings(6 if is_slow_to_build(name) else 200)
    @given(edits=st.lists(param_edit, min_size=1, max_size=3),
           infos=st.one_of(st.none(), tensor_infos))
    def run(edits: list[tuple[str, str, str]], infos: list[TensorInfo] | None) -> None:
        params = dict(payload.params)
        for op, key, value in edits:
            if op == "drop":
                params.pop(key, None)
            else:
                params[key] = value
        device_decode(name, with_body(payload, params=params, tensors=infos))
    run()


# ---------------------------------------------------------------------------------------- the wire


def small_chunks() -> mock._patch:  # type: ignore[name-defined]
    """Many small chunks instead of one, so ordering and counting get exercised."""
    return mock.patch.multiple(framing, CHUNK_BYTES=64, CHUNK_SYMBOLS=32)


def stream_frames(name: str, payload: EncodedPayload, with_reference: bool) -> list[meg_pb2.GenerateResponse]:
    with small_chunks():
        frames = [framing.header_frame(payload, request_id="fuzz", model_id="shapes_v1", codec_id=name)]
        frames += list(framing.chunk_frames(payload))
        if with_reference:
            frames.append(framing.reference_frame({"latents": torch.zeros(LATENT_SHAPE)}))
        frames.append(framing.trailer_frame(payload, len(frames) - 1 - int(with_reference)))
    return frames


def assemble_cleanly(frames: list[meg_pb2.GenerateResponse]) -> framing.ReceivedStream | None:
    """Feed frames like the device does: a StreamError anywhere is a clean rejection; a finished stream
    then goes through the device's decode path."""
    assembler = framing.StreamAssembler(max_payload_bytes=1 << 20)
    try:
        for frame in frames:
            assembler.add(frame)
        received = assembler.finish()
    except framing.StreamError:
        return None
    for name, tensor in received.reference.items():
        assert isinstance(name, str) and torch.is_tensor(tensor)
    device_decode(received.header.codec_id, received.payload)
    return received


def test_real_streams_assemble() -> None:
    for name in ("raw-fp16", "uint8", "analog"):
        _, payload = reference(name)
        frames = stream_frames(name, payload, with_reference=True)
        assert len(frames) > 4, "the stream should span several chunks"
        received = assemble_cleanly(frames)
        assert received is not None and received.header.codec_id == name


FRAME_OPS = ["drop", "duplicate", "swap", "cut", "chunk_byte", "chunk_seq", "header_bytes", "header_symbols",
             "header_kind", "header_version", "header_shape", "header_codec", "trailer_chunks", "trailer_bytes",
             "trailer_crc", "reference_blob", "empty_frame"]


def mutate_frames(frames: list[meg_pb2.GenerateResponse], ops: list[tuple[str, int, int]]
                  ) -> list[meg_pb2.GenerateResponse]:
    out = [meg_pb2.GenerateResponse.FromString(f.SerializeToString()) for f in frames]

    def first(kind: str) -> meg_pb2.GenerateResponse | None:
        return next((f for f in out if f.WhichOneof("frame") == kind), None)

    for op, a, b in ops:
        if not out:
            break
        i, j = a % len(out), b % len(out)
        header, trailer, reference_ = first("header"), first("trailer"), first("reference")
        chunks = [f for f in out if f.WhichOneof("frame") == "chunk"]
        if op == "drop":
            del out[i]
        elif op == "duplicate":
            out.insert(i, out[i])
        elif op == "swap":
            out[i], out[j] = out[j], out[i]
        elif op == "cut":
            del out[i:]
        elif op == "chunk_byte" and chunks:
            chunk = chunks[a % len(chunks)].chunk
            if chunk.data:
                data = bytearray(chunk.data)
                data[b % len(data)] ^= 0xFF
                chunk.data = bytes(data)
            elif len(chunk.symbols):
                chunk.symbols[b % len(chunk.symbols)] = float("nan")
        elif op == "chunk_seq" and chunks:
            chunks[a % len(chunks)].chunk.seq = b
        elif op == "header_bytes" and header:
            header.header.payload_bytes = max(0, header.header.payload_bytes + b - 128)
        elif op == "header_symbols" and header:
            header.header.payload_symbols = max(0, header.header.payload_symbols + b - 128)
        elif op == "header_kind" and header:
            header.header.payload_kind = b % 4
        elif op == "header_version" and header:
            header.header.wire_version = "meg.v0"
        elif op == "header_shape" and header and header.header.tensors and header.header.tensors[0].shape:
            header.header.tensors[0].shape[a % len(header.header.tensors[0].shape)] = b - 8
        elif op == "header_codec" and header:
            header.header.codec_id = CODECS[b % len(CODECS)]
        elif op == "trailer_chunks" and trailer:
            trailer.trailer.total_chunks = b
        elif op == "trailer_bytes" and trailer:
            trailer.trailer.total_bytes = b
        elif op == "trailer_crc" and trailer:
            trailer.trailer.crc32 ^= 1 << (b % 32)
        elif op == "reference_blob" and reference_:
            reference_.reference.float32_data = reference_.reference.float32_data[:b]
        elif op == "empty_frame":
            out.insert(i, meg_pb2.GenerateResponse())
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["raw-fp16", "uint8", "analog", "hyperprior", "merge+linear-analog"])
def test_mutated_streams_assemble_cleanly(name: str) -> None:
    """Real streams with frames dropped, duplicated, reordered, cut short or with fields rewritten."""
    _, payload = reference(name)
    frames = stream_frames(name, payload, with_reference=True)

    @fuzz_settings(40 if is_slow_to_build(name) else 200)
    @given(ops=st.lists(st.tuples(st.sampled_from(FRAME_OPS), st.integers(0, 255), st.integers(0, 255)),
                        min_size=1, max_size=4))
    def run(ops: list[tuple[str, int, int]]) -> None:
        assemble_cleanly(mutate_frames(frames, ops))
    run()


specs = st.lists(st.builds(meg_pb2.TensorSpec, name=st.sampled_from(["latents", "x"]),
                           shape=st.lists(st.integers(-2, 20), max_size=4), dtype=st.sampled_from(["float32", ""])),
                 max_size=2)
headers = st.builds(
    meg_pb2.StreamHeader,
    wire_version=st.sampled_from([framing.WIRE_VERSION, framing.WIRE_VERSION, "", "meg.v2"]),
    codec_id=st.sampled_from(CODECS + ["", "nope"]),
    payload_kind=st.integers(0, 3), payload_bytes=st.integers(0, 4096), payload_symbols=st.integers(0, 2048),
    tensors=specs, codec_params=st.dictionaries(st.sampled_from(PARAM_KEYS), st.sampled_from(NASTY_VALUES),
                                                max_size=3))
frames_strategy = st.one_of(
    headers.map(lambda h: meg_pb2.GenerateResponse(header=h)),
    st.builds(meg_pb2.PayloadChunk, seq=st.integers(0, 6), data=st.binary(max_size=256)).map(
        lambda c: meg_pb2.GenerateResponse(chunk=c)),
    st.builds(meg_pb2.PayloadChunk, seq=st.integers(0, 6),
              symbols=st.lists(st.floats(width=32), max_size=64)).map(lambda c: meg_pb2.GenerateResponse(chunk=c)),
    st.builds(meg_pb2.ReferenceFeatures, tensors=specs, float32_data=st.binary(max_size=256)).map(
        lambda r: meg_pb2.GenerateResponse(reference=r)),
    st.builds(meg_pb2.StreamTrailer, total_chunks=st.integers(0, 6), total_bytes=st.integers(0, 4096),
              total_symbols=st.integers(0, 2048), crc32=st.integers(0, (1 << 32) - 1)).map(
        lambda t: meg_pb2.GenerateResponse(trailer=t)),
    st.just(meg_pb2.GenerateResponse()),
)


@pytest.mark.timeout(300)
@fuzz_settings(1000)
@given(frames=st.lists(frames_strategy, max_size=8))
def test_random_frame_sequences_assemble_cleanly(frames: list[meg_pb2.GenerateResponse]) -> None:
    assemble_cleanly(frames)


@pytest.mark.timeout(300)
@fuzz_settings(800)
@given(blobs=st.lists(st.binary(max_size=300), min_size=1, max_size=6))
def test_random_bytes_as_frames_assemble_cleanly(blobs: list[bytes]) -> None:
    """Random bytes that happen to parse as frames (the rest never leave gRPC's deserializer)."""
    frames = []
    for blob in blobs:
        try:
            frames.append(meg_pb2.GenerateResponse.FromString(blob))
        except DecodeError:
            continue
    assemble_cleanly(frames)


def test_oversized_announcement_is_refused() -> None:
    header = meg_pb2.StreamHeader(wire_version=framing.WIRE_VERSION, payload_kind=meg_pb2.PAYLOAD_KIND_DIGITAL,
                                  payload_bytes=(1 << 20) + 1)
    with pytest.raises(framing.StreamError, match="limit"):
        framing.StreamAssembler(max_payload_bytes=1 << 20).add(meg_pb2.GenerateResponse(header=header))


# ------------------------------------------------------------------------------------ gRPC servers

#: What a server may answer to bytes that are not a valid request (RESOURCE_EXHAUSTED: over the size limit).
#: UNKNOWN (an exception escaping a handler, or grpc.aio's answer to a request that does not deserialize)
#: and INTERNAL are bugs.
CLEAN_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
               grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION}
GENERATE_METHOD = "/meg.v1.EdgeGeneration/Generate"


def raw_generate(channel: grpc.Channel) -> Callable[[bytes], list[bytes]]:
    """Generate with identity (de)serializers: the bytes go on the wire as they are."""
    method = channel.unary_stream(GENERATE_METHOD, request_serializer=None, response_deserializer=None)
    return lambda blob: list(method(blob, timeout=20))


def expect_clean_status(call: Callable[[bytes], list[bytes]], blob: bytes) -> None:
    try:
        call(blob)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details() or ""  # type: ignore[attr-defined]
        assert code in CLEAN_CODES, f"{code.name}: {details} for request bytes {blob[:40]!r}"
        return
    pytest.fail(f"request bytes {blob[:40]!r} were served as a valid request")


HAND_PICKED = [b"", b"\x00", b"\xff" * 64, b"\x0a\x05hello", b"\x12\x03abc\x20\x01\x32\x04nope",
               meg_pb2.GenerateRequest(prompt="p", steps=1, codec="raw-fp16", split_step=5).SerializeToString(),
               meg_pb2.GenerateRequest(prompt="p", steps=1, codec="uint8",
                                       codec_params={"bits": "zero"}).SerializeToString(),
               b"\x12" + b"\xff\xff\xff\xff\x0f" + b"x" * 10,  # length prefix far past the end
               b"\x12\x02\xc3\x28",  # invalid UTF-8 in the prompt
               b"x" * (70 * 1024)]   # over the servers' request size limit
#: Valid for the edge (it does not look at the channel), invalid for the channel emulator.
CHANNEL_ONLY = [meg_pb2.GenerateRequest(prompt="p", steps=1, codec="raw-fp16",
                                        channel=meg_pb2.ChannelSpec(model="wormhole")).SerializeToString()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("hop", ["edge", "channel"])
def test_grpc_generate_rejects_garbage_cleanly(testbed: Testbed, hop: str) -> None:
    port = testbed.edge_port if hop == "edge" else testbed.channel_port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = raw_generate(channel)
        for blob in HAND_PICKED + (CHANNEL_ONLY if hop == "channel" else []):
            expect_clean_status(call, blob)

        @fuzz_settings(60)
        @given(blob=st.binary(max_size=512))
        def run(blob: bytes) -> None:
            expect_clean_status(call, blob)
        run()

        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Still serving real work afterwards, end to end.
    resp = httpx.post(f"{testbed.url}/v1/generate", json={"prompt": "a red circle", "seed": 1, "steps": 1},
                      timeout=90)
    assert resp.status_code == 200, resp.text
