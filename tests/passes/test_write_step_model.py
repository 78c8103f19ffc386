"""WriteStepModel: the conversion record becomes the step model's metadata; the graph stays."""
import json

import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx_builder import GraphBuilder
from onnx_snn_runtime import Simulator
from onnx_snn_runtime.format import KEY_RUNTIME_FORM, StepModelSpec, metadata

from onnx_snn.converter import Converter
from onnx_snn.errors import ModelWeightsError
from onnx_snn.graph import ir_version_for
from onnx_snn.passes.base import ContractError, PassManager
from onnx_snn.passes.write_step_model import WriteStepModel
from onnx_snn.record import ConversionRecord

SHA = "ab" * 32
T = 5


def net():
    b = GraphBuilder(seed=6)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(3, 2, 3, 3), b.rand(3)])])
    h = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])  # running max: a state of its own
    y = b.op("Gemm", [b.op("Flatten", [h]), b.rand(3 * 2 * 2, 4), b.rand(4)])
    return b.model({"x": ["N", 2, 6, 6]}, [b.op("Softmax", [y])])  # the output Softmax is dropped


def data(n=32):
    return np.random.default_rng(5).random((n, 2, 6, 6)).astype(np.float32)


def before_writing(x=None, **options):
    x = data() if x is None else x
    converter = Converter(x, "99%", progress=False, **options)
    passes = converter.passes(SHA)
    k = next(i for i, p in enumerate(passes) if isinstance(p, WriteStepModel))
    result = PassManager(passes[:k], check=True)(net(), ConversionRecord(converter.config))
    return passes[k], result, converter


def simulate(model, states, x, steps=T):
    """The sum over ``steps`` of the model's first output, states carried by hand (onnxruntime)."""
    state = {s.input: s.initial(len(x)) for s in states}
    total = 0
    for _ in range(steps):
        values = run_ort(model, {"x": x, **state}, [model.graph.output[0].name] + [s.output for s in states])
        state = {s.input: v for s, v in zip(states, values[1:])}
        total = total + values[0]
    return total


def test_metadata_is_the_record_and_the_runtime_reads_it():
    pass_, before, converter = before_writing()
    model = before.model
    model.metadata_props.add(key="onnx_snn.foo", value="stale")  # left by an earlier tool: dropped
    model.metadata_props.add(key="author", value="me")           # the user's own: kept
    result = pass_(model, before.record)
    out, record = result.model, result.record
    assert result.modified
    spec = StepModelSpec.from_model(out)
    assert [s.to_json() for s in spec.states] == [s.to_json() for s in record.states]
    assert [s.kind for s in spec.states] == ["membrane", "maxpool_sum"]
    assert spec.outputs == {out.graph.output[0].name: "sum"}
    assert spec.source_sha256 == SHA
    assert spec.converter == {**converter.config.recorded(), "dropped_softmax": record.dropped_softmax}
    assert record.dropped_softmax  # the Softmax was dropped, and the record says so
    assert spec.calibration == json.loads(json.dumps(record.calibration_json()))
    assert [layer["lambda"] for layer in spec.calibration["layers"]] == [s.lam for s in record.sites]
    meta = metadata(out.metadata_props)
    assert meta["author"] == "me" and "onnx_snn.foo" not in meta
    assert {k for k in meta if k.startswith("onnx_snn.")} == set(spec.to_metadata())
    assert KEY_RUNTIME_FORM not in meta  # that one is EmbedRuntimeForm's
    assert out.ir_version <= 13 and out.ir_version == ir_version_for(out)
    assert (out.producer_name, out.producer_version) == ("onnx-snn", __import__("onnx_snn").__version__)
    onnx.checker.check_model(out, full_check=True)
    pass_.ensures(out, record)
    # the graph is untouched, and the runtime simulates it from the metadata alone
    assert out.graph.SerializeToString() == model.graph.SerializeToString()
    x = data(8)
    expected = simulate(model, record.states, x)
    got = Simulator(out.SerializeToString(), "cpu", optimize=False).run(x, T)[-1]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 0


def test_ensures_catches_states_that_differ_from_the_record():
    pass_, before, _ = before_writing()
    result = pass_(before.model, before.record)
    fewer = ConversionRecord(result.record.options, states=result.record.states[:1])
    with pytest.raises(ContractError, match="states"):
        pass_.ensures(result.model, fewer)


def test_an_overflowing_constant_is_refused():
    pass_, before, _ = before_writing()
    model = before.model
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    weight.CopyFrom(onnx.numpy_helper.from_array(np.full(tuple(weight.dims), np.inf, np.float32), weight.name))
    with pytest.raises(ModelWeightsError, match=weight.name):
        pass_(model, before.record)
