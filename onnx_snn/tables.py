"""Plain-text tables for the CLI and ``inspect`` (one formatter, so every table looks the same)."""
from __future__ import annotations

import numpy as np


def table(rows: list[tuple], header: tuple) -> str:
    """Left-aligned columns two spaces apart, a dashed line under the header."""
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def lambda_text(lam) -> str:
    """A layer's λ: the value, or the range over its channels."""
    a = np.asarray(lam, dtype=np.float64)
    return f"{float(a):.4g}" if a.ndim == 0 else f"{a.min():.3g}..{a.max():.3g} ({a.size} ch)"
