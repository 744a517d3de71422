"""A link as a request asks for it: the channel model, its parameters and the link's own parameters.

Parsed and validated here once, from a flat mapping (REST body, CLI flags, benchmark tables) or from the
``meg.v1`` wire, where a channel model's parameters travel by name in ``ChannelSpec.params``: a new channel
model needs no change to the wire, the REST schema or the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from radio.block import ChannelBlock, ChannelParams
from radio.channels import CHANNELS, build_block
from radio.modulation import MODULATIONS
from radio.params import ChannelError, build_params, field_specs, param, validate_fields
from radio.trace import DEFAULT_STEP_MS, PROFILES, profile_trace, snr_at

#: Names of fields that belong to the link rather than to the channel model.
DIGITAL_FIELDS = ("modulation", "fec", "code_rate")


@dataclass(frozen=True)
class LinkParams:
    """What every link has, whatever the channel model: airtime, delay, the digital transceiver, a seed."""

    bandwidth_hz: float = param(1.0e6, lo=1e3, hi=1e10, unit="Hz",
                                help="symbol rate: complex channel uses per second")
    delay_ms: float = param(0.0, lo=0.0, hi=10_000.0, unit="ms", help="one-way propagation delay")
    modulation: str = param("qpsk", kind=str, choices=tuple(MODULATIONS),
                            help="digital payloads: QAM order")
    fec: str = param("none", kind=str, choices=("none", "ldpc"),
                     help="digital payloads: none (uncoded QAM) or ldpc (CRC + 5G LDPC + QAM)")
    code_rate: float | None = param(None, lo=0.2, hi=0.925, help="LDPC code rate (with fec=ldpc; default 0.5)")
    seed: int | None = param(None, kind=int, lo=0, hi=2**63 - 1, help="channel noise seed (reproducible runs)")
    csi: str = param("perfect", kind=str, choices=("perfect", "estimated"),
                     help="receiver CSI: perfect (genie) or estimated from pilots that cost channel uses")
    pilots: int = param(8, kind=int, lo=1, hi=1024, help="pilot symbols per coherence block (with csi=estimated)")
    feedback_delay_ms: float = param(0.0, lo=0.0, hi=10_000.0, unit="ms",
                                     help="delay before the receiver's channel estimate reaches the transmitter")
    snr_trace_db: tuple[float, ...] | None = param(None, kind=list, lo=-60.0, hi=80.0, unit="dB",
                                                   help="SNR over time, one value per trace_step_ms from the "
                                                        "request's arrival (replaces snr_db)")
    snr_profile: str | None = param(None, kind=str, choices=tuple(PROFILES),
                                    help="a named SNR trace: " + ", ".join(PROFILES) + " (replaces snr_db)")
    trace_step_ms: float = param(DEFAULT_STEP_MS, lo=0.1, hi=3.6e6, unit="ms",
                                 help="time each value of the SNR trace holds")

    def validate(self) -> "LinkParams":
        validate_fields(self)
        if self.code_rate is not None and self.fec != "ldpc":
            raise ChannelError("channel.code_rate: only with fec=ldpc")
        if self.snr_profile is not None and self.snr_trace_db is not None:
            raise ChannelError("channel.snr_profile: give a profile or an snr_trace_db, not both")
        return self

    @property
    def trace(self) -> tuple[float, ...] | None:
        """The SNR trace this link follows (a profile expanded), None for a constant SNR."""
        if self.snr_trace_db is not None:
            return self.snr_trace_db
        return profile_trace(self.snr_profile) if self.snr_profile is not None else None

    @property
    def ldpc_rate(self) -> float:
        return self.code_rate if self.code_rate is not None else 0.5


@dataclass(frozen=True)
class ChannelSpec:
    """One link: ``model`` with its validated ``params`` and the ``link`` parameters."""

    model: str = "ideal"
    params: ChannelParams = field(default_factory=lambda: CHANNELS.get("ideal").Params())
    link: LinkParams = field(default_factory=LinkParams)

    @classmethod
    def create(cls, model: str = "ideal", **values: Any) -> "ChannelSpec":
        """From keyword values, e.g. ``ChannelSpec.create("awgn", snr_db=5, fec="ldpc")``."""
        return cls.from_mapping({"model": model, **values})

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "ChannelSpec":
        """From a flat mapping (``None`` values count as absent); every error names ``channel.<field>``."""
        values = {k: v for k, v in values.items() if v is not None}
        model = values.pop("model", "ideal")
        if model not in CHANNELS:
            raise ChannelError(f"channel.model: unknown channel model {model!r}; known: {', '.join(CHANNELS)}")
        link_names = {s.name for s in field_specs(LinkParams)}
        link_values = {k: v for k, v in values.items() if k in link_names}
        model_values = {k: v for k, v in values.items() if k not in link_names}
        link = build_params(LinkParams, link_values, owner="the link").validate()
        if link.trace is not None:
            # A trace replaces the constant SNR: the model's snr_db is the trace's value at the start.
            named = "snr_profile" if link.snr_profile is not None else "snr_trace_db"
            if CHANNELS.get(model).noiseless:
                raise ChannelError(f"channel.{named}: the {model} channel has no SNR to vary")
            if "snr_db" in model_values:
                raise ChannelError(f"channel.{named}: give snr_db or an SNR trace, not both")
            model_values["snr_db"] = link.trace[0]
        params = build_params(CHANNELS.get(model).Params, model_values, owner=f"the {model} channel")
        return cls(model, params, link)

    def at(self, t_ms: float) -> "ChannelSpec":
        """The link as it is ``t_ms`` after the start of its SNR trace (itself when the SNR is constant)."""
        trace = self.link.trace
        if trace is None:
            return self
        return ChannelSpec(self.model, dataclasses.replace(self.params, snr_db=snr_at(
            trace, self.link.trace_step_ms, t_ms)), self.link)

    def with_digital_link(self, modulation: str, fec: str, code_rate: float | None) -> "ChannelSpec":
        """The same link with another digital transceiver (what link adaptation chose), validated."""
        link = dataclasses.replace(self.link, modulation=modulation, fec=fec,
                                   code_rate=code_rate if fec == "ldpc" else None)
        return ChannelSpec(self.model, self.params, link.validate())

    @property
    def block_type(self) -> type[ChannelBlock]:
        return CHANNELS.get(self.model)

    @property
    def noiseless(self) -> bool:
        return self.block_type.noiseless

    @property
    def snr_db(self) -> float | None:
        return getattr(self.params, "snr_db", None)

    def block(self) -> ChannelBlock:
        return build_block(self.model, self.params, self.link.bandwidth_hz)

    def to_mapping(self) -> dict[str, Any]:
        """The flat mapping a REST client would send (defaults included; unset optionals left out)."""
        out: dict[str, Any] = {"model": self.model, **asdict(self.params), **asdict(self.link)}
        return {k: v for k, v in out.items() if v is not None}

    def to_proto(self, message: Any = None) -> Any:
        """The ``meg.v1.ChannelSpec`` of this link."""
        from meg.v1 import meg_pb2

        msg = message if message is not None else meg_pb2.ChannelSpec()
        msg.model = self.model
        for name, value in asdict(self.params).items():
            msg.params[name] = float(value)
        link = self.link
        msg.bandwidth_hz, msg.delay_ms = link.bandwidth_hz, link.delay_ms
        msg.modulation, msg.fec = link.modulation, link.fec
        if link.code_rate is not None:
            msg.code_rate = link.code_rate
        if link.seed is not None:
            msg.seed = link.seed
        msg.csi = link.csi
        msg.pilots = link.pilots
        msg.feedback_delay_ms = link.feedback_delay_ms
        if link.trace is not None:
            msg.snr_trace_db.extend(link.trace)
            msg.trace_step_ms = link.trace_step_ms
            del msg.params["snr_db"]  # the trace carries the SNR
        return msg

    @classmethod
    def from_proto(cls, msg: Any) -> "ChannelSpec":
        """Parse and validate a ``meg.v1.ChannelSpec``; raises :class:`ChannelError` naming the field."""
        values: dict[str, Any] = {"model": msg.model or "ideal", **dict(msg.params)}
        for name in ("bandwidth_hz", "delay_ms", "code_rate", "seed", "pilots", "feedback_delay_ms",
                     "trace_step_ms"):
            if msg.HasField(name):
                values[name] = getattr(msg, name)
        for name in ("modulation", "fec", "csi"):
            if getattr(msg, name):
                values[name] = getattr(msg, name)
        if msg.snr_trace_db:
            values["snr_trace_db"] = list(msg.snr_trace_db)
        return cls.from_mapping(values)


def schema_fields() -> dict[str, list[Any]]:
    """Every field a channel request may hold, with the models that take it (for schemas and CLIs)."""
    out: dict[str, list[Any]] = {}
    for name in CHANNELS:
        for spec in field_specs(CHANNELS.get(name).Params):
            out.setdefault(spec.name, [spec, []])[1].append(name)
    for spec in field_specs(LinkParams):
        out[spec.name] = [spec, list(CHANNELS)]
    return out


#: Link parameters that only matter when the channel can corrupt symbols (receiver CSI) or that choose the
#: digital transceiver, which a noiseless channel makes moot except for airtime.
NOISY_LINK_FIELDS = ("modulation", "fec", "code_rate", "csi", "pilots", "feedback_delay_ms", "snr_trace_db",
                     "snr_profile", "trace_step_ms")


def describe_channel(model: str) -> dict[str, Any]:
    """What ``GET /v1/channels`` lists for ``model``: its own parameters, then the link's that apply to it."""
    block = CHANNELS.get(model)
    entry = block.describe()
    link = [s.name for s in field_specs(LinkParams) if not (block.noiseless and s.name in NOISY_LINK_FIELDS)]
    entry["parameters"] = entry["parameters"] + link
    return entry
