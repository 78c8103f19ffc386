"""Runtime-form pass: embed the step model split for fast simulation (metadata ``onnx_snn.runtime_form``).

The layers before the first neuron see only the analog input, which is the same at every
timestep, so a runtime should evaluate them once per batch. A runtime without the ``onnx``
package cannot cut a graph, so the converter does it here and embeds two small models:

* ``prefix``: the source inputs -> the ``boundary`` tensors (everything that depends on the
  inputs alone and feeds the rest); absent only when every boundary tensor is a source input;
* ``body``: boundary tensors + states -> next states, with one ``output_sum`` accumulator state
  per output (the "sum over t" decoding done where the states live, e.g. on the GPU) and one
  per-sample spike-count output per neuron layer (firing statistics);
* ``chunk``: the body rewritten to advance K steps per call (``onnx_snn/chunk.py``), embedded
  only after it reproduced K calls of the body exactly on random currents (``check_chunk``).

Guarantees: the main graph is unchanged; prefix then body computes what the main graph does
(same ops, same constants); a model whose output does not depend on any state (no neuron)
gets no runtime form. Costs: the body's weights are stored a second time, and the chunk's a
third (base64 in metadata).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_snn_runtime.format import KEY_RUNTIME_FORM, MEMBRANE, RuntimeForm, SpikeCount

from .. import chunk
from ..chunk import build_chunk
from ..graph import add_output_sums, export_model, import_graph
from ..model_util import with_metadata
from ..ops import if_neuron
from ..record import ConversionRecord
from .base import ContractError, Pass, PassResult
from .write_step_model import step_model_spec

log = logging.getLogger(__name__)


def _static_tensors(graph: gs.Graph, state_inputs: set[str]) -> set[str]:
    """Names of tensors that depend only on the source inputs (and constants)."""
    static = {t.name for t in graph.inputs if t.name not in state_inputs}
    for node in graph.nodes:
        live = [t for t in node.inputs if not t.is_empty() and not isinstance(t, gs.Constant)]
        if all(t.name in static for t in live):
            static.update(t.name for t in node.outputs)
    return static


def _serialize(graph: gs.Graph, like: onnx.ModelProto, with_neuron: bool, reset_mode=None) -> bytes:
    model = export_model(graph, like)
    if reset_mode is not None:
        chunk.add_functions(model, reset_mode)
    if not with_neuron:
        del model.functions[:]
        keep = [o for o in model.opset_import if o.domain != if_neuron.DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    del model.metadata_props[:]
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _chunk_bytes(graph: gs.Graph, like: onnx.ModelProto, body: bytes, boundary: list[str], states,
                 record: ConversionRecord) -> bytes | None:
    """The chunk model's bytes, or None when it does not reproduce the body's steps exactly."""
    data = _serialize(graph, like, with_neuron=True, reset_mode=record.options.reset_mode)
    reason = chunk.check_chunk(data, body, boundary, states)
    if reason:
        log.warning("no chunk model (the runtime will step one timestep per call): %s", reason)
        return None
    return data


class EmbedRuntimeForm(Pass):
    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        spec = step_model_spec(model, record)
        graph = import_graph(model)
        graph.toposort()
        state_inputs = {s.input for s in spec.states}
        static = _static_tensors(graph, state_inputs)
        if not spec.states or any(o.name in static for o in graph.outputs if o.name in spec.outputs):
            log.info("no runtime form: an output does not depend on any neuron")
            return PassResult(model, False, record)

        boundary = []
        for node in graph.nodes:
            for t in node.inputs:
                if (t.name in static and not isinstance(t, gs.Constant) and not t.is_empty()
                        and not all(o.name in static for o in node.outputs) and t.name not in boundary):
                    boundary.append(t.name)
        source_inputs = [t.name for t in graph.inputs if t.name not in state_inputs]
        prefix_bytes = None
        if any(name not in source_inputs for name in boundary):
            prefix = graph.copy()
            ptensors = prefix.tensors()
            prefix.outputs = [ptensors[name] for name in boundary]
            prefix.cleanup(remove_unused_graph_inputs=True)
            prefix.inputs = [t for t in prefix.inputs if t.name not in state_inputs]
            prefix_bytes = _serialize(prefix, model, with_neuron=False)

        body = graph.copy()
        btensors = body.tensors()
        for name in boundary:
            btensors[name].inputs.clear()  # cut: the boundary becomes an input of the body
        body.inputs = [btensors[name] for name in boundary] + [btensors[s.input] for s in spec.states]
        body.outputs = [btensors[s.output] for s in spec.states]
        chunk_graph = build_chunk(body, boundary, spec.states, list(spec.outputs), record)
        sums = add_output_sums(body, list(spec.outputs), lambda name: f"snn.acc.{name}.next")
        if any(s.shape is None for s in sums):
            log.info("no runtime form: an output has a non-static shape")
            return PassResult(model, False, record)
        states = list(spec.states) + sums
        outputs = list(body.outputs)
        counts = []
        membrane = {s.output: s for s in spec.states if s.kind == MEMBRANE}
        for node in body.nodes:
            if node.op == if_neuron.OP_TYPE and node.outputs[1].name in membrane:
                state = membrane[node.outputs[1].name]
                spikes = node.outputs[0]
                count = gs.Variable(f"{state.input}.spike_count", dtype=spikes.dtype, shape=[spikes.shape[0]])
                axes = gs.Constant(f"{state.input}.count_axes", np.arange(1, len(state.shape), dtype=np.int64))
                body.nodes.append(gs.Node("ReduceSum", f"{state.input}.count", attrs={"keepdims": 0},
                                          inputs=[spikes, axes], outputs=[count]))
                outputs.append(count)
                counts.append(SpikeCount(count.name, state.input, int(np.prod(state.shape[1:]))))
        body.outputs = outputs
        body.cleanup(remove_unused_graph_inputs=False)
        body_bytes = _serialize(body, model, with_neuron=True)
        chunk_bytes = _chunk_bytes(chunk_graph, model, body_bytes, boundary, states, record)
        form = RuntimeForm(boundary, prefix_bytes, body_bytes, states, counts, chunk_bytes)
        out = with_metadata(model, KEY_RUNTIME_FORM, form.to_json())  # replaces an earlier one
        log.info("runtime form: prefix %s -> boundary %s; body with %d states; chunk model %s",
                 "present" if prefix_bytes else "empty", boundary, len(states), "present" if chunk_bytes else "absent")
        return PassResult(out, True, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        form = next((p.value for p in model.metadata_props if p.key == KEY_RUNTIME_FORM), None)
        if form is not None and len(RuntimeForm.from_json(form).states) < len(record.states):
            raise ContractError("the runtime form's body lacks some of the step model's states")
