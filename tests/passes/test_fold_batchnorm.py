"""BatchNorm folding: every foldable and standalone case computes what the original did (1e-5 relative),
and the record says where each BatchNormalization went (folded into a layer, or an affine)."""
import numpy as np
import pytest
from helpers import rel_err, run_ort
from onnx_builder import GraphBuilder

from onnx_snn.passes.base import ContractError
from onnx_snn.passes.canonicalize import Canonicalize
from onnx_snn.passes.fold_batchnorm import FoldBatchNorm
from onnx_snn.record import BatchNormFold, ConversionRecord

TOL = 1e-5


def fold_result(model):
    """The pass's result (model, record) on the canonicalized ``model``, its guarantee checked."""
    result = FoldBatchNorm()(Canonicalize()(model).model)
    FoldBatchNorm().ensures(result.model, result.record)
    return result


def fold(model):
    return fold_result(model).model


def names(model, op_type):
    return [n.name for n in model.graph.node if n.op_type == op_type]


def check(model, inputs: dict, expect_ops: set[str] | None = None, forbid_ops=("BatchNormalization",)):
    """Fold, check the ops left and the numbers; returns the pass's result."""
    result = fold_result(model)
    folded = result.model
    ops = [n.op_type for n in folded.graph.node]
    for op in forbid_ops:
        assert op not in ops, ops
    if expect_ops is not None:
        assert expect_ops <= set(ops), ops
    rng = np.random.default_rng(7)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in inputs.items()}
    for a, b in zip(run_ort(folded, feeds), run_ort(model, feeds)):
        err = rel_err(a, b)
        assert err <= TOL, err
    assert result.modified is True
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    return result


def assert_folded_into(model, result, layer_op):
    """Each BatchNormalization is recorded as folded into the one ``layer_op`` node (no affine),
    and that layer is still there under its name."""
    layer, = names(model, layer_op)
    assert result.record.batchnorms == [BatchNormFold(bn, layer, []) for bn in names(model, "BatchNormalization")]
    assert layer in names(result.model, layer_op)


