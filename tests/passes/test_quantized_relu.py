"""QuantizedReLU: QCFS activations (Bu et al. 2022) found in any spelling become Clip(x, 0, λ) neuron
sites with the graph's λ, L and shift; other Floor chains stay, with the reason. QuantizedReLUScales
keeps those numbers through calibration, and InsertNeurons starts such a layer at its shift."""
import json
import math

import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx_builder import GraphBuilder

from onnx_snn.converter import Converter
from onnx_snn.errors import CalibrationError
from onnx_snn.graph import import_graph
from onnx_snn.passes.base import ContractError, PassManager
from onnx_snn.passes.canonicalize import Canonicalize
from onnx_snn.passes.insert_neurons import InsertNeurons
from onnx_snn.passes.quantized_relu import QuantizedReLU, QuantizedReLUScales, find
from onnx_snn.record import ConversionRecord

LAM, L = 2.5, 4
f32 = np.float32


def qcfs(x, lam=LAM, levels=L, shift=0.5):
    """The reference: λ/L · clip(floor(x·L/λ + shift), 0, L), in float64."""
    x = np.asarray(x, np.float64)
    return lam / levels * np.clip(np.floor(x * levels / lam + shift), 0, levels)


# Each spelling: a function (builder, x) -> y. Constants are float32 scalars as exporters write them.
def torch_style(b, x):  # Div(λ), Mul(L), Add(0.5), Floor, Div(L), Clip(0, 1), Mul(λ): both torch exporters
    u = b.op("Add", [b.op("Mul", [b.op("Div", [x, b.const(f32(LAM))]), b.const(f32(L))]), b.const(f32(0.5))])
    return b.op("Mul", [b.op("Clip", [b.op("Div", [b.op("Floor", [u]), b.const(f32(L))]), b.const(f32(0)),
                                      b.const(f32(1))]), b.const(f32(LAM))])


def one_mul_max_min(b, x):  # one Mul by L/λ (constants on the left), Max/Min clamp, Mul by λ/L
    u = b.op("Add", [b.const(f32(0.5)), b.op("Mul", [b.const(f32(L / LAM)), x])])
    q = b.op("Min", [b.op("Max", [b.op("Floor", [u]), b.const(f32(0))]), b.const(f32(L))])
    return b.op("Mul", [q, b.const(f32(LAM / L))])


def sub_relu_min(b, x):  # Sub(-0.5) instead of Add(0.5), Relu + Min after scaling
    u = b.op("Sub", [b.op("Mul", [x, b.const(f32(L / LAM))]), b.const(f32(-0.5))])
    y = b.op("Mul", [b.op("Floor", [u]), b.const(f32(LAM / L))])
    return b.op("Min", [b.op("Relu", [y]), b.const(f32(LAM))])


def clamp_before_floor(b, x):  # the paper's code: x/λ, clamp(0, 1), floor(·L + 0.5)/L, ·λ
    c = b.op("Clip", [b.op("Div", [x, b.const(f32(LAM))]), b.const(f32(0)), b.const(f32(1))])
    q = b.op("Floor", [b.op("Add", [b.op("Mul", [c, b.const(f32(L))]), b.const(f32(0.5))])])
    return b.op("Mul", [b.op("Div", [q, b.const(f32(L))]), b.const(f32(LAM))])


def neg_and_clip_max_only(b, x):  # Neg twice, a Clip with its min left out and a Relu
    u = b.op("Add", [b.op("Neg", [b.op("Mul", [b.op("Neg", [x]), b.const(f32(L / LAM))])]), b.const(f32(0.5))])
    q = b.op("Relu", [b.op("Clip", [b.op("Floor", [u]), "", b.const(f32(L))])])
    return b.op("Div", [q, b.const(f32(L / LAM))])


SPELLINGS = [torch_style, one_mul_max_min, sub_relu_min, clamp_before_floor, neg_and_clip_max_only]


def chain_model(spelling, seed=0):
    """x -> Gemm -> (chain) -> Gemm -> y."""
    b = GraphBuilder(seed=seed)
    h = spelling(b, b.op("Gemm", ["x", b.rand(6, 16, scale=2.0), b.rand(16)]))
    return b.model({"x": ["N", 6]}, [b.op("Gemm", [h, b.rand(16, 3), b.rand(3)])])


