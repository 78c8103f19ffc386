"""What the converter will do to an ANN, and what a step model holds (``onnx-snn inspect``).

``inspect_ann``: the ops found, the nodes that become neurons, the BatchNorms that fold (and
into which layer) or become an affine, and every node the converter refuses, with the reason.
Nothing is converted and no data is needed.

``inspect_step_model``: a node table in the spirit of torch.fx's ``print_tabular`` (which
SpikingJelly's converter prints), then one row per neuron layer: scale λ, threshold, state
shape, initial potential and reset, with the converter options recorded in the model.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
from onnx_snn_runtime.format import KEY_FORMAT, KEY_RUNTIME_FORM, StepModelSpec, metadata

from .errors import UnsupportedOpError
from .graph import import_graph
from .io import load
from .ops import if_neuron
from .passes.base import PassManager
from .passes.canonicalize import Canonicalize
from .passes.fold_batchnorm import FoldBatchNorm
from .passes.output_softmax import DropOutputSoftmax
from .passes.quantized_relu import QuantizedReLU
from .support import NEURON_OPS, activation_tensors, check_node
from .tables import lambda_text, table


def is_step_model(model: onnx.ModelProto) -> bool:
    return KEY_FORMAT in metadata(model.metadata_props)


def inspect_ann(model: onnx.ModelProto) -> dict:
    """{ops, neurons, batchnorms, unsupported} for an ANN, after the converter's canonicalization."""
    # the converter's own first passes: a Softmax at an output is dropped, not refused, and a
    # trained QCFS activation becomes a neuron site
    canonical = PassManager([Canonicalize(), QuantizedReLU(), DropOutputSoftmax()], check=False)(model).model
    graph = import_graph(canonical)
    graph.toposort()
    carrying = activation_tensors(graph)
    unsupported = []
    for node in graph.nodes:
        if any(t.name in carrying for t in node.inputs if not t.is_empty()):
            try:
                check_node(node, carrying)
            except UnsupportedOpError as e:
                unsupported.append({"node": node.name, "op": node.op, "why": str(e).split(". Supported ops")[0]})
    refused = {u["node"] for u in unsupported}
    neurons = [{"node": n.name, "op": n.op, "output": n.outputs[0].name,
                "shape": None if n.outputs[0].shape is None else list(n.outputs[0].shape)}
               for n in graph.nodes if n.op in NEURON_OPS and n.name not in refused]
    batchnorms = []
    bns = [n for n in graph.nodes if n.op == "BatchNormalization"]
    if bns:
        try:
            for fold in FoldBatchNorm()(canonical).record.batchnorms:
                becomes = f"folds into {fold.into}" if fold.into else "per-channel Mul+Add"
                batchnorms.append({"node": fold.node, "becomes": becomes})
        except UnsupportedOpError as e:  # e.g. a BatchNorm in training mode
            batchnorms = [{"node": bn.name, "becomes": f"refused: {e}"} for bn in bns]
    return {"ops": dict(Counter(n.op for n in graph.nodes)), "neurons": neurons, "batchnorms": batchnorms,
            "unsupported": unsupported, "opset": next((o.version for o in canonical.opset_import
                                                       if o.domain in ("", "ai.onnx")), None)}


def _init_text(init) -> str:
    a = np.asarray(init, dtype=np.float64)
    if a.ndim == 0:
        return f"{float(a):g}"
    return f"per neuron, mean {a.mean():.3g} in [{a.min():.3g}, {a.max():.3g}]"


def inspect_step_model(model: onnx.ModelProto) -> dict:
    """{nodes, layers, options, outputs, runtime_form} for a step model."""
    meta = metadata(model.metadata_props)
    spec = StepModelSpec.from_metadata(meta)
    nodes = [{"op": (f"{n.domain}." if n.domain else "") + n.op_type, "name": n.name,
              "inputs": [i for i in n.input if i], "outputs": list(n.output)} for n in model.graph.node]
    calibration = {e["node"]: e for e in spec.calibration.get("layers", [])}
    neurons = {n.input[1]: n for n in model.graph.node if n.domain == if_neuron.DOMAIN}
    layers = []
    for s in spec.states:
        entry = calibration.get(s.layer, {})
        node = neurons.get(s.input)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} if node is not None else {}
        reset = if_neuron.RESET_MODES[int(attrs.get("reset_mode", 0))] if node is not None else "-"
        layers.append({"state": s.input, "kind": s.kind, "layer": s.layer,
                       "lambda": entry.get("lambda"), "threshold": s.threshold,
                       "shape": ["N"] + [int(d) for d in s.shape[1:]], "init": _init_text(s.init), "reset": reset})
    return {"nodes": nodes, "layers": layers, "options": spec.converter, "outputs": spec.outputs,
            "calibration_mode": spec.calibration.get("mode"), "runtime_form": KEY_RUNTIME_FORM in meta}


def inspect(source) -> dict:
    """Inspect an ANN or a step model (path, bytes or ModelProto): ``{"kind": "ann"|"step", ...}``."""
    model, _ = load(source)
    if is_step_model(model):
        return {"kind": "step", **inspect_step_model(model)}
    return {"kind": "ann", **inspect_ann(model)}


def format_report(report: dict) -> str:
    if report["kind"] == "ann":
        out = [f"ANN, opset {report['opset']}: " + ", ".join(f"{op} x{n}" for op, n in sorted(report["ops"].items())), ""]
        out.append(f"{len(report['neurons'])} neuron sites (ReLU / Clip(0, c) become IF neurons):")
        out.append(table([(n["node"], n["op"], n["output"], n["shape"]) for n in report["neurons"]],
                         ("node", "op", "output", "shape")))
        if report["batchnorms"]:
            out += ["", "BatchNormalization:", table([(b["node"], b["becomes"]) for b in report["batchnorms"]],
                                                     ("node", "becomes"))]
        out.append("")
        if report["unsupported"]:
            out.append(f"{len(report['unsupported'])} node(s) the converter refuses:")
            out.append(table([(u["node"], u["op"], u["why"]) for u in report["unsupported"]], ("node", "op", "why")))
        else:
            out.append("every node is supported: `onnx-snn convert` can convert this model")
        return "\n".join(out)
    opts = report["options"]
    out = [f"SNN step model: {len(report['layers'])} states, outputs {list(report['outputs'])} (decoded by sum over t); "
           f"calibration {report['calibration_mode']}; runtime form {'embedded' if report['runtime_form'] else 'absent'}",
           "converter options: " + json.dumps(opts), "",
           table([(i, n["op"], n["name"], ", ".join(n["inputs"]), ", ".join(n["outputs"]))
                  for i, n in enumerate(report["nodes"])], ("#", "op", "name", "inputs", "outputs")), "",
           table([(L["state"], L["kind"], L["layer"], lambda_text(L["lambda"]) if L["lambda"] is not None else "-",
                   L["threshold"] if L["threshold"] is not None else "-", L["shape"], L["init"], L["reset"])
                  for L in report["layers"]],
                 ("state", "kind", "layer", "lambda", "threshold", "shape", "initial potential", "reset"))]
    return "\n".join(out)
