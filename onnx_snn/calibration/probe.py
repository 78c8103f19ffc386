"""The statistics probe: the ANN with each neuron site's statistics computed inside the graph.

Copying every activation out of onnxruntime and binning it in numpy took 14 times an ANN pass
(the sample CNN over 60 000 images). For the modes that need only the max and the upper tail
of the distribution (max, fractions of the max, percentiles) the probe computes per site:

* ``max``: ReduceMax over every axis (per layer) or every axis but 1 (per channel), the
  activation's shape, and its sum (onnxruntime's ReduceMax skips NaN; the sum shows it);
* with a ``floor`` input (one value per channel): the activations above it, flattened in row-major
  order (Compress), and per channel their channel index (row 1 of NonZero, the same order).

So only the max and a tail of a few percent of the activations reach numpy
(``stats.TailHistogram``). The search mode needs the whole distribution and keeps the dense path
(``dense_session``: the model with every site's activation as an output).

Selecting the same tail in numpy from the dense outputs (without binning them all) turned out
faster still, so ``passes.calibrate`` does that by default and runs the probe only with
``DENSE_TAILS = False`` (it holds less memory per batch; see that module).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..model_util import probe_model


@dataclass
class ProbeSite:
    output: str          # the activation tensor
    channels: int        # statistics per channel when > 1
    rank: int | None

    @property
    def key(self) -> str:
        return f"snn.calib.{self.output}"


def _reduce_max(x: str, out: str, axes: list[int] | None, opset: int) -> tuple[list[onnx.NodeProto], list]:
    if axes is None:
        return [helper.make_node("ReduceMax", [x], [out], keepdims=0)], []
    if opset < 18:
        return [helper.make_node("ReduceMax", [x], [out], axes=axes, keepdims=0)], []
    name = f"{out}.axes"
    axes_value = numpy_helper.from_array(np.array(axes, np.int64), name)
    return [helper.make_node("ReduceMax", [x, name], [out], keepdims=0)], [axes_value]


def build(model: onnx.ModelProto, sites: list[ProbeSite], tails: bool) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """(probe model, its outputs in order, its floor inputs in order). Per site the outputs are
    ``max``, ``shape`` (of the activation, to count its values), ``sum`` (finite unless an
    activation is not) and, with ``tails``, ``tail`` and (per channel) ``channel``; each floor
    input holds one float per channel of the activation's type. ``model`` needs inferred
    value_info (element types)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    dtypes = {v.name: v.type.tensor_type.elem_type for v in
              list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    nodes, inits, inputs, outputs, floors = [], [], [], [], []
    for site in sites:
        k, y = site.key, site.output
        axes = None if site.channels == 1 else [0] + list(range(2, site.rank))
        reduce, extra = _reduce_max(y, f"{k}.max", axes, opset)
        # onnxruntime's ReduceMax skips NaN; a sum does not (nor Inf)
        nodes += reduce + [helper.make_node("Shape", [y], [f"{k}.shape"]),
                           helper.make_node("ReduceSum", [y], [f"{k}.sum"], keepdims=0)]
        inits += extra
        outputs += [f"{k}.max", f"{k}.shape", f"{k}.sum"]
        if not tails:
            continue
        elem = dtypes.get(y, TensorProto.FLOAT)
        inputs.append(helper.make_tensor_value_info(f"{k}.floor", elem, [site.channels]))
        floors.append(f"{k}.floor")
        floor = f"{k}.floor"
        if site.channels > 1:
            shape = [1, site.channels] + [1] * (site.rank - 2)
            inits.append(numpy_helper.from_array(np.array(shape, np.int64), f"{k}.floor_shape"))
            nodes.append(helper.make_node("Reshape", [floor, f"{k}.floor_shape"], [f"{k}.floor_b"]))
            floor = f"{k}.floor_b"
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), f"{k}.flat"))
        nodes += [helper.make_node("Greater", [y, floor], [f"{k}.mask"]),
                  helper.make_node("Reshape", [f"{k}.mask", f"{k}.flat"], [f"{k}.mask_flat"]),
                  helper.make_node("Compress", [y, f"{k}.mask_flat"], [f"{k}.tail"])]
        outputs.append(f"{k}.tail")
        if site.channels > 1:
            inits.append(numpy_helper.from_array(np.array(1, np.int64), f"{k}.row"))
            nodes += [helper.make_node("NonZero", [f"{k}.mask"], [f"{k}.where"]),
                      helper.make_node("Gather", [f"{k}.where", f"{k}.row"], [f"{k}.channel"], axis=0)]
            outputs.append(f"{k}.channel")
    probe = probe_model(model, [])
    probe.graph.node.extend(nodes)
    probe.graph.initializer.extend(inits)
    probe.graph.input.extend(inputs)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    return probe, outputs, floors


def dense_session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    """A CPU session of ``model`` with the tensors ``outputs`` exposed, without onnxruntime's memory
    arena: a run that returns every activation of a big model needs as much memory as they
    hold, and an arena would keep that much for the session's lifetime (measured on a ResNet-50,
    16 images: 0.70 GB held after the run with the arena, 0.27 GB without; the run as fast)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(probe_model(model, outputs).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
