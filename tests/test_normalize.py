"""compressq.normalize: the import step (Constant weights, initializers as inputs, node names) and the
interface contract every pass keeps."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.graph.normalize import normalize
from compressq.graph.passes import InterfaceChanged, Port, check_contract, check_interface, interface
from compressq.io import load_model

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def _linear(*, constant_weight=False, weight_as_input=False, names=True, ir_version=8) -> onnx.ModelProto:
    """y = x @ W + [1.5, 1.5, 1.5] (the bias from a value_floats Constant)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul" if names else ""),
             helper.make_node("Constant", [], ["bias"], name="bias_const" if names else "",
                              **({"value_floats": [1.5] * 3} if ir_version >= 8 else  # value_floats: opset 12 on
                                 {"value": numpy_helper.from_array(np.full(3, 1.5, np.float32), "bias")})),
             helper.make_node("Add", ["xw", "bias"], ["y"], name="add" if names else "")]
    initializers = [numpy_helper.from_array(W, "W")]
    if constant_weight:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W, "W"),
                                         name="w_const" if names else ""))
        initializers = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17 if ir_version >= 8 else 7)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)


def test_constants_become_initializers_and_values_are_kept():
    model = _linear(constant_weight=True)
    result = normalize(model)
    assert sorted(result.constants_to_initializers) == ["W", "bias"]
    assert not any(n.op_type == "Constant" for n in result.model.graph.node)
    stored = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(stored["W"], W)
    assert stored["bias"].dtype == np.float32 and stored["bias"].shape == (3,) and np.all(stored["bias"] == 1.5)
    np.testing.assert_allclose(_outputs(result.model, X), X @ W + 1.5, rtol=1e-6)
    assert sum(n.op_type == "Constant" for n in model.graph.node) == 2, "the caller's proto is not modified"


def test_initializers_listed_as_inputs_are_dropped_from_the_inputs():
    model = _linear(weight_as_input=True)
    result = normalize(model)
    assert result.inputs_dropped == ["W"]
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert any("feeding replacement weights is not supported" in change for change in result.changes)
    np.testing.assert_allclose(_outputs(result.model, X), X @ W + 1.5, rtol=1e-6)


def test_ir3_models_get_ir4_when_initializers_leave_the_inputs():
    """IR 3 requires every initializer among the inputs; IR 4 is the first that allows dropping them."""
    model = _linear(weight_as_input=True, ir_version=3)
    result = normalize(model)
    assert result.model.ir_version == 4 and result.ir_version_raised == (3, 4)
    onnx.checker.check_model(result.model)


def test_unnamed_and_repeated_node_names_become_unique_subgraphs_included():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["c"], name="dup")], "else", [],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Identity", ["flag"], ["f"], name="dup"),
             helper.make_node("If", ["f"], ["y"], then_branch=branch, else_branch=other),
             helper.make_node("Identity", ["y"], ["z"], name="Identity_0")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = normalize(model)
    names = [node.name for node in result.model.graph.node]
    names += [n.name for a in result.model.graph.node[1].attribute for n in a.g.node]
    assert all(names) and len(set(names)) == len(names) == 5
    assert result.nodes_named == 3  # the If, its then-branch Identity, the second 'dup'
    assert names[0] == "dup" and names[2] == "Identity_0", "existing unique names are kept"


def test_a_clean_model_is_returned_as_is():
    model = _linear()
    model.graph.node.pop(1)  # no Constant left
    model.graph.node[1].input[1] = "xw"
    result = normalize(model)
    assert result.model is model and not result.changed and result.changes == []


