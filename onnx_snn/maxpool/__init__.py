"""MaxPool strategies (option ``maxpool``): one module per strategy, owning all of its graph changes.

Max pooling is not linear, so it does not commute with rate coding's average over time: the
mean of a per-step max is larger than the max of the means. Each strategy is a
``MaxPoolStrategy`` (``maxpool.base``) with two hooks: ``place`` changes the ANN before
calibration (the ``PlaceMaxPool`` pass calls it) and ``convert_pool`` turns a MaxPool that sees
time-varying signals into its SNN form while neurons are inserted (``InsertNeurons`` calls it).

* ``running_max`` (default, ``maxpool.running_max``): a running max whose outputs add up to
  the max of the accumulated inputs, exactly;
* ``before_neuron`` (``maxpool.before_neuron``): ``neuron -> MaxPool`` becomes
  ``MaxPool -> neuron``; other MaxPools get the running max;
* ``plain`` (``maxpool.plain``): MaxPool stays on the per-step signal (SpikingJelly's way).
"""
from __future__ import annotations

STRATEGIES = ("running_max", "before_neuron", "plain")


def strategy(name: str):
    """The strategy object for ``name`` (validated by ``ConvertOptions``)."""
    from .before_neuron import BeforeNeuron
    from .plain import Plain
    from .running_max import RunningMax
    return {"running_max": RunningMax, "before_neuron": BeforeNeuron, "plain": Plain}[name]()
