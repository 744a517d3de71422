"""``meg bench snr``: image quality and semantics versus SNR for digital, MEG and E2E-MEG transmission.

Why: the issue's claim is that analog latent transmission (MEG-DT) and the learned merged JSCC (E2E-MEG-DT)
degrade gracefully where a digital link falls off its cliff. This benchmark puts every scheme through the
same link as the channel emulator (:class:`radio.link.Link`, SNR relative to the measured power of what is sent) on the
SAME held-out latents and scores what the device would show:

* **raw-fp16 (uncoded QPSK)**: the latent as float16 bytes, Gray QPSK, hard decisions, no FEC
  (:func:`radio.link.transmit_uncoded`); the standard tiny decoder.
* **<entropy coder> + LDPC** at two rates: the latent entropy-coded
  (the learned ``hyperprior`` when it loads, else ``uint8`` + rANS), then CRC + 5G LDPC + QAM. A payload with
  an erased block is concealed: the decoder is tried on the zero-filled bytes, and when the bitstream cannot
  be decoded the image's latent is replaced by zeros (the prior mean), never an exception.
* **MEG (analog + robust decoder)**: the ``analog`` preset, decoded by the noise-robust decoder.
* **JSCC** and **E2E-MEG (merge + JSCC)**: the learned links of :mod:`codec.jscc`, decoded by the decoder
  they were trained through.

Metrics against the clean VAE decode of each latent: PSNR, MS-SSIM (64×64 images are too small for the
default 5 scales with an 11-pixel window, so 3 scales with the first three standard weights renormalised and
a 7-pixel window), the classifier's accuracy (all of shape, colour and background right, against the
prompt's labels) and the Fréchet distance of its features (``shapes_frechet_distance``; FID-style, not
Inception). Results go to ``snr.csv``, ``snr.png`` and ``snr.md`` in the output folder.

Modes: full (216 diffusion latents, −20…20 dB, every envelope configuration; the time of the last run is in
``snr.md``), ``--quick`` (54 latents, one per label combination, −5…20 dB), ``--smoke`` (6 VAE-encoded latents
at −5 and 10 dB; seconds, for tests). Cost is kept down without changing what is measured: see
:class:`Transmitter`, and ``--jobs`` (default 2) runs the schemes in worker processes with the same rows.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import codec
from bench.stats import bootstrap_ci, paired_difference
from codec.adaptation import table_from_snr_csv
from codec.base import CodecError
from codec.image_sets import image_set_dir
from device_client.receiver import link_may_have_damaged, receive_features
from radio import ChannelSpec, channel_names, is_noiseless
from radio.link import Link
from wire.payload import EncodedPayload
from models import DEFAULT_MODEL_DIR

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_SNRS_DB = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0)
FULL_SNRS_DB = (-20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0)
SMOKE_SNRS_DB = (-5.0, 10.0)
SMOKE_IMAGES = 6
CHANNELS = ("awgn", "rayleigh")
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)  # the first three standard MS-SSIM weights (renormalised by us)
CSV_COLUMNS = ("scheme", "kind", "channel", "snr_db", "n_images", "symbols_per_image", "bits_per_image",
               "side_symbols_per_image", "channel_uses_per_image", "psnr_db", "psnr_ci_low", "psnr_ci_high",
               "psnr_std_db", "ms_ssim", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "fd", "erased_fraction",
               "config", "grid")
#: How counted side information (analog gains, merge maps) crosses the link: a protected digital block at
#: QPSK with a rate-1/2 LDPC code, i.e. one information bit per complex channel use (CRC and padding aside).
SIDE_INFO_BITS_PER_SYMBOL = 1.0
SIDE_INFO_MCS = "QPSK + LDPC r1/2"
#: The digital envelope: every quality of this coder x modulation x LDPC rate that fits a budget.
ENVELOPE_CODER = "gained-native"
ENVELOPE_QUALITIES = (1, 2, 3, 4)
ENVELOPE_MODULATIONS = ("qpsk", "16qam", "64qam")
ENVELOPE_RATES = ("1/2", "3/4")
#: Channel-use budgets per image, in channel uses per latent value: E2E-MEG's own (0.25) and twice it.
BUDGET_USES_PER_VALUE = (0.25, 0.5)
#: Images the digital cliffs are measured again on (the first of the held-out set: one per label combination).
CLIFF_IMAGES = 54
#: E2E-MEG whose merging is learned inside the JSCC network (nothing to send; issue 14's cheap side information).
LEARNED_MERGE = "E2E-MEG (learned merge)"
#: The learned analog links: (codec preset, JSCC weights in the codec set, scheme name).
JSCC_SCHEMES = (("jscc", "jscc_full", "JSCC (no merge)"), ("e2e-meg", "jscc_e2e", "E2E-MEG"),
                ("e2e-meg-fixed", "jscc_e2e_fixed", "E2E-MEG (fixed merge map)"),
                ("e2e-meg-learned", "jscc_e2e_learned", LEARNED_MERGE))
#: the paper's FID curve (REFERENCES.md), SNR −20…20 dB in 5 dB steps
PAPER_FID = {"MEG-DT": (197.7, 187.5, 41.4, 3.5, 5.9, 4.0, 2.6, 1.8, 1.5),
             "E2E-MEG-DT": (176.5, 147.1, 6.2, 6.2, 7.3, 6.0, 5.1, 4.7, 4.8)}


@dataclass
class Family:
    """What the benchmark needs from the embedded model: VAE (reference decodes), device decoders, judge."""

    vae: torch.nn.Module
    decoders: dict[str, torch.nn.Module]
    classifier: torch.nn.Module
    root: Path


@dataclass
class Scheme:
    """One transmission scheme: a codec, how its payload crosses a channel, and the device decoder."""

    name: str
    codec_name: str
    decoder: str
    transport: str  # "analog" | "uncoded" | "ldpc"
    modulation: str = "qpsk"
    code_rate: str = "1/2"
    params: dict[str, str] = field(default_factory=dict)
    batched: bool = False  # code all images as one batch (JSCC: per-image normalisation makes it equivalent)
    envelope: bool = False  # a configuration of the digital envelope (reported through the envelope rows)

    @property
    def kind(self) -> str:
        return "analog" if self.transport == "analog" else "digital"


@dataclass
class HeldOut:
    """The held-out latents, their clean reference images in [0, 1] and prompt labels (N, 3)."""

    latents: torch.Tensor
    reference: torch.Tensor
    labels: torch.Tensor
    source: str


def load_family(root: Path) -> Family:
    """Load the VAE, the tiny and robust decoders and the classifier of the embedded model."""
    from models import components
    from models.classifier import ShapesClassifier

    decoders = {name: components.load_tiny(root, name) for name in ("tiny_decoder", "robust_decoder")
                if (root / name).is_dir()}
    return Family(components.load_vae(root), decoders, ShapesClassifier.from_pretrained(root / "classifier"), root)


@torch.no_grad()
def held_out_latents(family: Family, n: int, source: str, start: int = 0) -> HeldOut:
    """``n`` balanced held-out prompts from the ``start``-th on: diffusion latents (``source="diffusion"``,
    what the edge really sends) or VAE encodings of the rendered reference images (``"vae"``, fast, for tests)."""
    from models import components
    from models.decoders import decode_latents
    from models.sampling import generate_latents
    from models.shapes import caption_to_labels, heldout_sample, heldout_set, image_to_tensor, labels_to_indices

    pairs = heldout_set(n, start)
    labels = torch.tensor([labels_to_indices(*caption_to_labels(c)) for c, _ in pairs])
    if source == "diffusion":
        root = family.root
        latents = generate_latents(components.load_tokenizer(root), components.load_text_encoder(root),
                                   components.load_unet(root), components.load_scheduler(root),
                                   [c for c, _ in pairs], [s for _, s in pairs],
                                   scaling_factor=float(family.vae.config.scaling_factor))
    elif source == "vae":
        images = torch.stack([image_to_tensor(heldout_sample(c, s).image) for c, s in pairs])
        latents = family.vae.encode(images).latent_dist.mean
    else:
        raise ValueError(f"unknown latent source {source!r}: 'diffusion' or 'vae'")
    return HeldOut(latents.float(), decode_latents(family.vae, latents), labels, source)


def available_schemes(family: Family, with_jscc_full: bool = True) -> list[Scheme]:
    """Every scheme whose pieces exist now (digital chain, learned coder, JSCC weights), in plot order."""
    schemes = [Scheme("raw-fp16 uncoded QPSK", "raw-fp16", "tiny_decoder", "uncoded")]
    weights = image_set_dir(family.root)
    coder = _entropy_coder(weights)
    schemes += [Scheme(f"{coder}+LDPC QPSK r1/2", coder, "tiny_decoder", "ldpc", "qpsk", "1/2"),
                Scheme(f"{coder}+LDPC 16QAM r2/3", coder, "tiny_decoder", "ldpc", "16qam", "2/3")]
    robust = "robust_decoder" if "robust_decoder" in family.decoders else "tiny_decoder"
    schemes.append(Scheme("MEG (analog)", "analog", robust, "analog"))
    from codec.jscc import JsccNet
    from codec.transforms import resolve_weights_file

    for name, model, label in JSCC_SCHEMES:
        if name == "jscc" and not with_jscc_full:
            continue
        try:
            path = resolve_weights_file(model[len("jscc_"):], "jscc_", ".safetensors", weights)
            decoder = str(JsccNet.load(path).config.get("decoder", robust))
        except CodecError as exc:
            logger.warning("skipping %s: %s", label, exc)
            continue
        schemes.append(Scheme(label, name, decoder if decoder in family.decoders else robust, "analog",
                              batched=True))
    return schemes


def budgets_for(latents: torch.Tensor) -> tuple[int, ...]:
    """The stated channel-use budgets per image for latents of this size."""
    values = int(latents[0].numel())
    return tuple(int(round(f * values)) for f in BUDGET_USES_PER_VALUE)


PayloadCache = dict[tuple[str, tuple[tuple[str, str], ...]], list[EncodedPayload]]


def digital_payloads(codec_name: str, params: dict[str, str], latents: torch.Tensor, weights: Path,
                     cache: PayloadCache) -> list[EncodedPayload]:
    """Each latent's payload, encoded once per (codec, params) for the whole run: a payload does not depend on
    the channel, so the schemes that send it over different MCS (and the envelope's sizing) share it. A cache
    serves one run, i.e. one set of latents and one codec set."""
    key = (codec_name, tuple(sorted(params.items())))
    if key not in cache:
        c = codec.build_codec(codec_name, dict(params), weights)
        cache[key] = [c.encode({"latents": lat[None]}) for lat in latents]
    return cache[key]


def envelope_schemes(family: Family, latents: torch.Tensor, max_uses: int, cache: PayloadCache) -> list[Scheme]:
    """Every (quality, modulation, LDPC rate) of :data:`ENVELOPE_CODER` whose mean channel uses per image fit
    ``max_uses`` (the largest budget); payload sizes are those of these very latents."""
    from radio.digital import DigitalChain, DigitalChainConfig

    weights = image_set_dir(family.root)
    out = []
    for q in ENVELOPE_QUALITIES:
        try:
            payloads = digital_payloads(ENVELOPE_CODER, {"learned_quality": str(q)}, latents, weights, cache)
        except CodecError as exc:
            logger.warning("no digital envelope: %s", exc)
            return []
        sizes = [len(p.data) for p in payloads]
        for mod in ENVELOPE_MODULATIONS:
            for rate in ENVELOPE_RATES:
                chain = DigitalChain(DigitalChainConfig(modulation=mod, code_rate=rate))
                uses = float(np.mean([chain.symbols_for(n) for n in sizes]))
                if uses <= max_uses:
                    out.append(Scheme(f"{ENVELOPE_CODER} q{q}+LDPC {mod.upper()} r{rate}", ENVELOPE_CODER,
                                      "tiny_decoder", "ldpc", mod, rate, params={"learned_quality": str(q)},
                                      envelope=True))
    return out


def envelope_rows(rows: list[dict[str, object]], budgets: tuple[int, ...]) -> list[dict[str, object]]:
    """Per budget, channel and SNR, the best configuration of the digital envelope that fits (by PSNR), as a
    row named ``digital envelope ≤B uses`` carrying that configuration's metrics and name (``config``)."""
    members = [r for r in rows if r.get("_envelope")]
    out: list[dict[str, object]] = []
    for budget in budgets:
        cells: dict[tuple[str, float], dict[str, object]] = {}
        for r in members:
            if float(r["channel_uses_per_image"]) > budget:  # type: ignore[arg-type]
                continue
            key = (str(r["channel"]), float(r["snr_db"]))  # type: ignore[arg-type]
            if key not in cells or float(r["psnr_db"]) > float(cells[key]["psnr_db"]):  # type: ignore[arg-type]
                cells[key] = r
        for r in cells.values():
            out.append({**r, "scheme": f"digital envelope ≤{budget} uses", "config": r["scheme"], "_envelope": False})
    return out


def _entropy_coder(weights: Path) -> str:
    """``hyperprior`` when the learned coders of the codec set ``weights`` load and round-trip a latent, else
    ``uint8``."""
    try:
        if importlib.util.find_spec("codec.learned") is not None:
            importlib.import_module("codec.learned")
        if "hyperprior" in codec.codec_names():
            c = codec.build_codec("hyperprior", weights_dir=weights)
            c.decode(c.encode({"latents": torch.zeros(1, 4, 16, 16)}))
            return "hyperprior"
    except Exception as exc:  # noqa: BLE001 - any failure of another team's coder means: use the fallback
        logger.warning("learned hyperprior unavailable (%s); using uint8", exc)
    return "uint8"


@dataclass
class CellResult:
    """One (scheme, channel, SNR) cell: the latents the device reconstructs and per-image link counters."""

    latents: torch.Tensor
    symbols: list[int]
    bits: list[int]
    erased: list[float]


class Transmitter:
    """Sends the held-out latents through one scheme, one image (one request) at a time, with the product's
    own code: :class:`radio.link.Link` (what the channel emulator applies to a request) and
    :func:`device_client.receiver.receive_features` (what the device decodes, conceals and clamps).

    What does not depend on the channel is done once per scheme, not once per cell: a digital payload is the
    same at every SNR. LDPC code blocks of all images are decoded in shared batches
    (:meth:`Link.send_digital_many`, equivalent to one :meth:`Link.send` per image); JSCC images are encoded
    as one batch (per-image power normalisation makes it equivalent) and each image's symbols then cross the
    link as its own request would.
    """

    def __init__(self, scheme: Scheme, latents: torch.Tensor, link: Link | None = None,
                 weights: Path | None = None, payload_cache: PayloadCache | None = None) -> None:
        self.scheme = scheme
        self.latents = latents
        self.link = link or Link(decode_batch=256)  # large decoder batches: every image's blocks together
        # The image codec set of the model whose latents are sent (the embedded one by default), as the edge uses.
        self.weights = weights if weights is not None else image_set_dir(DEFAULT_MODEL_DIR)
        self._payloads: list[EncodedPayload] = []
        if scheme.kind == "digital":
            self._codec = codec.build_codec(scheme.codec_name, dict(scheme.params), self.weights)
            self._payloads = digital_payloads(scheme.codec_name, scheme.params, latents, self.weights,
                                              payload_cache if payload_cache is not None else {})

    def spec(self, channel_name: str, snr_db: float) -> ChannelSpec:
        s = self.scheme
        digital = {"modulation": s.modulation, "fec": "ldpc" if s.transport == "ldpc" else "none",
                   "code_rate": float(Fraction(s.code_rate)) if s.transport == "ldpc" else None} \
            if s.kind == "digital" else {}
        snr = {} if is_noiseless(channel_name) else {"snr_db": snr_db}
        return ChannelSpec.create(channel_name, **snr, **digital)

    def _codec_for(self, spec: ChannelSpec) -> codec.Codec:
        params = dict(self.scheme.params)
        if spec.snr_db is not None:
            params["channel_snr_db"] = f"{spec.snr_db:g}"  # what the edge does for SNR-adaptive codecs
        return codec.build_codec(self.scheme.codec_name, params, self.weights)

    def _analog_payloads(self, c: codec.Codec) -> list[EncodedPayload]:
        return [c.encode({"latents": lat[None]}) for lat in self.latents]

    def _batched_analog_payloads(self, c: codec.Codec) -> tuple[list[EncodedPayload], EncodedPayload]:
        """One batch encode cut into per-image payloads (each with a lone image's header), and the batch."""
        batch = c.encode({"latents": self.latents})
        per_image = batch.symbols.reshape(len(self.latents), -1)
        single = c.encode({"latents": self.latents[:1]})
        return [EncodedPayload("analog", single.tensors, single.params, symbols=row) for row in per_image], batch

    def send_all(self, channel_name: str, snr_db: float, generator: torch.Generator) -> CellResult:
        spec = self.spec(channel_name, snr_db)
        if self.scheme.kind == "analog":
            return self._send_analog(spec, generator)
        if self.scheme.transport == "ldpc":
            results = self.link.send_digital_many(spec, self._payloads, generator)
        else:
            results = [self.link.send(spec, p, generator) for p in self._payloads]
        out, erased = [], []
        for payload, res in zip(self._payloads, results):
            rx = receive_features(self._codec, res.payload, link_may_have_damaged(spec, res.payload, res.erased))
            out.append(rx.tensors["latents"][0])
            erased.append(1.0 if rx.concealed else res.erased_bytes / max(len(payload.data), 1))
        return CellResult(torch.stack(out), [r.symbols for r in results], [p.bits_sent for p in self._payloads],
                          erased)

    def _send_analog(self, spec: ChannelSpec, generator: torch.Generator) -> CellResult:
        c = self._codec_for(spec)
        if self.scheme.batched:
            payloads, batch = self._batched_analog_payloads(c)
            received = [self.link.send(spec, p, generator).payload.symbols for p in payloads]
            rx = EncodedPayload("analog", batch.tensors, batch.params, symbols=np.concatenate(received))
            decoded = list(receive_features(c, rx, False).tensors["latents"])
        else:
            payloads = self._analog_payloads(c)
            decoded = [receive_features(c, self.link.send(spec, p, generator).payload, False).tensors["latents"][0]
                       for p in payloads]
        n = len(self.latents)
        return CellResult(torch.stack(decoded), [int(payloads[0].symbols_sent)] * n, [payloads[0].bits_sent] * n,
                          [0.0] * n)


def cell_generator(*key: int) -> torch.Generator:
    """The channel's random stream of one (scheme, channel, SNR) cell: reproducible, independent per cell."""
    return torch.Generator("cpu").manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def psnr_db(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [0, 1]."""
    mse = (images - reference).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


def ms_ssim_64(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM for 64×64 images: 3 scales (the first three standard weights, renormalised) and a
    7-pixel Gaussian window. ``pytorch_msssim.ms_ssim`` asserts a side > 96 px whatever the scale count, so
    this repeats its formula (relu'd contrast-structure terms at the coarser scales, SSIM at the last) on
    its own ``_ssim`` building block."""
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    w = torch.tensor(MSSSIM_WEIGHTS, dtype=images.dtype)
    w = w / w.sum()
    win = _fspecial_gauss_1d(7, 1.5).repeat([images.shape[1], 1, 1, 1])
    x, y, terms = images, reference, []
    for level in range(len(w)):
        ssim_pc, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False, K=(0.01, 0.03))
        if level < len(w) - 1:
            terms.append(torch.relu(cs))
            x = torch.nn.functional.avg_pool2d(x, 2, padding=[d % 2 for d in x.shape[2:]])
            y = torch.nn.functional.avg_pool2d(y, 2, padding=[d % 2 for d in y.shape[2:]])
    terms.append(torch.relu(ssim_pc))
    return torch.prod(torch.stack(terms) ** w.view(-1, 1, 1), dim=0).mean(dim=1)


@dataclass
class ReferenceStats:
    """Gaussian fit of the classifier features of the reference images, computed once per run: every cell's
    Fréchet distance compares against the same set, and the reference covariance's square root dominates
    the cost of one distance."""

    mean: np.ndarray
    cov: np.ndarray
    cov_sqrt: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "ReferenceStats":
        cov = np.atleast_2d(np.cov(features, rowvar=False))
        vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
        return cls(features.mean(0), cov, (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T)

    def frechet(self, features: np.ndarray) -> float:
        """Fréchet distance of ``features`` to the reference fit: the formula of
        :func:`models.classifier.frechet_distance` (symmetric in its arguments), with the reference's
        square root reused."""
        mu = features.mean(0)
        cov = np.atleast_2d(np.cov(features, rowvar=False))
        middle = self.cov_sqrt @ cov @ self.cov_sqrt
        tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
        diff = mu - self.mean
        return float(diff @ diff + np.trace(cov) + np.trace(self.cov) - 2 * tr_covmean)


@torch.no_grad()
def score(family: Family, held: HeldOut, images: torch.Tensor, ref: ReferenceStats | None = None
          ) -> dict[str, float]:
    """PSNR, MS-SSIM, classifier accuracy and Fréchet distance of received images against the references."""
    from models.shapes import BACKGROUNDS, COLORS, SHAPES

    p = psnr_db(images, held.reference)
    scaled = images * 2.0 - 1.0
    preds = family.classifier.predict(scaled)
    idx = torch.tensor([(SHAPES.index(s), COLORS.index(c), BACKGROUNDS.index(b)) for c, s, b in preds])
    right = (idx == held.labels).all(dim=1).float()
    acc = float(right.mean())
    psnr_lo, psnr_hi = bootstrap_ci(p.numpy())
    acc_lo, acc_hi = bootstrap_ci(right.numpy())
    fd = float("nan")
    if images.shape[0] > 1:
        ref = ref or ReferenceStats.of(family.classifier.embed(held.reference * 2.0 - 1.0).double().numpy())
        fd = ref.frechet(family.classifier.embed(scaled).double().numpy())
    return {"psnr_db": float(p.mean()), "psnr_std_db": float(p.std()) if p.numel() > 1 else 0.0,
            "psnr_ci_low": psnr_lo, "psnr_ci_high": psnr_hi, "ms_ssim": float(ms_ssim_64(images, held.reference).mean()),
            "accuracy": acc, "accuracy_ci_low": acc_lo, "accuracy_ci_high": acc_hi, "fd": float(fd),
            "_psnr": p.numpy()}


def run_grid(family: Family, held: HeldOut, schemes: list[Scheme], channels: tuple[str, ...],
             snrs: tuple[float, ...], seed: int = 0, progress: bool = True,
             payload_cache: PayloadCache | None = None, jobs: int = 1) -> list[dict[str, object]]:
    """Every (scheme, channel, SNR) on the held-out latents; one row of metrics each.

    ``jobs`` > 1 runs the schemes in that many worker processes (one CPU thread each); a cell's noise stream
    depends only on (seed, channel, SNR), so the rows are the same as with one process, in the same order."""
    return run_tasks(family, held, [GridTask(s, ch, snrs) for s in schemes for ch in channels], seed, progress,
                     payload_cache, jobs)


@dataclass(frozen=True)
class GridTask:
    """One scheme on one channel at some SNRs."""

    scheme: Scheme
    channel: str
    snrs: tuple[float, ...]
    grid: str = "coarse"  # "coarse": the report's grid; "cliff": the fine grid around a digital cliff


def run_tasks(family: Family, held: HeldOut, tasks: list[GridTask], seed: int = 0, progress: bool = True,
              payload_cache: PayloadCache | None = None, jobs: int = 1) -> list[dict[str, object]]:
    """The rows of every task, in task order (in ``jobs`` worker processes when > 1; the same rows)."""
    bar = tqdm(total=sum(len(t.snrs) for t in tasks), desc="bench snr", disable=not progress)
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        done: dict[int, list[dict[str, object]]] = {}
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                 initargs=(family.root, held)) as pool:
            futures = {pool.submit(_worker_task_rows, task, seed): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                bar.update(len(tasks[futures[future]].snrs))
        bar.close()
        return [row for i in range(len(tasks)) for row in done[i]]
    ref = ReferenceStats.of(family.classifier.embed(held.reference * 2.0 - 1.0).double().numpy())
    cache = payload_cache if payload_cache is not None else {}
    rows: list[dict[str, object]] = []
    for task in tasks:
        bar.set_postfix_str(task.scheme.name)
        rows += task_rows(family, held, task, seed, ref, cache, bar.update)
    bar.close()
    return rows


def estimate_spread_db(channels: tuple[str, ...], seed: int = 0, probes: int = 200,
                       snrs: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)) -> dict[str, float]:
    """Per channel model, the RMS error (dB) of the emulator's pilot-based SNR estimate (:meth:`Link.probe`,
    ``csi: "estimated"``, default pilots) over the SNRs where digital cliffs lie: what link adaptation must
    expect an estimate to stray by."""
    link, out = Link(), {}
    for ci, channel in enumerate(channels):
        if is_noiseless(channel):
            continue
        errors = []
        for snr in snrs:
            spec = ChannelSpec.create(channel, snr_db=snr, csi="estimated")
            gen = cell_generator(seed, 4242, ci, int(snr * 4))
            errors += [link.probe(spec, gen)[0] - snr for _ in range(probes)]  # type: ignore[operator]
        out[channel] = round(float(np.sqrt(np.mean(np.square(errors)))), 2)
    return out


def noise_key(channel: str, snr_db: float) -> tuple[int, int]:
    """The key of a (channel, SNR) cell's random stream: every scheme at that cell sees the same noise."""
    # AWGN and Rayleigh keep the keys 0 and 1 of the committed runs; another model takes one of its own.
    known = CHANNELS.index(channel) if channel in CHANNELS else 100 + sorted(channel_names()).index(channel)
    return known, int(round(snr_db * 4)) + 1000


def task_rows(family: Family, held: HeldOut, task: GridTask, seed: int, ref: ReferenceStats,
              payload_cache: PayloadCache, done: Callable[[], object] = lambda: None) -> list[dict[str, object]]:
    """The rows of one task: its scheme on its channel at each of its SNRs."""
    from models.decoders import decode_latents

    scheme, rows = task.scheme, []
    tx = Transmitter(scheme, held.latents, weights=image_set_dir(family.root), payload_cache=payload_cache)
    for snr in task.snrs:
        # One random stream per (channel, SNR), shared by every scheme: schemes of the same length see the
        # same noise on the same images, so their differences are paired.
        cell = tx.send_all(task.channel, snr, cell_generator(seed, *noise_key(task.channel, snr)))
        images = decode_latents(family.decoders[scheme.decoder], cell.latents)
        symbols, bits = float(np.mean(cell.symbols)), float(np.mean(cell.bits))
        # Analog schemes' bits are their side information (gain, merge map): it crosses the link as a
        # protected digital block, so it costs channel uses too. Digital payloads carry their own.
        side = bits / SIDE_INFO_BITS_PER_SYMBOL if scheme.kind == "analog" else 0.0
        rows.append({"scheme": scheme.name, "kind": scheme.kind, "channel": task.channel, "snr_db": snr,
                     "n_images": len(cell.latents), "symbols_per_image": symbols, "bits_per_image": bits,
                     "side_symbols_per_image": side, "channel_uses_per_image": symbols + side,
                     **score(family, held, images, ref), "erased_fraction": float(np.mean(cell.erased)),
                     "config": scheme.name, "grid": task.grid, "_envelope": scheme.envelope})
        done()
    return rows


def cliff_tasks(schemes: list[Scheme], rows: list[dict[str, object]], step_db: float = 0.5,
                min_jump_db: float = 3.0) -> list[GridTask]:
    """Issue 16: locate each digital scheme's cliff on a ``step_db`` grid. Per digital scheme and channel, the
    coarse interval with the largest PSNR jump (at least ``min_jump_db``) is measured again every ``step_db``."""
    tasks = []
    channels = list(dict.fromkeys(str(r["channel"]) for r in rows))
    for scheme in schemes:
        if scheme.kind != "digital":
            continue
        for ch in channels:
            pts = sorted((float(r["snr_db"]), float(r["psnr_db"])) for r in rows  # type: ignore[arg-type]
                         if r["scheme"] == scheme.name and r["channel"] == ch)
            jumps = [(b[1] - a[1], a[0], b[0]) for a, b in zip(pts, pts[1:])]
            if not jumps or max(jumps)[0] < min_jump_db:
                continue
            _, lo, hi = max(jumps)
            inner = tuple(float(v) for v in np.arange(lo + step_db, hi - step_db / 2, step_db))
            if inner:
                tasks.append(GridTask(scheme, ch, inner, grid="cliff"))
    return tasks


#: A worker process's model and held-out latents (set once by :func:`_init_worker`).
_WORKER: dict[str, object] = {}


def _init_worker(root: Path, held: HeldOut) -> None:
    torch.set_num_threads(1)
    family = load_family(root)
    _WORKER.update(family=family, held=held, cache={}, ref=ReferenceStats.of(
        family.classifier.embed(held.reference * 2.0 - 1.0).double().numpy()))


def _worker_task_rows(task: GridTask, seed: int) -> list[dict[str, object]]:
    return task_rows(_WORKER["family"], _WORKER["held"], task, seed, _WORKER["ref"],  # type: ignore[arg-type]
                     _WORKER["cache"])  # type: ignore[arg-type]


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    """One line per (scheme, channel, SNR), columns :data:`CSV_COLUMNS`."""
    def fmt(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [",".join(CSV_COLUMNS)] + [",".join(fmt(r[c]) for c in CSV_COLUMNS) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


PLOT_METRICS = (("psnr_db", "PSNR vs clean VAE decode", "PSNR (dB)"),
                ("ms_ssim", "MS-SSIM vs clean VAE decode", "MS-SSIM"),
                ("accuracy", "semantic accuracy (classifier)", "accuracy"))


def plot(rows: list[dict[str, object]], channels: tuple[str, ...], path: Path) -> None:
    """PSNR, MS-SSIM and accuracy versus SNR, one panel column per channel (analog solid, digital dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PLOT_METRICS), len(channels), figsize=(5.5 * len(channels), 3.6 * len(PLOT_METRICS)),
                             squeeze=False)
    schemes = list(dict.fromkeys(str(r["scheme"]) for r in rows))
    for ci, ch in enumerate(channels):
        for name in schemes:
            pts = sorted((r for r in rows if r["scheme"] == name and r["channel"] == ch),
                         key=lambda r: float(r["snr_db"]))
            if not pts:
                continue
            style = "-o" if pts[0]["kind"] == "analog" else "--s"
            x = [float(r["snr_db"]) for r in pts]
            for mi, (key, _, _) in enumerate(PLOT_METRICS):
                line, = axes[mi][ci].plot(x, [float(r[key]) for r in pts], style, label=name, ms=4)
                if f"{key}_ci_low" in pts[0]:  # 95 % bootstrap band over images
                    axes[mi][ci].fill_between(x, [float(r[f"{key}_ci_low"]) for r in pts],
                                              [float(r[f"{key}_ci_high"]) for r in pts], color=line.get_color(),
                                              alpha=0.15, lw=0)
        for mi, (key, title, ylabel) in enumerate(PLOT_METRICS):
            ax = axes[mi][ci]
            ax.set_title(f"{ch.upper()}: {title}")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if key in ("ms_ssim", "accuracy"):
                ax.set_ylim(-0.02, 1.02)
        axes[-1][ci].set_xlabel("SNR (dB)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lookup(rows: list[dict[str, object]], scheme: str, channel: str, snr: float) -> dict[str, object] | None:
    for r in rows:
        if r["scheme"] == scheme and r["channel"] == channel and math.isclose(float(r["snr_db"]), snr):
            return r
    return None


def findings(rows: list[dict[str, object]], channels: tuple[str, ...], snrs: tuple[float, ...]) -> list[str]:
    """The stated claims, computed: the gap above the digital cliff and the paper-shape comparison."""
    out: list[str] = []
    digital = [s for s in dict.fromkeys(str(r["scheme"]) for r in rows) if _kind(rows, s) == "digital"]
    e2e = "E2E-MEG"
    for ch in channels:
        for d in digital:
            pts = [r for r in rows if r["scheme"] == d and r["channel"] == ch]
            if not pts:
                continue
            best = max(float(r["psnr_db"]) for r in pts)
            ok = sorted(float(r["snr_db"]) for r in pts if float(r["psnr_db"]) >= best - 1.0)
            cliff = ok[0] if ok else float("nan")
            out.append(f"- {ch}: **{d}** reaches within 1 dB of its best PSNR ({best:.1f} dB) from "
                       f"{cliff:g} dB SNR on (its cliff).")
        low = [s for s in snrs if s <= 0.0]
        for s in low:
            er = _lookup(rows, e2e, ch, s)
            if er is None:
                continue
            rivals = [r for r in (_lookup(rows, d, ch, s) for d in digital) if r is not None]
            if not rivals:
                continue
            bp = max(rivals, key=lambda r: float(r["psnr_db"]))
            ba = max(float(r["accuracy"]) for r in rivals)
            verdict = "beats" if float(er["psnr_db"]) > float(bp["psnr_db"]) and float(er["accuracy"]) > ba \
                else "does NOT beat"
            out.append(f"- {ch} @ {s:g} dB: E2E-MEG {verdict} the best digital scheme: PSNR "
                       f"{float(er['psnr_db']):.1f} vs {float(bp['psnr_db']):.1f} dB ({bp['scheme']}), "
                       f"accuracy {float(er['accuracy']):.2f} vs {ba:.2f}.")
    # Above the cliff: the gap between E2E-MEG and the best digital scheme at the highest SNR, stated.
    for ch in channels:
        top = max(snrs)
        er = _lookup(rows, e2e, ch, top)
        rivals = [r for r in (_lookup(rows, d, ch, top) for d in digital) if r is not None]
        if er is not None and rivals:
            bp = max(rivals, key=lambda r: float(r["psnr_db"]))
            out.append(f"- {ch} @ {top:g} dB (above every cliff): E2E-MEG PSNR {float(er['psnr_db']):.1f} dB vs "
                       f"{float(bp['psnr_db']):.1f} dB ({bp['scheme']}), gap {float(er['psnr_db']) - float(bp['psnr_db']):+.1f} dB; "
                       f"accuracy {float(er['accuracy']):.2f} vs {float(bp['accuracy']):.2f}; channel uses "
                       f"{float(er['symbols_per_image']):.0f} vs {float(bp['symbols_per_image']):.0f} symbols/img.")
    # Learned JSCC against the linear analog MEG link, SNR by SNR (does the training pay off?).
    for ch in channels:
        gaps = []
        for s in snrs:
            er, meg = _lookup(rows, e2e, ch, s), _lookup(rows, "MEG (analog)", ch, s)
            if er is not None and meg is not None:
                gaps.append(f"{s:g} dB: {float(er['psnr_db']) - float(meg['psnr_db']):+.1f}")
        if gaps:
            out.append(f"- {ch}: E2E-MEG minus MEG (analog) PSNR, dB (E2E-MEG uses half the channel uses): "
                       + ", ".join(gaps) + ".")
    # Paper shape: merged JSCC better at the lowest SNRs, full-latent MEG better above.
    for ch in channels:
        lo = min(snrs)
        a, b = _lookup(rows, e2e, ch, lo), _lookup(rows, "MEG (analog)", ch, lo)
        hi_a, hi_b = _lookup(rows, e2e, ch, max(snrs)), _lookup(rows, "MEG (analog)", ch, max(snrs))
        if a and b and hi_a and hi_b:
            low_win = float(a["fd"]) < float(b["fd"])
            high_win = float(hi_b["fd"]) < float(hi_a["fd"])
            out.append(f"- paper shape ({ch}, Fréchet distance): at {lo:g} dB E2E-MEG {'wins' if low_win else 'loses'} "
                       f"({float(a['fd']):.1f} vs MEG {float(b['fd']):.1f}); at {max(snrs):g} dB MEG "
                       f"{'wins' if high_win else 'loses'} ({float(hi_b['fd']):.1f} vs E2E {float(hi_a['fd']):.1f}). "
                       f"The paper: E2E-MEG-DT wins at ≤ −10 dB, MEG-DT above "
                       f"({'same shape' if low_win and high_win else 'different shape'}).")
    return out


def _kind(rows: list[dict[str, object]], scheme: str) -> str:
    return next(str(r["kind"]) for r in rows if r["scheme"] == scheme)


def write_markdown(rows: list[dict[str, object]], meta: dict[str, object], channels: tuple[str, ...],
                   snrs: tuple[float, ...], path: Path) -> None:
    """Tables of PSNR / accuracy per scheme and SNR, the computed findings, and how the run was made."""
    schemes = list(dict.fromkeys(str(r["scheme"]) for r in rows))
    lines = ["# `meg bench snr`: quality and semantics versus SNR", "",
             f"Mode {meta['mode']}: {meta['n_images']} held-out latents ({meta['source']}), model `{meta['model']}`, "
             f"seed {meta['seed']}, "
             f"{meta['seconds']:.0f} s ({meta['seconds'] / 60:.1f} min, {meta.get('jobs', 1)} "
             "worker processes on this 2-core machine). References: the clean VAE decode of each latent. MS-SSIM: 3 scales, "
             "7-pixel window (64×64 images). Accuracy: classifier gets shape, colour and background all right "
             "(prompt labels). FD: Fréchet distance of the classifier's features (FID-style, not Inception; "
             f"with few images it is noisy). Clean-decode accuracy (ceiling): {meta['clean_accuracy']:.2f}; "
             f"tiny decoder on clean latents: PSNR {meta['tiny_ceiling_psnr']:.1f} dB.", "",
             f"Reproduce: `{meta['command']}`. Digital schemes: the latent entropy-coded once per image, CRC + 5G "
             "LDPC (Sionna) + QAM; an image whose payload lost a block is concealed with a zero latent (erased "
             "column in the CSV). Analog schemes: the same channel models, SNR relative to the measured power."
             + (f" Each digital scheme's cliff is measured again every {meta['cliff_step_db']:g} dB on the first "
                f"{CLIFF_IMAGES} images ({meta['cliff_cells']} cells; `grid` = `cliff` in the CSV): the "
                "adaptation table (`snr_adaptation.json`) uses those points too." if meta.get("cliff_cells") else ""),
             ""]
    for ch in channels:
        lines += [f"## {ch.upper()}: PSNR (dB) / MS-SSIM / accuracy / FD", "",
                  "| scheme | channel uses/img (side info) | bits/img | " + " | ".join(f"{s:g} dB" for s in snrs) + " |",
                  "|---|---:|---:|" + "---:|" * len(snrs)]
        for name in schemes:
            cells, first = [], None
            for s in snrs:
                r = _lookup(rows, name, ch, s)
                if r is None:
                    cells.append("–")
                    continue
                first = first or r
                cells.append(f"{float(r['psnr_db']):.1f} / {float(r['ms_ssim']):.2f} / {float(r['accuracy']):.2f} / "
                             f"{float(r['fd']):.0f}")
            if first is not None:
                uses = f"{float(first['channel_uses_per_image']):.0f} ({float(first['side_symbols_per_image']):.0f})"
                lines.append(f"| {name} | {uses} | {float(first['bits_per_image']):.0f} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"95 % bootstrap intervals over the {meta['n_images']} images, PSNR (dB) and accuracy:", "",
                  "| scheme | " + " | ".join(f"{s:g} dB" for s in snrs) + " |", "|---|" + "---:|" * len(snrs)]
        for name in schemes:
            cells = []
            for s in snrs:
                r = _lookup(rows, name, ch, s)
                cells.append("–" if r is None else
                             f"[{float(r['psnr_ci_low']):.1f}, {float(r['psnr_ci_high']):.1f}] / "
                             f"[{float(r['accuracy_ci_low']):.2f}, {float(r['accuracy_ci_high']):.2f}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += envelope_section(rows, channels, snrs)
    lines += merge_map_section(rows, channels, snrs)
    lines += training_ranges(schemes, snrs)
    lines += ["## Findings (computed from the table)", "", *findings(rows, channels, snrs), "",
              "The paper (REFERENCES.md) reports FID on SDXL images: MEG-DT "
              f"{PAPER_FID['MEG-DT']}, E2E-MEG-DT {PAPER_FID['E2E-MEG-DT']} at −20…20 dB. Channel uses/img counts "
              "complex channel uses, side information included: an analog scheme's bits/img is its per-image side "
              f"information (gain, merge map), sent as a protected digital block at {SIDE_INFO_MCS} "
              f"({SIDE_INFO_BITS_PER_SYMBOL:g} bit per channel use), in brackets. Per-session configuration (codec "
              "name, codec set, quality, merge ratio) and request metadata (prompt, ids, timings) are control "
              "plane and not counted. Every scheme sees the same noise stream per (channel, SNR), so differences "
              "between schemes of equal length are paired.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def envelope_section(rows: list[dict[str, object]], channels: tuple[str, ...], snrs: tuple[float, ...]) -> list[str]:
    """Which configuration the digital envelope picked in every cell."""
    names = [n for n in dict.fromkeys(str(r["scheme"]) for r in rows) if n.startswith("digital envelope")]
    if not names:
        return []
    out = ["## Digital envelope", "",
           f"At each SNR and budget, the best (by mean PSNR) of {ENVELOPE_CODER} qualities "
           f"{', '.join(map(str, ENVELOPE_QUALITIES))} × {', '.join(m.upper() for m in ENVELOPE_MODULATIONS)} × LDPC "
           f"rates {', '.join(ENVELOPE_RATES)} whose channel uses fit the budget, each simulated on the same images "
           "(every configuration's row is in snr.csv). Budgets: E2E-MEG's channel uses and twice them. "
           "Configuration chosen:", "",
           "| channel | envelope | " + " | ".join(f"{s:g} dB" for s in snrs) + " |", "|---|---|" + "---|" * len(snrs)]
    for ch in channels:
        for name in names:
            cells = []
            for s in snrs:
                r = _lookup(rows, name, ch, s)
                cells.append("–" if r is None else str(r["config"]).replace(f"{ENVELOPE_CODER} ", "").replace("+LDPC", ""))
            out.append(f"| {ch} | {name} | " + " | ".join(cells) + " |")
    return out + [""]


def training_ranges(schemes: list[str], snrs: tuple[float, ...]) -> list[str]:
    """Which learned parts were trained over which SNRs, and the table's cells outside that range."""
    from codec.jscc import JsccNet
    from codec.transforms import resolve_weights_file
    from models.stages.decoder import SNR_RANGE_DB as ROBUST_RANGE

    weights = image_set_dir(DEFAULT_MODEL_DIR)
    parts = [("MEG (analog)", "robust decoder", tuple(ROBUST_RANGE))]
    for _, model, label in JSCC_SCHEMES:
        try:
            cfg = JsccNet.load(resolve_weights_file(model[len("jscc_"):], "jscc_", ".safetensors", weights)).config
        except CodecError:
            continue
        parts.append((label, f"{model} link", tuple(cfg.get("snr_range_db", (float("nan"),) * 2))))
    out = ["## Training SNR ranges", ""]
    for label, what, (lo, hi) in parts:
        if label not in schemes:
            continue
        outside = [s for s in snrs if not lo <= s <= hi]
        out.append(f"- {label}: {what} trained over {lo:g}…{hi:g} dB"
                   + (f"; its cells at {', '.join(f'{s:g}' for s in outside)} dB are outside that range." if outside
                      else "; every cell is inside it."))
    return out + [""]


def merge_map_section(rows: list[dict[str, object]], channels: tuple[str, ...], snrs: tuple[float, ...]
                      ) -> list[str]:
    """E2E-MEG's side information: what each merge map costs, and what the free (fixed) map loses, paired."""
    from codec.merging import MAP_MODES, plan_merge

    e2e = next((r for r in rows if r["scheme"] == "E2E-MEG"), None)
    if e2e is None:
        return []
    uses = float(e2e["symbols_per_image"])
    out = ["## E2E-MEG side information: merge maps", "",
           f"Cost per 16×16 latent at merge ratio 0.5, against E2E-MEG's {uses:.0f} analog channel uses (side "
           f"information at {SIDE_INFO_MCS}):", "",
           "| merge map | bits/img | channel uses/img | share of E2E-MEG's channel uses |", "|---|---:|---:|---:|"]
    for mode in MAP_MODES:
        bits = plan_merge(256, 0.5, mode).side_bits
        sym = bits / SIDE_INFO_BITS_PER_SYMBOL
        out.append(f"| {mode} | {bits} | {sym:.0f} | {100 * sym / (uses + sym):.0f} % |")
    if any(r["scheme"] == LEARNED_MERGE for r in rows):
        out.append(f"| learned (no merge stage: the JSCC network maps each token to one symbol) | 0 | 0 | 0 % |")
    for other, what in (("E2E-MEG (fixed merge map)", "the fixed map (its own trained link, nothing sent)"),
                        (LEARNED_MERGE, "learned merging (its own trained link, nothing sent)")):
        if not any(r["scheme"] == other for r in rows):
            continue
        out += ["", f"PSNR of E2E-MEG with {what} minus E2E-MEG with the global map (its bits not counted here), "
                "paired over the same images and noise, dB [95 % interval]:",
                "", "| channel | " + " | ".join(f"{s:g} dB" for s in snrs) + " | worst |",
                "|---|" + "---:|" * (len(snrs) + 1)]
        for ch in channels:
            cells, worst = [], math.inf
            for s in snrs:
                a, b = _lookup(rows, "E2E-MEG", ch, s), _lookup(rows, other, ch, s)
                if a is None or b is None:
                    cells.append("–")
                    continue
                d, lo, hi = paired_difference(a["_psnr"], b["_psnr"])  # type: ignore[arg-type]
                worst = min(worst, d)
                cells.append(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            out.append(f"| {ch} | " + " | ".join(cells) + f" | {worst:+.2f} |")
    return out + [""]


def run(quick: bool, out_dir: Path, *, n_images: int | None = None, snrs: tuple[float, ...] | None = None,
        channels: tuple[str, ...] = CHANNELS, schemes: list[str] | None = None, source: str | None = None,
        model_root: Path | None = None, seed: int = 0, progress: bool = True,
        command: str = "meg bench snr", mode: str | None = None, envelope: bool = True, jobs: int = 1,
        cliff_step_db: float | None = None) -> dict[str, object]:
    """Run the benchmark and write ``snr.csv``, ``snr.png`` and ``snr.md`` under ``out_dir``.

    Quick: 54 latents (one per label combination), −5…20 dB. Full: 216 latents, −20…20 dB. ``schemes``
    filters by scheme name prefix; the keyword arguments exist for tests and ad-hoc runs.
    Returns ``{"rows": [...], "csv": path, "png": path, "md": path, "meta": {...}}``.
    """
    from models import DEFAULT_MODEL_DIR
    from models.decoders import decode_latents

    t0 = time.monotonic()
    root = model_root or DEFAULT_MODEL_DIR
    torch.manual_seed(seed)
    family = load_family(root)
    n = n_images or (54 if quick else 216)
    snr_list = snrs or (QUICK_SNRS_DB if quick else FULL_SNRS_DB)
    held = held_out_latents(family, n, source or "diffusion")
    chosen = available_schemes(family)
    if schemes is not None:
        chosen = [s for s in chosen if any(s.name.startswith(p) or s.codec_name == p for p in schemes)]
    budgets = budgets_for(held.latents)
    payload_cache: PayloadCache = {}
    if envelope:
        chosen += envelope_schemes(family, held.latents, max(budgets), payload_cache)
    logger.info("bench snr: %d latents, schemes %s, SNRs %s", n, [s.name for s in chosen], snr_list)
    rows = run_grid(family, held, chosen, channels, snr_list, seed, progress, payload_cache, jobs)
    rows += envelope_rows(rows, budgets)
    cliffs: list[dict[str, object]] = []
    if cliff_step_db:
        # The adaptation table needs each digital cliff to within half a dB, not the 5 dB of the report's grid.
        sub = HeldOut(held.latents[:CLIFF_IMAGES], held.reference[:CLIFF_IMAGES], held.labels[:CLIFF_IMAGES],
                      held.source)
        tasks = cliff_tasks(chosen, rows, cliff_step_db)
        logger.info("bench snr: %d digital cliffs measured again every %g dB on %d images", len(tasks),
                    cliff_step_db, len(sub.latents))
        cliffs = run_tasks(family, sub, tasks, seed, progress, payload_cache, jobs)
    clean = score(family, held, held.reference)
    tiny = score(family, held, decode_latents(family.decoders["tiny_decoder"], held.latents)) \
        if "tiny_decoder" in family.decoders else {"psnr_db": float("nan")}
    meta = {"n_images": n, "source": held.source, "model": root.name, "seed": seed, "budgets": budgets, "jobs": jobs,
            "cliff_step_db": cliff_step_db, "cliff_cells": len(cliffs),
            "seconds": time.monotonic() - t0, "clean_accuracy": clean["accuracy"],
            "tiny_ceiling_psnr": tiny["psnr_db"], "quick": quick, "command": command,
            "mode": mode or ("quick" if quick else "full")}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "snr.csv", "png": out_dir / "snr.png", "md": out_dir / "snr.md",
             "adaptation": out_dir / "snr_adaptation.json"}
    write_csv(rows + cliffs, paths["csv"])
    # The link-adaptation table of codec "auto" (copy it into the model's codec set to serve it).
    paths["adaptation"].write_text(table_from_snr_csv(
        paths["csv"], estimate_std_db=estimate_spread_db(channels, seed)).to_json())
    shown = [r for r in rows if not r.get("_envelope")]  # envelope members: in the CSV, summarised by the envelope
    plot(shown, channels, paths["png"])
    write_markdown(shown, meta, channels, snr_list, paths["md"])
    logger.info("bench snr: wrote %s in %.0f s", ", ".join(str(p) for p in paths.values()), meta["seconds"])
    return {"rows": rows, "meta": meta, **paths}


def main(argv: list[str] | None = None) -> int:
    """``meg bench snr [--quick | --smoke] [--out DIR]`` (arguments: :func:`bench.cli.build_parser`)."""
    from bench.cli import parse

    args = parse("snr", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    n_images, source, snrs = args.n_images, args.source, tuple(args.snrs) if args.snrs else None
    if args.smoke:
        n_images, source, snrs = n_images or SMOKE_IMAGES, source or "vae", snrs or SMOKE_SNRS_DB
    run(args.quick or args.smoke, args.out, n_images=n_images, snrs=snrs, channels=tuple(args.channels or CHANNELS),
        schemes=args.schemes, source=source, seed=args.seed, progress=not args.no_progress,
        mode="smoke" if args.smoke else None, cliff_step_db=None if args.smoke else 0.5,
        jobs=1 if args.smoke else args.jobs,  # a smoke run is over before two workers have loaded the model
        command=" ".join(["meg bench snr", *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
