"""MaxPool placement pass (option ``maxpool``).

Max pooling is not linear, so it does not commute with rate coding's average over time: the
mean of a per-step max is larger than the max of the means. Three strategies:

* ``"running_max"`` (default): the insert-neurons pass turns every MaxPool that sees
  time-varying signals into a *running max*: it keeps the sum S of its input over past steps
  and emits ``P(S + x_t) - P(S)`` (P the pooling). The outputs telescope to ``P(sum_t x_t)``,
  so after T steps the pooled output is exactly the max over each window of the input's
  accumulated total: the max of the rates, which is what the ANN's MaxPool computes in rate
  terms. On spike inputs ``x_t = lambda * s_t`` each output is 0 or lambda (to float
  rounding), i.e. a spike.
  (Gating by the argmax of past counts, the textbook alternative, was measured biased: it
  keeps selecting the input that has just fired and then misses spikes.)
* ``"before_neuron"``: this pass swaps ``neuron -> MaxPool`` into ``MaxPool -> neuron`` (exact
  in the ANN, since max and ReLU/Clip commute), so the neuron integrates the pooled current.
  MaxPools not next to a neuron get the running max.
* ``"plain"``: MaxPool stays on the per-step signal (what SpikingJelly does); it overestimates.

Guarantee of this pass: the ANN it returns computes the same function; with ``before_neuron``
no ReLU/Clip output feeds a MaxPool alone. ``GlobalMaxPool`` over static spatial dims becomes
a MaxPool with the whole plane as kernel, so all strategies apply to it.
"""
from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from ..errors import OptionError
from ..graph import export_model, import_graph, producer, sole_consumer
from .base import Pass, PassResult

log = logging.getLogger(__name__)
STRATEGIES = ("running_max", "before_neuron", "plain")


def _globalize(node: gs.Node) -> bool:
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        log.warning("%s: GlobalMaxPool over dynamic spatial dims stays a plain per-step max "
                    "(it overestimates rates); give the model static spatial sizes", node.name)
        return False
    node.op, node.attrs = "MaxPool", {"kernel_shape": list(shape[2:])}
    return True


class PlaceMaxPool(Pass):
    def __init__(self, strategy: str = "running_max"):
        if strategy not in STRATEGIES:
            raise OptionError(f"maxpool={strategy!r} is not a strategy; use one of {', '.join(STRATEGIES)}")
        self.strategy = strategy

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        changed = False
        for node in list(graph.nodes):
            if node.op == "GlobalMaxPool":
                changed |= _globalize(node)
        if self.strategy == "before_neuron":
            for pool in [n for n in graph.nodes if n.op == "MaxPool"]:
                neuron = producer(pool.inputs[0])
                if neuron is None or neuron.op not in ("Relu", "Clip") or sole_consumer(graph, pool.inputs[0]) is not pool:
                    continue
                # x -> neuron -> a -> pool -> y   becomes   x -> pool -> a -> neuron -> y
                x, a, y = neuron.inputs[0], pool.inputs[0], pool.outputs[0]
                neuron_in, pool_in = [a] + list(neuron.inputs[1:]), [x] + list(pool.inputs[1:])
                for io in (neuron.inputs, neuron.outputs, pool.inputs, pool.outputs):
                    io.clear()
                pool.inputs.extend(pool_in)
                pool.outputs.append(a)
                neuron.inputs.extend(neuron_in)
                neuron.outputs.append(y)
                a.shape = y.shape
                changed = True
        return PassResult(export_model(graph, model) if changed else model, changed)