def hidden(model, out_of):
    """The model with the tensor ``out_of`` (a node's name, else the first Gemm) as its only output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == out_of)
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    return m


def data(n=512, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, 6)) * 2).astype(np.float32)


def recognised(model):
    canonical = Canonicalize()(model).model
    result = QuantizedReLU()(canonical)
    return canonical, result


@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda f: f.__name__)
def test_each_spelling_becomes_one_clip_with_the_graphs_numbers(spelling):
    canonical, result = recognised(chain_model(spelling))
    out, record = result.model, result.record
    assert result.modified
    (site,) = record.trained
    assert site.levels == L and site.v_init == 0.5
    assert math.isclose(site.lam, LAM, rel_tol=1e-6)
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Clip", "Gemm"]
    clip = next(n for n in out.graph.node if n.op_type == "Clip")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert clip.name == site.node and [float(inits[i]) for i in clip.input[1:]] == [0.0, float(f32(site.lam))]
    floor = next(n.name for n in canonical.graph.node if n.op_type == "Floor")
    assert floor == site.node and floor in site.nodes
    assert set(site.nodes) == {n.name for n in canonical.graph.node if n.op_type != "Gemm"}
    QuantizedReLU().ensures(out, record)
    # the chain computes λ/L·clip(floor(x·L/λ + b), 0, L) with the recorded numbers, clamps included
    x = data()
    z = run_ort(hidden(canonical, canonical.graph.node[0].name), {"x": x})[0]
    y = run_ort(hidden(canonical, next(n.name for n in canonical.graph.node[::-1] if n.op_type != "Gemm")),
                {"x": x})[0]
    assert (z < 0).any() and (z > LAM).any()
    np.testing.assert_allclose(y, qcfs(z, site.lam, site.levels, site.v_init), atol=1e-5)
    # and the new Clip reads z and writes the chain's output tensor (the second Gemm is untouched)
    np.testing.assert_allclose(run_ort(hidden(out, clip.name), {"x": x})[0], np.clip(z, 0, site.lam), atol=1e-6)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_found_in_torch_exports(exporter):
    torch = pytest.importorskip("torch")
    from onnx_snn.qcfs import QCFS
    from onnx_snn.torch_export import export_module
    torch.manual_seed(0)
    lams = [1.7, 0.9]
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), QCFS(4, lams[0]), torch.nn.Conv2d(3, 2, 3),
                                QCFS(8, lams[1]), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 5))
    proto = export_module(model, torch.rand(2, 1, 8, 8), exporter=exporter)
    _, result = recognised(proto)
    assert [(t.levels, t.v_init) for t in result.record.trained] == [(4, 0.5), (8, 0.5)]
    assert [t.lam for t in result.record.trained] == [float(f32(v)) for v in lams]  # λ as torch stored it
    assert not [n for n in result.model.graph.node if n.op_type in ("Floor", "Div", "Mul", "Add")]
    assert [n.op_type for n in result.model.graph.node if n.op_type in ("Conv", "Clip")] == ["Conv", "Clip"] * 2


def test_stacked_activations_stay_two_sites():
    """QCFS -> QCFS with nothing between: the second chain does not swallow the first site."""
    b = GraphBuilder(seed=3)
    h = torch_style(b, torch_style(b, b.op("Gemm", ["x", b.rand(6, 8, scale=2.0), b.rand(8)])))
    _, result = recognised(b.model({"x": ["N", 6]}, [h]))
    assert len(result.record.trained) == 2
    assert [n.op_type for n in result.model.graph.node] == ["Gemm", "Clip", "Clip"]


def two_inputs(b, x):  # the Floor's output is scaled by an activation (a second graph input)
    u = b.op("Add", [b.op("Mul", [b.op("Div", [x, b.const(f32(LAM))]), b.const(f32(L))]), b.const(f32(0.5))])
    q = b.op("Div", [b.op("Mul", [b.op("Floor", [u]), "scale"]), b.const(f32(L))])
    return b.op("Mul", [b.op("Clip", [q, b.const(f32(0)), b.const(f32(1))]), b.const(f32(LAM))])


def output_scale(b, x):  # λ/L·clip(floor(x·L/λ + 0.5)) times 2: no part of it is QCFS
    u = b.op("Add", [b.op("Mul", [x, b.const(f32(L / LAM))]), b.const(f32(0.5))])
    q = b.op("Clip", [b.op("Div", [b.op("Floor", [u]), b.const(f32(L))]), b.const(f32(0)), b.const(f32(1))])
    return b.op("Mul", [q, b.const(f32(2 * LAM))])


def scaled(shift=0.5, levels=L, lo=0.0, offset=0.0, top=1.0):
    def spelling(b, x):
        u = b.op("Add", [b.op("Mul", [b.op("Div", [x, b.const(f32(LAM))]), b.const(f32(levels))]), b.const(f32(shift))])
        q = b.op("Add", [b.op("Div", [b.op("Floor", [u]), b.const(f32(levels))]), b.const(f32(offset))])
        c = b.op("Clip", [q, b.const(f32(lo + offset)), b.const(f32(top + offset))])
        return b.op("Mul", [c, b.const(f32(LAM))])
    return spelling


NOT_QCFS = [
    ("output scale", output_scale, "s·a = 2, not 1"),
    ("shift 1.5", scaled(shift=1.5), "b = 1.5, outside [0, 1)"),
    ("negative shift", scaled(shift=-0.25), "b = -0.25, outside [0, 1)"),
    ("non-integer L", scaled(levels=4.5), "upper clamp is at 4.5 levels, not a positive integer"),
    ("lower clamp", scaled(lo=0.25), "lower clamp is at 1 levels, not 0"),
    ("output offset", scaled(offset=0.1), "offset by c = 0.25"),
    ("no clamp", scaled(top=math.inf), "no upper clamp"),
    ("non-constant operand", two_inputs, ("no upper clamp: floor(a·x + b) is unbounded; the chain stops because Mul",
                                          "(Mul): its operand 'scale' is not a constant")),
]


@pytest.mark.parametrize("case, spelling, reason", NOT_QCFS, ids=[c[0] for c in NOT_QCFS])
def test_other_floor_chains_are_left_alone_with_the_reason(case, spelling, reason):
    b = GraphBuilder(seed=0)
    inputs = {"x": ["N", 6]}
    y = spelling(b, b.op("Gemm", ["x", b.rand(6, 16, scale=2.0), b.rand(16)]))
    if spelling is two_inputs:
        inputs["scale"] = [1]
    canonical = Canonicalize()(b.model(inputs, [y])).model
    graph = import_graph(canonical)
    check = find(graph, next(n for n in graph.nodes if n.op == "Floor"))
    assert not check and all(r in check.reason for r in ([reason] if isinstance(reason, str) else reason)), check.reason
    result = QuantizedReLU()(canonical)
    assert result.record.trained == [] and not result.modified
    assert result.model.SerializeToString() == canonical.SerializeToString()


def test_a_model_without_floor_is_returned_as_it_was():
    b = GraphBuilder(seed=1)
    model = b.model({"x": ["N", 6]}, [b.op("Relu", [b.op("Gemm", ["x", b.rand(6, 4), b.rand(4)])])])
    result = QuantizedReLU()(model)
    assert result.model is model and not result.modified and result.record.trained == []


def test_runs_before_calibration_only():
    model = chain_model(torch_style)
    converter = Converter(data(), mode="max", progress=False)
    passes = converter.passes()
    k = next(i for i, p in enumerate(passes) if isinstance(p, QuantizedReLUScales))
    calibrated = PassManager(passes[:k], check=True)(model, ConversionRecord(converter.config))
    with pytest.raises(ContractError, match="before Calibrate"):
        QuantizedReLU()(calibrated.model, calibrated.record)
    with pytest.raises(CalibrationError, match="Calibrate"):
        QuantizedReLUScales()(model)


@pytest.mark.parametrize("options", [dict(mode="99%"), dict(mode="max", per_channel=True, v_init=0.0),
                                     dict(mode=0.3, v_init="half")], ids=["99%", "per-channel", "fraction"])
def test_the_graphs_lambda_and_shift_survive_calibration(options):
    """Whatever the calibration mode and the v_init option, a trained site keeps λ, L and v_init = b,
    and the step model records ``trained_levels`` for that layer only."""
    b = GraphBuilder(seed=4)
    h = torch_style(b, b.op("Gemm", ["x", b.rand(6, 16, scale=2.0), b.rand(16)]))
    h = b.op("Relu", [b.op("Gemm", [h, b.rand(16, 8), b.rand(8)])])  # an ordinary ReLU after it
    model = b.model({"x": ["N", 6]}, [b.op("Gemm", [h, b.rand(8, 3), b.rand(3)])])
    converter = Converter(data(), progress=False, **options)
    snn = converter(model)
    trained, plain = converter.record.sites
    assert trained.lam == converter.record.trained[0].lam and math.isclose(trained.lam, LAM, rel_tol=1e-6)
    assert (trained.levels, trained.v_init, trained.share_above) == (L, 0.5, 0.0)
    assert trained.state.init == 0.5 and plain.state.init == converter.config.v_init
    assert plain.levels is None and plain.v_init is None
    meta = {p.key: p.value for p in snn.metadata_props}
    layers = json.loads(meta["onnx_snn.calibration"])["layers"]
    assert layers[0]["trained_levels"] == L and "trained_levels" not in layers[1]
    assert layers[0]["lambda"] == trained.lam
    states = json.loads(meta["onnx_snn.states"])
    assert states[0]["init"] == {"value": 0.5}


def test_insert_neurons_starts_a_trained_site_at_its_shift():
    model = chain_model(torch_style)
    converter = Converter(data(), mode="max", v_init=0.25, progress=False)
    passes = converter.passes()
    k = next(i for i, p in enumerate(passes) if isinstance(p, InsertNeurons))
    before = PassManager(passes[:k], check=True)(model, ConversionRecord(converter.config))
    before.record.sites[0].v_init = 0.75  # the site's own value wins over the option's 0.25
    after = InsertNeurons("if", converter.config)(before.model, before.record)
    assert after.record.states[0].init == 0.75


def test_a_scale_before_the_activation_stays_outside_the_site():
    """Mul(2) -> QCFS(λ): the whole chain is not QCFS (s·a = 2), the chain from the Div(λ) on is."""
    def spelling(b, x):
        return scaled()(b, b.op("Mul", [x, b.const(f32(2.0))]))
    canonical, result = recognised(chain_model(spelling))
    (site,) = result.record.trained
    assert (site.lam, site.levels, site.v_init) == (LAM, L, 0.5)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm", "Mul", "Clip", "Gemm"]
