"""Feature codecs shared by edge and device. Imports no service.

Importing this package registers the built-in stages and codecs; add a new one with one file and one line
in the list below.
"""

from codec import (  # noqa: F401  (registration side effects)
    analog, hidden_jscc, hidden_quant, hidden_sets, jscc, learned, merging, outliers, packing, raw, transforms, uint8_rans,
)
from codec.base import Codec, CodecError, EncodedPayload, TensorInfo
from codec.registry import build_codec, codec_names, list_codecs

__all__ = ["Codec", "CodecError", "EncodedPayload", "TensorInfo", "build_codec", "codec_names", "list_codecs"]
