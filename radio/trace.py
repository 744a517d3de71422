"""Channels that change over time: an SNR trace (a list of SNR values, one per ``trace_step_ms``) or a named
profile that expands to one (a walk away from the cell, a drive past it, a tunnel).

Time runs from the request's arrival at the emulator (for an LLM session, from the session's opening). The
emulator measures the channel (pilots) on arrival and feeds the estimate back, but the payload leaves only
after the edge has computed it, so an estimate is always a little stale on a changing channel, as on a real
link. One transmission (an image's payload, a token block) sees the SNR of the step it starts in: its
airtime (well under a millisecond at 1 MHz) is short against a trace step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

#: Default time between two values of a trace.
DEFAULT_STEP_MS = 100.0


def _linear(start_db: float, end_db: float, n: int) -> tuple[float, ...]:
    return tuple(float(round(v, 3)) for v in np.linspace(start_db, end_db, n))


def walk_away() -> tuple[float, ...]:
    """25 dB at the cell's centre down to −10 dB at its edge over 60 steps (6 s at 100 ms)."""
    return _linear(25.0, -10.0, 60)


def walk_toward() -> tuple[float, ...]:
    """The walk away, reversed."""
    return walk_away()[::-1]


def drive_by() -> tuple[float, ...]:
    """Approach and leave: −10 → 25 → −10 dB over 60 steps."""
    return _linear(-10.0, 25.0, 30) + _linear(25.0, -10.0, 30)


def tunnel() -> tuple[float, ...]:
    """A good link (20 dB) that drops to −5 dB for 20 steps and comes back."""
    return (20.0,) * 20 + (-5.0,) * 20 + (20.0,) * 20


#: Named profiles: name → the trace it expands to (one value per ``trace_step_ms``).
PROFILES: dict[str, Callable[[], tuple[float, ...]]] = {
    "walk-away": walk_away, "walk-toward": walk_toward, "drive-by": drive_by, "tunnel": tunnel}


def profile_trace(name: str) -> tuple[float, ...]:
    """The SNR values (dB) of profile ``name``; raises KeyError for an unknown name."""
    return PROFILES[name]()


def snr_at(trace: Sequence[float], step_ms: float, t_ms: float) -> float:
    """The trace's SNR at ``t_ms`` after its start: each value holds for ``step_ms``, the last one after the
    trace ends."""
    index = int(max(0.0, t_ms) // step_ms)
    return float(trace[min(index, len(trace) - 1)])
