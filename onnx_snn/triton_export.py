"""Export a step model as a Triton Inference Server model repository (onnxruntime backend).

Triton's sequence batcher keeps each sequence's state between requests ("implicit state"): the
model reads state input ``snn.v0`` and writes ``snn.v0.next``, and Triton feeds each request of
a sequence the previous request's output, from ``initial_state`` at the sequence's start. So a
step model maps onto it directly. The exported model differs from the step model in two ways:

* one ``output_sum`` state per output (``snn.acc.<output>``, zero at the start): the model
  returns the running sum ``<output>.sum`` beside the step's own ``<output>``, so a client
  reads the decoded prediction after every request without keeping anything;
* a ``START`` input (the sequence batcher's start control, 1.0 on a sequence's first request):
  every state is replaced by its initial value when it is 1, so a sequence starts from the
  initial state even if a client reuses a sequence id without ending it.

Layout written::

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx
    REPO/NAME/initial_state/<state>.bin     (raw little-endian data, for non-zero initial states)

Triton looks for ``data_file`` in the ``initial_state`` folder beside ``config.pbtxt``. Its
sequence batcher sends the model one sequence per batch slot: each request carries batch 1.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_snn_runtime.format import StepModelSpec

from .errors import OnnxSnnError, OptionError
from .graph import add_output_sums, export_model, import_graph, ir_version_for
from .io import load

log = logging.getLogger(__name__)

START = "START"
_TRITON_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.DOUBLE: "TYPE_FP64", TensorProto.FLOAT16: "TYPE_FP16",
                 TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32", TensorProto.UINT8: "TYPE_UINT8",
                 TensorProto.BOOL: "TYPE_BOOL"}


@dataclass
class TritonState:
    """One implicit state of the exported model (dims without the batch axis)."""
    input: str
    output: str
    dtype: str              # Triton type, e.g. TYPE_FP32
    dims: list[int]
    init: np.ndarray | None  # None: zero_data


def _dims(value_info: onnx.ValueInfoProto, what: str) -> list[int]:
    dims = value_info.type.tensor_type.shape.dim[1:]
    if any(not d.HasField("dim_value") for d in dims):
        raise OnnxSnnError(f"{what} {value_info.name!r} has a dynamic non-batch dimension; Triton needs "
                           "static dims: export the ANN with a fixed input size")
    return [d.dim_value for d in dims]


def _elem(value_info: onnx.ValueInfoProto) -> int:
    return value_info.type.tensor_type.elem_type


def _triton_type(value_info: onnx.ValueInfoProto) -> str:
    elem = _elem(value_info)
    if elem not in _TRITON_TYPES:
        raise OnnxSnnError(f"tensor {value_info.name!r} has type {TensorProto.DataType.Name(elem)}, "
                           "which this exporter does not map to a Triton type")
    return _TRITON_TYPES[elem]


def triton_model(step: onnx.ModelProto) -> tuple[onnx.ModelProto, list[TritonState], StepModelSpec]:
    """The step model with START resets and output accumulators, and its implicit states."""
    spec = StepModelSpec.from_model(step)
    if not spec.states:
        raise OnnxSnnError("the model has no states (no neuron): serve it as a stateless model instead")
    for name in spec.outputs:
        _dims(next(o for o in step.graph.output if o.name == name), "output")  # static, or a clear error
    graph = import_graph(step)
    sums = add_output_sums(graph, list(spec.outputs), lambda name: f"{name}.sum")  # reset at START below
    model = export_model(graph, step)
    g = model.graph
    inputs = {i.name: i for i in g.input}
    # START is float whatever the model's type: the config declares fp32_false_true, and the
    # onnxruntime backend checks that the model's input has the declared type
    g.input.append(helper.make_tensor_value_info(START, TensorProto.FLOAT, ["N", 1]))
    start_bool = "snn.start.bool"
    new_nodes = [helper.make_node("Cast", [START], [start_bool], to=TensorProto.BOOL, name="snn.start.cast")]
    states: list[TritonState] = []
    renames = {}
    for s in spec.states + sums:
        vi = inputs[s.input]
        dims = _dims(vi, "state")
        init = np.broadcast_to(np.asarray(s.init, dtype=s.dtype), dims).copy()
        # START resets: v = Where(START, init, v_in); the graph reads the reset value
        reset_in = f"{s.input}.after_start"
        init_name = f"{s.input}.initial"
        cond = f"{s.input}.start"
        shape = np.array([-1] + [1] * len(dims), np.int64)
        g.initializer.extend([numpy_helper.from_array(init[None], init_name),
                              numpy_helper.from_array(shape, f"{cond}.shape")])
        new_nodes += [helper.make_node("Reshape", [start_bool, f"{cond}.shape"], [cond], name=f"{cond}.reshape"),
                      helper.make_node("Where", [cond, init_name, s.input], [reset_in], name=f"{s.input}.reset")]
        renames[s.input] = reset_in
        states.append(TritonState(s.input, s.output, _triton_type(vi), dims, None if not init.any() else init))
    for node in g.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    if any(o.name in renames for o in g.output):
        raise OnnxSnnError("a state input is also a graph output; this step model cannot be exported")
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    model.ir_version = ir_version_for(model)
    onnx.checker.check_model(model, full_check=True)
    return model, states, spec


def config_text(name: str, model: onnx.ModelProto, states: list[TritonState], spec: StepModelSpec, *,
                max_batch_size: int, max_idle_us: int, kind: str) -> str:
    """config.pbtxt for the onnxruntime backend with the sequence batcher and implicit state."""
    state_names = {s.input for s in states} | {s.output for s in states} | {START}
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}"]

    def tensor(vi):
        dims = ", ".join(str(d) for d in _dims(vi, "tensor"))
        return f'  {{\n    name: "{vi.name}"\n    data_type: {_triton_type(vi)}\n    dims: [ {dims} ]\n  }}'

    ins = [vi for vi in model.graph.input if vi.name not in state_names]
    hidden = {s.output for s in spec.states}  # membrane states; the running sums stay visible outputs
    outs = [vi for vi in model.graph.output if vi.name not in hidden]
    lines.append("input [\n" + ",\n".join(tensor(vi) for vi in ins) + "\n]")
    lines.append("output [\n" + ",\n".join(tensor(vi) for vi in outs) + "\n]")
    seq = ["sequence_batching {", f"  max_sequence_idle_microseconds: {max_idle_us}",
           "  control_input [", "    {", f'      name: "{START}"', "      control [", "        {",
           "          kind: CONTROL_SEQUENCE_START", "          fp32_false_true: [ 0, 1 ]", "        }", "      ]",
           "    }", "  ]", "  state ["]
    for i, s in enumerate(states):
        init = ("          zero_data: true" if s.init is None else
                f'          data_file: "{_state_file(s)}"')
        dims = ", ".join(str(d) for d in s.dims)
        seq += ["    {", f'      input_name: "{s.input}"', f'      output_name: "{s.output}"',
                f"      data_type: {s.dtype}", f"      dims: [ {dims} ]", "      initial_state: {",
                f"          data_type: {s.dtype}", f"          dims: [ {dims} ]", init,
                f'          name: "{s.input}.initial"', "      }", "    }" + ("," if i < len(states) - 1 else "")]
    seq += ["  ]", "}"]
    lines.append("\n".join(seq))
    lines.append(f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def _state_file(s: TritonState) -> str:
    return s.input.replace("/", "_") + ".bin"


def export_triton(step_model, repo: str | os.PathLike, *, name: str = "snn", max_batch_size: int = 16,
                  max_idle_seconds: float = 60.0, gpu: bool = False, force: bool = False) -> Path:
    """Write ``repo/name/`` (config.pbtxt, 1/model.onnx, initial_state/) and return its path.
    The folder is written in a temporary sibling and renamed, so a failure leaves nothing."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise OptionError(f"model name {name!r}: give a plain folder name")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise OptionError(f"max_batch_size={max_batch_size!r} must be a positive integer")
    if not max_idle_seconds > 0:
        raise OptionError(f"max_idle_seconds={max_idle_seconds!r} must be positive")
    step, _ = load(step_model)
    model, states, spec = triton_model(step)
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise OnnxSnnError(f"model repository {repo} is a file, not a folder; give a folder (created if missing)")
    repo.mkdir(parents=True, exist_ok=True)
    target = repo / name
    if target.exists() and not force:
        raise OnnxSnnError(f"{target} already exists; remove it or pass --force")
    text = config_text(name, model, states, spec, max_batch_size=max_batch_size,
                       max_idle_us=int(max_idle_seconds * 1e6), kind="KIND_GPU" if gpu else "KIND_CPU")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        (tmp / "1").mkdir()
        onnx.save(model, tmp / "1" / "model.onnx")
        if any(s.init is not None for s in states):
            (tmp / "initial_state").mkdir()
        for s in states:
            if s.init is not None:
                (tmp / "initial_state" / _state_file(s)).write_bytes(np.ascontiguousarray(s.init).tobytes())
        (tmp / "config.pbtxt").write_text(text)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote Triton model %s with %d implicit states", target, len(states))
    return target
