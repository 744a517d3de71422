"""Train the JSCC links (``jscc`` and ``e2e-meg``) end to end: ``python -m codec.train_jscc``.

Why a script of its own: the runtime codec must not import any channel model, but training must see the
channel the testbed really applies. This module (never imported by ``codec/__init__``) runs the emulator's
own torch channel blocks (:mod:`radio`), so gradients flow through exactly what the testbed applies:

* N0 = mean(|x|²) / SNR per image (SNR relative to the measured power of what is sent);
* AWGN: y = x + n, used as is;
* Rayleigh: block fading h ~ CN(0, 1), one gain per coherence block (64 symbols), receiver CSI and
  the scalar MMSE equaliser conj(h)·y / (|h|² + N0/P).

The objective is the paper's E2E one: latents of the embedded model (``vae.encode(images).latent_dist.mean``
of rendered training shapes) → (merge) → JSCC encoder → channel at an SNR drawn uniformly from −5…20 dB, half
the batch AWGN and half Rayleigh → JSCC decoder → (unmerge) → the device's latent decoder (frozen, by
default the robust decoder) → pixel MSE against the clean VAE decode of the same latent, plus a small latent
MSE that keeps the decoder's input in the range it was trained on. The device decoder stays frozen, so the
device keeps one decoder for every codec; the JSCC receiver outputs a latent.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from codec.image_sets import image_set_dir, refresh_image_set_config
from codec.jscc import JsccNet
from codec.merging import merge_tokens, unmerge_tokens
from radio import build_block

logger = logging.getLogger(__name__)

#: The committed links: weights name → merge ratio (0 = no merging stage).
VARIANTS: dict[str, float] = {"jscc_full": 0.0, "jscc_e2e": 0.5, "jscc_e2e_fixed": 0.5, "jscc_e2e_learned": 0.0}
#: The merge map a variant is trained with (``codec.merging``); the others use the global one.
MERGE_MAPS: dict[str, str] = {"jscc_e2e_fixed": "fixed"}
#: Complex symbols per latent token where a variant differs from ``--symbols-per-token``, and its 1-D
#: dilations. ``jscc_e2e_learned`` is learned merging: no merge stage and no map to send, the network itself
#: maps each token's 4 values to one symbol (E2E-MEG's 256 channel uses per 16×16 latent) and its dilations
#: reach the token above (16 apart in raster order), so it can pool what the global merge map pools.
SYMBOLS_PER_TOKEN: dict[str, int] = {"jscc_e2e_learned": 1}
DILATIONS: dict[str, tuple[int, ...]] = {"jscc_e2e_learned": (1, 2, 4, 8, 16, 1, 16)}
SNR_RANGE_DB = (-20.0, 20.0)  # the range `meg bench snr` sweeps (issue 16: training and bench agree)


def torch_channel(symbols: torch.Tensor, snr_db: torch.Tensor, rayleigh: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The emulator's own channel blocks (:mod:`radio`) on a training batch: (B, S) complex → what the
    receiver sees, ``snr_db`` (B,) per image, ``rayleigh`` (B,) bool selects Rayleigh block fading (MMSE with
    receiver CSI) over AWGN. Differentiable: the blocks are torch."""
    awgn = build_block("awgn", {"snr_db": 0.0})          # the SNR is given per row below
    fading = build_block("rayleigh", {"snr_db": 0.0})
    y_awgn = awgn.apply_analog(symbols, generator, snr_db)
    y_fading = fading.apply_analog(symbols, generator, snr_db)
    return torch.where(rayleigh[:, None], y_fading, y_awgn)


