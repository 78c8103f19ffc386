"""export-triton: the config matches the step model's state pairs, and the exported model, driven
the way Triton's sequence batcher drives it, computes what the local runtime computes."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_snn_runtime import Simulator
from onnx_snn_runtime.format import StepModelSpec

import onnx_snn
from onnx_snn.cli import main
from onnx_snn.errors import OnnxSnnError
from onnx_snn.triton_export import START, export_triton

TYPES = {"float32": "TYPE_FP32", "float64": "TYPE_FP64", "float16": "TYPE_FP16"}


@pytest.fixture(scope="module")
def half_init_snn(bundled):
    """Non-zero initial potentials, so the initial_state files are exercised."""
    from conftest import SAMPLE_ONNX
    return onnx_snn.Converter(bundled[0], "99.9%", v_init="half", progress=False)(SAMPLE_ONNX)


def parse_config(text: str):
    from google.protobuf import text_format
    return text_format.Parse(text, model_config().ModelConfig())


def model_config():
    """Triton's model-config schema (the protobuf tritonclient ships): parsing refuses any field
    or value Triton would not know."""
    if os.environ.get("CI"):  # CI installs the serve extra: the schema checks must run there
        import tritonclient.grpc.model_config_pb2 as schema
        return schema
    return pytest.importorskip("tritonclient.grpc.model_config_pb2")


def test_config_has_every_state_pair_with_shape_type_and_initial_value(half_init_snn, tmp_path):
    path = export_triton(half_init_snn, tmp_path, name="cnn")
    spec = StepModelSpec.from_metadata({p.key: p.value for p in half_init_snn.metadata_props})
    config = parse_config((path / "config.pbtxt").read_text())
    assert config.name == "cnn" and config.backend == "onnxruntime" and config.max_batch_size == 16
    states = {s.input_name: s for s in config.sequence_batching.state}
    assert len(states) == len(spec.states) + len(spec.outputs)
    for s in spec.states:
        entry = states[s.input]
        assert entry.output_name == s.output
        assert list(entry.dims) == [int(d) for d in s.shape[1:]]
        assert model_config().DataType.Name(entry.data_type) == TYPES[s.dtype]
        assert len(entry.initial_state) == 1
        init = entry.initial_state[0]
        assert list(init.dims) == list(entry.dims)
        # Triton reads data_file from initial_state/ beside config.pbtxt, not from the version folder
        stored = np.fromfile(path / "initial_state" / init.data_file, dtype=s.dtype).reshape(entry.dims)
        np.testing.assert_array_equal(stored, np.broadcast_to(np.asarray(s.init, s.dtype), stored.shape))
    acc = states["snn.acc.logits"]
    assert acc.output_name == "logits.sum" and acc.initial_state[0].zero_data
    control = config.sequence_batching.control_input[0]
    assert control.name == START and control.control[0].kind == control.control[0].CONTROL_SEQUENCE_START
    assert list(control.control[0].fp32_false_true) == [0, 1]
    assert [i.name for i in config.input] == ["input"] and list(config.input[0].dims) == [1, 28, 28]
    assert [o.name for o in config.output] == ["logits", "logits.sum"]
    # every config tensor exists in the model with the same dims
    model = onnx.load(path / "1" / "model.onnx")
    graph_inputs = {i.name: i for i in model.graph.input}
    assert set(states) | {START, "input"} == set(graph_inputs)
    assert graph_inputs[START].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # as fp32_false_true says
    assert sorted(p.name for p in path.iterdir()) == ["1", "config.pbtxt", "initial_state"]



def test_exported_model_driven_like_triton_equals_the_simulator(half_init_snn, bundled, tmp_path):
    """Requests of one sequence: START=1 first (the states Triton passes then are ignored),
    then each request gets the previous request's state outputs."""
    path = export_triton(half_init_snn, tmp_path)
    session = ort.InferenceSession(str(path / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    config = parse_config((path / "config.pbtxt").read_text())
    pairs = [(s.input_name, s.output_name) for s in config.sequence_batching.state]
    x = bundled[2][:3]
    expected = Simulator(half_init_snn.SerializeToString(), "cpu").run(x, 6)
    rng = np.random.default_rng(0)
    states = {i: rng.standard_normal([len(x)] + list(s.dims)).astype(np.float32)  # garbage: START resets it
              for (i, _), s in zip(pairs, config.sequence_batching.state)}
    names = [o.name for o in session.get_outputs()]
    for t in range(6):
        start = np.full((len(x), 1), 1.0 if t == 0 else 0.0, np.float32)
        out = dict(zip(names, session.run(names, {"input": x, START: start, **states})))
        np.testing.assert_allclose(out["logits.sum"], expected[t], rtol=1e-5, atol=1e-4)
        states = {i: out[o] for i, o in pairs}


def test_cli_export_refuses_an_existing_folder_without_force(half_init_snn, tmp_path, capsys):
    model = tmp_path / "m.snn.onnx"
    onnx_snn.save(half_init_snn, model)
    repo = tmp_path / "repo"
    repo.mkdir()
    assert main(["export-triton", str(model), "--repo", str(repo)]) == 0
    assert (repo / "snn" / "config.pbtxt").is_file()
    assert main(["export-triton", str(model), "--repo", str(repo)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-triton", str(model), "--repo", str(repo), "--force", "--max-batch-size", "4"]) == 0
    assert "max_batch_size: 4" in (repo / "snn" / "config.pbtxt").read_text()
    assert [p.name for p in repo.iterdir()] == ["snn"]  # no temporary folder left behind
    assert main(["export-triton", str(model), "--repo", str(tmp_path / "new" / "repo")]) == 0  # created
    assert (tmp_path / "new" / "repo" / "snn" / "config.pbtxt").is_file()
    (tmp_path / "file").write_text("")
    assert main(["export-triton", str(model), "--repo", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_export_refuses_an_ann_and_bad_options(tmp_path):
    from conftest import SAMPLE_ONNX
    with pytest.raises(OnnxSnnError, match="not an SNN step model"):
        export_triton(SAMPLE_ONNX, tmp_path)
    with pytest.raises(OnnxSnnError, match="max_batch_size"):
        export_triton(SAMPLE_ONNX, tmp_path, max_batch_size=0)
    with pytest.raises(OnnxSnnError, match="name"):
        export_triton(SAMPLE_ONNX, tmp_path, name="../x")
