"""``maxpool="before_neuron"``: ``neuron -> MaxPool`` becomes ``MaxPool -> neuron``.

Exact in the ANN, since max and ReLU/Clip commute: the neuron then integrates the pooled
current (whose per-step max overestimates; cheapest, since the neuron state is the pooled
size). Before calibration, each ReLU/Clip whose output feeds a MaxPool alone is swapped with
it (recorded in ``ConversionRecord.swapped_maxpools``); MaxPools not next to a neuron get the
running max (``maxpool.running_max``) when neurons are inserted.
"""
from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ..graph import producer, sole_consumer
from ..passes.base import OK, Check, fail
from ..record import ConversionRecord
from .base import MaxPoolStrategy
from .running_max import running_max

log = logging.getLogger(__name__)


def can_swap(graph: gs.Graph, pool: gs.Node) -> Check:
    neuron = producer(pool.inputs[0])
    if neuron is None or neuron.op not in ("Relu", "Clip"):
        return fail("its input does not come from a ReLU or Clip")
    if sole_consumer(graph, pool.inputs[0]) is not pool:
        return fail("the neuron's output has other readers")
    return OK


def swap(pool: gs.Node) -> None:
    """x -> neuron -> a -> pool -> y   becomes   x -> pool -> a -> neuron -> y"""
    neuron = producer(pool.inputs[0])
    x, a, y = neuron.inputs[0], pool.inputs[0], pool.outputs[0]
    neuron_in, pool_in = [a] + list(neuron.inputs[1:]), [x] + list(pool.inputs[1:])
    for io in (neuron.inputs, neuron.outputs, pool.inputs, pool.outputs):
        io.clear()
    pool.inputs.extend(pool_in)
    pool.outputs.append(a)
    neuron.inputs.extend(neuron_in)
    neuron.outputs.append(y)
    a.shape = y.shape


class BeforeNeuron(MaxPoolStrategy):
    name = "before_neuron"

    def place(self, graph: gs.Graph, record: ConversionRecord) -> bool:
        changed = super().place(graph, record)
        for pool in [n for n in graph.nodes if n.op == "MaxPool"]:
            check = can_swap(graph, pool)
            if not check:
                log.debug("before_neuron: %s stays after its input: %s", pool.name, check.reason)
                continue
            swap(pool)
            record.swapped_maxpools.append(pool.name)
            changed = True
        return changed

    def convert_pool(self, graph: gs.Graph, pool: gs.Node, sites: set[str], record: ConversionRecord) -> bool:
        readers = pool.outputs[0].outputs
        if len(readers) == 1 and readers[0].name in sites:  # placed before its neuron on purpose
            return False
        running_max(graph, pool, record)
        return True
