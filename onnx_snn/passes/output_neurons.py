"""Spike-count readout (option ``output_decoding="spikes"``).

By default the last layer stays analog: each step's output is summed over time (the readout
SpikingJelly's tutorial uses). With spike-count decoding the outputs themselves become neurons:
this pass puts a ReLU before every graph output, so the later passes calibrate it and turn it
into ``Mul(1/lambda) -> IFNeuron -> Mul(lambda)``; the decoded output is then lambda times the
spike count, and the prediction is the output neuron that fired most.

Guarantee: graph output names unchanged; each output is ``relu`` of what it was. The argmax
is unchanged wherever the largest output is positive; negative outputs all read as zero.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..graph import export_model, import_graph, unique_name
from ..record import ConversionRecord
from .base import ContractError, Pass, PassResult


class AddOutputNeurons(Pass):
    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        graph = import_graph(model)
        added = 0
        for i, out in enumerate(list(graph.outputs)):
            pre = gs.Variable(unique_name(graph, f"{out.name}.pre_readout"), dtype=out.dtype, shape=out.shape)
            producer = out.inputs[0] if out.inputs else None
            if producer is None:
                continue  # an input passed straight through: nothing to read out
            producer.outputs[producer.outputs.index(out)] = pre
            for consumer in list(out.outputs):
                consumer.inputs[consumer.inputs.index(out)] = pre
            graph.nodes.append(gs.Node("Relu", unique_name(graph, f"readout_{i}"), inputs=[pre], outputs=[out]))
            added += 1
        if not added:
            return PassResult(model, False, record)
        return PassResult(export_model(graph, model), True, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        produced = {o: n for n in model.graph.node for o in n.output}
        for out in model.graph.output:
            node = produced.get(out.name)
            if node is not None and node.op_type != "Relu":
                raise ContractError(f"output {out.name!r} comes from {node.op_type} {node.name}, not a ReLU")
