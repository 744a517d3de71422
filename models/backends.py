"""Text-to-image backends, loaded from local folders in diffusers format only: the edge serves them and the
split-point device finishes their denoising, so they live here, in the neutral ``models`` package that neither
service owns.

A backend encodes prompts, makes the per-request rows of the one denoising loop (:mod:`models.denoising`) and
maps final latents to what the device's decoder takes; it never decodes images. Families are chosen by the
folder's contents and registered by name in :data:`BACKENDS` (a duplicate name is refused), so adding one is
one class plus one ``@BACKENDS.register("name")`` line.
"""

from __future__ import annotations

import abc
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from models.denoising import (
    Conditioning, DenoiseRow, Predictor, denoise, initial_noise, start_row, unet_predictor,
)
from serving.registry import Registry, UnknownNameError

log = logging.getLogger(__name__)


class ModelFolderError(RuntimeError):
    """The model folder is missing or incomplete; the message says what to put where."""


@dataclass
class RowSpec:
    """What one request asks of the denoiser."""

    prompt: str
    seed: int
    guidance_scale: float
    steps: int
    start: int = 0                       # first schedule entry to run (a split point on the device)
    stop: int | None = None              # one past the last entry (the edge's split point); None: the end
    latents: torch.Tensor | None = None  # (1, C, h, w) scheduler-space latents when start > 0


@dataclass
class BatchItem:
    """One request of :meth:`TextToImageBackend.generate` (the whole-batch convenience API)."""

    prompt: str
    seed: int
    guidance_scale: float
    cancelled: threading.Event


@dataclass
class BatchResult:
    latents: list[torch.Tensor | None]   # per item; None when it was cancelled
    text_encode_s: float
    denoise_s: float


