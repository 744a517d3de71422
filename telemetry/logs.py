"""Logging with request ids: every record carries the id of the request being served, when there is one.

Also the one place where the known, harmless warnings of the libraries the services load are silenced
(:func:`quiet_known_warnings`), so a start-up log shows what the testbed does rather than library noise.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import warnings

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("meg_request_id", default="-")


def set_request_id(request_id: str) -> contextvars.Token[str]:
    """Tag log records of the current task (and tasks it spawns) with ``request_id``."""
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str]) -> None:
    _request_id.reset(token)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get()
        return True


class _DropMessages(logging.Filter):
    """Drops records of one logger whose message contains every fragment of one of ``patterns``."""

    def __init__(self, *patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(all(fragment in message for fragment in pattern) for pattern in self.patterns)


#: Library log records that say nothing actionable on this testbed: logger name -> message fragments.
KNOWN_LOG_NOISE: dict[str, tuple[tuple[str, ...], ...]] = {
    # diffusers asks for `accelerate` on every from_pretrained; it only speeds up loading big checkpoints,
    # and the embedded model loads in milliseconds without it.
    "diffusers.models.modeling_utils": (("`accelerate` was not found",),),
    # The embedded tiny decoders' config.json carries `block_out_channels` (written by the diffusers version
    # that trained them); AutoencoderTiny ignores it. Only this pair is dropped: other unexpected config
    # attributes may well be a user's real mistake.
    "diffusers.configuration_utils": (("AutoencoderTiny", "block_out_channels", "will be ignored"),),
}


def quiet_known_warnings() -> None:
    """Silence the known, harmless warnings of the libraries a service loads. Idempotent.

    Call before those libraries are imported (``configure_logging`` does): some warn at import time, and
    progress-bar settings are read when a library is first imported.
    """
    # compressai imports torch_geometric, whose import calls torch.jit.script (deprecated in torch 2.10+):
    # nothing of ours uses TorchScript.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    # transformers draws a "Loading weights" progress bar per model load: noise in a service log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported: the environment variable came too late
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    for name, patterns in KNOWN_LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*patterns))


def configure_logging(service: str, level: str | int = "INFO") -> None:
    """Configure the root logger of a service process: one line per record, with service and request id.

    Also silences known library noise (:func:`quiet_known_warnings`) and, above DEBUG, the per-request
    INFO lines of the HTTP client (health polls would otherwise log every half second).
    """
    quiet_known_warnings()
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {service} [%(request_id)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    client_level = logging.DEBUG if root.getEffectiveLevel() <= logging.DEBUG else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(client_level)
