"""Prometheus metrics shared by the three services: one naming scheme, one label set.

Every service builds its own :class:`MegMetrics` on its own registry (no module-level globals), so tests can
run several services in one process. Metric names are the contract that dashboards and alerts rely on;
:data:`METRIC_NAMES` lists them and a test checks every Grafana panel against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets sized for this testbed: a CPU request takes 10 ms..30 s, a GPU one 50 ms..60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BYTES_BUCKETS = tuple(float(2**k) for k in range(5, 28, 2))  # 32 B .. 128 MiB
TOKEN_BYTES_BUCKETS = tuple(float(2**k) for k in range(2, 17))  # 4 B .. 64 KiB: one row of hidden states
SYMBOLS_BUCKETS = tuple(float(2**k) for k in range(8, 31, 2))  # 256 .. 1 G channel uses
RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0, 1.5, 2.0, 5.0)
PSNR_BUCKETS = (5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 50.0, 60.0)
SSIM_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

#: Pipeline stages timed by ``meg_stage_seconds``.
STAGES = ("queue_wait", "text_encode", "denoise", "encode", "airtime", "channel", "decode", "end_to_end")

#: Every metric family the services export (names without the ``_bucket``/``_total`` suffixes Prometheus adds).
METRIC_NAMES = (
    "meg_stage_seconds",
    "meg_request_payload_bytes",
    "meg_request_symbols",
    "meg_rate_capacity_ratio",
    "meg_image_psnr_db",
    "meg_image_msssim",
    "meg_requests_in_flight",
    "meg_queue_depth",
    "meg_errors_total",
    "meg_requests_total",
    "meg_batch_size",
    "meg_llm_sessions",
    "meg_llm_ttft_seconds",
    "meg_llm_tpot_seconds",
    "meg_llm_token_payload_bytes",
    "meg_link_snr_db",
    "meg_link_snr_estimate_db",
)

_REQUEST_LABELS = ("service", "model", "codec", "channel", "snr_bucket")


def snr_bucket(snr_db: float | None) -> str:
    """A low-cardinality label for an SNR: 5 dB wide buckets such as ``"0..5"``; ``"ideal"`` without noise
    (``None``: a noiseless channel)."""
    if snr_db is None or math.isinf(snr_db):
        return "ideal"
    low = int(math.floor(snr_db / 5.0) * 5)
    return f"{low}..{low + 5}"


def shannon_capacity_bits_per_symbol(snr_db: float) -> float:
    """AWGN capacity of a complex channel use, log2(1 + SNR)."""
    return math.log2(1.0 + 10.0 ** (snr_db / 10.0))


@dataclass
class MegMetrics:
    """The metric families of one service, registered on ``registry``."""

    service: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.stage_seconds = Histogram(
            "meg_stage_seconds", "Latency of one pipeline stage of one request",
            (*_REQUEST_LABELS, "stage"), buckets=LATENCY_BUCKETS, registry=r)
        # Prometheus wants base units: bytes here, while the REST API reports bits (bits_sent).
        self.payload_bytes = Histogram(
            "meg_request_payload_bytes", "Payload bytes sent over the air per request (digital payloads)",
            _REQUEST_LABELS, buckets=BYTES_BUCKETS, registry=r)
        self.request_symbols = Histogram(
            "meg_request_symbols", "Complex channel uses per request",
            _REQUEST_LABELS, buckets=SYMBOLS_BUCKETS, registry=r)
        self.rate_capacity_ratio = Histogram(
            "meg_rate_capacity_ratio", "Achieved bits per channel use divided by the Shannon capacity at that SNR",
            _REQUEST_LABELS, buckets=RATIO_BUCKETS, registry=r)
        self.image_psnr_db = Histogram(
            "meg_image_psnr_db", "PSNR of the received image against the clean decode",
            _REQUEST_LABELS, buckets=PSNR_BUCKETS, registry=r)
        self.image_ms_ssim = Histogram(
            "meg_image_msssim", "MS-SSIM of the received image against the clean decode",
            _REQUEST_LABELS, buckets=SSIM_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "meg_requests_in_flight", "Requests being served now", ("service",), registry=r)
        self.queue_depth = Gauge(
            "meg_queue_depth", "Requests waiting for compute", ("service",), registry=r)
        self.errors = Counter(
            "meg_errors", "Failed requests by kind", ("service", "kind"), registry=r)
        self.requests = Counter(
            "meg_requests", "Finished requests", ("service", "codec", "channel", "status"), registry=r)
        self.batch_size = Histogram(
            "meg_batch_size", "Requests per compute batch", ("service",), buckets=BATCH_BUCKETS, registry=r)
        # The split language model: open sessions (edge), and per answer its time to first token, time per
        # output token and the payload bytes of each token's hidden state (device).
        self.llm_sessions = Gauge(
            "meg_llm_sessions", "Open language-model sessions (each holds a KV cache)", ("service",), registry=r)
        self.llm_ttft = Histogram(
            "meg_llm_ttft_seconds", "Time to first token of a language-model answer",
            _REQUEST_LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.llm_tpot = Histogram(
            "meg_llm_tpot_seconds", "Mean time per output token after the first, per answer",
            _REQUEST_LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.llm_token_bytes = Histogram(
            "meg_llm_token_payload_bytes", "Payload bytes of one decode step's hidden state over the air",
            _REQUEST_LABELS, buckets=TOKEN_BYTES_BUCKETS, registry=r)
        # The link as it is now: the SNR applied to the last transmission (it follows an SNR trace) and the
        # receiver's last estimate fed back to the edge (pilots, with estimation error), per channel model.
        self.link_snr_db = Gauge(
            "meg_link_snr_db", "SNR the link applied to its last transmission", ("service", "channel"), registry=r)
        self.link_snr_estimate_db = Gauge(
            "meg_link_snr_estimate_db", "The receiver's last SNR estimate, fed back to the transmitter",
            ("service", "channel"), registry=r)
        # Make the unlabelled gauges visible from the first scrape, so dashboards show 0 rather than "no data".
        self.in_flight.labels(self.service).set(0)
        self.queue_depth.labels(self.service).set(0)
        self.llm_sessions.labels(self.service).set(0)

    def labels(self, model: str, codec: str, channel: str, snr_db: float | None) -> dict[str, str]:
        """The common label set of one request (``snr_db`` None for a noiseless channel)."""
        return {"service": self.service, "model": model, "codec": codec, "channel": channel,
                "snr_bucket": snr_bucket(snr_db)}

    def observe_stage(self, labels: dict[str, str], stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.stage_seconds.labels(**labels, stage=stage).observe(max(seconds, 0.0))

    def error(self, kind: str) -> None:
        self.errors.labels(self.service, kind).inc()
