"""Exporter habits found on real models (issue 14, item 4): tf2onnx maxout (Max of two convolutions in an
NHWC graph), ConvTranspose, and fp16 models. Tiny models built here, checked against onnxruntime fp32 runs
and numpy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import load_dataset
from compressq.graph.index import GraphIndex
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.float16 import holds_float16, narrow, widen
from compressq.quantize.integer_select import select_on_integers
from compressq.quantize.plan import build_plan
from compressq.runtime import create_session, optimized_graph
from tests.conftest import make_model
from tests.helpers import cosine

CHANNELS, SIZE = 16, 12


def conv_weight(rng, out_channels: int, in_channels: int, kernel: int = 3) -> np.ndarray:
    return (rng.standard_normal((out_channels, in_channels, kernel, kernel)) / np.sqrt(in_channels * kernel ** 2)
            ).astype(np.float32)


def maxout_model(*, split: bool = False, nhwc_max: bool = False, shared_input: bool = False,
                 seed: int = 0) -> onnx.ModelProto:
    """tf2onnx's shape of a maxout block: NHWC input -> Transpose -> Conv(s) -> Max -> Conv -> Relu -> Conv
    -> Transpose back. `split`: one Conv with twice the channels split in halves (LightCNN's MFM);
    `nhwc_max`: the Max runs in NHWC between Transposes, as tf2onnx leaves it; `shared_input`: one Max
    input is a graph output too (read elsewhere, so its range may not be clipped)."""
    rng = np.random.default_rng(seed)
    first = 2 * CHANNELS if split else CHANNELS
    inits = [numpy_helper.from_array(conv_weight(rng, first, 3), "w1"),
             numpy_helper.from_array(rng.standard_normal(first).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array(conv_weight(rng, CHANNELS, CHANNELS), "w3"),
             numpy_helper.from_array(np.zeros(CHANNELS, np.float32), "b3"),
             numpy_helper.from_array(conv_weight(rng, CHANNELS, CHANNELS), "w4"),
             numpy_helper.from_array(np.zeros(CHANNELS, np.float32), "b4")]
    nodes = [helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["x_nchw", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    if split:
        inits.append(numpy_helper.from_array(np.array([CHANNELS, CHANNELS], np.int64), "halves"))
        nodes.append(helper.make_node("Split", ["c1", "halves"], ["a", "b"], axis=1, name="split"))
    else:
        inits += [numpy_helper.from_array(conv_weight(rng, CHANNELS, 3), "w2"),
                  numpy_helper.from_array(rng.standard_normal(CHANNELS).astype(np.float32) * 0.1, "b2")]
        nodes.append(helper.make_node("Conv", ["x_nchw", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"))
        nodes += [helper.make_node("Identity", ["c1"], ["a"], name="keep_a"),
                  helper.make_node("Identity", ["c2"], ["b"], name="keep_b")]
    if nhwc_max:
        nodes += [helper.make_node("Transpose", ["a"], ["a_nhwc"], perm=[0, 2, 3, 1], name="a_to_nhwc"),
                  helper.make_node("Transpose", ["b"], ["b_nhwc"], perm=[0, 2, 3, 1], name="b_to_nhwc"),
                  helper.make_node("Max", ["a_nhwc", "b_nhwc"], ["m_nhwc"], name="maxout"),
                  helper.make_node("Transpose", ["m_nhwc"], ["m"], perm=[0, 3, 1, 2], name="m_to_nchw")]
    else:
        nodes.append(helper.make_node("Max", ["a", "b"], ["m"], name="maxout"))
    nodes += [helper.make_node("Conv", ["m", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
              helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
              helper.make_node("Conv", ["r3", "w4", "b4"], ["c4"], pads=[1, 1, 1, 1], name="conv4"),
              helper.make_node("Transpose", ["c4"], ["y"], perm=[0, 2, 3, 1], name="to_nhwc")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SIZE, SIZE, CHANNELS])]
    if shared_input:
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE]))
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])],
                       outputs, inits, opset=13)
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def nhwc_data(tmp_path):
    def make(model: onnx.ModelProto, dtype=np.float32, samples: int = 16):
        path = tmp_path / "calib.npz"
        np.savez(path, x=np.random.default_rng(1).standard_normal((samples, SIZE, SIZE, 3)).astype(dtype))
        return load_dataset(path, model)
    return make


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return create_session(model, "cpu", threads=1).run(None, feed)


STATIC = QuantizeConfig(mode="static", speed_check=False, accuracy_check=False)


# ---------------------------------------------------------------------------------------------------
# Maxout: Max of int8 tensors with one scale runs on the integers


@pytest.mark.parametrize("shape", [{}, {"split": True}, {"nhwc_max": True}, {"split": True, "nhwc_max": True}])
def test_maxout_groups_inputs_and_output_on_the_output_range(shape):
    model = maxout_model(**shape)
    plan = build_plan(model)
    output = "m_nhwc" if shape.get("nhwc_max") else "m"
    assert "maxout" in plan.shared_scale_nodes
    for tensor in ("a", "b", output):
        assert plan.param_source[tensor] == output, tensor
    if shape.get("split"):
        assert "split" in plan.shared_scale_nodes and plan.param_source["c1"] == output


@pytest.mark.parametrize("shape", [{}, {"split": True}, {"nhwc_max": True}])
def test_maxout_runs_on_integers_and_matches_fp32(shape, nhwc_data):
    model = maxout_model(**shape)
    result = quantize_model(model, nhwc_data(model), STATIC)
    quantized = result.model
    maxout = next(n for n in quantized.graph.node if n.op_type == "Max")
    producers = GraphIndex(quantized.graph).producer
    assert {producers[name].op_type for name in maxout.input} <= {"QuantizeLinear", "Split", "Transpose"}
    # what onnxruntime runs: integer convolutions and a Max with no float conversion around it
    ran = optimized_graph(quantized, "cpu").graph
    ops = [node.op_type for node in ran.node]
    assert ops.count("QLinearConv") == (3 if shape.get("split") else 4), ops
    ran_index = GraphIndex(ran)
    ran_max = next(n for n in ran.node if n.op_type == "Max")
    assert all(ran_index.producer.get(i) is None or ran_index.producer[i].op_type != "DequantizeLinear"
               for i in ran_max.input), ops
    x = np.random.default_rng(7).standard_normal((4, SIZE, SIZE, 3)).astype(np.float32)
    assert cosine(run(model, {"x": x})[0], run(quantized, {"x": x})[0]) > 0.999


def test_integer_max_is_exactly_the_float_max_of_the_dequantized_inputs():
    """Q(max(DQ(a), DQ(b))) == max(a, b) with one scale and zero point: the rewrite changes no value."""
    scale, zero = 0.037, 131
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.UINT8, [64]) for n in ("qa", "qb")]
    parameters = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
                  numpy_helper.from_array(np.array(zero, np.uint8), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["qa", "s", "z"], ["a"]),
             helper.make_node("DequantizeLinear", ["qb", "s", "z"], ["b"]),
             helper.make_node("Max", ["a", "b"], ["m"], name="max"),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["qm"]),
             helper.make_node("DequantizeLinear", ["qm", "s", "z"], ["y"])]
    model = make_model(nodes, graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
                       parameters)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert select_on_integers(rewritten.graph, 13) == 1
    assert [n.op_type for n in rewritten.graph.node] == ["Max", "DequantizeLinear"]
    rng = np.random.default_rng(0)
    feed = {"qa": rng.integers(0, 256, 64, dtype=np.uint8), "qb": rng.integers(0, 256, 64, dtype=np.uint8)}
    expected = (np.maximum(feed["qa"], feed["qb"]).astype(np.float32) - zero) * np.float32(scale)
    np.testing.assert_array_equal(run(rewritten, feed)[0], expected)
    np.testing.assert_array_equal(run(model, feed)[0], expected)
    assert select_on_integers(model.graph, 11) == 0  # Max takes no uint8 before opset 12


def test_max_whose_input_is_read_elsewhere_keeps_its_own_scales(nhwc_data):
    model = maxout_model(shared_input=True)
    plan = build_plan(model)
    assert plan.param_source.get("a", "a") != plan.param_source.get("m")  # 'a' may not be clipped to m's range
    result = quantize_model(model, nhwc_data(model), STATIC)
    x = np.random.default_rng(7).standard_normal((4, SIZE, SIZE, 3)).astype(np.float32)
    reference, quantized = run(model, {"x": x}), run(result.model, {"x": x})
    assert cosine(reference[0], quantized[0]) > 0.999 and cosine(reference[1], quantized[1]) > 0.999


@pytest.mark.parametrize("pattern", ["unstructured", "channel"])
def test_prune_handles_maxout(run_cli, tmp_path, pattern):
    model = maxout_model()
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(1).standard_normal((16, SIZE, SIZE, 3)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    result = run_cli("prune", tmp_path / "m.onnx", "--pattern", pattern, "-s", "0.5", "--prune-first",
                     "--min-params", "1", "--calibration-data", tmp_path / "calib.npz", "-o", tmp_path / "p.onnx")
    assert result.exit_code == 0, result.stderr
    pruned = onnx.load(str(tmp_path / "p.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    if pattern == "channel":  # the two Max inputs lose the same channels, or the Max could not pair them
        assert weights["w1"].shape[0] == weights["w2"].shape[0] < CHANNELS
    floor = {"unstructured": 0.95, "channel": 0.8}[pattern]  # half the channels of a random net: a rough copy
    assert cosine(run(model, {"x": x[:4]})[0], run(pruned, {"x": x[:4]})[0]) > floor


# ---------------------------------------------------------------------------------------------------
# ConvTranspose: no integer kernel in onnxruntime, so listed as kept float with that reason


def decoder_model() -> onnx.ModelProto:
    """A ViT decoder's tail: Conv -> Relu -> ConvTranspose (2x upsampling) -> Conv."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(conv_weight(rng, CHANNELS, 3), "w1"),
             numpy_helper.from_array((rng.standard_normal((CHANNELS, CHANNELS, 2, 2)) / 8).astype(np.float32), "wt"),
             numpy_helper.from_array(np.zeros(CHANNELS, np.float32), "bt"),
             numpy_helper.from_array(conv_weight(rng, 4, CHANNELS), "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("ConvTranspose", ["r1", "wt", "bt"], ["up"], strides=[2, 2], name="upsample"),
             helper.make_node("Conv", ["up", "w3"], ["y"], pads=[1, 1, 1, 1], name="conv3")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 2 * SIZE, 2 * SIZE])], inits)


