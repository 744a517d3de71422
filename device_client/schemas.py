"""REST request and response models of the device API (a contract: other tools drive it).

The channel object's fields are generated from the channel blocks' parameter declarations
(:mod:`radio`), so ranges and help texts are written once; the cross-field rules (which model takes which
parameter, SNR required on a noisy channel) run through :meth:`radio.ChannelSpec.from_mapping`, the same
validation the channel emulator applies. Requests are strict: a string where a number goes is a 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

import codec
from codec.base import CodecError
from codec.adaptation import AUTO
from codec.sets import IMAGE_SOURCE
from codec.registry import check_request_params
from radio import ChannelError, ChannelSpec, channel_names
from radio.params import MAX_LIST_LENGTH
from radio.spec import schema_fields

MAX_PROMPT_CHARS = 500
STRICT = ConfigDict(extra="forbid", strict=True)


def _channel_field(spec: Any, models: list[str]) -> tuple[Any, Any]:
    value_bounds = {} if spec.kind is str else {k: v for k, v in (("ge", spec.lo), ("le", spec.hi)) if v is not None}
    kind: Any
    bounds: dict[str, Any]
    if spec.kind is list:  # a list of numbers, each within the field's range
        kind, bounds = list[Annotated[float, Field(**value_bounds)]], {"min_length": 1, "max_length": MAX_LIST_LENGTH}
    else:
        kind, bounds = {float: float, int: int, str: str}[spec.kind], value_bounds
    if spec.choices:
        kind = Literal[spec.choices]  # type: ignore[valid-type]
    takes = "" if set(models) == set(channel_names()) else f" [{', '.join(models)}]"
    default = f"; default {spec.default}" if spec.default not in (None, "") else ""
    return kind | None, Field(None, description=f"{spec.help}{default}{takes}", **bounds)


def _validate_channel(model: BaseModel) -> BaseModel:
    try:
        ChannelSpec.from_mapping(model.model_dump())
    except ChannelError as exc:
        raise ValueError(str(exc)) from exc
    return model


def _channel_model() -> type[BaseModel]:
    fields: dict[str, Any] = {name: _channel_field(spec, models) for name, (spec, models) in schema_fields().items()}
    fields["model"] = (Literal[tuple(channel_names())], Field("ideal", description="channel model (GET /v1/channels)"))
    return create_model("ChannelIn", __config__=STRICT, __doc__="A wireless link; see GET /v1/channels.",
                        __validators__={"_spec": model_validator(mode="after")(_validate_channel)}, **fields)


ChannelIn = _channel_model()


def channel_spec(channel: BaseModel) -> ChannelSpec:
    """The validated :class:`radio.ChannelSpec` of a request's channel object."""
    return ChannelSpec.from_mapping(channel.model_dump())


class GenerateIn(BaseModel):
    model_config = STRICT

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    codec: str | None = Field(None, description="a codec name from GET /v1/codecs, or auto (link adaptation: "
                                                "the edge chooses the scheme for the estimated SNR)")
    codec_params: dict[str, str] = Field(default_factory=dict,
                                         description="the codec's request parameters (GET /v1/codecs lists them)")
    channel: ChannelIn = Field(default_factory=ChannelIn)  # type: ignore[valid-type]
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
        if v is not None and v not in codec.codec_names(IMAGE_SOURCE) and v != AUTO:
            raise ValueError(f"unknown codec {v!r}; known: auto, {', '.join(codec.codec_names(IMAGE_SOURCE))}")
        return v


def codec_problem(codec_name: str, body: GenerateIn) -> str | None:
    """Cross-field rules between the codec and the rest of the request (the message names the field)."""
    if codec_name == AUTO:
        # Link adaptation chooses the codec and, for a digital scheme, the transceiver.
        for name in ("fec", "modulation", "code_rate"):
            if getattr(body.channel, name) is not None:
                return f"channel.{name}: chosen by codec 'auto' (link adaptation); leave it out"
        extra = set(body.codec_params) - {"budget_symbols"}
        if extra:
            return f"codec_params.{sorted(extra)[0]}: codec 'auto' takes only budget_symbols"
        return None
    try:
        check_request_params(codec_name, body.codec_params)
    except CodecError as exc:
        return str(exc)
    if codec.registry.codec_kind(codec_name) == "analog":
        for name in ("fec", "modulation", "code_rate"):
            if getattr(body.channel, name) is not None:
                return (f"channel.{name}: applies to digital payloads only; codec {codec_name!r} sends analog "
                        "symbols")
    return None


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
    codec_choice: dict[str, object] | None = None  # with codec "auto": the scheme chosen and why
