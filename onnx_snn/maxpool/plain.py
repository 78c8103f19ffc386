"""``maxpool="plain"``: MaxPool stays on the per-step signal, as SpikingJelly does.

The per-step max of spike trains overestimates the max of their rates (the mean of a max is at
least the max of the means), increasingly so as T grows; kept for comparisons."""
from __future__ import annotations

from .base import MaxPoolStrategy


class Plain(MaxPoolStrategy):
    name = "plain"
