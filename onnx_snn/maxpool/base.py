"""What every MaxPool strategy shares: the two hooks, and GlobalMaxPool as a whole-plane MaxPool."""
from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ..record import ConversionRecord

log = logging.getLogger(__name__)


def globalize(node: gs.Node) -> bool:
    """GlobalMaxPool over static spatial dims becomes a MaxPool with the whole plane as kernel,
    so every strategy applies to it. Returns whether it changed the node."""
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        log.warning("%s: GlobalMaxPool over dynamic spatial dims stays a plain per-step max "
                    "(it overestimates rates); give the model static spatial sizes", node.name)
        return False
    node.op, node.attrs = "MaxPool", {"kernel_shape": list(shape[2:])}
    return True


class MaxPoolStrategy:
    name = ""

    def place(self, graph: gs.Graph, record: ConversionRecord) -> bool:
        """Change the ANN before calibration (the function it computes stays the same);
        returns whether anything changed. By default only GlobalMaxPools are globalized."""
        changed = False
        for node in list(graph.nodes):
            if node.op == "GlobalMaxPool":
                changed |= globalize(node)
        return changed

    def convert_pool(self, graph: gs.Graph, pool: gs.Node, sites: set[str], record: ConversionRecord) -> bool:
        """Turn ``pool``, whose input varies over time, into its SNN form; ``sites`` are the
        neuron sites not yet converted. Returns False to leave it a plain per-step MaxPool."""
        return False
