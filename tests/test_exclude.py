"""--exclude patterns that match nothing are errors naming the closest nodes; already-int8 nodes say so."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.quantize.plan import build_plan
from tests.conftest import SAMPLES, make_model

CNN = SAMPLES / "digits_cnn.onnx"
CALIB = SAMPLES / "digits_calib.npz"


@pytest.mark.parametrize("command", [
    ("prune", CNN, "-s", "0.5"),
    ("quantize", CNN, "--no-speed-check"),  # dynamic (no data)
    ("quantize", CNN, "-d", CALIB, "--no-speed-check"),  # static
    ("quantize", CNN, "--mode", "weight-only", "--no-speed-check"),
])
def test_a_pattern_matching_nothing_is_exit_2_with_the_closest_names(run_cli, tmp_path, command):
    output = tmp_path / "out.onnx"
    result = run_cli(*command, "--exclude", "/classifer/classifier.1/*", "-o", output)
    assert result.exit_code == 2, result.stdout
    assert "--exclude '/classifer/classifier.1/*' matches no node" in result.stderr
    assert "closest: " in result.stderr and "/classifier/classifier.1/Gemm" in result.stderr
    assert not output.exists() and "Traceback" not in result.stderr


def test_op_type_typo_suggests_the_op_type(run_cli, tmp_path):
    result = run_cli("prune", CNN, "-s", "0.5", "--exclude", "Gem", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2 and "closest: Gemm" in result.stderr


def test_patterns_that_match_still_work(run_cli, tmp_path):
    result = run_cli("prune", CNN, "-s", "0.5", "--exclude", "/classifier/*", "-o", tmp_path / "p.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    dense = {d["node"]: d["reason"] for d in json.loads(result.stdout)["dense_layers"]}
    assert "excluded by --exclude '/classifier/*'" in dense["/classifier/classifier.1/Gemm"]
    result = run_cli("quantize", CNN, "-d", CALIB, "--no-speed-check", "--exclude", "Gemm",
                     "-o", tmp_path / "q.onnx", "--json")
    assert result.exit_code == 0, result.stderr


def qdq_conv_then_float_gemm() -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(int8 weight)) -> Flatten -> Gemm: the Conv is int8 already, the Gemm is float."""
    rng = np.random.default_rng(0)
    weight_int8 = rng.integers(-100, 100, (4, 1, 3, 3)).astype(np.int8)
    gemm_weight = rng.standard_normal((4 * 6 * 6, 3)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        numpy_helper.from_array(weight_int8, "w_q"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zero"),
        numpy_helper.from_array(gemm_weight, "g_w"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="w_dq", axis=0),
        helper.make_node("Conv", ["x_dq", "w"], ["c"], name="qat_conv"),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g_w"], ["y"], name="float_gemm"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], initializers)


def test_nodes_quantized_already_are_reported_as_already_int8_not_kept_in_float(run_cli, tmp_path):
    model = qdq_conv_then_float_gemm()
    plan = build_plan(model)
    reasons = {s.node: s.reason for s in plan.skipped}
    assert reasons["qat_conv"].startswith("already int8")
    path = tmp_path / "qat.onnx"
    onnx.save_model(model, str(path))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).random((16, 1, 8, 8)).astype(np.float32))
    result = run_cli("quantize", path, "-d", tmp_path / "calib.npz", "--no-speed-check", "-o", tmp_path / "q.onnx")
    assert result.exit_code == 0, result.stderr
    assert "1 already int8" in result.stdout and "already int8, kept as is: qat_conv" in result.stdout
    kept_float = result.stdout.split("Kept in float", 1)[1] if "Kept in float" in result.stdout else ""
    assert "qat_conv" not in kept_float.split("already int8, kept as is")[0]


def test_integer_kernels_in_the_input_are_listed_as_already_int8():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mmi")]
    model = make_model(nodes, [helper.make_tensor_value_info("a", TensorProto.UINT8, ["n", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.INT32, ["n", 2])],
                       [numpy_helper.from_array(rng.integers(-5, 5, (4, 2)).astype(np.int8), "b")])
    (skipped,) = build_plan(model).skipped
    assert skipped.node == "mmi" and skipped.reason == "already int8 (MatMulInteger kept as is)"


@pytest.mark.parametrize("command", [
    ("prune", CNN, "-s", "0.5", "--prune-last"),
    ("quantize", CNN, "--no-speed-check"),  # dynamic
    ("quantize", CNN, "-d", CALIB, "--no-speed-check"),  # static
])
def test_a_weight_name_excludes_its_layer_in_every_command(run_cli, tmp_path, command):
    """One meaning of --exclude everywhere: node name, op type or weight name (graph/index.py)."""
    result = run_cli(*command, "--exclude", "classifier.4.weight", "-o", tmp_path / "out.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    if command[0] == "prune":
        dense = {layer["node"]: layer["reason"] for layer in report["dense_layers"]}
        assert "excluded by --exclude 'classifier.4.weight'" in dense.values()
    else:
        assert "/classifier/classifier.4/Gemm" not in report["quantized_nodes"]
        assert any(n["node"] == "/classifier/classifier.4/Gemm" for n in report["float_nodes"])
