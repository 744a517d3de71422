"""The channel models: one file each, one registry line here."""

from __future__ import annotations

from typing import Any

from serving.registry import Registry

from radio.block import ChannelBlock, ChannelParams

CHANNELS: Registry[type[ChannelBlock]] = Registry("channel model")

# Registration, in the order GET /v1/channels lists them.
from radio.channels import ideal  # noqa: E402,F401,I001
from radio.channels import awgn  # noqa: E402,F401
from radio.channels import rayleigh  # noqa: E402,F401
from radio.channels import rician  # noqa: E402,F401
from radio.channels import gilbert_elliott  # noqa: E402,F401


def channel_names() -> list[str]:
    return CHANNELS.names()


def is_noiseless(model: str) -> bool:
    """Whether ``model`` adds no noise; raises :class:`serving.registry.UnknownNameError` for an unknown one."""
    return CHANNELS.get(model).noiseless


def params_type(model: str) -> type[ChannelParams]:
    return CHANNELS.get(model).Params


def build_block(model: str, params: ChannelParams | dict[str, Any] | None = None,
                symbol_rate_hz: float = 1.0e6) -> ChannelBlock:
    """The block of ``model`` with ``params`` (a params instance, or a mapping checked field by field)."""
    from radio.params import build_params

    cls = CHANNELS.get(model)
    if isinstance(params, dict):
        params = build_params(cls.Params, params, owner=f"the {model} channel")
    return cls(params, symbol_rate_hz)
