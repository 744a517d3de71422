"""Embedded default model family ("shapes_v1") for the Mobile Edge Generation testbed.

The family is a miniature Stable-Diffusion-style latent diffusion model trained on a
procedural data set of coloured shapes (see :mod:`models.shapes`). It is small enough to
ship inside the repository and to train on a laptop CPU, yet it is assembled from the same
diffusers/transformers classes as Stable Diffusion, so the edge server and device client can
treat it exactly like a real checkpoint.
"""

from pathlib import Path

#: Folder holding the committed default weights.
DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "shapes_v1"

__all__ = ["DEFAULT_MODEL_DIR"]