def load_family(root: Path, decoder_name: str, stand_in: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(VAE, device decoder) of the embedded model, or random stand-ins for smoke runs."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    if stand_in:
        from models import components

        torch.manual_seed(0)
        return components.new_vae().eval(), components.new_tiny_decoder(1.0).eval()
    return (AutoencoderKL.from_pretrained(str(root / "vae")).eval(),
            AutoencoderTiny.from_pretrained(str(root / decoder_name)).eval())


@torch.no_grad()
def make_dataset(vae: torch.nn.Module, seeds: range, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (N, 4, 16, 16) and their clean VAE decodes (N, 3, 64, 64) in [0, 1] for rendered shapes."""
    from models.decoders import decode_latents
    from models.shapes import render_batch

    lat, img = [], []
    for start in range(seeds.start, seeds.stop, 256):
        images, _, _ = render_batch(range(start, min(start + 256, seeds.stop)))
        z = vae.encode(images.to(device)).latent_dist.mean
        lat.append(z.float())
        img.append(decode_latents(vae, z).float())
    return torch.cat(lat), torch.cat(img)


def forward_link(net: JsccNet, latents: torch.Tensor, snr_db: torch.Tensor, rayleigh: torch.Tensor,
                 ratio: float, merge_map: str = "global") -> torch.Tensor:
    """Latents (B, C, H, W) → received latent estimates, through merge, JSCC, channel, JSCC⁻¹, unmerge."""
    b, c, h, w = latents.shape
    tokens = latents.reshape(b, c, h * w)
    if ratio > 0:
        tokens, mask, dst = merge_tokens(tokens, ratio, merge_map, (h, w))
    sym = net.encode(tokens, snr_db)
    rx = torch_channel(sym, snr_db, rayleigh)
    est = net.decode(rx, snr_db, tokens.shape[-1])
    if ratio > 0:
        est = unmerge_tokens(est, mask, dst)
    return est.reshape(b, c, h, w)


def decode_image(decoder: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Device decoder with gradients, images in [0, 1] (not clamped, so the loss sees saturation)."""
    return decoder.decode(latents).sample.add(1.0).div(2.0)


def train_variant(name: str, ratio: float, latents: torch.Tensor, targets: torch.Tensor,
                  decoder: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> JsccNet:
    """Train one link and return it.

    Two phases, because the frozen decoder's backward pass dominates the cost on a CPU: ``--latent-steps``
    steps of latent MSE alone (cheap; gets the link close), then ``--steps`` steps of the E2E objective
    (pixel MSE through the frozen device decoder + ``--latent-weight`` × latent MSE). Stops early when
    ``--minutes`` pass.
    """
    torch.manual_seed(args.seed)
    net = JsccNet(in_channels=latents.shape[1], hidden=args.hidden,
                  symbols_per_token=SYMBOLS_PER_TOKEN.get(name, args.symbols_per_token),
                  dilations=DILATIONS.get(name, (1, 2, 4, 8, 1)),
                  merge_ratio=ratio, snr_range_db=list(SNR_RANGE_DB), decoder=args.decoder).to(device)
    total = args.latent_steps + args.steps
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(total, 1), pct_start=0.05)
    lat_var = latents.var().clamp_min(1e-6)
    n = latents.shape[0]
    t0, deadline = time.monotonic(), time.monotonic() + 60.0 * args.minutes
    bar = tqdm(range(total), desc=name, disable=args.quiet)
    step = -1
    for step in bar:
        pixel_phase = step >= args.latent_steps
        batch = args.pixel_batch if pixel_phase else args.batch
        idx = torch.randint(0, n, (batch,), device=device)
        x = latents[idx]
        snr = torch.empty(batch, device=device).uniform_(*SNR_RANGE_DB)
        rayleigh = torch.arange(batch, device=device) % 2 == 1
        est = forward_link(net, x, snr, rayleigh, ratio, MERGE_MAPS.get(name, "global"))
        lat = torch.nn.functional.mse_loss(est, x) / lat_var
        if pixel_phase:
            pix = torch.nn.functional.mse_loss(decode_image(decoder, est), targets[idx])
            loss = pix + args.latent_weight * lat
        else:
            loss = lat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            post = {"lat_nmse": f"{lat.item():.3f}"}
            if pixel_phase:
                post["pix_psnr"] = f"{-10 * math.log10(max(pix.item(), 1e-10)):.2f}"
            bar.set_postfix(post)
            if step % 100 == 0:
                logger.info("%s step %d/%d %s (%.0f s)", name, step, total, post, time.monotonic() - t0)
        if time.monotonic() > deadline:
            logger.warning("%s: time budget of %.1f min reached at step %d", name, args.minutes, step)
            break
    net.config["train_steps"] = step + 1
    net.config["merge_map"] = MERGE_MAPS.get(name, "global")
    net.config["train_seconds"] = round(time.monotonic() - t0, 1)
    return net.cpu().eval()


@torch.no_grad()
def evaluate(net: JsccNet, ratio: float, latents: torch.Tensor, targets: torch.Tensor,
             decoder: torch.nn.Module, merge_map: str = "global") -> dict[str, float]:
    """Pixel PSNR (dB) against the clean decode at a few SNRs, AWGN and Rayleigh (the torch channel)."""
    out = {}
    for kind, fading in (("awgn", False), ("rayleigh", True)):
        for snr_db in (-5.0, 0.0, 10.0, 20.0):
            torch.manual_seed(1)
            snr = torch.full((latents.shape[0],), snr_db)
            est = forward_link(net, latents, snr, torch.full_like(snr, fading, dtype=torch.bool), ratio, merge_map)
            mse = torch.nn.functional.mse_loss(decode_image(decoder, est).clamp(0, 1), targets).item()
            out[f"{kind}@{snr_db:g}"] = round(-10 * math.log10(max(mse, 1e-10)), 2)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m codec.train_jscc", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-root", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "shapes_v1")
    p.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for jscc_*.safetensors (default: the model's codec set, <model root>/codecs/image-k0)")
    p.add_argument("--decoder", default="robust_decoder", help="frozen device decoder folder under the model root")
    p.add_argument("--stand-in", action="store_true", help="random VAE/decoder (smoke runs before the model exists)")
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-val", type=int, default=128)
    p.add_argument("--latent-steps", type=int, default=700, help="steps of latent MSE alone (cheap)")
    p.add_argument("--steps", type=int, default=200, help="steps of the E2E pixel objective")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pixel-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--symbols-per-token", type=int, default=2)
    p.add_argument("--latent-weight", type=float, default=0.05)
    p.add_argument("--minutes", type=float, default=8.0, help="time budget per variant")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Train the selected links and write them under ``--out``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.stand_in and not (args.model_root / "vae").is_dir():
        logger.error("no model at %s (pass --stand-in for a smoke run)", args.model_root)
        return 2
    vae, decoder = load_family(args.model_root, args.decoder, args.stand_in)
    vae, decoder = vae.to(device), decoder.to(device)
    decoder.requires_grad_(False)
    t0 = time.monotonic()
    latents, targets = make_dataset(vae, range(0, args.n_train), device)
    val_lat, val_img = make_dataset(vae, range(args.n_train, args.n_train + args.n_val), device)
    logger.info("dataset: %d latents (std %.3f) in %.1f s", latents.shape[0], latents.std().item(), time.monotonic() - t0)
    names = list(VARIANTS) if args.variant == "all" else [args.variant]
    out = args.out or image_set_dir(args.model_root)
    for name in names:
        net = train_variant(name, VARIANTS[name], latents, targets, decoder, args, device)
        net.config["val_psnr_db"] = evaluate(net, VARIANTS[name], val_lat.cpu(), val_img.cpu(), decoder.cpu(),
                                             MERGE_MAPS.get(name, "global"))
        decoder.to(device)
        net.config["trained_on"] = "stand-in" if args.stand_in else str(args.model_root.name)
        net.save(out / f"{name}.safetensors")
        logger.info("%s: %d steps in %.0f s, val PSNR %s → %s", name, net.config["train_steps"],
                    net.config["train_seconds"], net.config["val_psnr_db"], out / f"{name}.safetensors")
        # The set's config.json hashes every file: a retrained link changes the set's content hash.
        refresh_image_set_config(out, args.model_root, name, {
            "method": "python -m codec.train_jscc", "features": "vae-mean of rendered shapes",
            "train_steps": net.config["train_steps"], "val_psnr_db": net.config["val_psnr_db"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
