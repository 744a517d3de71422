"""Link adaptation: the ``auto`` codec picks, per request, the scheme that maximises expected quality at the
receiver's estimated SNR, from a table measured by ``meg bench snr``.

A *scheme* is a codec plus, for digital codecs, the link's modulation, FEC and code rate (a hyperprior
payload over LDPC QPSK r1/2 is a different scheme from the same payload over 16QAM r2/3). The table holds,
per channel model, each scheme's measured quality (image PSNR) on an SNR grid and its channel uses per image;
between grid points quality is interpolated linearly, outside the grid it is held at the nearest point.

Why an expectation over the estimate's error: a digital scheme falls off a cliff within a dB, and the estimate
comes from a few pilots (and, on a changing channel, is stale), so a scheme just above its cliff at the
estimate fails whenever the truth is a little lower. When the table knows how far an estimate strays on a
channel (``estimate_std_db``, measured from the emulator's own probe), every scheme is judged by its expected
quality over SNR ~ N(estimate, std²) (Gauss–Hermite): a cliff close below the estimate costs what it is
likely to cost, no more. ``margin_db`` (digital schemes judged that much lower) is the blunt older rule, kept
for tables without a spread. With perfect CSI neither applies.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

from codec.base import CodecError

#: The ``codec`` value that asks the edge to choose.
AUTO = "auto"
#: Expected qualities this close to the best count as a tie, broken by fewer channel uses.
TIE_DB = 0.1
#: Nodes and weights of E[f(Z)], Z ~ N(0, 1) (probabilists' Gauss–Hermite, 9 points).
_GH_NODES, _GH_WEIGHTS = hermegauss(9)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()
#: File name of the table inside a codec set folder.
TABLE_FILE = "adaptation.json"


@dataclass(frozen=True)
class Scheme:
    """One candidate: codec, digital link settings (empty for analog), cost and measured quality curve."""

    name: str
    codec: str
    kind: str                                  # "digital" or "analog"
    symbols: float                             # channel uses per image (side information included)
    snr_db: tuple[float, ...]
    quality: tuple[float, ...]
    link: dict[str, object] = field(default_factory=dict)  # modulation, fec, code_rate
    params: dict[str, str] = field(default_factory=dict)   # codec params (e.g. learned_quality)

    def expected(self, snr_db: float) -> float:
        return float(np.interp(snr_db, self.snr_db, self.quality))


@dataclass(frozen=True)
class Choice:
    scheme: Scheme
    expected: float
    reason: str


@dataclass
class AdaptationTable:
    """Per channel model, the schemes ``auto`` chooses among."""

    metric: str
    channels: dict[str, list[Scheme]]
    margin_db: float = 1.0
    #: How far a pilot-based estimate strays from the true SNR, per channel model (dB, one std).
    estimate_std_db: dict[str, float] = field(default_factory=dict)

    def choose(self, channel: str, snr_estimate_db: float | None, budget_symbols: float | None = None,
               estimated: bool = True) -> Choice:
        """The scheme with the highest expected quality that fits ``budget_symbols`` (within :data:`TIE_DB` of
        it: the one with the fewest channel uses).

        ``snr_estimate_db`` None means a noiseless link: every scheme is judged at its best SNR. ``estimated``
        False means the SNR is known exactly (perfect CSI): no spread and no margin.
        """
        schemes = self.channels.get(channel) or self.channels.get("awgn")
        if not schemes:
            raise CodecError(f"codec: no adaptation table for channel {channel!r}")
        fits = [s for s in schemes if budget_symbols is None or s.symbols <= budget_symbols]
        if not fits:
            cheapest = min(s.symbols for s in schemes)
            raise CodecError(f"codec_params.budget_symbols: {budget_symbols:g} channel uses fit no scheme "
                             f"(the cheapest needs {cheapest:g})")
        spread = self.estimate_std_db.get(channel, 0.0) if estimated else 0.0
        margin = self.margin_db if estimated and not spread else 0.0

        def value(s: Scheme) -> float:
            if snr_estimate_db is None:
                return s.expected(max(s.snr_db))
            at = snr_estimate_db - (margin if s.kind == "digital" else 0.0)
            if spread <= 0.0:
                return s.expected(at)
            return float(np.dot(_GH_WEIGHTS, [s.expected(at + spread * z) for z in _GH_NODES]))

        values = {s.name: value(s) for s in fits}
        top = max(values.values())
        # Within TIE_DB of the best, the scheme with the fewest channel uses: 0.001 dB is not worth 20× the airtime.
        best = min((s for s in fits if values[s.name] >= top - TIE_DB), key=lambda s: (s.symbols, -values[s.name]))
        expected = values[best.name]
        at = "a noiseless link" if snr_estimate_db is None else f"estimated {snr_estimate_db:.1f} dB"
        runner_up = max((s for s in fits if s is not best), key=lambda s: values[s.name], default=None)
        versus = f"; next best {runner_up.name} {values[runner_up.name]:.1f}" if runner_up is not None else ""
        how = (f" (expected over the estimate's ±{spread:g} dB)" if spread and snr_estimate_db is not None else
               f" (digital judged {margin:g} dB lower)" if margin and snr_estimate_db is not None else "")
        return Choice(best, expected, f"{at} on {channel}{how}: {best.name} expects {self.metric} "
                                      f"{expected:.1f}{versus}")

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "margin_db": self.margin_db,
                           "estimate_std_db": self.estimate_std_db,
                           "channels": {ch: [asdict(s) for s in schemes] for ch, schemes in self.channels.items()}},
                          indent=1)

    @classmethod
    def load(cls, path: Path) -> "AdaptationTable":
        if not path.is_file():
            raise CodecError(f"codec: 'auto' needs the adaptation table {path}; make it with `meg bench snr` "
                             "(it writes snr_adaptation.json) and copy it into the codec set")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            channels = {ch: [Scheme(**{**s, "snr_db": tuple(s["snr_db"]), "quality": tuple(s["quality"])})
                             for s in schemes] for ch, schemes in raw["channels"].items()}
            return cls(str(raw["metric"]), channels, float(raw.get("margin_db", 1.0)),
                       {str(k): float(v) for k, v in raw.get("estimate_std_db", {}).items()})
        except (ValueError, KeyError, TypeError) as exc:
            raise CodecError(f"codec: adaptation table {path} is malformed: {exc}") from exc


#: How the SNR benchmark's scheme names map to codecs and digital link settings.
#: The analog schemes of ``meg bench snr`` by name; digital ones are parsed from their names.
ANALOG_SCHEMES: dict[str, str] = {"MEG (analog)": "analog", "JSCC (no merge)": "jscc", "E2E-MEG": "e2e-meg",
                                  "E2E-MEG (fixed merge map)": "e2e-meg-fixed",
                                  "E2E-MEG (learned merge)": "e2e-meg-learned"}
_DIGITAL_NAME = re.compile(r"^(?P<codec>\S+?)(?: q(?P<q>\d+))?(?P<fec>\+LDPC | uncoded )(?P<mod>QPSK|16QAM|64QAM)"
                           r"(?: r(?P<num>\d+)/(?P<den>\d+))?$")


def scheme_of(name: str) -> tuple[str, dict[str, object], dict[str, str]] | None:
    """(codec, link settings, codec params) of a ``meg bench snr`` scheme name, None for names that are not a
    single scheme (e.g. the digital envelope, a summary of several)."""
    if name in ANALOG_SCHEMES:
        return ANALOG_SCHEMES[name], {}, {}
    m = _DIGITAL_NAME.match(name)
    if m is None:
        return None
    link: dict[str, object] = {"modulation": m["mod"].lower(), "fec": "ldpc" if "LDPC" in m["fec"] else "none"}
    if m["num"]:
        link["code_rate"] = int(m["num"]) / int(m["den"])
    return m["codec"], link, ({"learned_quality": m["q"]} if m["q"] else {})


def table_from_snr_csv(path: Path, metric: str = "psnr_db", margin_db: float = 1.0,
                       estimate_std_db: dict[str, float] | None = None) -> AdaptationTable:
    """Build the table from ``bench/results/snr.csv`` (one row per scheme, channel and SNR)."""
    curves: dict[tuple[str, str], list[tuple[float, float, float, str]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if scheme_of(row["scheme"]) is None or not row.get(metric):
                continue
            # Channel uses with side information when the table has them (older tables: payload symbols).
            uses = float(row.get("channel_uses_per_image") or row["symbols_per_image"])
            curves.setdefault((row["channel"], row["scheme"]), []).append(
                (float(row["snr_db"]), float(row[metric]), uses, row["kind"]))
    channels: dict[str, list[Scheme]] = {}
    for (channel, name), points in sorted(curves.items()):
        points.sort()
        codec_name, link, params = scheme_of(name)  # type: ignore[misc]
        channels.setdefault(channel, []).append(Scheme(
            name, codec_name, points[0][3], max(p[2] for p in points), tuple(p[0] for p in points),
            tuple(p[1] for p in points), dict(link), dict(params)))
    return AdaptationTable(metric, channels, margin_db, dict(estimate_std_db or {}))
