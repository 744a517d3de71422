"""REST request and response models of the device API (a contract: other tools drive it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

import codec
from channel_sim.channels import MODULATIONS, SNR_RANGE_DB, channel_names

MAX_PROMPT_CHARS = 500


class ChannelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("ideal", description="ideal | awgn | rayleigh | rician")
    snr_db: float | None = Field(None, ge=SNR_RANGE_DB[0], le=SNR_RANGE_DB[1], description="receive SNR in dB")
    bandwidth_hz: float | None = Field(None, ge=1e3, le=1e10, description="symbol rate, complex symbols/s")
    delay_ms: float | None = Field(None, ge=0, le=10_000, description="one-way propagation delay")
    k_factor: float | None = Field(None, ge=0, le=1e4, description="Rician K factor (linear)")
    coherence_symbols: int | None = Field(None, ge=1, le=1 << 24, description="block-fading length")
    modulation: str | None = Field(None, description="digital payloads: bpsk | qpsk | 16qam | 64qam")
    fec: Literal["none", "ldpc"] | None = Field(None, description="digital payloads: uncoded or LDPC")
    code_rate: float | None = Field(None, gt=0, lt=1, description="LDPC code rate")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="channel noise seed")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in channel_names():
            raise ValueError(f"unknown channel model {v!r}; known: {', '.join(channel_names())}")
        return v

    @field_validator("modulation")
    @classmethod
    def _known_modulation(cls, v: str | None) -> str | None:
        if v is not None and v not in MODULATIONS:
            raise ValueError(f"unknown modulation {v!r}; known: {', '.join(MODULATIONS)}")
        return v


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    codec: str | None = Field(None, description="a codec name from GET /v1/codecs")
    codec_params: dict[str, str] = Field(default_factory=dict)
    channel: ChannelIn = Field(default_factory=ChannelIn)
    reference: bool = False
    split_step: int = Field(0, ge=0, le=199, description="0: the edge runs every step; k: the device runs k+1..N")
    decoder: Literal["auto", "tiny", "robust", "vae"] = "auto"
    height: int | None = Field(None, ge=8, le=4096)
    width: int | None = Field(None, ge=8, le=4096)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, v: str | None) -> str | None:
        if v is not None and v not in codec.codec_names():
            raise ValueError(f"unknown codec {v!r}; known: {', '.join(codec.codec_names())}")
        return v


class Timings(BaseModel):
    edge: float
    encode: float
    channel: float
    decode: float
    total: float


class GenerateOut(BaseModel):
    id: str
    image_url: str
    width: int
    height: int
    codec: str
    channel: dict[str, object]
    bits_sent: int
    symbols_sent: int
    airtime_ms: float
    timings_ms: Timings
    quality: dict[str, float]
    model: str
    decoder: str
    bit_errors: int
    concealed: bool
    batch_size: int
    prompt: str
    seed: int
    steps: int
    guidance_scale: float
