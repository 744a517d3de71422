"""Training stages of the shapes_v1 family; each module exposes ``run(opts) -> dict``."""
