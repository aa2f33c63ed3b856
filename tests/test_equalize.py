"""compressq.quantize.equalize: BatchNorm folding and cross-layer equalization keep fp32 outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import load_dataset
from compressq.graph.index import GraphIndex, node_attributes
from compressq.io import load_model
from compressq.quantize.equalize import equalize, fold_batchnorm
from compressq.runtime import create_session
from tests.conftest import SAMPLES, make_model

TOLERANCE = 1e-4


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return create_session(model).run(None, feed)[0]


def relative_max_error(reference: np.ndarray, output: np.ndarray) -> float:
    return float(np.abs(output - reference).max() / np.abs(reference).max())


def conv_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    index = GraphIndex(model.graph)
    return {node.name: index.constant(node.input[1]) for node in model.graph.node if node.op_type == "Conv"}


def channel_range_spread(weight: np.ndarray) -> float:
    ranges = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    return float(ranges.max() / ranges.min())


def with_per_tensor_int8_conv_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Conv weight quantized and dequantized with one symmetric int8 scale (numpy simulation)."""
    simulated = onnx.ModelProto()
    simulated.CopyFrom(model)
    index = GraphIndex(simulated.graph)
    for node in simulated.graph.node:
        if node.op_type == "Conv":
            tensor = index.initializers[node.input[1]]
            weight = numpy_helper.to_array(tensor)
            scale = np.abs(weight).max() / 127
            fake_quantized = (np.clip(np.rint(weight / scale), -127, 127) * scale).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(fake_quantized, tensor.name))
    return simulated


# ---------------------------------------------------------------------------------------------------
# The MobileNet-style sample


@pytest.fixture(scope="module")
def mobilenet() -> onnx.ModelProto:
    return load_model(SAMPLES / "digits_mobilenet.onnx")


@pytest.fixture(scope="module")
def feed(mobilenet: onnx.ModelProto) -> dict[str, np.ndarray]:
    return next(load_dataset(SAMPLES / "digits_calib.npz", mobilenet).batches(256))


@pytest.fixture(scope="module")
def folded(mobilenet: onnx.ModelProto) -> onnx.ModelProto:
    return fold_batchnorm(mobilenet)


def test_fold_batchnorm_removes_every_batchnorm_and_keeps_outputs(mobilenet, folded, feed) -> None:
    before = mobilenet.SerializeToString()
    onnx.checker.check_model(folded)
    assert sum(n.op_type == "BatchNormalization" for n in mobilenet.graph.node) == 9
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert all(len(n.input) == 3 for n in folded.graph.node if n.op_type == "Conv")  # each got a bias
    assert relative_max_error(run(mobilenet, feed), run(folded, feed)) <= TOLERANCE
    assert mobilenet.SerializeToString() == before


def test_equalize_balances_depthwise_ranges_and_keeps_fp32_outputs(mobilenet, folded, feed) -> None:
    equalized, summary = equalize(folded)
    onnx.checker.check_model(equalized)
    assert len(summary.pairs) == 5  # stem->dw0, and each block's depthwise->pointwise
    assert relative_max_error(run(mobilenet, feed), run(equalized, feed)) <= TOLERANCE

    before, after = conv_weights(folded), conv_weights(equalized)
    depthwise = [n.name for n in folded.graph.node
                 if n.op_type == "Conv" and node_attributes(n).get("group", 1) == before[n.name].shape[0]]
    assert len(depthwise) == 4
    for name in depthwise:
        assert not np.allclose(before[name], after[name])
        assert channel_range_spread(after[name]) < channel_range_spread(before[name])


def test_equalize_lowers_per_tensor_int8_weight_error(mobilenet, folded, feed) -> None:
    reference = run(mobilenet, feed)
    equalized, _ = equalize(folded)

    def int8_weight_error(model: onnx.ModelProto) -> float:
        output = run(with_per_tensor_int8_conv_weights(model), feed)
        return float(np.linalg.norm(output - reference) / np.linalg.norm(reference))

    assert int8_weight_error(equalized) < 0.8 * int8_weight_error(folded)


def test_relu6_becomes_relu_plus_a_per_channel_bound(folded) -> None:
    equalized, summary = equalize(folded)
    assert len(summary.clips_made_per_channel) == 5
    assert {p.activation for p in summary.pairs} == {"Clip"}
    bounds = [GraphIndex(equalized.graph).constant(n.input[1]) for n in equalized.graph.node if n.op_type == "Min"]
    assert len(bounds) == 5 and all(b.ndim == 3 and np.ptp(b) > 0 for b in bounds)

    unchanged, skipping_summary = equalize(folded, rewrite_bounded_clips=False)
    assert not skipping_summary.pairs
    clip_reasons = {name for name, reason in skipping_summary.skipped.items() if "max bound" in reason}
    assert clip_reasons == {p.first for p in summary.pairs}
    assert conv_weights(unchanged).keys() == conv_weights(folded).keys()
    for name, weight in conv_weights(unchanged).items():
        np.testing.assert_array_equal(weight, conv_weights(folded)[name])


# ---------------------------------------------------------------------------------------------------
# Tiny graphs: each activation, grouped convolutions, dense chains


