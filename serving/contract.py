"""The serving contract every service implements, in the style of LitServe's ``LitAPI``.

A request is handled in three steps, each small enough to read and test on its own:

* :meth:`StreamingApi.decode_request` validates the wire request and turns it into the work to do; bad input
  raises :class:`RequestError` with :attr:`Status.INVALID` and a message naming the field;
* :meth:`StreamingApi.run` does the work (queue for compute, call upstream, pass the link ...);
* :meth:`StreamingApi.encode_response` turns the result into response frames.

Transport adapters (:mod:`serving.grpc_service`) own everything else once: request ids, the in-flight gauge,
the request counter with its status label, and mapping :class:`Status` to gRPC or HTTP codes.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Generic, TypeVar

Req = TypeVar("Req")
Work = TypeVar("Work")
Result = TypeVar("Result")
Frame = TypeVar("Frame")


class Status(enum.Enum):
    """Transport-neutral outcome of a refused or failed request: (gRPC status name, HTTP status, label)."""

    INVALID = ("INVALID_ARGUMENT", 422, "invalid")
    OVERLOADED = ("RESOURCE_EXHAUSTED", 503, "overloaded")
    UNAVAILABLE = ("UNAVAILABLE", 503, "unavailable")
    DEADLINE = ("DEADLINE_EXCEEDED", 504, "deadline")
    BAD_STREAM = ("DATA_LOSS", 502, "bad_stream")
    CANCELLED = ("CANCELLED", 499, "cancelled")
    INTERNAL = ("INTERNAL", 500, "error")

    @property
    def grpc_name(self) -> str:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]

    @property
    def label(self) -> str:
        return self.value[2]

    @classmethod
    def from_grpc_name(cls, name: str) -> "Status":
        for status in cls:
            if status.grpc_name == name:
                return status
        return cls.INTERNAL

    @classmethod
    def from_http(cls, code: int) -> "Status":
        for status in cls:
            if status.http_status == code:
                return status
        return cls.BAD_STREAM if 500 <= code < 600 else cls.INVALID


class RequestError(Exception):
    """A request the service refuses or cannot finish, with what the caller should be told."""

    def __init__(self, status: Status, message: str, retry_after_s: float | None = None,
                 label: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        #: status label of the request counter (defaults to the status's own label)
        self.label = label or status.label


@dataclass
class CallContext:
    """What a handler may know about its call besides the request itself."""

    request_id: str
    #: seconds left before the caller's deadline, or None when it set none
    time_remaining: Callable[[], float | None] = lambda: None
    #: ``codec`` and ``channel`` labels of the request counter, from :meth:`StreamingApi.metric_labels`; a
    #: handler may refine them once it knows more (bounded values only)
    labels: dict[str, str] = field(default_factory=dict)


class StreamingApi(abc.ABC, Generic[Req, Work, Result, Frame]):
    """A served method answering one request with a stream of frames."""

    #: the service's name in metrics and logs ("edge", "channel" ...)
    service: str = ""

    def metric_labels(self, request: Req) -> tuple[str, str]:
        """(codec, channel) labels of the request counter, from fixed sets only: free text from a request
        must never create metric series."""
        return "-", "-"

    @abc.abstractmethod
    async def decode_request(self, request: Req, ctx: CallContext) -> Work:
        """Validate ``request``; raise :class:`RequestError` (``Status.INVALID``) naming the bad field."""

    @abc.abstractmethod
    async def run(self, work: Work, ctx: CallContext) -> Result:
        """Do the work; raise :class:`RequestError` for refusals the caller should see."""

    @abc.abstractmethod
    def encode_response(self, result: Result, ctx: CallContext) -> AsyncIterator[Frame]:
        """The response frames of ``result``."""
