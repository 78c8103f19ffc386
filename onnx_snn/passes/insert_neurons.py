"""Neuron insertion pass: turn the calibrated ANN into an SNN step graph.

Every ReLU / Clip(0, c) site recorded by the calibration pass, ``y = relu(x)``, becomes

    x -> Mul(1/lambda) -> onnx_snn.IFNeuron(threshold=1) -> Mul(lambda) -> y
                          ^ snn.v{k}        snn.v{k}.next ^

with lambda a scalar or a per-channel tensor (broadcast along axis 1). The membrane potential
is an explicit graph input ``snn.v{k}`` and output ``snn.v{k}.next`` (k counts sites in
topological order). With the ``running_max`` MaxPool strategy, each MaxPool that sees
time-varying signals accumulates its input in a state ``snn.m{k}`` / ``snn.m{k}.next`` and
emits, per step, how much the max of the accumulated sums grew (see ``passes.maxpool``).

With ``neuron="analog"`` the site becomes ``Mul(1/lambda) -> Clip(0, 1) -> Mul(lambda)``
instead: the rate-coded function the SNN approximates, with no state, for checking scales.

Guarantees: the state pairs are recorded in metadata (``onnx_snn.states``) with their shape
(None for the batch dimension), dtype and initial value; no ReLU/Clip site remains.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_snn_runtime.format import KEY_STATES, State

from ..errors import CalibrationError, OnnxSnnError, OptionError
from ..graph import channel_shape, export_model, import_graph
from ..ops import if_neuron
from .base import Pass, PassResult
from .calibrate import METADATA_KEY as CALIBRATION_KEY
from .maxpool import STRATEGIES

log = logging.getLogger(__name__)
NEURONS = ("if", "analog")


def _state_shape(node_name: str, tensor: gs.Tensor) -> list:
    shape = tensor.shape
    if shape is None or not shape or not all(isinstance(d, int) for d in shape[1:]):
        raise OnnxSnnError(f"the output of {node_name!r} has shape {shape}, not known apart from the batch "
                           "dimension, so its state cannot be allocated. Export the model with static "
                           "sizes for all but the batch axis")
    return [None] + [int(d) for d in shape[1:]]


def _np_dtype(tensor: gs.Tensor) -> np.dtype:
    return np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)


class InsertNeurons(Pass):
    def __init__(self, neuron: str = "if", *, reset_mode: str = "subtract", v_reset: float = 0.0,
                 v_init: float = 0.0, maxpool: str = "running_max"):
        if neuron not in NEURONS:
            raise OptionError(f"neuron={neuron!r}; use one of {', '.join(NEURONS)}")
        if_neuron.check_attributes(1.0, reset_mode)
        self.neuron, self.reset_mode, self.v_reset, self.v_init = neuron, reset_mode, v_reset, v_init
        if maxpool not in STRATEGIES:
            raise OptionError(f"maxpool={maxpool!r}; use one of {', '.join(STRATEGIES)}")
        self.maxpool = maxpool

    def call(self, model: onnx.ModelProto) -> PassResult:
        meta = {p.key: p.value for p in model.metadata_props}
        if CALIBRATION_KEY not in meta:
            raise CalibrationError("the model has no calibration record; run the Calibrate pass first")
        layers = {entry["node"]: entry for entry in json.loads(meta[CALIBRATION_KEY])["layers"]}
        graph = import_graph(model)
        graph.toposort()
        states: list[State] = []
        spiking: set[str] = set()  # tensors that vary over time
        for node in list(graph.nodes):
            if node.name in layers:
                self._neuron(graph, node, layers.pop(node.name), states, spiking)
            elif node.op == "MaxPool" and node.inputs[0].name in spiking and self._gates(node, layers):
                self._running_max(graph, node, states)
                spiking.update(t.name for t in node.outputs)
            elif any(t.name in spiking for t in node.inputs):
                spiking.update(t.name for t in node.outputs)
        if layers:
            raise CalibrationError(f"calibrated nodes {sorted(layers)} are not in the graph; calibrate this model")
        out = export_model(graph, model)
        if self.neuron == "if":
            if not any(o.domain == if_neuron.DOMAIN for o in out.opset_import):
                out.opset_import.extend(if_neuron.opset_imports())
            opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
            if not any(f.domain == if_neuron.DOMAIN for f in out.functions):
                out.functions.append(if_neuron.make_function(opset, reset_modes=[self.reset_mode]))
        out.metadata_props.add(key=KEY_STATES, value=json.dumps([s.to_json() for s in states]))
        return PassResult(out, True)

    def _gates(self, pool: gs.Node, sites: dict) -> bool:
        """Whether this time-varying MaxPool becomes a running max under the chosen strategy."""
        if self.neuron != "if" or self.maxpool == "plain":
            return False
        readers = pool.outputs[0].outputs
        moved = len(readers) == 1 and readers[0].name in sites  # placed before its neuron on purpose
        return not (self.maxpool == "before_neuron" and moved)

    @staticmethod
    def _const(name, values, dtype):
        return gs.Constant(name, np.asarray(values, dtype=dtype))

    def _neuron(self, graph: gs.Graph, node: gs.Node, entry: dict, states: list[State], spiking: set[str]) -> None:
        x, y = node.inputs[0], node.outputs[0]
        k = sum(s.kind == "membrane" for s in states)
        dtype = _np_dtype(y)
        lam = np.asarray(entry["lambda"], dtype=np.float64)
        r = len(y.shape) if y.shape is not None else None
        if lam.ndim and r is None:
            raise OnnxSnnError(f"{node.name}: per-channel scales need a known rank")
        lam_b = channel_shape(lam, r) if lam.ndim else lam
        base = f"snn.{node.name}"
        current = gs.Variable(f"{base}.current", dtype=dtype, shape=y.shape)
        fired = gs.Variable(f"{base}.spikes", dtype=dtype, shape=y.shape)
        new = [gs.Node("Mul", f"{base}.scale_in", inputs=[x, self._const(f"{base}.inv_lambda", 1.0 / lam_b, dtype)],
                       outputs=[current])]
        if self.neuron == "analog":
            new.append(gs.Node("Clip", f"{base}.clip", inputs=[current, self._const(f"{base}.zero", 0.0, dtype),
                                                                 self._const(f"{base}.one", 1.0, dtype)],
                               outputs=[fired]))
        else:
            shape = _state_shape(node.name, y)
            v_in = gs.Variable(f"snn.v{k}", dtype=dtype, shape=y.shape)
            v_out = gs.Variable(f"snn.v{k}.next", dtype=dtype, shape=y.shape)
            graph.inputs.append(v_in)
            graph.outputs.append(v_out)
            attrs = if_neuron.attributes(1.0, self.reset_mode, self.v_reset)
            new.append(gs.Node(if_neuron.OP_TYPE, f"{base}.if", attrs=attrs, inputs=[current, v_in],
                               outputs=[fired, v_out], domain=if_neuron.DOMAIN))
            states.append(State(v_in.name, v_out.name, shape, str(dtype), "membrane", node.name,
                                float(self.v_init), 1.0))
            spiking.add(y.name)
        node.outputs.clear()
        node.inputs.clear()
        new.append(gs.Node("Mul", f"{base}.scale_out", inputs=[fired, self._const(f"{base}.lambda", lam_b, dtype)],
                           outputs=[y]))
        graph.nodes.extend(new)

    def _running_max(self, graph: gs.Graph, pool: gs.Node, states: list[State]) -> None:
        """y_t = P(m + x_t) - P(m), m = sum of x over earlier steps, P the MaxPool: the outputs add
        up to P(sum_t x_t), so the output rate is the max of the input rates, exactly."""
        x, y = pool.inputs[0], pool.outputs[0]
        k = sum(s.kind == "maxpool_sum" for s in states)
        dtype = _np_dtype(x)
        base = f"snn.{pool.name}"
        m_in = gs.Variable(f"snn.m{k}", dtype=dtype, shape=x.shape)
        m_out = gs.Variable(f"snn.m{k}.next", dtype=dtype, shape=x.shape)
        graph.inputs.append(m_in)
        graph.outputs.append(m_out)
        states.append(State(m_in.name, m_out.name, _state_shape(pool.name, x), str(dtype), "maxpool_sum", pool.name, 0.0))
        before = gs.Variable(f"{base}.max_before", dtype=dtype)
        after = gs.Variable(f"{base}.max_after", dtype=dtype)
        attrs = {k2: v for k2, v in pool.attrs.items() if k2 != "storage_order"}
        pool.outputs.clear()
        pool.inputs.clear()
        graph.nodes.extend([
            gs.Node("Add", f"{base}.accumulate", inputs=[m_in, x], outputs=[m_out]),
            gs.Node("MaxPool", f"{base}.pool_before", attrs=attrs, inputs=[m_in], outputs=[before]),
            gs.Node("MaxPool", f"{base}.pool_after", attrs=attrs, inputs=[m_out], outputs=[after]),
            gs.Node("Sub", f"{base}.increase", inputs=[after, before], outputs=[y]),
        ])
