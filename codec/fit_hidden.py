"""Fit the llm-hidden codec set of one (model, split layer): ``meg train codecs --source llm-hidden --model-dir DIR
--split-layer K`` (or ``python -m codec.fit_hidden``).

What is fitted, all on hidden states after layer ``k - 1`` of the *training* corpus (procedural documents of
:func:`models.llm.corpus.training_document`: scene, questions and answers over training scenes only; the
held-out evaluation scenes are never seen):

* ``fcm.safetensors``: FCM's clip range (0.1 / 99.9 percentiles) and, for every bit depth in
  :data:`~codec.hidden_sets.FCM_BITS`, the frequency table of the quantised codes;
* ``dtufc.safetensors``: 1-D K-means centres for every ``K`` in :data:`~codec.hidden_sets.DTUFC_K` and the
  frequency table of the centre indices;
* ``jscc-hidden.safetensors``: the row JSCC of :mod:`codec.hidden_jscc`, trained through the emulator's own
  torch channel blocks (:func:`codec.train_jscc.torch_channel`: AWGN and Rayleigh with MMSE, SNR uniform in
  −20…20 dB per row), MSE on standardised rows;
* ``config.json``: source, model id, split layer, codecs, each file's SHA-256 and the set's content hash.

Why a module of its own: the runtime codecs must not import the LLM or a channel model; only fitting does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from codec.hidden_jscc import SNR_RANGE_DB, HiddenJsccNet
from codec.hidden_sets import DTUFC_FILE, DTUFC_K, FCM_BITS, FCM_FILE, JSCC_FILE, fcm_codes, nearest_centre
from codec.sets import CONFIG_FILE, LLM_SOURCE, codec_set_dir, content_hash, file_sha256
from codec.transforms import kmeans_1d

logger = logging.getLogger(__name__)

FIT_SEED = 7
DEFAULT_DOCS = 1500
DEFAULT_JSCC_STEPS = 3000
FCM_PERCENTILES = (0.1, 99.9)


@torch.no_grad()
def collect_hidden(model_dir: str | Path, split_layer: int, n_docs: int = DEFAULT_DOCS, seed: int = FIT_SEED
                   ) -> torch.Tensor:
    """``(rows, d)`` hidden states after layer ``split_layer - 1`` of ``n_docs`` training documents (every
    token of each, prefilled as the edge does)."""
    from models.llm.corpus import training_document
    from models.llm.loader import load_llm
    from models.llm.split import EdgeHalf

    llm = load_llm(model_dir)
    edge = EdgeHalf(llm.model, split_layer)
    rng = random.Random(seed)
    rows = []
    for _ in range(n_docs):
        ids = llm.tokenizer(training_document(rng).text, return_tensors="pt").input_ids
        edge.reset()
        rows.append(edge.prefill(ids)[0].float())
    return torch.cat(rows)


def _percentiles(values: torch.Tensor, pcts: tuple[float, float]) -> tuple[float, float]:
    q = torch.quantile(_subsample(values, 4_000_000).double(), torch.tensor(pcts, dtype=torch.float64) / 100)
    return float(q[0]), float(q[1])


def _subsample(values: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() <= n:
        return flat
    return flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:n]]


def fit_fcm(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """FCM clip range and per-bit-depth code histograms."""
    lo, hi = _percentiles(hidden, FCM_PERCENTILES)
    out = {"range": torch.tensor([lo, hi], dtype=torch.float64)}
    for bits in FCM_BITS:
        codes = fcm_codes(hidden.reshape(-1), lo, hi, bits)
        out[f"counts_b{bits}"] = torch.bincount(codes, minlength=1 << bits).double()[None]
    return out


def fit_dtufc(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """K-means centres and index histograms for every K."""
    sample = _subsample(hidden, 2_000_000)
    out = {}
    for k in DTUFC_K:
        centres = kmeans_1d(sample, k)
        out[f"centres_k{k}"] = centres.float()
        codes = nearest_centre(hidden.reshape(-1), centres.float())
        out[f"counts_k{k}"] = torch.bincount(codes, minlength=k).double()[None]
    return out


def train_jscc(hidden: torch.Tensor, steps: int = DEFAULT_JSCC_STEPS, batch: int = 512, seed: int = FIT_SEED,
               symbols: int = 32) -> tuple[HiddenJsccNet, dict[str, float]]:
    """Train the row JSCC through the emulator's channel blocks; returns it (eval mode) and validation MSEs
    (standardised units) at a few SNRs."""
    from codec.train_jscc import torch_channel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(hidden.shape[0], generator=gen)
    n_val = min(2000, hidden.shape[0] // 10)
    val, train = hidden[perm[:n_val]], hidden[perm[n_val:]]
    net = HiddenJsccNet(dim=hidden.shape[1], symbols=symbols, snr_range_db=list(SNR_RANGE_DB),
                        trained_rows=int(train.shape[0]))
    net.mean.copy_(train.mean(0))
    net.std.copy_(train.std(0).clamp_min(1e-3))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    lo, hi = SNR_RANGE_DB
    net.train()
    for step in range(steps):
        x = train[torch.randint(0, train.shape[0], (batch,), generator=gen)]
        snr = torch.rand(batch, generator=gen) * (hi - lo) + lo
        fading = torch.rand(batch, generator=gen) < 0.5
        y = net.decode(torch_channel(net.encode(x, snr), snr, fading, gen), snr)
        loss = ((y - x) / net.std).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            logger.info("jscc-hidden step %d/%d: loss %.4f", step, steps, loss.item())
    net.eval()
    report = {}
    with torch.no_grad():
        for snr_db in (-10.0, 0.0, 10.0, 20.0):
            snr = torch.full((val.shape[0],), snr_db)
            awgn = torch.zeros(val.shape[0], dtype=torch.bool)
            y = net.decode(torch_channel(net.encode(val, snr), snr, awgn, gen), snr)
            report[f"awgn_{snr_db:g}dB_std_mse"] = float(((y - val) / net.std).pow(2).mean())
    return net, report


def model_id(model_dir: Path) -> str:
    """The model folder's name and a hash of its weights: a set fits one model, not a folder name."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return f"{model_dir.resolve().name}@sha256:{digest.hexdigest()[:16]}"


