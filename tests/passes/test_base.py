"""Pass infrastructure: PassManager's error naming and checks, record copying, Check."""
import logging

import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx import helper, numpy_helper
from onnx_builder import GraphBuilder

from onnx_snn.errors import CalibrationError, OnnxSnnError, PassError
from onnx_snn.passes import base
from onnx_snn.passes.base import OK, Check, ContractError, Pass, PassManager, PassResult, check_sorted, fail
from onnx_snn.record import ConversionRecord, NeuronSite


def affine():
    """y = x * 2 + 1, the constants as initializers ("a", "b")."""
    b = GraphBuilder()
    y = b.op("Add", [b.op("Mul", ["x", b.const(np.float32(2), "a")]), b.const(np.float32(1), "b")])
    return b.model({"x": ["N", 3]}, [y])


class Scale(Pass):
    """Multiplies initializer ``name`` by ``factor`` and notes it in the record."""

    def __init__(self, name="a", factor=3.0):
        self.target, self.factor = name, factor

    def call(self, model, record):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        t = next(t for t in out.graph.initializer if t.name == self.target)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(self.factor), t.name))
        record.folded_scales.append(f"{self.target}*{self.factor:g}")
        if record.sites:
            record.sites[0].lam = -1.0
        return PassResult(out, True, record)


class Nothing(Pass):
    def call(self, model, record):
        return PassResult(model, False, record)


class Raises(Pass):
    def __init__(self, error):
        self.error = error

    def call(self, model, record):
        raise self.error


class BrokenPromise(Nothing):
    """Runs fine, but its postcondition fails."""

    def ensures(self, model, record):
        raise ContractError("the promise is broken")


class Refuses(Nothing):
    def requires(self, model, record):
        raise CalibrationError("no calibration")


X = np.arange(6, dtype=np.float32).reshape(2, 3)


def test_passes_run_in_order_and_hand_on_model_and_record():
    model = affine()
    result = PassManager([Scale("a", 3.0), Nothing(), Scale("b", 5.0)], check=True)(model)
    assert result.modified and result.record.folded_scales == ["a*3", "b*5"]
    np.testing.assert_allclose(run_ort(result.model, {"x": X})[0], X * 6 + 5)
    np.testing.assert_allclose(run_ort(model, {"x": X})[0], X * 2 + 1)  # the input model is untouched
    nothing = PassManager([Nothing(), Nothing()])(model)
    assert nothing.modified is False and nothing.model is model


def test_a_project_error_keeps_its_type_and_names_the_pass_once():
    with pytest.raises(CalibrationError) as info:
        PassManager([Nothing(), Raises(CalibrationError("no scales"))])(affine())
    assert str(info.value) == "[Raises] no scales"
    # a manager inside a manager does not name the pass twice
    inner = PassManager([Raises(CalibrationError("no scales"))])

    class Outer(Pass):
        def call(self, model, record):
            return inner(model, record)

    with pytest.raises(CalibrationError) as info:
        PassManager([Outer()])(affine())
    assert str(info.value) == "[Raises] no scales"


def test_any_other_exception_is_a_pass_error_that_blames_onnx_snn():
    original = KeyError("boom")
    with pytest.raises(PassError, match=r"pass Raises failed with KeyError: 'boom'.*bug in onnx-snn") as info:
        PassManager([Scale(), Raises(original)])(affine())
    assert info.value.__cause__ is original
    assert isinstance(info.value, OnnxSnnError)


def test_requires_always_runs():
    with pytest.raises(CalibrationError, match=r"\[Refuses\] no calibration"):
        PassManager([Refuses()], check=False)(affine())
    with pytest.raises(CalibrationError, match="no calibration"):
        Refuses()(affine())


def test_ensures_runs_only_when_checking(monkeypatch):
    model = affine()
    assert PassManager([BrokenPromise()], check=False)(model).modified is False
    with pytest.raises(ContractError, match=r"\[BrokenPromise\] the promise is broken"):
        PassManager([BrokenPromise()], check=True)(model)
    assert BrokenPromise()(model).modified is False  # calling a pass alone never checks
    monkeypatch.setenv(base.CHECK_ENV, "0")
    assert PassManager([BrokenPromise()]).check is False
    PassManager([BrokenPromise()])(model)
    monkeypatch.setenv(base.CHECK_ENV, "1")
    assert PassManager([BrokenPromise()]).check is True
    with pytest.raises(ContractError):
        PassManager([BrokenPromise()])(model)
    assert PassManager([BrokenPromise()], check=False).check is False  # an explicit choice wins


def test_a_pass_never_changes_the_record_it_is_given():
    site = NeuronSite("Relu1", "Relu", "r", 2.0, 2.0, 0.0)
    given = ConversionRecord(sites=[site])
    result = Scale()(affine(), given)
    assert result.record is not given and result.record.sites[0] is not site
    assert result.record.folded_scales == ["a*3"] and result.record.sites[0].lam == -1.0
    assert given.folded_scales == [] and site.lam == 2.0  # a deep copy: nested objects too
    managed = PassManager([Scale(), Scale("b")])(affine(), given)
    assert managed.record.folded_scales == ["a*3", "b*3"]
    assert given.folded_scales == [] and site.lam == 2.0
    fresh = Scale()(affine())
    assert isinstance(fresh.record, ConversionRecord) and fresh.record.folded_scales == ["a*3"]


def test_check_is_truthy_when_ok_and_falsy_with_a_reason():
    assert OK and bool(Check()) and OK.reason == "" and repr(OK) == "Check(ok)"
    no = fail("the weight is not constant")
    assert not no and no.reason == "the weight is not constant"
    assert repr(no) == "Check(fail: the weight is not constant)"
    assert isinstance(no, Check) and not Check("x")


def test_check_rewrite_logs_the_reason_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="onnx_snn.passes.base")
    assert Nothing().check_rewrite(OK, "fold A") is True
    assert Nothing().check_rewrite(fail("it has two readers"), "fold B") is False
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name == base.log.name]
    assert debug == ["Nothing: fold B: it has two readers"]


def test_check_sorted_finds_a_node_that_reads_ahead():
    model = affine()
    check_sorted(model)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    with pytest.raises(ContractError, match="before they are produced"):
        check_sorted(model)
    empty = helper.make_node("Clip", ["x", "", "b"], ["y"], name="clip")  # an empty input is fine
    g = helper.make_graph([empty], "g", [helper.make_tensor_value_info("x", 1, [1])],
                          [helper.make_tensor_value_info("y", 1, [1])],
                          [numpy_helper.from_array(np.float32(1), "b")])
    check_sorted(helper.make_model(g))
