"""Drop a Softmax/LogSoftmax that produces a graph output.

Guarantee: every graph output keeps its name; one that was ``Softmax(z)`` or ``LogSoftmax(z)``
becomes ``z`` (the logits). The SNN decodes by summing each step's output over time, and a sum
of logits has the same argmax as the ANN's softmax, while a sum of per-step softmaxes would not
be the softmax of anything. The names of dropped nodes are recorded in metadata
(``onnx_snn.dropped_softmax``). A Softmax anywhere else is refused by the support check.
"""
from __future__ import annotations

import json
import logging

import onnx

from ..graph import bypass, export_model, import_graph, producer
from .base import Pass, PassResult

log = logging.getLogger(__name__)
METADATA_KEY = "onnx_snn.dropped_softmax"


class DropOutputSoftmax(Pass):
    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        dropped = []
        for out in list(graph.outputs):
            node = producer(out)
            if node is not None and node.op in ("Softmax", "LogSoftmax") and len(out.outputs) == 0:
                if bypass(graph, node, node.inputs[0]):
                    dropped.append(node.name)
                    log.info("dropped %s (%s) before output %r: the SNN sums logits over time",
                             node.name, node.op, out.name)
        if not dropped:
            return PassResult(model, False)
        result = export_model(graph, model)
        result.metadata_props.add(key=METADATA_KEY, value=json.dumps(dropped))
        return PassResult(result, True)
