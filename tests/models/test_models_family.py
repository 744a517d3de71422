"""The embedded shapes_v1 family: its procedural data set, a smoke run of every training stage (through
`meg train`, with resumable checkpoints) and the committed weights loading through the services' loaders.

Training runs in-process in smoke mode (a few steps on a 32-image pool) so the whole file stays within
tens of seconds on two CPU cores; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from models import DEFAULT_MODEL_DIR, shapes
from models import components as C
from models.train import main as train_main

# --------------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------------

#: Fraction of its bounding box a rendered shape fills: circle pi/4, square 1, triangle 1/2 (measured
#: ranges over 600 seeds: 0.75-0.82, 1.0, 0.49-0.56; the bounds leave room for anti-aliasing).
FILL_RANGE = {"circle": (0.70, 0.87), "square": (0.95, 1.01), "triangle": (0.42, 0.62)}


def _fill_ratio_and_colours(image: np.ndarray, fg_nominal: tuple[int, int, int]) -> tuple[float, np.ndarray, np.ndarray]:
    """(fill ratio of the foreground's bounding box, mean foreground colour, corner colour)."""
    img = image.astype(np.float64)
    bg = img[0, 0]  # shapes keep a margin from the border, so a corner is background
    threshold = 0.5 * np.linalg.norm(np.asarray(fg_nominal, np.float64) - bg)
    mask = np.linalg.norm(img - bg, axis=-1) > threshold
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    inner = np.linalg.norm(img - bg, axis=-1) > 1.5 * threshold  # away from the anti-aliased edge
    return float(mask.sum() / box), img[inner].mean(0), bg


def test_samples_are_deterministic_by_seed() -> None:
    a, b = shapes.sample(1234), shapes.sample(1234)
    assert a.caption == b.caption and np.array_equal(a.image, b.image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    others = [shapes.sample(s) for s in range(1235, 1240)]
    assert any(not np.array_equal(a.image, o.image) for o in others)


@pytest.mark.parametrize("seed", range(0, 240, 7))
def test_caption_matches_rendered_image(seed: int) -> None:
    s = shapes.sample(seed)
    assert shapes.caption_to_labels(s.caption) == (s.color, s.shape, s.background)
    assert s.caption == f"a {s.color} {s.shape} on a {s.background} background"
    fill, fg, bg = _fill_ratio_and_colours(s.image, shapes.COLOR_RGB[s.color])
    lo, hi = FILL_RANGE[s.shape]
    assert lo <= fill <= hi, f"{s.caption}: fill ratio {fill:.3f}"
    # The nearest nominal colours are the labelled ones (jitter is +-20 / +-8 per channel).
    nearest_fg = min(shapes.COLORS, key=lambda c: np.linalg.norm(fg - np.asarray(shapes.COLOR_RGB[c])))
    nearest_bg = min(shapes.BACKGROUNDS, key=lambda c: np.linalg.norm(bg - np.asarray(shapes.BACKGROUND_RGB[c])))
    assert (nearest_fg, nearest_bg) == (s.color, s.background)


def test_every_label_occurs_and_captions_parse_back() -> None:
    seen = {(s.color, s.shape, s.background) for s in (shapes.sample(i) for i in range(600))}
    assert len(seen) == len(shapes.COMBINATIONS) == 54
    with pytest.raises(ValueError):
        shapes.caption_to_labels("a purple circle on a white background")


def test_heldout_pairs_are_balanced_and_disjoint_from_training() -> None:
    pairs = shapes.heldout_set(216)
    seeds = [s for _, s in pairs]
    assert len(set(seeds)) == len(seeds) and min(seeds) >= shapes.HELDOUT_SEED_BASE
    counts: dict[str, int] = {}
    for caption, _ in pairs:
        counts[caption] = counts.get(caption, 0) + 1
    assert len(counts) == 54 and set(counts.values()) == {4}
    ref = shapes.heldout_sample(*pairs[5])
    assert ref.caption == pairs[5][0]
    # Training draws seeds below the held-out base; a data set reaching into it is refused.
    with pytest.raises(ValueError):
        shapes.ShapesDataset(10, seed_offset=shapes.HELDOUT_SEED_BASE - 5)
    item = shapes.ShapesDataset(4)[3]
    assert item["pixel_values"].shape == (3, 64, 64) and float(item["pixel_values"].abs().max()) <= 1.0
    assert item["caption"] == shapes.sample(3).caption


# --------------------------------------------------------------------------------------------------
# Training CLI (smoke mode)
# --------------------------------------------------------------------------------------------------

STAGE_FOLDERS = {
    "classifier": C.CLASSIFIER, "vae": C.VAE, "text": C.TEXT_ENCODER, "unet": C.UNET,
    "decoder": C.TINY_DECODER, "robust-decoder": C.ROBUST_DECODER,
}


@pytest.fixture(scope="module")
def smoke_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Every stage once, each through `meg train <stage> --smoke`, into a temporary folder."""
    from meg_cli.main import main as meg_main

    root = tmp_path_factory.mktemp("smoke_family")
    out, work = root / "model", root / "work"
    for stage in ["data", "classifier", "vae", "text", "unet", "decoder", "robust-decoder", "evaluate"]:
        assert meg_main(["train", stage, "--smoke", "--out", str(out), "--work-dir", str(work)]) == 0, stage
    return out, work


def test_smoke_run_writes_every_component(smoke_family: tuple[Path, Path]) -> None:
    out, work = smoke_family
    for stage, folder in STAGE_FOLDERS.items():
        assert (out / folder / "config.json").is_file(), stage
        assert list((out / folder).glob("*.safetensors")), stage
    for checkpoint_dir in ("classifier", "vae", "text", "unet", "tiny_decoder", "robust_decoder"):
        assert (work / checkpoint_dir / "ckpt.pt").is_file(), checkpoint_dir
    assert (out / C.TOKENIZER / "vocab.json").is_file() and (out / C.SCHEDULER / "scheduler_config.json").is_file()
    assert (work / "data" / "data_preview.png").is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert set(index["_meg_extra_components"]) == {C.TINY_DECODER, C.ROBUST_DECODER, C.CLASSIFIER}
    log = json.loads((out / "training_log.json").read_text())
    assert set(STAGE_FOLDERS) | {"data", "evaluate"} <= set(log)
    assert all(log[s]["steps"] == 3.0 for s in STAGE_FOLDERS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["generation"]["shape_acc"] <= 1.0


def test_smoke_family_loads_through_the_service_loaders(smoke_family: tuple[Path, Path]) -> None:
    from device_client.decoders import DecoderBank
    from models.backends import BatchItem, load_backend

    out, _ = smoke_family
    backend = load_backend(out)
    shape = backend.latent_shape(0, 0)
    assert shape == (4, 16, 16)
    result = backend.generate([BatchItem("a red circle on a white background", 1, 4.0, threading.Event())], 2, shape, 0)
    bank = DecoderBank(out)
    assert set(bank.available()) == {"tiny", "robust", "vae"}
    for kind in bank.available():
        assert bank.get(kind).decode(result.latents[0][None]).shape == (1, 3, 64, 64)


def test_training_resumes_from_its_checkpoint(smoke_family: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    out, work = smoke_family
    common = ["--smoke", "--out", str(out), "--work-dir", str(work / "resume")]
    assert train_main(["classifier", "--steps", "2", *common]) == 0
    ckpt = work / "resume" / "classifier" / "ckpt.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    with caplog.at_level(logging.INFO, logger="models.trainer"):
        assert train_main(["classifier", "--steps", "3", "--resume", *common]) == 0
    assert "at step 2" in caplog.text
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 3 and state["optimizer"]["state"]


def test_finetune_starts_from_the_committed_component(smoke_family: tuple[Path, Path]) -> None:
    out, work = smoke_family
    before = (out / C.UNET / "diffusion_pytorch_model.safetensors").read_bytes()
    assert train_main(["unet", "--smoke", "--finetune", "--out", str(out), "--work-dir", str(work)]) == 0
    assert (work / "unet-finetune" / "ckpt.pt").is_file()
    assert "unet-finetune" in json.loads((out / "training_log.json").read_text())
    assert (out / C.UNET / "diffusion_pytorch_model.safetensors").read_bytes() != before
    # The VAE and the text encoder are never fine-tuned in place: other trained parts depend on them.
    with pytest.raises(SystemExit):
        train_main(["vae", "--finetune", "--smoke", "--out", str(out), "--work-dir", str(work)])


def test_meg_train_help_lists_the_stages(capsys: pytest.CaptureFixture[str]) -> None:
    from meg_cli.main import main as meg_main

    with pytest.raises(SystemExit) as exc:
        meg_main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for stage in ["data", "vae", "text", "unet", "decoder", "robust-decoder", "classifier", "evaluate"]:
        assert stage in text


# --------------------------------------------------------------------------------------------------
# The committed family
# --------------------------------------------------------------------------------------------------


def test_committed_metrics_hold_what_the_card_quotes() -> None:
    metrics = json.loads((DEFAULT_MODEL_DIR / "metrics.json").read_text())
    gen = metrics["generation"]
    for key in ("color_acc", "shape_acc", "background_acc", "all_correct_acc", "shapes_frechet_distance"):
        assert 0.0 <= gen[key] <= (1.0 if key.endswith("acc") else 1e6), key
    assert metrics["heldout_prompts"] >= 54 and metrics["guidance_scale"] > 0 and metrics["sampling_steps"] > 0
    assert metrics["vae_reconstruction_psnr_db"] > 20 and metrics["tiny_decoder_psnr_vs_vae_db"] > 20
    channel = metrics["channel_psnr_db_vs_clean_vae_decode"]
    for kind in ("awgn", "rayleigh"):
        for snr in ("0dB", "5dB"):
            plain, robust = channel[f"{kind}_{snr}_plain_tiny_psnr"], channel[f"{kind}_{snr}_robust_tiny_psnr"]
            assert robust > plain, f"{kind} {snr}: robust {robust:.2f} dB <= plain {plain:.2f} dB"
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    for value in (gen["color_acc"], gen["shape_acc"]):
        assert f"{100 * value:.1f} %" in card
    assert f"guidance scale {metrics['guidance_scale']:g}" in card


def test_committed_family_generates_through_the_edge_and_device_loaders() -> None:
    """The edge backend and the reference sampler agree, and the device's decoders give images the
    family's own classifier recognises (colour and background; shape is the weakest attribute)."""
    from device_client.decoders import DecoderBank
    from models.backends import BatchItem, load_backend
    from models.classifier import ShapesClassifier
    from models.sampling import generate_latents

    metrics = json.loads((DEFAULT_MODEL_DIR / "metrics.json").read_text())
    guidance, steps = float(metrics["guidance_scale"]), int(metrics["sampling_steps"])
    prompts = ["a red circle on a white background", "a green triangle on a black background",
               "a blue square on a gray background"]
    backend = load_backend(DEFAULT_MODEL_DIR)
    items = [BatchItem(p, 7 + i, guidance, threading.Event()) for i, p in enumerate(prompts)]
    edge = torch.stack(backend.generate(items, steps, backend.latent_shape(0, 0), 0).latents)
    reference = generate_latents(C.load_tokenizer(DEFAULT_MODEL_DIR), C.load_text_encoder(DEFAULT_MODEL_DIR),
                                 C.load_unet(DEFAULT_MODEL_DIR), C.load_scheduler(DEFAULT_MODEL_DIR),
                                 prompts, [7, 8, 9], steps, guidance)
    torch.testing.assert_close(edge, reference, atol=1e-3, rtol=1e-3)

    bank = DecoderBank(DEFAULT_MODEL_DIR)
    judge = ShapesClassifier.from_pretrained(DEFAULT_MODEL_DIR / C.CLASSIFIER)
    vae_images = bank.get("vae").decode(edge)
    for kind in ("tiny", "robust", "vae"):
        images = bank.get(kind).decode(edge)
        assert images.shape == (3, 3, 64, 64)
        mse = (images - vae_images).pow(2).mean().item()
        assert kind == "vae" or 10 * np.log10(1.0 / max(mse, 1e-10)) > 20.0, kind
        predicted = judge.predict(images * 2 - 1)
        for (colour, _shape, background), prompt in zip(predicted, prompts):
            want = shapes.caption_to_labels(prompt)
            assert (colour, background) == (want[0], want[2]), f"{kind}: {prompt} -> {predicted}"
