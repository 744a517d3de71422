"""Registries of codec stages and named codecs.

A codec is chosen per request by name: either a preset (``raw-fp16``, ``uint8``, ``analog`` ...) or a
composition of registered stage names joined by ``+`` and ending in a terminal coder, e.g.
``dtufc+gained``. Adding a stage is one file with ``@register_stage`` plus one import line in
``codec/__init__.py``.

Every preset names the feature *sources* it is meant for (:data:`SOURCES`): ``"image"`` (the diffusion
model's latents) and ``"llm-hidden"`` (a language model's hidden states after the edge's last layer, sent as
``{"hidden": (1, T, d)}``). A service lists only the codecs of its source, so an image request never offers a
codec whose fitted set belongs to a language model; generic codecs (``raw-fp16``, ``analog`` ...) serve both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from codec.base import AnalogMapper, Codec, CodecError, SourceCoder, TensorStage
from codec.sets import SOURCES
from serving.registry import Registry

STAGES: Registry[type[TensorStage]] = Registry("codec stage")
TERMINALS: Registry[type[SourceCoder] | type[AnalogMapper]] = Registry("terminal coder")
PRESETS: Registry["CodecPreset"] = Registry("codec")

S = TypeVar("S", bound=type)


@dataclass(frozen=True)
class CodecPreset:
    """A named codec: its stage spec, default parameters, a one-line description and the feature sources
    (:data:`SOURCES`) it serves."""

    name: str
    spec: str
    description: str
    params: dict[str, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ("image",)


def register_stage(name: str) -> Callable[[S], S]:
    return STAGES.register(name)


def register_terminal(name: str) -> Callable[[S], S]:
    return TERMINALS.register(name)


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise CodecError(f"unknown feature source {source!r}; known: {', '.join(SOURCES)}")
    return source


def register_preset(name: str, spec: str, description: str, sources: tuple[str, ...] = ("image",),
                    **params: str) -> None:
    """Register preset ``name``: ``spec`` (``+``-joined stages and a terminal), default ``params`` and the
    feature ``sources`` it serves (default: image latents only, what every preset served before sources)."""
    if not sources:
        raise ValueError(f"preset {name!r} must serve at least one source")
    PRESETS.add(name, CodecPreset(name, spec, description, dict(params), tuple(_check_source(s) for s in sources)))


def codec_names(source: str | None = None) -> list[str]:
    """Sorted preset names; with ``source``, only the presets serving that feature source."""
    if source is None:
        return sorted(PRESETS.names())
    _check_source(source)
    return sorted(n for n in PRESETS.names() if source in PRESETS.get(n).sources)


def list_codecs(source: str | None = None) -> list[CodecPreset]:
    """The presets (all, or those serving ``source``), sorted by name."""
    return [PRESETS.get(n) for n in codec_names(source)]


def stage_names() -> list[str]:
    return sorted(STAGES.names())


def terminal_names() -> list[str]:
    return sorted(TERMINALS.names())


def resolve_spec(name: str) -> tuple[str, dict[str, str]]:
    """The stage spec and default params of a codec name (a preset or a ``+``-joined composition)."""
    if name in PRESETS:
        preset = PRESETS.get(name)
        return preset.spec, dict(preset.params)
    return name, {}


def _parts(name: str) -> tuple[list[type[TensorStage]], type[SourceCoder] | type[AnalogMapper]]:
    spec, _ = resolve_spec(name)
    parts = [p for p in spec.split("+") if p]
    if not parts:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(codec_names())}")
    *stage_parts, terminal_part = parts
    if terminal_part not in TERMINALS:
        raise CodecError(f"unknown codec {name!r}: {terminal_part!r} is not a terminal coder; "
                         f"known codecs: {', '.join(codec_names())}; terminals: {', '.join(terminal_names())}")
    for part in stage_parts:
        if part not in STAGES:
            raise CodecError(f"unknown codec {name!r}: {part!r} is not a stage; stages: {', '.join(stage_names())}")
    return [STAGES.get(p) for p in stage_parts], TERMINALS.get(terminal_part)


def codec_kind(name: str) -> str:
    """``"analog"`` or ``"digital"``, from the terminal coder's class (nothing is loaded)."""
    _, terminal = _parts(name)
    return "analog" if issubclass(terminal, AnalogMapper) else "digital"


def request_params(name: str) -> tuple[str, ...]:
    """The codec params a request may set for codec ``name`` (nothing is loaded)."""
    stages, terminal = _parts(name)
    out: list[str] = []
    for part in (*stages, terminal):
        out += [p for p in part.request_params if p not in out]
    return tuple(out)


def uses_codec_set(name: str) -> bool:
    """Whether codec ``name`` reads fitted data from a codec set (nothing is loaded): only then must the edge's
    and the device's sets be the same; raw, uint8 and analog codecs work with or without a set."""
    stages, terminal = _parts(name)
    return any(part.uses_codec_set for part in (*stages, terminal))


def check_request_params(name: str, params: dict[str, str]) -> None:
    """Refuse request-supplied params outside codec ``name``'s allow-list: header fields such as
    ``side_info`` or ``coded_tensors`` are the codec's own and never set by a request."""
    allowed = request_params(name)
    for key in params:
        if key not in allowed:
            raise CodecError(f"codec_params.{key}: not a parameter of codec {name!r} "
                             f"(takes: {', '.join(allowed) or 'none'})")


def build_codec(name: str, params: dict[str, str] | None = None, weights_dir: Path | None = None) -> Codec:
    """Build the codec ``name`` with request or header ``params`` over the defaults.

    Raises :class:`CodecError` naming the unknown part when ``name`` is neither a preset nor a valid
    composition.
    """
    stages, terminal = _parts(name)
    merged = {**resolve_spec(name)[1], **(params or {})}
    return Codec(name, [cls(merged, weights_dir) for cls in stages], terminal(merged, weights_dir), merged, weights_dir)