def test_onnxruntime_still_has_no_integer_conv_transpose():
    """The reason compressq gives: a QDQ ConvTranspose stays a float ConvTranspose between conversions.
    When onnxruntime fuses it some day, this fails and ConvTranspose should join the quantized ops."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((8, 8, 2, 2)) / 8).astype(np.float32)
    scale = float(np.abs(weight).max() / 127)
    parameters = [numpy_helper.from_array(np.round(weight / scale).astype(np.int8), "wq"),
                  numpy_helper.from_array(np.array(scale, np.float32), "ws"),
                  numpy_helper.from_array(np.array(0, np.int8), "wz"),
                  numpy_helper.from_array(np.array(0.03, np.float32), "s"),
                  numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
             helper.make_node("ConvTranspose", ["xd", "wd"], ["yf"], strides=[2, 2]),
             helper.make_node("QuantizeLinear", ["yf", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])], parameters)
    ops = [node.op_type for node in optimized_graph(model, "cpu").graph.node]
    assert "ConvTranspose" in ops and not any("ConvTranspose" in op and op != "ConvTranspose" for op in ops), ops


def test_conv_transpose_is_listed_as_kept_float_with_the_reason(tmp_path):
    model = decoder_model()
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32))
    result = quantize_model(model, load_dataset(tmp_path / "calib.npz", model), STATIC)
    kept = {entry["node"]: entry["reason"] for entry in result.summary.float_nodes}
    assert "upsample" in kept and "no integer ConvTranspose kernel" in kept["upsample"]
    assert {"conv1", "conv3"} <= set(result.summary.quantized_nodes)
    assert any(n.op_type == "ConvTranspose" for n in result.model.graph.node)
    x = np.random.default_rng(2).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    assert cosine(run(model, {"x": x})[0], run(result.model, {"x": x})[0]) > 0.999
    dynamic = quantize_model(model, None, QuantizeConfig(mode="dynamic", speed_check=False))
    assert "upsample" in {entry["node"] for entry in dynamic.summary.float_nodes}


# ---------------------------------------------------------------------------------------------------
# fp16 models: quantized with float32 inside, fp16 interface kept; prune and report work on them


def as_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 export of a float32 model: weights, interface and value types in fp16."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for position, tensor in enumerate(half.graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            values = numpy_helper.to_array(tensor).astype(np.float16)
            half.graph.initializer[position].CopyFrom(numpy_helper.from_array(values, tensor.name))
    for value in [*half.graph.input, *half.graph.output, *half.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(half)
    return half


def test_widen_keeps_the_interface_and_computes_in_float32():
    half = as_float16(maxout_model())
    assert holds_float16(half) and not holds_float16(maxout_model())
    wide, was_float16 = widen(half)
    onnx.checker.check_model(wide)
    assert [(v.name, v.type.tensor_type.elem_type) for v in wide.graph.input] == \
        [(v.name, v.type.tensor_type.elem_type) for v in half.graph.input]
    assert all(t.data_type == TensorProto.FLOAT for t in wide.graph.initializer)
    assert was_float16 == {t.name for t in half.graph.initializer if t.data_type == TensorProto.FLOAT16}
    x = np.random.default_rng(3).standard_normal((2, SIZE, SIZE, 3)).astype(np.float16)
    wide_out, half_out = run(wide, {"x": x})[0], run(half, {"x": x})[0]
    assert wide_out.dtype == np.float16
    np.testing.assert_allclose(wide_out.astype(np.float32), half_out.astype(np.float32), atol=0.02, rtol=0.02)
    narrowed = narrow(wide, was_float16)  # nothing quantized: every weight back to fp16, read through a Cast
    assert all(t.data_type == TensorProto.FLOAT16 for t in narrowed.graph.initializer)
    np.testing.assert_array_equal(run(narrowed, {"x": x})[0], wide_out)


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_fp16_model_quantizes_and_keeps_fp16_inputs_and_outputs(mode, nhwc_data):
    half = as_float16(maxout_model())
    if mode != "static":  # dynamic and weight-only quantize MatMul: give the model a classifier head
        half = as_float16(classifier_model())
    dataset = nhwc_data(half, np.float16) if mode == "static" else None
    config = QuantizeConfig(mode=mode, speed_check=False, accuracy_check=False)
    result = quantize_model(half, dataset, config)
    assert result.summary.quantized_nodes, result.summary.float_nodes
    quantized = result.model
    interface = [(v.name, v.type.tensor_type.elem_type) for v in [*quantized.graph.input, *quantized.graph.output]]
    assert interface == [(v.name, v.type.tensor_type.elem_type) for v in [*half.graph.input, *half.graph.output]]
    assert quantized.ByteSize() < half.ByteSize()
    assert not any(t.data_type == TensorProto.FLOAT and t.name in {"w1", "w2", "w3", "w4"}
                   for t in quantized.graph.initializer)  # float weights left stay fp16 on disk
    x = np.random.default_rng(7).standard_normal((4, SIZE, SIZE, 3)).astype(np.float16)
    expected, got = run(half, {"x": x})[0], run(quantized, {"x": x})[0]
    assert got.dtype == np.float16 and cosine(expected, got) > 0.995


def classifier_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(conv_weight(rng, 8, 3), "w1"),
             numpy_helper.from_array((rng.standard_normal((8 * SIZE * SIZE, 64)) / 30).astype(np.float32), "fc1"),
             numpy_helper.from_array((rng.standard_normal((64, 10)) / 8).astype(np.float32), "fc2")]
    nodes = [helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["x_nchw", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Flatten", ["r1"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu2"),
             helper.make_node("MatMul", ["hr", "fc2"], ["y"], name="fc2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)


def test_fp16_model_with_nothing_gained_is_returned_as_it_came(nhwc_data):
    half = as_float16(maxout_model())
    result = quantize_model(half, None, QuantizeConfig(mode="dynamic", speed_check=False))  # convolutions only
    assert result.model is half and not result.summary.quantized_nodes


def test_fp16_model_through_the_commands(run_cli, tmp_path):
    half = as_float16(maxout_model())
    onnx.save_model(half, str(tmp_path / "half.onnx"))
    np.savez(tmp_path / "calib.npz",
             x=np.random.default_rng(1).standard_normal((16, SIZE, SIZE, 3)).astype(np.float16))
    model, data = tmp_path / "half.onnx", tmp_path / "calib.npz"
    quantized = run_cli("quantize", model, "-d", data, "--no-speed-check", "-o", tmp_path / "q.onnx")
    assert quantized.exit_code == 0, quantized.stderr
    assert onnx.load(str(tmp_path / "q.onnx")).graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    pruned = run_cli("prune", model, "-s", "0.5", "--min-params", "1", "--calibration-data", data,
                     "-o", tmp_path / "p.onnx")
    assert pruned.exit_code == 0, pruned.stderr
    weights = onnx.load(str(tmp_path / "p.onnx")).graph.initializer
    assert {t.data_type for t in weights} == {TensorProto.FLOAT16}
    report = run_cli("report", model, tmp_path / "q.onnx", tmp_path / "p.onnx", "--data", data, "--runs", "2",
                     "--warmup", "0", "--format", "json")
    assert report.exit_code == 0, report.stderr
    assert run_cli("inspect", model).exit_code == 0
    ranked = run_cli("sensitivity", model, "-d", data, "--json")
    assert ranked.exit_code == 0, ranked.stderr
    assert {"conv1", "conv2", "conv3", "conv4"} <= {row["node"] for row in json.loads(ranked.stdout)["nodes"]}
