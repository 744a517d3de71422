"""Text-to-image backends the edge can serve, loaded from local folders in diffusers format only.

A backend encodes prompts and runs the denoising loop for a batch of requests; it never decodes images
(that is the device's job). Families are chosen by the folder's contents and registered by name, so adding
one (SDXL, SD3 ...) is one class plus one ``@register_backend`` line.
"""

from __future__ import annotations

import abc
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from models.denoising import Conditioning, DenoiseRows, Predictor, initial_noise, run_steps, unet_predictor

log = logging.getLogger(__name__)


class ModelFolderError(RuntimeError):
    """The model folder is missing or incomplete; the message says what to put where."""


@dataclass
class BatchItem:
    """One request inside a batch, as the backend sees it."""

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

    family: str = ""

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.path = path
        self.device = torch.device(device)
        self.dtype = dtype

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
    def generate(self, items: Sequence[BatchItem], steps: int, shape: tuple[int, int, int], split_step: int
                 ) -> BatchResult:
        """Denoise a batch for ``split_step`` of ``steps`` steps (0: all); return per-item latents.

        Fully denoised latents are returned in VAE space (divided by the VAE scaling factor, what the
        device's decoder takes); a partial run returns scheduler-space latents for the device to finish.
        """


_BACKENDS: dict[str, type[TextToImageBackend]] = {}
B = TypeVar("B", bound=type[TextToImageBackend])


def register_backend(family: str) -> Callable[[B], B]:
    def wrap(cls: B) -> B:
        cls.family = family
        _BACKENDS[family] = cls
        return cls
    return wrap


def backend_families() -> list[str]:
    return sorted(_BACKENDS)


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
    family = family or detect_family(path)
    if family not in _BACKENDS:
        raise ModelFolderError(f"model family {family!r} is not supported; known: {', '.join(backend_families())}")
    return _BACKENDS[family](path, device=device, dtype=dtype)


def require_subfolders(path: Path, names: Sequence[str]) -> None:
    missing = [n for n in names if not (path / n).is_dir()]
    if missing:
        raise ModelFolderError(
            f"model folder {path} lacks {', '.join(n + '/' for n in missing)}; a diffusers checkpoint "
            f"of this family needs {', '.join(n + '/' for n in names)} (each with config.json and safetensors "
            "weights, or tokenizer files). Copy the checkpoint there; nothing is downloaded at run time.")


def _scheduler_from_folder(folder: Path) -> Callable[[], object]:
    """A factory of fresh schedulers (each batch mutates its own timesteps) from ``scheduler/``."""
    import diffusers

    config = json.loads((folder / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"))
    return lambda: cls.from_config(config)


class DiffusersBackend(TextToImageBackend):
    """Shared batch loop of the diffusers families: subclasses load components and say how to encode
    prompts, predict noise and map final latents to the VAE's input space."""

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(path, device, dtype)
        vae_config = json.loads((path / "vae" / "config.json").read_text())
        self._scaling = float(vae_config.get("scaling_factor", 0.18215))
        self._shift = float(vae_config.get("shift_factor") or 0.0)
        self._vae_factor = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
        self._new_scheduler = _scheduler_from_folder(path / "scheduler")
        self._uncond_cache: Conditioning | None = None

    # -- what a family provides ------------------------------------------------------------------------
    latent_channels: int = 4
    sample_size: int = 64

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str], height: int, width: int) -> Conditioning: ...

    @abc.abstractmethod
    def predictor(self) -> Predictor: ...

    # -- shared ----------------------------------------------------------------------------------------
    @property
    def vae_scaling_factor(self) -> float:
        return self._scaling

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

    def _uncond(self, n: int, height: int, width: int) -> Conditioning:
        if self._uncond_cache is None:
            self._uncond_cache = self.encode_prompts([""], height, width)
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._uncond_cache.items()}

    def generate(self, items: Sequence[BatchItem], steps: int, shape: tuple[int, int, int], split_step: int
                 ) -> BatchResult:
        import time

        height, width = shape[1] * self._vae_factor, shape[2] * self._vae_factor
        t0 = time.perf_counter()
        with torch.inference_mode():
            cond = self.encode_prompts([it.prompt for it in items], height, width)
            uncond = self._uncond(len(items), height, width)
        t1 = time.perf_counter()
        scheduler = self._new_scheduler()
        scheduler.set_timesteps(steps, device=self.device)
        latents = initial_noise([it.seed for it in items], shape, self.dtype, self.device)
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        guidance = torch.tensor([it.guidance_scale for it in items], device=self.device)
        rows = DenoiseRows(latents, cond, uncond, guidance)
        alive = list(range(len(items)))  # batch row -> item index

        def keep() -> list[bool]:
            return [not items[i].cancelled.is_set() for i in alive]

        def on_drop(mask: Sequence[bool]) -> None:
            alive[:] = [i for i, k in zip(alive, mask) if k]

        timesteps = scheduler.timesteps if split_step == 0 else scheduler.timesteps[:split_step]
        rows = run_steps(self.predictor(), scheduler, rows, timesteps, keep, on_drop)
        t2 = time.perf_counter()
        out: list[torch.Tensor | None] = [None] * len(items)
        # The device's decoder takes what diffusers hands the VAE: latents / scaling (+ shift for SD3).
        final = rows.latents if split_step else rows.latents / self._scaling + self._shift
        for row, i in enumerate(alive):
            out[i] = final[row].detach().to("cpu", torch.float32)
        return BatchResult(out, t1 - t0, t2 - t1)


@register_backend("ldm")
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


@register_backend("sdxl")
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


@register_backend("sd3")
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
