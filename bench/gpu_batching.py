"""Edge batching at full model size: an SD 1.5-sized text encoder + UNet (random weights, built from the
SD 1.5 configs) served through the edge's real step scheduler (:class:`serving.scheduler.StepScheduler`),
batching off vs on.

Run on a GPU machine: ``python -m bench.gpu_batching --device cuda --dtype float16``. Random weights change
no arithmetic cost, so the timings are those of SD 1.5. Writes ``bench/results/gpu_batching.json`` (or
``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import string
import time
from pathlib import Path

import torch

log = logging.getLogger("bench.gpu_batching")


def build_sd15_sized(root: Path) -> Path:
    """SD 1.5's UNet (860 M) and CLIP-L text encoder (123 M) configs with random weights, plus its VAE config."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in string.ascii_lowercase + string.digits:
        vocab[s] = len(vocab)
        vocab[s + "</w>"] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                  pad_token="<|endoftext|>").save_pretrained(tok_dir)
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder", safe_serialization=True)
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).save_pretrained(
        root / "unet", safe_serialization=True)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(root / "scheduler")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                  sample_size=512).save_pretrained(root / "vae", safe_serialization=True)
    return root


async def _serve_burst(scheduler: object, shape: tuple[int, int, int], n: int, steps: int) -> float:
    from edge_server.diffusion import DiffusionJob

    jobs = [DiffusionJob(f"a red circle number {i}", i, steps, 7.5, 0, shape) for i in range(n)]
    start = time.perf_counter()
    await asyncio.gather(*(scheduler.submit(j, f"r{i}") for i, j in enumerate(jobs)))
    return time.perf_counter() - start


def run(device: str, dtype_name: str, concurrency: int, steps: int, model_dir: Path) -> dict[str, object]:
    from edge_server.diffusion import DiffusionStepModel
    from serving.scheduler import SchedulerConfig, StepScheduler
    from models.backends import load_backend

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    backend = load_backend(model_dir, device=device, dtype=dtype)
    shape = backend.latent_shape(0, 0)
    params = sum(p.numel() for p in backend.unet.parameters())
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
                                  "dtype": dtype_name, "unet_params": params, "latent_shape": list(shape),
                                  "steps": steps, "concurrency": concurrency, "runs": {}}
    for max_batch in (1, concurrency):
        scheduler = StepScheduler(DiffusionStepModel(backend), SchedulerConfig(
            max_batch=max_batch, window_ms=20.0, max_queue=4 * concurrency), cpu=device == "cpu")
        asyncio.run(_serve_burst(scheduler, shape, min(2, concurrency), 2))  # warm-up (kernels, allocator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = asyncio.run(_serve_burst(scheduler, shape, concurrency, steps))
        scheduler.stop()
        results["runs"][f"max_batch_{max_batch}"] = {"seconds": seconds, "images_per_s": concurrency / seconds}
        log.info("max_batch %d: %d requests × %d steps in %.2f s (%.2f img/s)", max_batch, concurrency, steps,
                 seconds, concurrency / seconds)
    runs = results["runs"]
    results["speedup"] = runs[f"max_batch_{concurrency}"]["images_per_s"] / runs["max_batch_1"]["images_per_s"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sd15-sized"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_batching.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (args.model_dir / "unet" / "config.json").is_file():
        build_sd15_sized(args.model_dir)
    results = run(args.device, args.dtype, args.concurrency, args.steps, args.model_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