def test_scalar_integer_and_string_constants_and_constants_that_are_graph_outputs_stay_nodes():
    nodes = [helper.make_node("Constant", [], ["shape"], name="shape", value_ints=[2]),
             helper.make_node("Reshape", ["x", "shape"], ["x1"], name="reshape"),
             helper.make_node("Constant", [], ["bound"], name="bound", value_float=6.0),
             helper.make_node("Constant", [], ["one"], name="one",
                              value=numpy_helper.from_array(np.array(1.0, np.float32))),
             helper.make_node("Clip", ["x1", "one", "bound"], ["x2"], name="clip"),
             helper.make_node("Constant", [], ["s"], name="strings",
                              value=helper.make_tensor("s", TensorProto.STRING, [1], [b"a"])),
             helper.make_node("Constant", [], ["out"], name="as_output", value_floats=[1.0, 2.0]),
             helper.make_node("Identity", ["x2"], ["y"], name="id")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("out", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("s", TensorProto.STRING, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = normalize(model)
    assert result.model is model
    assert [n.name for n in model.graph.node] == ["shape", "reshape", "bound", "one", "clip", "strings", "as_output",
                                                  "id"]


def test_load_model_normalizes_and_says_so(tmp_path, caplog):
    path = tmp_path / "m.onnx"
    onnx.save_model(_linear(constant_weight=True, weight_as_input=False, names=False), str(path))
    with caplog.at_level(logging.WARNING, logger="compressq"):
        model = load_model(path)
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    assert all(n.name for n in model.graph.node)
    (record,) = [r for r in caplog.records if r.name == "compressq"]
    assert record.getMessage().startswith(
        "note: m.onnx normalized at load: 2 weights held in Constant nodes stored as initializers")


def test_load_model_says_nothing_about_a_clean_model(tmp_path, caplog, cnn_path):
    with caplog.at_level(logging.WARNING, logger="compressq"):
        load_model(cnn_path)
    assert not [r for r in caplog.records if r.name == "compressq"]


# ---------------------------------------------------------------------------------------------------
# The interface contract


def test_interface_ignores_initializers_listed_as_inputs():
    assert interface(_linear(weight_as_input=True)) == interface(_linear())
    assert [p.name for p in interface(_linear(weight_as_input=True)).inputs] == ["x"]


@pytest.mark.parametrize("a, b, same", [
    (Port("x", 1, ("n", 4)), Port("x", 1, ("batch", 4)), True),     # symbolic names may differ
    (Port("x", 1, ("n", 4)), Port("x", 1, (None, 4)), True),        # symbolic vs unknown
    (Port("x", 1, ("n", 4)), Port("x", 1, (1, 4)), False),          # a symbolic dim pinned
    (Port("x", 1, (2, 4)), Port("x", 1, (2, 5)), False),
    (Port("x", 1, (2, 4)), Port("x", 1, (2, 4, 1)), False),
    (Port("x", 1, (2, 4)), Port("x", 10, (2, 4)), False),           # float -> float16
    (Port("x", 1, (2, 4)), Port("y", 1, (2, 4)), False),
    (Port("x", 1, None), Port("x", 1, (2,)), False),
])
def test_port_matching(a, b, same):
    assert a.matches(b) is same and b.matches(a) is same


def test_check_interface_names_the_difference():
    before = interface(_linear())
    renamed = _linear()
    renamed.graph.output[0].name = "z"
    with pytest.raises(InterfaceChanged, match="output 0: y FLOAT\\[n, 3\\] -> z FLOAT\\[n, 3\\]"):
        check_interface(before, interface(renamed), "a pass")
    extra = _linear()
    extra.graph.input.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [1]))
    with pytest.raises(InterfaceChanged, match="number of model inputs: 1 -> 2"):
        check_interface(before, interface(extra), "a pass")
    reordered = _linear()
    reordered.graph.input.insert(0, helper.make_tensor_value_info("t", TensorProto.FLOAT, [1]))
    with pytest.raises(InterfaceChanged):
        check_interface(interface(extra), interface(reordered), "a pass")


def test_check_contract_runs_the_checker():
    broken = _linear()
    broken.graph.node[0].input[1] = "missing"
    with pytest.raises(InterfaceChanged, match="fails the ONNX checker"):
        check_contract(_linear(), broken, "a pass")
    check_contract(_linear(weight_as_input=True), normalize(_linear(weight_as_input=True)).model, "normalize")
