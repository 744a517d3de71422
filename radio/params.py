"""Parameter fields with their ranges, written once and read by validation, the REST schema and the CLI.

A channel model's parameters are a frozen dataclass whose fields are declared with :func:`param`; the range,
unit and help text live in the field's metadata, so :func:`validate_fields` checks them, the device builds
its pydantic schema from them (the OpenAPI page shows the ranges) and nothing restates them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass
from typing import Any, Sequence


class ChannelError(ValueError):
    """An invalid channel specification; the message names the field (``channel.<field>: ...``)."""


@dataclass(frozen=True)
class FieldSpec:
    """What one parameter accepts."""

    name: str
    kind: type                      # float, int, str, or list (a list of floats, each within lo..hi)
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""
    required: bool = False
    default: Any = None


def param(default: Any = MISSING, *, kind: type = float, help: str, lo: float | None = None,
          hi: float | None = None, choices: Sequence[str] = (), unit: str = "") -> Any:
    """A dataclass field with its range; no default means the parameter is required."""
    meta = {"kind": kind, "help": help, "lo": lo, "hi": hi, "choices": tuple(choices), "unit": unit}
    return dataclasses.field(default=default, metadata={"radio": meta})


def field_specs(cls: type) -> list[FieldSpec]:
    """The :class:`FieldSpec` of every :func:`param` field of a params dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("radio")
        if meta is None:
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        out.append(FieldSpec(f.name, meta["kind"], meta["help"], meta["lo"], meta["hi"], meta["choices"],
                             meta["unit"], required, None if required else f.default))
    return out


def check_value(spec: FieldSpec, value: Any, prefix: str = "channel") -> Any:
    """``value`` converted to the field's kind and checked against its range; raises :class:`ChannelError`."""
    where = f"{prefix}.{spec.name}"
    if value is None:
        if spec.required:
            raise ChannelError(f"{where}: required")
        return None
    if spec.kind is list:
        return _check_list(spec, value, where)
    if spec.kind is str:
        if not isinstance(value, str):
            raise ChannelError(f"{where}: must be a string, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise ChannelError(f"{where}: unknown {spec.name} {value!r}; known: {', '.join(spec.choices)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ChannelError(f"{where}: must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ChannelError(f"{where}: must be finite, got {value!r}")
    if spec.kind is int:
        if float(value) != int(value):
            raise ChannelError(f"{where}: must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if (spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi):
        raise ChannelError(f"{where}: {value:g}{spec.unit and ' ' + spec.unit} is outside "
                           f"[{spec.lo:g}, {spec.hi:g}]")
    return value


#: The longest list a list-valued parameter takes (an SNR trace of an hour at 1 s steps fits).
MAX_LIST_LENGTH = 4096


def _check_list(spec: FieldSpec, value: Any, where: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ChannelError(f"{where}: must be a list of numbers, got {value!r}")
    if not 1 <= len(value) <= MAX_LIST_LENGTH:
        raise ChannelError(f"{where}: must hold 1 to {MAX_LIST_LENGTH} values, got {len(value)}")
    item = dataclasses.replace(spec, kind=float)
    return tuple(check_value(item, v, where.rsplit(".", 1)[0]) for v in value)


def validate_fields(obj: Any, prefix: str = "channel") -> None:
    """Check every :func:`param` field of a params dataclass instance."""
    for spec in field_specs(type(obj)):
        check_value(spec, getattr(obj, spec.name), prefix)


def build_params(cls: type, values: dict[str, Any], prefix: str = "channel", owner: str = "") -> Any:
    """An instance of params dataclass ``cls`` from ``values`` (missing optional fields take defaults).

    Unknown keys are an error naming the key (``owner`` says whose parameters these are)."""
    specs = {s.name: s for s in field_specs(cls)}
    for key in values:
        if key not in specs:
            known = ", ".join(specs) or "none"
            raise ChannelError(f"{prefix}.{key}: not a parameter of {owner or cls.__name__} (takes: {known})")
    checked = {name: check_value(spec, values.get(name), prefix) for name, spec in specs.items()
               if name in values or spec.required}
    return cls(**checked)
