"""``meg train unet``: text-conditional latent denoiser with caption dropout (for CFG).

Depends on vae/, tokenizer/ and text_encoder/ in --out (both kept frozen, as in SD). Latents of
a rendered pool (and its mirror image) are encoded once; every step samples
``z = (mean + std * eps) * scaling_factor``, noises it with the DDPM schedule and regresses the
v-prediction target. Hidden states of the 54 captions and of "" are pre-computed.
With ``--finetune`` training continues from the UNet already in --out (new optimizer, new LR
schedule over --steps, checkpoints in ``unet-finetune/``).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from models import components as C
from models.sampling import encode_prompts
from models.shapes import COMBINATIONS, make_caption
from models.stages.latents import encode_pool
from models.trainer import StageOptions, build_pool, random_indices, run_loop

logger = logging.getLogger(__name__)

CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    """Exponential moving average with warm-up (decay grows from 0 to EMA_DECAY)."""
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def run(opts: StageOptions) -> dict[str, float]:
    vae = C.load_vae(opts.out).to(opts.device)
    tok = C.load_tokenizer(opts.out)
    text_encoder = C.load_text_encoder(opts.out).to(opts.device)
    sf = float(vae.config.scaling_factor)
    pool = build_pool(opts.pool_size, opts.num_workers)
    m0, s0 = encode_pool(vae, pool, opts.device)
    m1, s1 = encode_pool(vae, pool, opts.device, flip=True)
    means, stds = torch.cat([m0, m1]), torch.cat([s0, s1])
    combos = torch.cat([pool.combos, pool.combos]).to(opts.device)
    del vae
    captions = [make_caption(c, s, b) for c, s, b in COMBINATIONS] + [""]
    table = encode_prompts(tok, text_encoder, captions)  # (55, L, H)
    uncond_index = len(COMBINATIONS)

    finetune = bool(opts.extra.get("finetune"))
    # Fine-tuning continues from the committed (EMA) weights; the EMA restarts from them too.
    unet = (C.load_unet(opts.out) if finetune else C.new_unet()).to(opts.device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_sched = C.new_train_scheduler()
    alphas = noise_sched.alphas_cumprod.to(opts.device)
    optim = torch.optim.AdamW(unet.parameters(), lr=opts.lr, weight_decay=1e-2)
    use_amp = opts.device.type == "cuda"

    def step(i: int) -> dict[str, float]:
        idx = random_indices(means.shape[0], opts.batch_size, opts.device)
        z = (means[idx] + stds[idx] * torch.randn_like(means[idx])) * sf
        cond = combos[idx].clone()
        cond[torch.rand(cond.shape[0], device=opts.device) < CAPTION_DROPOUT] = uncond_index
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (z.shape[0],), device=opts.device)
        noise = torch.randn_like(z)
        a = alphas[t].sqrt()[:, None, None, None]
        b = (1 - alphas[t]).sqrt()[:, None, None, None]
        noisy = a * z + b * noise
        target = a * noise - b * z  # v-prediction
        with torch.autocast(opts.device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = unet(noisy, t, encoder_hidden_states=table[cond]).sample
        loss = F.mse_loss(pred.float(), target)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optim.step()
        ema_update(ema, unet, i)
        return {"loss": loss.item()}

    stats = run_loop("unet-finetune" if finetune else "unet", opts, {"unet": unet, "ema": ema}, optim, step)
    if finetune:
        # A model made by from_pretrained records its source folder in config.json; save the weights
        # in a freshly built UNet so the committed config stays free of local paths.
        fresh = C.new_unet()
        fresh.load_state_dict(ema.cpu().state_dict())
        ema = fresh
    ema.cpu().save_pretrained(opts.out / C.UNET)
    C.new_sampling_scheduler().save_pretrained(opts.out / C.SCHEDULER)
    stats["parameters"] = float(C.count_parameters(ema))
    logger.info("unet: %s", stats)
    return stats
