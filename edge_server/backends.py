"""The backends moved to :mod:`models.backends` (the split-point device loads them too, and must not import
the edge); this module keeps existing imports working."""

from models.backends import (  # noqa: F401
    BACKENDS, BatchItem, BatchResult, DiffusersBackend, LatentDiffusionBackend, ModelFolderError, RowSpec,
    StableDiffusion3Backend, StableDiffusionXLBackend, TextToImageBackend, backend_families, detect_family,
    load_backend, require_subfolders,
)