def fit_llm_codec_set(model_dir: str | Path, split_layer: int, out_dir: str | Path | None = None,
                      n_docs: int = DEFAULT_DOCS, jscc_steps: int = DEFAULT_JSCC_STEPS, seed: int = FIT_SEED) -> Path:
    """Fit and write the llm-hidden codec set of ``model_dir`` split after layer ``split_layer`` (module
    docstring). ``out_dir`` defaults to :func:`codec.hidden_sets.codec_set_dir`. Returns the folder."""
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else codec_set_dir(model_dir, split_layer)
    start = time.time()
    hidden = collect_hidden(model_dir, split_layer, n_docs, seed)
    logger.info("collected %d hidden rows of %d values at k=%d", hidden.shape[0], hidden.shape[1], split_layer)
    fcm = fit_fcm(hidden)
    dtufc = fit_dtufc(hidden)
    net, jscc_report = train_jscc(hidden, jscc_steps, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in fcm.items()}, str(out / FCM_FILE))
    save_file({k: v.contiguous() for k, v in dtufc.items()}, str(out / DTUFC_FILE))
    save_file(net.state_for_save(), str(out / JSCC_FILE), metadata={"config": json.dumps(net.config)})
    files = {name: file_sha256(out / name) for name in (FCM_FILE, DTUFC_FILE, JSCC_FILE)}
    flat = hidden.abs().reshape(-1)
    config = {
        "source": LLM_SOURCE,
        "model_id": model_id(model_dir),
        "split_layer": split_layer,
        "hidden_size": int(hidden.shape[1]),
        "codecs": ["fcm-hidden", "fcm-hidden+ol", "dtufc-hidden", "dtufc-hidden-16", "jscc-hidden"],
        "fit": {
            "corpus": "models.llm.corpus.training_document (training scenes only; prompts with answers)",
            "documents": n_docs, "rows": int(hidden.shape[0]), "seed": seed,
            "fcm_percentiles": list(FCM_PERCENTILES), "fcm_range": [float(v) for v in fcm["range"]],
            "fcm_bits": list(FCM_BITS), "dtufc_k": list(DTUFC_K), "jscc_steps": jscc_steps,
            "jscc_validation": jscc_report,
            "hidden_abs": {"max": float(flat.max()), "median": float(flat.median()), "mean": float(flat.mean())},
            "seconds": round(time.time() - start, 1),
            "command": f"meg train codecs --source {LLM_SOURCE} --model-dir {model_dir} --split-layer {split_layer}",
        },
        "files": files,
        "content_hash": content_hash(files),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    logger.info("wrote codec set %s in %.0f s", out, time.time() - start)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meg train codecs", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=(LLM_SOURCE,), default=LLM_SOURCE,
                        help="feature source (`--source image` is dispatched to codec.fit_image by `meg train codecs`)")
    parser.add_argument("--model-dir", type=Path, required=True, help="the LLM folder (e.g. models/shapes_llm_v1)")
    parser.add_argument("--split-layer", type=int, required=True, help="k: the edge runs layers [0, k)")
    parser.add_argument("--out", type=Path, default=None, help="default: <model dir>/codecs/llm-hidden-k<k>")
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS,
                        help="training documents to collect hidden states from")
    parser.add_argument("--jscc-steps", type=int, default=DEFAULT_JSCC_STEPS)
    parser.add_argument("--seed", type=int, default=FIT_SEED)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns a process exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = fit_llm_codec_set(args.model_dir, args.split_layer, args.out, args.docs, args.jscc_steps, args.seed)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