def conv_chain(activation: list[onnx.NodeProto], second_groups: int, second_out: int, seed: int = 0,
               bias_scale: float = 1.0) -> onnx.ModelProto:
    """x -> Conv(3->8, bias) -> activation(s) -> Conv(8->second_out, group=second_groups) -> y."""
    rng = np.random.default_rng(seed)
    # Very different channel ranges in the first layer, so that equalization has work to do.
    first = rng.standard_normal((8, 3, 3, 3)) * rng.uniform(0.05, 5.0, (8, 1, 1, 1))
    second = rng.standard_normal((second_out, 8 // second_groups, 3, 3))
    bias = rng.standard_normal(8) * bias_scale
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             *activation,
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1], group=second_groups)]
    initializers = [numpy_helper.from_array(array.astype(np.float32), name)
                    for name, array in (("w1", first), ("b1", bias), ("w2", second))]
    initializers += [numpy_helper.from_array(np.array(value, np.float32), name)
                     for name, value in (("zero", 0.0), ("six", 6.0), ("minus_one", -1.0))]
    initializers.append(numpy_helper.from_array(rng.uniform(0.1, 0.3, (8, 1, 1)).astype(np.float32), "slope"))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", second_out, 6, 6])],
                      initializers)


ACTIVATIONS = {
    "relu": [helper.make_node("Relu", ["h"], ["a"], name="act")],
    "leaky_relu": [helper.make_node("LeakyRelu", ["h"], ["a"], name="act", alpha=0.1)],
    "prelu": [helper.make_node("PRelu", ["h", "slope"], ["a"], name="act")],
    "relu6": [helper.make_node("Clip", ["h", "zero", "six"], ["a"], name="act")],
    "none": [helper.make_node("Identity", ["h"], ["a"], name="act")],
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(("groups", "second_out"), [(1, 4), (2, 4), (8, 8), (8, 16)])  # dense, grouped, depthwise x1/x2
def test_equalize_is_exact_for_each_activation_and_grouping(activation: str, groups: int, second_out: int) -> None:
    # A large bias pushes many activations beyond 6, so an unscaled ReLU6 bound would show.
    model = conv_chain(ACTIVATIONS[activation], groups, second_out, bias_scale=8.0)
    if activation == "none":  # Identity is not an activation we look through: drop it
        model.graph.node[2].input[0] = "h"
        del model.graph.node[1]
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    equalized, summary = equalize(model)
    onnx.checker.check_model(equalized)
    assert [(p.first, p.second) for p in summary.pairs] == [("conv1", "conv2")]
    assert relative_max_error(run(model, x), run(equalized, x)) <= TOLERANCE
    weights = conv_weights(equalized)
    assert channel_range_spread(weights["conv1"]) < channel_range_spread(conv_weights(model)["conv1"]) / 2


@pytest.mark.parametrize(("clip_inputs", "reason"), [(["h", "minus_one", "six"], "does not commute")])
def test_clip_with_a_negative_floor_is_left_alone(clip_inputs: list[str], reason: str) -> None:
    model = conv_chain([helper.make_node("Clip", clip_inputs, ["a"], name="act")], 1, 4)
    equalized, summary = equalize(model)
    assert not summary.pairs and reason in summary.skipped["conv1"]
    np.testing.assert_array_equal(conv_weights(equalized)["conv1"], conv_weights(model)["conv1"])


def test_conv_whose_bias_is_computed_at_run_time_is_left_alone() -> None:
    # The bias would have to be divided by the scale too; a graph input cannot be (this crashed with an
    # AttributeError before, found by mypy).
    model = conv_chain(ACTIVATIONS["relu"], 1, 4)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "b1"))
    model.graph.input.append(helper.make_tensor_value_info("b1", TensorProto.FLOAT, [8]))
    equalized, summary = equalize(model)
    assert not summary.pairs and "computed at run time" in summary.skipped["conv1"]
    np.testing.assert_array_equal(conv_weights(equalized)["conv1"], conv_weights(model)["conv1"])


def test_sigmoid_between_layers_is_not_equalized() -> None:
    model = conv_chain([helper.make_node("Sigmoid", ["h"], ["a"], name="act")], 1, 4)
    _, summary = equalize(model)
    assert not summary.pairs


def test_dense_chain_with_bias_add_balances_ranges_exactly() -> None:
    rng = np.random.default_rng(2)
    w1 = (rng.standard_normal((16, 32)) * rng.uniform(0.05, 5.0, 32)).astype(np.float32)
    w2 = rng.standard_normal((10, 32)).astype(np.float32)  # Gemm transB: [out, in]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1)]
    initializers = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                    numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
                    numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], initializers)
    x = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    equalized, summary = equalize(model)
    assert [p.activation for p in summary.pairs] == ["Relu"]
    assert relative_max_error(run(model, x), run(equalized, x)) <= TOLERANCE
    index = GraphIndex(equalized.graph)
    first = index.constant(next(n for n in equalized.graph.node if n.op_type == "MatMul").input[1])
    second = index.constant(next(n for n in equalized.graph.node if n.op_type == "Gemm").input[1])
    np.testing.assert_allclose(np.abs(first).max(axis=0), np.abs(second).max(axis=0), rtol=1e-5)


def test_fold_batchnorm_into_gemm() -> None:
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((6, 5)), "c": rng.standard_normal(6), "gamma": rng.uniform(0.5, 2, 6),
              "beta": rng.standard_normal(6), "mean": rng.standard_normal(6), "var": rng.uniform(0.5, 2, 6)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="fc", transB=1, beta=0.5),
             helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
                       [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()])
    folded = fold_batchnorm(model)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    x = {"x": rng.standard_normal((4, 5)).astype(np.float32)}
    assert relative_max_error(run(model, x), run(folded, x)) <= TOLERANCE