CONV_CASES = [dict(group=1), dict(group=2), dict(group=4, depthwise=True), dict(group=1, pads=[1, 2, 1, 0]),
              dict(group=2, strides=[2, 2]), dict(group=1, dilations=[2, 2], pads=[2, 2, 2, 2]),
              dict(group=1, bias=False)]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv_bn_folds_into_weights(case):
    case = dict(case)
    g, bias, depthwise = case.pop("group"), case.pop("bias", True), case.pop("depthwise", False)
    b = GraphBuilder()
    cout = 4 if depthwise else 6
    inputs = ["x", b.rand(cout, 4 // g, 3, 3)] + ([b.rand(cout)] if bias else [])
    y = b.bn(b.op("Conv", inputs, group=g, **case), cout)
    model = b.model({"x": ["N", 4, 9, 9]}, [y])
    result = check(model, {"x": [3, 4, 9, 9]}, forbid_ops=("BatchNormalization", "Mul", "Add"))
    assert_folded_into(model, result, "Conv")
    conv, = result.model.graph.node
    assert len(conv.input) == 3  # a bias is added where there was none
    assert conv.input[1] != model.graph.node[0].input[1]  # new weights, the old ones may be shared


@pytest.mark.parametrize("group,strides,bias", [(1, [1, 1], True), (2, [2, 2], True), (2, [1, 1], False)])
def test_convtranspose_bn_folds_into_weights(group, strides, bias):
    b = GraphBuilder()
    inputs = ["x", b.rand(4, 6 // group, 3, 3)] + ([b.rand(6)] if bias else [])
    y = b.bn(b.op("ConvTranspose", inputs, group=group, strides=strides), 6)
    model = b.model({"x": ["N", 4, 5, 5]}, [y])
    result = check(model, {"x": [2, 4, 5, 5]}, forbid_ops=("BatchNormalization", "Mul", "Add"))
    assert_folded_into(model, result, "ConvTranspose")


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (7,), (1, 7), (1,)])
def test_gemm_bn_folds_into_weights(trans_b, bias_shape):
    b = GraphBuilder()
    w = b.rand(7, 5) if trans_b else b.rand(5, 7)
    inputs = ["x", w] + ([b.rand(*bias_shape)] if bias_shape else [])
    y = b.bn(b.op("Gemm", inputs, transB=trans_b, alpha=0.7, beta=1.3), 7)
    model = b.model({"x": ["N", 5]}, [y])
    result = check(model, {"x": [4, 5]}, forbid_ops=("BatchNormalization", "Mul", "Add"))
    assert_folded_into(model, result, "Gemm")


def test_matmul_bn_and_matmul_add_bn_fold():
    b = GraphBuilder()
    y1 = b.bn(b.op("MatMul", ["x", b.rand(5, 7)]), 7)
    y2 = b.bn(b.op("Add", [b.op("MatMul", ["x", b.rand(5, 7)]), b.rand(7)]), 7)
    model = b.model({"x": ["N", 5]}, [y1, y2])
    result = check(model, {"x": [4, 5]}, forbid_ops=("BatchNormalization", "Mul"))
    folded = result.model
    assert [n.op_type for n in folded.graph.node].count("Add") == 2  # one new bias, one reused
    bn1, bn2 = names(model, "BatchNormalization")
    mm1, mm2 = names(model, "MatMul")
    add, = names(model, "Add")
    assert [r.node for r in result.record.batchnorms] == [bn1, bn2]
    assert all(r.affine == [] for r in result.record.batchnorms)
    assert result.record.batchnorms[1].into in (mm2, add)  # the MatMul's weights, the Add's bias
    assert set(names(model, "MatMul")) <= set(names(folded, "MatMul")) and add in names(folded, "Add")


def test_matmul_bn_is_recorded_as_folded_into_the_matmul():
    b = GraphBuilder()
    y = b.bn(b.op("MatMul", ["x", b.rand(5, 7)]), 7)
    model = b.model({"x": ["N", 5]}, [y])
    result = check(model, {"x": [4, 5]}, forbid_ops=("BatchNormalization", "Mul"))
    assert_folded_into(model, result, "MatMul")


@pytest.mark.parametrize("where", ["after_add", "after_concat", "after_relu", "shared_conv_output",
                                   "graph_input", "rank3_matmul"])
def test_standalone_bn_becomes_affine(where):
    b = GraphBuilder()
    shape = ["N", 4, 6, 6]
    if where == "after_add":
        y = b.bn(b.op("Add", [b.op("Conv", ["x", b.rand(4, 4, 1, 1)]), "x"]), 4)
    elif where == "after_concat":
        y = b.bn(b.op("Concat", [b.op("Conv", ["x", b.rand(2, 4, 1, 1)]), "x"], axis=1), 6)
    elif where == "after_relu":
        y = b.op("Conv", [b.bn(b.op("Relu", [b.op("Conv", ["x", b.rand(4, 4, 3, 3)])]), 4), b.rand(3, 4, 1, 1)])
    elif where == "shared_conv_output":
        c = b.op("Conv", ["x", b.rand(4, 4, 3, 3), b.rand(4)])
        y = b.op("Add", [b.bn(c, 4), c])
    elif where == "graph_input":
        y = b.bn("x", 4)
    else:
        shape = ["N", 4, 5]
        y = b.bn(b.op("MatMul", ["x", b.rand(5, 3)]), 4)  # BN's channel axis 1 is not the weight's axis
    model = b.model({"x": shape}, [y])
    result = check(model, {"x": [3] + shape[1:]}, expect_ops={"Mul", "Add"})
    folded = result.model
    assert folded.graph.output[0].name == model.graph.output[0].name
    bn, = names(model, "BatchNormalization")
    assert result.record.batchnorms == [BatchNormFold(bn, None, [f"{bn}.mul", f"{bn}.add"])]
    by_name = {n.name: n for n in folded.graph.node}
    mul, add = by_name[f"{bn}.mul"], by_name[f"{bn}.add"]
    assert (mul.op_type, add.op_type) == ("Mul", "Add") and add.input[0] == mul.output[0]
    weights = {n: names(model, n) for n in ("Conv", "MatMul")}
    for op, layer_names in weights.items():  # the layers before are untouched
        assert layer_names == names(folded, op)


def test_graph_without_batchnorm_is_unchanged():
    b = GraphBuilder()
    y = b.op("Relu", [b.op("Add", [b.op("Conv", ["x", b.rand(4, 4, 3, 3), b.rand(4)]), b.rand(4, 1, 1)])])
    model = Canonicalize()(b.model({"x": ["N", 4, 6, 6]}, [y])).model
    original = model.SerializeToString()
    result = FoldBatchNorm()(model, ConversionRecord())
    assert result.modified is False
    assert result.model.SerializeToString() == original
    assert result.record.batchnorms == []
    FoldBatchNorm().ensures(result.model, result.record)


def test_input_record_is_not_changed():
    b = GraphBuilder()
    model = Canonicalize()(b.model({"x": ["N", 4, 3, 3]}, [b.bn("x", 4)])).model
    record = ConversionRecord()
    result = FoldBatchNorm()(model, record)
    assert record.batchnorms == [] and len(result.record.batchnorms) == 1


def test_ensures_catches_a_batchnorm_left():
    b = GraphBuilder()
    model = b.model({"x": ["N", 4, 3, 3]}, [b.bn("x", 4)])
    with pytest.raises(ContractError, match="BatchNormalization left"):
        FoldBatchNorm().ensures(model, ConversionRecord())


def test_training_mode_bn_is_refused():
    from onnx_snn.errors import UnsupportedOpError
    b = GraphBuilder(opset=15)
    y = b.bn("x", 4)
    model = b.model({"x": ["N", 4, 3, 3]}, [y])
    model.graph.node[0].attribute.add(name="training_mode", i=1, type=2)
    model.graph.node[0].output.extend(["running_mean", "running_var"])  # as a training-mode export has
    with pytest.raises(UnsupportedOpError, match="training mode"):
        fold(model)


def _torch_net():
    torch = pytest.importorskip("torch")
    from torch import nn

    class Net(nn.Module):
        """BN after Conv, BN1d after Linear, BN after a residual Add, BN after a ReLU."""

        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.b_after_relu = nn.BatchNorm2d(4)
            self.fc, self.b3 = nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(torch.relu(self.c2(y)) + y)
            y = self.b_after_relu(torch.relu(y))
            return torch.relu(self.b3(self.fc(y.flatten(1))))

    torch.manual_seed(0)
    net = Net()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return torch, net.eval()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_torch_exports_with_batchnorm_preserved_fold_exactly(exporter):
    torch, net = _torch_net()
    from onnx_snn.torch_export import export_module
    model = export_module(net, torch.randn(2, 1, 8, 8), exporter=exporter, preserve_batchnorm=True)
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 4
    result = check(model, {"input": [5, 1, 8, 8]})
    folded = result.model
    x = np.random.default_rng(3).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert rel_err(run_ort(folded, {"input": x})[0], expected) <= TOL
    # b1 and b3 fold into their layers; b2 (after the residual Add) and the one after a ReLU stay affines
    assert [r.into is None for r in result.record.batchnorms].count(True) == 2
    assert {r.node for r in result.record.batchnorms} == set(names(model, "BatchNormalization"))
    left = {n.name for n in folded.graph.node}
    for r in result.record.batchnorms:
        assert (r.into in left) if r.into else (set(r.affine) <= left and len(r.affine) == 2)
