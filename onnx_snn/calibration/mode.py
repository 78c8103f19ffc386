"""Parse the ``mode`` option: "max", a percentile "p%" (0 < p <= 100), a fraction k of the max
(0 < k <= 1, written as a number or as "1/3"), or "search" (the lambda that minimises the
rate-coding error for the target T; see ``calibration.search``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError


@dataclass(frozen=True)
class Mode:
    kind: str      # "max" | "percentile" | "fraction" | "search"
    value: float   # percentile p in (0, 100] or fraction k in (0, 1]; 1.0 for max

    def __str__(self) -> str:
        return {"max": "max", "percentile": f"{self.value:g}%", "fraction": f"{self.value:g}",
                "search": "search"}[self.kind]


def parse_mode(mode) -> Mode:
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, bool):
        raise OptionError(f"mode={mode!r} is not a mode; use 'max', a percentile like '99.9%' or a fraction 0 < k <= 1")
    if isinstance(mode, str):
        text = mode.strip()
        if text.lower() == "max":
            return Mode("max", 1.0)
        if text.lower() == "search":  # threshold search for the target T (calibration.search)
            return Mode("search", 1.0)
        if text.endswith("%"):
            try:
                p = float(text[:-1])
            except ValueError:
                raise OptionError(f"mode={mode!r}: the percentile is not a number; write e.g. '99.9%'") from None
            if not 0 < p <= 100:
                raise OptionError(f"mode={mode!r}: the percentile must be in (0, 100]")
            return Mode("percentile", p)
        try:
            if "/" in text:  # "1/3", as in the seed tutorial's modes
                num, den = text.split("/")
                mode = float(num) / float(den)
            else:
                mode = float(text)
        except (ValueError, ZeroDivisionError):
            raise OptionError(f"mode={mode!r} is not a mode; use 'max', a percentile like '99.9%' "
                              "or a fraction 0 < k <= 1") from None
    if isinstance(mode, (int, float)):
        k = float(mode)
        if not 0 < k <= 1:
            raise OptionError(f"mode={mode!r}: a fraction of the max must be in (0, 1]; for a percentile write '{k:g}%'")
        return Mode("fraction", k)
    raise OptionError(f"mode={mode!r} is not a mode; use 'max', a percentile like '99.9%' or a fraction 0 < k <= 1")
