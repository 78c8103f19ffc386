"""Drop a Softmax/LogSoftmax that produces a graph output.

Guarantee: every graph output keeps its name; one that was ``Softmax(z)`` or ``LogSoftmax(z)``
becomes ``z`` (the logits; an ``Identity`` of ``z`` when ``z`` is itself a graph output or
input). The SNN decodes by summing each step's output over time, and a sum
of logits has the same argmax as the ANN's softmax, while a sum of per-step softmaxes would not
be the softmax of anything. The names of dropped nodes are recorded
(``ConversionRecord.dropped_softmax``; the step model lists them among the converter options).
A Softmax anywhere else is refused by the support check.
"""
from __future__ import annotations

import logging

import onnx

from ..graph import bypass, export_model, import_graph, producer
from ..record import ConversionRecord
from .base import ContractError, Pass, PassResult

log = logging.getLogger(__name__)


class DropOutputSoftmax(Pass):
    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        graph = import_graph(model)
        dropped = []
        for out in list(graph.outputs):
            node = producer(out)
            if node is not None and node.op in ("Softmax", "LogSoftmax") and len(out.outputs) == 0:
                if not bypass(graph, node, node.inputs[0]):
                    # the logits are a graph output too (a model returning logits and
                    # probabilities): both names stay, this one becomes a copy of the logits
                    node.op, node.attrs = "Identity", {}
                dropped.append(node.name)
                log.info("dropped %s (%s) before output %r: the SNN sums logits over time",
                         node.name, node.op, out.name)
        if not dropped:
            return PassResult(model, False, record)
        record.dropped_softmax += dropped
        return PassResult(export_model(graph, model), True, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        produced = {o: n for n in model.graph.node for o in n.output}
        for out in model.graph.output:
            node = produced.get(out.name)
            if node is not None and node.op_type in ("Softmax", "LogSoftmax") and node.domain in ("", "ai.onnx"):
                consumers = [n for n in model.graph.node if out.name in n.input]
                if not consumers:
                    raise ContractError(f"{node.name} ({node.op_type}) still produces output {out.name!r}")
