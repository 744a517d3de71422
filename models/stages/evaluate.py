"""``meg train evaluate``: end-to-end metrics of the committed family -> metrics.json + grid.

Metrics (all on held-out seeds, disjoint from training):
* generation: classifier accuracy of (colour, shape, background) for images generated from
  held-out prompts (text encoder -> UNet with CFG via DDIM -> VAE decode), and the Shapes-FD
  (classifier-feature Fréchet distance, not Inception FID) against renderings;
* VAE reconstruction PSNR on renderings; tiny-decoder PSNR against the VAE decode;
* plain vs robust decoder PSNR (against the clean VAE decode) on latents received through the
  AWGN and Rayleigh channels at 0 and 5 dB.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from models import components as C
from models.channel import apply_channel
from models.classifier import ShapesClassifier, shapes_frechet_distance
from models.decoders import decode_latents
from models.sampling import generate_latents
from models.shapes import COLORS, SHAPES, heldout_sample, heldout_set, image_to_tensor, make_caption
from models.trainer import StageOptions

logger = logging.getLogger(__name__)

GUIDANCE_SCALE = 4.0
SAMPLING_STEPS = 20
GRID_SEED = 2_000_000_000


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def save_grid(
    images01: torch.Tensor,
    rows: int,
    path: Path,
    scale: int = 2,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
) -> None:
    """Save (N,3,H,W) images in [0,1] as a ``rows``-row PNG grid, optionally with row/column labels
    (so the committed figure can be read without the code that made it)."""
    n, _, h, w = images01.shape
    cols = -(-n // rows)
    arr = (images01.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    if row_labels or col_labels:
        left, top = (70 if row_labels else 0), (20 if col_labels else 0)
        canvas = Image.new("RGB", (picture.width + left, picture.height + top), "white")
        canvas.paste(picture, (left, top))
        draw = ImageDraw.Draw(canvas)
        cell_w, cell_h = (w + 2) * scale, (h + 2) * scale
        for r, label in enumerate(row_labels or []):
            draw.text((4, top + r * cell_h + cell_h // 2 - 6), label, fill="black")
        for c, label in enumerate(col_labels or []):
            draw.text((left + c * cell_w + cell_w // 2 - 3 * len(label), 4), label, fill="black")
        picture = canvas
    picture.save(path)


def run(opts: StageOptions) -> dict[str, float]:
    torch.manual_seed(opts.seed)
    root = opts.out
    dev = opts.device
    tok, te = C.load_tokenizer(root), C.load_text_encoder(root).to(dev)
    unet, sched = C.load_unet(root).to(dev), C.load_scheduler(root)
    vae = C.load_vae(root).to(dev)
    sf = float(vae.config.scaling_factor)
    clf = ShapesClassifier.from_pretrained(root / C.CLASSIFIER).to(dev)
    n_prompts = 27 if opts.smoke else 216
    pairs = heldout_set(n_prompts)
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    steps = 4 if opts.smoke else int(opts.extra.get("sampling_steps", SAMPLING_STEPS))  # type: ignore[arg-type]
    guidance = float(opts.extra.get("guidance_scale", GUIDANCE_SCALE))  # type: ignore[arg-type]

    t0 = time.time()
    lat = generate_latents(tok, te, unet, sched, prompts, seeds, steps, guidance, scaling_factor=sf)
    gen_seconds = time.time() - t0
    gen = decode_latents(vae, lat.to(dev)).cpu()
    refs = [heldout_sample(p, s) for p, s in pairs]
    real = torch.stack([image_to_tensor(r.image) for r in refs])
    preds = clf.predict(gen * 2 - 1)
    truth = [(r.color, r.shape, r.background) for r in refs]
    acc = {
        name: float(np.mean([p[k] == t[k] for p, t in zip(preds, truth)]))
        for k, name in enumerate(["color_acc", "shape_acc", "background_acc"])
    }
    acc["all_correct_acc"] = float(np.mean([p == t for p, t in zip(preds, truth)]))
    real_preds = clf.predict(real)
    classifier_acc_real = float(np.mean([p == t for p, t in zip(real_preds, truth)]))
    fd = shapes_frechet_distance(clf, gen * 2 - 1, real)

    # Autoencoder metrics on held-out renderings.
    real01 = (real + 1) / 2
    with torch.no_grad():
        z = vae.encode(real.to(dev)).latent_dist.mean
    vae_rec = decode_latents(vae, z).cpu()
    tiny = C.load_tiny(root, C.TINY_DECODER).to(dev)
    robust = C.load_tiny(root, C.ROBUST_DECODER).to(dev) if (root / C.ROBUST_DECODER).is_dir() else None
    tiny_rec = decode_latents(tiny, z).cpu()
    metrics: dict[str, object] = {
        "guidance_scale": guidance,
        "sampling_steps": steps,
        "scheduler": "DDIMScheduler (trailing spacing, v_prediction)",
        "heldout_prompts": n_prompts,
        "generation": {**acc, "shapes_frechet_distance": fd, "seconds": gen_seconds, "device": dev.type},
        "classifier_acc_on_heldout_renderings_all_attributes": classifier_acc_real,
        "vae_reconstruction_psnr_db": psnr(vae_rec, real01),
        "tiny_decoder_psnr_vs_vae_db": psnr(tiny_rec, vae_rec),
        "tiny_decoder_psnr_vs_original_db": psnr(tiny_rec, real01),
        "latent_scaling_factor": sf,
    }
    channel: dict[str, float] = {}
    gen_ch = torch.Generator().manual_seed(opts.seed + 12345)
    for kind in ("awgn", "rayleigh"):
        for snr in (0.0, 5.0, 10.0):
            received = apply_channel(z.cpu(), snr, kind, generator=gen_ch).to(dev)
            channel[f"{kind}_{snr:g}dB_vae_decoder_psnr"] = psnr(decode_latents(vae, received).cpu(), vae_rec)
            channel[f"{kind}_{snr:g}dB_plain_tiny_psnr"] = psnr(decode_latents(tiny, received).cpu(), vae_rec)
            if robust is not None:
                channel[f"{kind}_{snr:g}dB_robust_tiny_psnr"] = psnr(decode_latents(robust, received).cpu(), vae_rec)
    metrics["channel_psnr_db_vs_clean_vae_decode"] = channel

    # Grid: every colour x shape on white (rows = shapes).
    grid_prompts = [make_caption(c, s, "white") for s in SHAPES for c in COLORS]
    grid_lat = generate_latents(
        tok, te, unet, sched, grid_prompts, [GRID_SEED + i for i in range(len(grid_prompts))],
        steps, guidance, scaling_factor=sf,
    )
    docs = opts.extra.get("docs_dir")
    grid_path = Path(str(docs)) / "shapes_grid.png" if docs else opts.stage_dir("evaluate") / "shapes_grid.png"
    save_grid(
        decode_latents(vae, grid_lat.to(dev)).cpu(), len(SHAPES), grid_path, scale=3,
        row_labels=list(SHAPES), col_labels=list(COLORS),
    )
    save_grid(gen[:54], 6, opts.stage_dir("evaluate") / "heldout_generated.png")
    (root / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    logger.info("metrics: %s", json.dumps(metrics, indent=2))
    return {"color_acc": acc["color_acc"], "shape_acc": acc["shape_acc"]}