class TextToImageBackend(abc.ABC):
    """The heavy front half of a latent-diffusion model."""

    name: str = ""   # set by BACKENDS.register

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.path = path
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def family(self) -> str:
        return type(self).name

    @property
    def model_id(self) -> str:
        return self.path.name

    @abc.abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent for an image of ``height``×``width`` (0 = the model's default)."""

    @property
    @abc.abstractmethod
    def vae_scaling_factor(self) -> float: ...

    @abc.abstractmethod
    def start_rows(self, specs: Sequence[RowSpec], shape: tuple[int, int, int]) -> list[DenoiseRow]:
        """Rows of the denoising loop for ``specs`` (all of latent ``shape``), prompts encoded in one call."""

    @abc.abstractmethod
    def predictor(self) -> Predictor:
        """The denoiser as the loop calls it."""

    @abc.abstractmethod
    def to_vae_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Fully denoised scheduler-space latents → what the device's decoder takes."""

    # -- built on the above, the same for every family ---------------------------------------------------
    def generate(self, items: Sequence[BatchItem], steps: int, shape: tuple[int, int, int], split_step: int
                 ) -> BatchResult:
        """Denoise a batch for ``split_step`` of ``steps`` steps (0: all); return per-item latents.

        Fully denoised latents are returned in VAE space; a partial run returns scheduler-space latents for
        the device to finish (:meth:`finish`). Cancelled items leave the batch at the next step.
        """
        t0 = time.perf_counter()
        specs = [RowSpec(it.prompt, it.seed, it.guidance_scale, steps, stop=split_step or None) for it in items]
        rows = self.start_rows(specs, shape)
        t1 = time.perf_counter()
        owner = {id(r): i for i, r in enumerate(rows)}
        kept = denoise(self.predictor(), rows, keep=lambda r: not items[owner[id(r)]].cancelled.is_set())
        out: list[torch.Tensor | None] = [None] * len(items)
        for row in kept:
            out[owner[id(row)]] = self.row_output(row, split_step)
        return BatchResult(out, t1 - t0, time.perf_counter() - t1)

    def row_output(self, row: DenoiseRow, split_step: int) -> torch.Tensor:
        """A finished row's latents (C, h, w) on the CPU: scheduler space after a split, else VAE space."""
        final = row.latents if split_step else self.to_vae_space(row.latents)
        return final[0].detach().to("cpu", torch.float32)

    def finish(self, noisy_latents: torch.Tensor, prompt: str, split_step: int, total_steps: int,
               guidance_scale: float) -> torch.Tensor:
        """Continue a split: scheduler-space latents (1, C, h, w) after ``split_step`` of ``total_steps``
        steps → final VAE-space latents (1, C, h, w) on the CPU."""
        shape = tuple(noisy_latents.shape[1:])
        if noisy_latents.dim() != 4 or noisy_latents.shape[0] != 1 or not self.accepts_latent_shape(shape):
            raise ValueError(f"noisy latents have shape {tuple(noisy_latents.shape)}; this {self.family} model "
                             f"takes (1, {self.latent_shape(0, 0)[0]}, h, w)")
        spec = RowSpec(prompt, 0, guidance_scale, total_steps, start=split_step,
                       latents=noisy_latents.to(self.device, self.dtype))
        rows = denoise(self.predictor(), self.start_rows([spec], (shape[0], shape[1], shape[2])))
        return self.to_vae_space(rows[0].latents).detach().to("cpu", torch.float32)

    @abc.abstractmethod
    def accepts_latent_shape(self, shape: Sequence[int]) -> bool:
        """Whether (C, h, w) is a latent shape of this model."""


BACKENDS: Registry[type[TextToImageBackend]] = Registry("model family")


def backend_families() -> list[str]:
    return sorted(BACKENDS.names())


def detect_family(path: Path) -> str:
    """Which family a diffusers folder holds, from its ``model_index.json`` or, failing that, its subfolders."""
    index = path / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        if "StableDiffusion3" in name:
            return "sd3"
        if "XL" in name:
            return "sdxl"
    if (path / "transformer").is_dir():
        return "sd3"
    if (path / "text_encoder_2").is_dir():
        return "sdxl"
    return "ldm"


def load_backend(path: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 family: str | None = None) -> TextToImageBackend:
    """Load the text-to-image backend stored at ``path`` (a local folder; nothing is downloaded)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ModelFolderError(
            f"model folder {path} does not exist. Put a diffusers-format checkpoint there (subfolders "
            "tokenizer/, text_encoder/, unet/ or transformer/, scheduler/, vae/ with config.json and "
            "*.safetensors), or omit --model-dir to use the embedded default models/shapes_v1.")
    try:
        cls = BACKENDS.get(family or detect_family(path))
    except UnknownNameError as exc:
        raise ModelFolderError(f"model family not supported: {exc}") from None
    return cls(path, device=device, dtype=dtype)


def require_subfolders(path: Path, names: Sequence[str]) -> None:
    missing = [n for n in names if not (path / n).is_dir()]
    if missing:
        raise ModelFolderError(
            f"model folder {path} lacks {', '.join(n + '/' for n in missing)}; a diffusers checkpoint "
            f"of this family needs {', '.join(n + '/' for n in names)} (each with config.json and safetensors "
            "weights, or tokenizer files). Copy the checkpoint there; nothing is downloaded at run time.")


def scheduler_factory(folder: Path) -> Callable[[], Any]:
    """A factory of fresh schedulers from ``scheduler/``: every row owns one (each mutates its own state)."""
    import diffusers

    config = json.loads((folder / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"))
    return lambda: cls.from_config(config)


class DiffusersBackend(TextToImageBackend):
    """What the diffusers families share: subclasses load components and say how to encode prompts and
    predict noise; rows, the VAE mapping and the unconditional embedding cache live here."""

    latent_channels: int = 4
    sample_size: int = 64

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(path, device, dtype)
        vae_config = json.loads((path / "vae" / "config.json").read_text())
        self._scaling = float(vae_config.get("scaling_factor", 0.18215))
        self._shift = float(vae_config.get("shift_factor") or 0.0)
        self._vae_factor = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
        self.new_scheduler = scheduler_factory(path / "scheduler")
        self._uncond_cache: dict[tuple[int, int], Conditioning] = {}

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str], height: int, width: int) -> Conditioning: ...

    @property
    def vae_scaling_factor(self) -> float:
        return self._scaling

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return self._vae_factor

    @property
    def default_size(self) -> int:
        return int(self.sample_size) * self._vae_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        height, width = height or self.default_size, width or self.default_size
        for name, v in (("height", height), ("width", width)):
            if v % self._vae_factor or not (self._vae_factor <= v <= 4096):
                raise ValueError(f"{name} must be a multiple of {self._vae_factor} in "
                                 f"[{self._vae_factor}, 4096], got {v}")
        return int(self.latent_channels), height // self._vae_factor, width // self._vae_factor

    def accepts_latent_shape(self, shape: Sequence[int]) -> bool:
        if len(shape) != 3:
            return False
        try:
            return self.latent_shape(shape[1] * self._vae_factor, shape[2] * self._vae_factor) == tuple(shape)
        except ValueError:
            return False

    def to_vae_space(self, latents: torch.Tensor) -> torch.Tensor:
        # What diffusers hands the VAE: latents / scaling (+ shift for SD3).
        return latents / self._scaling + self._shift

    def _uncond(self, height: int, width: int) -> Conditioning:
        # Keyed by size: SDXL's added time ids depend on it.
        if (height, width) not in self._uncond_cache:
            with torch.inference_mode():
                self._uncond_cache[(height, width)] = self.encode_prompts([""], height, width)
        return self._uncond_cache[(height, width)]

    def start_rows(self, specs: Sequence[RowSpec], shape: tuple[int, int, int]) -> list[DenoiseRow]:
        height, width = shape[1] * self._vae_factor, shape[2] * self._vae_factor
        with torch.inference_mode():
            cond = self.encode_prompts([s.prompt for s in specs], height, width)
        uncond = self._uncond(height, width)
        rows = []
        for i, spec in enumerate(specs):
            latents = spec.latents if spec.start else initial_noise([spec.seed], shape, self.dtype, self.device)
            if latents is None:
                raise ValueError("a row starting after step 0 needs its latents")
            rows.append(start_row(self.new_scheduler(), spec.steps, latents, {k: v[i:i + 1] for k, v in cond.items()},
                                  uncond, spec.guidance_scale, start=spec.start, stop=spec.stop, seed=spec.seed))
        return rows


@BACKENDS.register("ldm")
class LatentDiffusionBackend(DiffusersBackend):
    """Stable-Diffusion-1.x-style: CLIP tokenizer + text encoder, UNet2DConditionModel, any diffusers
    scheduler. The embedded ``shapes_v1`` family and SD 1.5 both load here."""

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        require_subfolders(path, ["tokenizer", "text_encoder", "unet", "scheduler", "vae"])
        super().__init__(path, device, dtype)
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True,
                                                          torch_dtype=dtype).to(self.device).eval()
        self.unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True,
                                                         torch_dtype=dtype).to(self.device).eval()
        self.latent_channels = int(self.unet.config.in_channels)
        self.sample_size = int(self.unet.config.sample_size)
        log.info("loaded %s backend from %s on %s (%s)", self.family, path, self.device, dtype)

    def encode_prompts(self, prompts: Sequence[str], height: int, width: int) -> Conditioning:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        hidden = self.text_encoder(tokens.input_ids.to(self.device))[0].to(self.dtype)
        return {"encoder_hidden_states": hidden}

    def predictor(self) -> Predictor:
        return unet_predictor(self.unet)


@BACKENDS.register("sdxl")
class StableDiffusionXLBackend(DiffusersBackend):
    """SDXL: two CLIP text encoders (pooled embeddings + size/crop time ids as added conditioning).
    Prompt encoding reuses diffusers' own ``StableDiffusionXLPipeline.encode_prompt``."""

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        require_subfolders(path, ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet",
                                  "scheduler", "vae"])
        super().__init__(path, device, dtype)
        from diffusers import StableDiffusionXLPipeline

        self.pipe = StableDiffusionXLPipeline.from_pretrained(path, vae=None, use_safetensors=True,
                                                              torch_dtype=dtype).to(self.device)
        self.unet = self.pipe.unet.eval()
        self.latent_channels = int(self.unet.config.in_channels)
        self.sample_size = int(self.unet.config.sample_size)

    def encode_prompts(self, prompts: Sequence[str], height: int, width: int) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(prompts), device=self.device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        projection = self.pipe.text_encoder_2.config.projection_dim
        time_ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                               text_encoder_projection_dim=projection)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled,
                "time_ids": time_ids.to(self.device).expand(len(prompts), -1)}

    def predictor(self) -> Predictor:
        return unet_predictor(self.unet)


@BACKENDS.register("sd3")
class StableDiffusion3Backend(DiffusersBackend):
    """SD3: CLIP-L, CLIP-G and (optional) T5 text encoders, an MMDiT transformer denoiser, 16-channel
    latents and a flow-matching scheduler. Prompt encoding reuses ``StableDiffusion3Pipeline.encode_prompt``
    (without ``text_encoder_3/`` the T5 part is zeros, as diffusers does)."""

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        require_subfolders(path, ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer",
                                  "scheduler", "vae"])
        super().__init__(path, device, dtype)
        from diffusers import StableDiffusion3Pipeline

        extra = {} if (path / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
        self.pipe = StableDiffusion3Pipeline.from_pretrained(path, vae=None, use_safetensors=True,
                                                             torch_dtype=dtype, **extra).to(self.device)
        self.transformer = self.pipe.transformer.eval()
        self.latent_channels = int(self.transformer.config.in_channels)
        self.sample_size = int(self.transformer.config.sample_size)

    def encode_prompts(self, prompts: Sequence[str], height: int, width: int) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(prompts), None, None, device=self.device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predictor(self) -> Predictor:
        transformer = self.transformer

        def predict(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                               pooled_projections=cond["pooled_projections"]).sample
        return predict
