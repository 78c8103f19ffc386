"""Neuron insertion pass: turn the calibrated ANN into an SNN step graph.

Every ReLU / Clip(0, c) site of the conversion record (``Calibrate``), ``y = relu(x)``, becomes

    x -> Mul(1/lambda) -> onnx_snn.IFNeuron(threshold=1) -> Mul(lambda) -> y
                          ^ snn.v{k}        snn.v{k}.next ^

with lambda a scalar or a per-channel tensor (broadcast along axis 1). The membrane potential
is an explicit graph input ``snn.v{k}`` and output ``snn.v{k}.next`` (k counts sites in
topological order). A MaxPool that sees time-varying signals is handed to the MaxPool strategy
(``onnx_snn.maxpool``), which may turn it into a running max with a state of its own.

With ``neuron="analog"`` the site becomes ``Mul(1/lambda) -> Clip(0, 1) -> Mul(lambda)``
instead: the rate-coded function the SNN approximates, with no state, for checking scales.

Guarantees: no ReLU/Clip site remains; each ``NeuronSite`` names its ``scale_in``, ``neuron``
and ``scale_out`` nodes and (for IF neurons) its membrane ``State``; every state pair is in
``ConversionRecord.states``, in graph-input order, with its shape (None for the batch axis),
dtype and initial value (the ``v_init`` option, or the site's own ``v_init``: a trained QCFS
site starts at its shift, ``passes.quantized_relu``), and is a graph input and output.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_snn_runtime.format import MEMBRANE, State

from ..errors import CalibrationError, OnnxSnnError, OptionError
from ..graph import channel_shape, export_model, import_graph, np_dtype, state_shape
from ..maxpool import strategy
from ..ops import if_neuron
from ..options import ConvertOptions
from ..record import ConversionRecord, NeuronSite
from .base import ContractError, Pass, PassResult

log = logging.getLogger(__name__)
NEURONS = ("if", "analog")


class InsertNeurons(Pass):
    def __init__(self, neuron: str = "if", options: ConvertOptions | None = None, **given):
        if neuron not in NEURONS:
            raise OptionError(f"neuron={neuron!r}; use one of {', '.join(NEURONS)}")
        options = ConvertOptions.of(options or ConvertOptions(), **given)
        self.neuron, self.options = neuron, options
        self.maxpool = strategy(options.maxpool)

    def requires(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        if record.calibration is None:
            raise CalibrationError("the model has no calibration record; run the Calibrate pass first")

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        sites = {site.node: site for site in record.sites}
        pending = set(sites)
        graph = import_graph(model)
        graph.toposort()
        spiking: set[str] = set()  # tensors that vary over time
        for node in list(graph.nodes):
            outputs = [t.name for t in node.outputs]  # the conversions below detach the node
            if node.name in pending:
                pending.discard(node.name)
                self._neuron(graph, node, sites[node.name], record)
                if self.neuron == "if":
                    spiking.update(outputs)
            elif node.op == "MaxPool" and self.neuron == "if" and node.inputs[0].name in spiking:
                self.maxpool.convert_pool(graph, node, pending, record)
                spiking.update(outputs)
            elif any(t.name in spiking for t in node.inputs):
                spiking.update(outputs)
        if pending:
            raise CalibrationError(f"calibrated nodes {sorted(pending)} are not in the graph; calibrate this model")
        out = export_model(graph, model)
        if self.neuron == "if":
            if not any(o.domain == if_neuron.DOMAIN for o in out.opset_import):
                out.opset_import.extend(if_neuron.opset_imports())
            opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
            if not any(f.domain == if_neuron.DOMAIN for f in out.functions):
                out.functions.append(if_neuron.make_function(opset, reset_modes=[self.options.reset_mode]))
        return PassResult(out, True, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        names = {n.name for n in model.graph.node}
        left = [s.node for s in record.sites if s.node in names]
        if left:
            raise ContractError(f"sites {left} are still in the graph")
        for site in record.sites:
            missing = [n for n in (site.scale_in, site.neuron, site.scale_out) if n not in names]
            if missing:
                raise ContractError(f"{site.node}: its nodes {missing} are not in the graph")
        inputs, outputs = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
        for state in record.states:
            if state.input not in inputs or state.output not in outputs:
                raise ContractError(f"state {state.input} -> {state.output} is not a graph input/output pair")

    @staticmethod
    def _const(name, values, dtype):
        return gs.Constant(name, np.asarray(values, dtype=dtype))

    def _neuron(self, graph: gs.Graph, node: gs.Node, site: NeuronSite, record: ConversionRecord) -> None:
        x, y = node.inputs[0], node.outputs[0]
        k = record.count(MEMBRANE)
        dtype = np_dtype(y)
        lam = np.asarray(site.lam, dtype=np.float64)
        r = len(y.shape) if y.shape is not None else None
        if lam.ndim and r is None:
            raise OnnxSnnError(f"{node.name}: per-channel scales need a known rank")
        lam_b = channel_shape(lam, r) if lam.ndim else lam
        base = f"snn.{node.name}"
        current = gs.Variable(f"{base}.current", dtype=dtype, shape=y.shape)
        fired = gs.Variable(f"{base}.spikes", dtype=dtype, shape=y.shape)
        scale_in = gs.Node("Mul", f"{base}.scale_in", inputs=[x, self._const(f"{base}.inv_lambda", 1.0 / lam_b, dtype)],
                           outputs=[current])
        if self.neuron == "analog":
            neuron = gs.Node("Clip", f"{base}.clip", inputs=[current, self._const(f"{base}.zero", 0.0, dtype),
                                                              self._const(f"{base}.one", 1.0, dtype)],
                             outputs=[fired])
        else:
            shape = state_shape(node.name, y)
            v_in = gs.Variable(f"snn.v{k}", dtype=dtype, shape=y.shape)
            v_out = gs.Variable(f"snn.v{k}.next", dtype=dtype, shape=y.shape)
            graph.inputs.append(v_in)
            graph.outputs.append(v_out)
            attrs = if_neuron.attributes(1.0, self.options.reset_mode, self.options.v_reset)
            neuron = gs.Node(if_neuron.OP_TYPE, f"{base}.if", attrs=attrs, inputs=[current, v_in],
                             outputs=[fired, v_out], domain=if_neuron.DOMAIN)
            v_init = self.options.v_init if site.v_init is None else site.v_init  # a trained site's own
            site.state = State(v_in.name, v_out.name, shape, str(dtype), MEMBRANE, node.name, float(v_init), 1.0)
            record.states.append(site.state)
        node.outputs.clear()
        node.inputs.clear()
        scale_out = gs.Node("Mul", f"{base}.scale_out", inputs=[fired, self._const(f"{base}.lambda", lam_b, dtype)],
                            outputs=[y])
        graph.nodes.extend([scale_in, neuron, scale_out])
        site.scale_in, site.neuron, site.scale_out = scale_in.name, neuron.name, scale_out.name
