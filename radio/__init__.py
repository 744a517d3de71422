"""The radio link as one set of typed blocks, shared by the channel emulator, the device's REST schema, JSCC
and decoder training, and the benchmarks. Imports no service (no gRPC servicer, no FastAPI).

* :mod:`radio.params` — parameter fields with ranges (:func:`param`) and their validation;
* :mod:`radio.block` — :class:`ChannelBlock`, the one torch implementation of y = h·x + n and equalisation;
* :mod:`radio.channels` — one file per channel model, registered in :data:`CHANNELS`;
* :mod:`radio.spec` — :class:`ChannelSpec`: a channel model, its parameters and the link's (bandwidth, delay,
  modulation, FEC), parsed from REST/CLI mappings or the ``meg.v1`` wire and validated in one place;
* :mod:`radio.modulation` — Gray QAM, hard decisions, uncoded BER;
* :mod:`radio.digital` — the CRC + 5G LDPC + QAM chain (Sionna), a block of the same kind;
* :mod:`radio.link` — :class:`Link`: what one payload goes through, with airtime accounting.
"""

from radio.block import ChannelBlock, ChannelError, ChannelOutput
from radio.channels import CHANNELS, build_block, channel_names, is_noiseless, params_type
from radio.spec import ChannelSpec, LinkParams

__all__ = ["CHANNELS", "ChannelBlock", "ChannelError", "ChannelOutput", "ChannelSpec", "LinkParams", "build_block",
           "channel_names", "is_noiseless", "params_type"]
