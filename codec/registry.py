"""Registries of codec stages and named codecs.

A codec is chosen per request by name: either a preset (``raw-fp16``, ``uint8``, ``analog`` ...) or a
composition of registered stage names joined by ``+`` and ending in a terminal coder, e.g.
``dtufc+hyperprior``. Adding a stage is one file with ``@register_stage`` plus one import line in
``codec/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from codec.base import AnalogMapper, Codec, CodecError, SourceCoder, TensorStage

_STAGES: dict[str, type[TensorStage]] = {}
_TERMINALS: dict[str, type[SourceCoder] | type[AnalogMapper]] = {}
_PRESETS: dict[str, "CodecPreset"] = {}

S = TypeVar("S", bound=type)


@dataclass(frozen=True)
class CodecPreset:
    """A named codec: its stage spec, default parameters and a one-line description."""

    name: str
    spec: str
    description: str
    params: dict[str, str] = field(default_factory=dict)


def register_stage(name: str) -> Callable[[S], S]:
    def wrap(cls: S) -> S:
        if name in _STAGES:
            raise ValueError(f"stage {name!r} registered twice")
        cls.name = name
        _STAGES[name] = cls
        return cls
    return wrap


def register_terminal(name: str) -> Callable[[S], S]:
    def wrap(cls: S) -> S:
        if name in _TERMINALS:
            raise ValueError(f"terminal coder {name!r} registered twice")
        cls.name = name
        _TERMINALS[name] = cls
        return cls
    return wrap


def register_preset(name: str, spec: str, description: str, **params: str) -> None:
    if name in _PRESETS:
        raise ValueError(f"codec {name!r} registered twice")
    _PRESETS[name] = CodecPreset(name, spec, description, dict(params))


def codec_names() -> list[str]:
    return sorted(_PRESETS)


def list_codecs() -> list[CodecPreset]:
    return [_PRESETS[n] for n in codec_names()]


def stage_names() -> list[str]:
    return sorted(_STAGES)


def terminal_names() -> list[str]:
    return sorted(_TERMINALS)


def resolve_spec(name: str) -> tuple[str, dict[str, str]]:
    """The stage spec and default params of a codec name (a preset or a ``+``-joined composition)."""
    if name in _PRESETS:
        preset = _PRESETS[name]
        return preset.spec, dict(preset.params)
    return name, {}


def codec_kind(name: str) -> str:
    """``"analog"`` or ``"digital"``, from the terminal coder's class (nothing is loaded)."""
    spec, _ = resolve_spec(name)
    terminal = _TERMINALS.get(spec.split("+")[-1])
    if terminal is None:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(codec_names())}")
    return "analog" if issubclass(terminal, AnalogMapper) else "digital"


def build_codec(name: str, params: dict[str, str] | None = None, weights_dir: Path | None = None) -> Codec:
    """Build the codec ``name`` with request or header ``params`` over the defaults.

    Raises :class:`CodecError` naming the unknown part when ``name`` is neither a preset nor a valid
    composition.
    """
    spec, defaults = resolve_spec(name)
    parts = [p for p in spec.split("+") if p]
    if not parts:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(codec_names())}")
    *stage_parts, terminal_part = parts
    if terminal_part not in _TERMINALS:
        raise CodecError(f"unknown codec {name!r}: {terminal_part!r} is not a terminal coder; "
                         f"known codecs: {', '.join(codec_names())}; terminals: {', '.join(terminal_names())}")
    merged = {**defaults, **(params or {})}
    stages = []
    for part in stage_parts:
        if part not in _STAGES:
            raise CodecError(f"unknown codec {name!r}: {part!r} is not a stage; stages: {', '.join(stage_names())}")
        stages.append(_STAGES[part](merged, weights_dir))
    terminal = _TERMINALS[terminal_part](merged, weights_dir)
    return Codec(name, stages, terminal, merged, weights_dir)
