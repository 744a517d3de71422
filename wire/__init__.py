"""The wire: payloads and their ``meg.v1`` framing, shared by every service. Imports no codec and no service."""

from wire.framing import ReceivedStream, StreamAssembler, StreamError
from wire.payload import CodecError, EncodedPayload, TensorInfo

__all__ = ["CodecError", "EncodedPayload", "ReceivedStream", "StreamAssembler", "StreamError", "TensorInfo"]
