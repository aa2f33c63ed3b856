"""Every command on graph shapes real exporters write (issue 14): weights held in Constant nodes
(paddle2onnx), initializers also listed as graph inputs (torch.onnx.export(keep_initializers_as_inputs=True)),
unnamed nodes, and all three at once.

Each command must exit 0 and do its work; what it writes must reload, pass onnx.checker, run in
onnxruntime fed with the model's real inputs only (never the weights), and keep the interface: the same
inputs and outputs, names, types, order and shapes. Reference: the float model run by onnxruntime with
its weights in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.graph.normalize import interface
from compressq.io import load_model
from tests.helpers import cosine

SHAPES = ("constant_weights", "initializers_as_inputs", "unnamed_nodes", "all_three")
SAMPLES = 24


def exported_cnn(shape: str, seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-pool-MatMul-Add-Relu-Gemm on x[batch, 3, 12, 12], written the way `shape` says."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv1.weight": rng.standard_normal((16, 3, 3, 3)) * 0.3, "conv1.bias": rng.standard_normal(16) * 0.1,
        "conv2.weight": rng.standard_normal((32, 16, 3, 3)) * 0.1, "conv2.bias": rng.standard_normal(32) * 0.1,
        "fc1.weight": rng.standard_normal((32, 64)) * 0.2, "fc1.bias": rng.standard_normal(64) * 0.1,
        "fc2.weight": rng.standard_normal((64, 10)) * 0.2, "fc2.bias": rng.standard_normal(10) * 0.1,
    }
    weights = {name: value.astype(np.float32) for name, value in weights.items()}
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc1.weight"], ["h"]),
        helper.make_node("Add", ["h", "fc1.bias"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("Gemm", ["hr", "fc2.weight", "fc2.bias"], ["logits"]),
    ]
    unnamed = shape in ("unnamed_nodes", "all_three")
    if not unnamed:
        for number, node in enumerate(nodes):
            node.name = f"/{node.op_type}_{number}"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12])]
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    if shape in ("constant_weights", "all_three"):
        # paddle2onnx: every weight is the output of a Constant node; the last two stay initializers here
        held = list(weights)[:6]
        constants = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(weights[name], name),
                                      name="" if unnamed else f"const_{name}") for name in held]
        nodes = constants + nodes
        initializers = [t for t in initializers if t.name not in held]
    if shape in ("initializers_as_inputs", "all_three"):
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in initializers]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    graph = helper.make_graph(nodes, "exported", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(params=SHAPES)
def exported(request, tmp_path: Path):
    """(shape, model path, calibration .npz path, float reference outputs on that data)."""
    model = exported_cnn(request.param)
    path = tmp_path / f"{request.param}.onnx"
    onnx.save_model(model, str(path))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((SAMPLES, 3, 12, 12)).astype(np.float32)
    data = tmp_path / "calib.npz"
    np.savez(data, x=x, labels=rng.integers(0, 10, SAMPLES))
    reference = _run(path, x, feed_weights=True)
    return request.param, path, data, x, reference


def _run(path: Path, x: np.ndarray, feed_weights: bool = False) -> np.ndarray:
    """Run a model file in onnxruntime fed with `x` only (weights that are inputs get their stored values
    only when `feed_weights`: the original file; an output of ours must never need them)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"x": x}
    if feed_weights:
        stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        feed |= {i.name: stored[i.name] for i in session.get_inputs() if i.name in stored}
    return session.run(None, feed)[0]


def _check_written(original: Path, written: Path) -> onnx.ModelProto:
    """Reloads, passes the checker, has only `x` as input and keeps the original interface; or is the input
    file itself, byte for byte (what a quantize that found nothing worth changing writes)."""
    model = onnx.load(str(written))
    onnx.checker.check_model(model)
    if written.read_bytes() != original.read_bytes():
        assert [i.name for i in model.graph.input] == ["x"]
    assert interface(model) == interface(onnx.load(str(original)))
    return model


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def test_the_shapes_are_what_exporters_write():
    """The fixtures really have the habits under test (else every test below would prove nothing)."""
    constants = exported_cnn("constant_weights")
    assert sum(n.op_type == "Constant" for n in constants.graph.node) == 6
    as_inputs = exported_cnn("initializers_as_inputs")
    assert {i.name for i in as_inputs.graph.input} >= {t.name for t in as_inputs.graph.initializer}
    assert not any(n.name for n in exported_cnn("unnamed_nodes").graph.node)


def test_load_normalizes_and_keeps_the_interface(exported):
    shape, path, _, x, reference = exported
    model = load_model(path)
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    assert [i.name for i in model.graph.input] == ["x"]
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert interface(model) == interface(onnx.load(str(path)))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], reference, rtol=1e-5, atol=1e-6)


def test_inspect_counts_every_weight(run_cli, exported):
    _, path, *_ = exported
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    expected = sum(int(np.prod(w.shape)) for w in
                   (numpy_helper.to_array(t) for t in load_model(path).graph.initializer))
    assert summary["parameters"] == expected == 16 * 27 + 16 + 32 * 144 + 32 + 32 * 64 + 64 + 64 * 10 + 10
    assert [i["name"] for i in summary["inputs"]] == ["x"]


def test_quantize_static(run_cli, exported, tmp_path):
    _, path, data, x, reference = exported
    out = tmp_path / "static.onnx"
    result = run_cli("quantize", path, "-d", data, "-o", out, "--no-speed-check", "--json")
    assert result.exit_code == 0, result.stderr
    model = _check_written(path, out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(model)
    assert cosine(_run(out, x), reference) > 0.99


@pytest.mark.parametrize("speed_check", ["--speed-check", "--no-speed-check"])
def test_quantize_dynamic(run_cli, exported, tmp_path, speed_check):
    _, path, _, x, reference = exported
    out = tmp_path / "dynamic.onnx"
    result = run_cli("quantize", path, "--mode", "dynamic", "-o", out, speed_check, "--json")
    assert result.exit_code == 0, result.stderr
    model = _check_written(path, out)
    if speed_check == "--no-speed-check":
        assert "DynamicQuantizeMatMul" in _op_types(model) or "MatMulInteger" in _op_types(model)
    assert cosine(_run(out, x), reference) > 0.99


def test_quantize_weight_only(run_cli, exported, tmp_path):
    _, path, _, x, reference = exported
    out = tmp_path / "w4.onnx"
    result = run_cli("quantize", path, "--mode", "weight-only", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    model = _check_written(path, out)
    assert "MatMulNBits" in _op_types(model)
    assert cosine(_run(out, x), reference) > 0.98


@pytest.mark.parametrize("with_data", [False, True])
def test_prune(run_cli, exported, tmp_path, with_data):
    _, path, data, x, reference = exported
    out = tmp_path / "pruned.onnx"
    extra = ["--calibration-data", str(data)] if with_data else []
    result = run_cli("prune", path, "-s", "0.5", "-o", out, "--prune-first", "--prune-last", "--min-params", "1",
                     "--json", *extra)
    assert result.exit_code == 0, result.stderr
    model = _check_written(path, out)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"):  # Constant-held ones included
        assert np.mean(weights[name] == 0) == pytest.approx(0.5, abs=0.02), name
    layers = json.loads(result.stdout)["layers"]
    assert sorted(layer["weight"] for layer in layers) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    pruned_output = _run(out, x)
    assert np.all(np.isfinite(pruned_output)) and cosine(pruned_output, reference) > 0.5


def test_report_and_sensitivity(run_cli, exported, tmp_path):
    _, path, data, *_ = exported
    out = tmp_path / "static.onnx"
    assert run_cli("quantize", path, "-d", data, "-o", out, "--no-speed-check").exit_code == 0
    result = run_cli("report", path, out, "--data", data, "--runs", "2", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["baseline"]["facts"]["weighted_nodes"] == 4
    (scored,) = report["candidates"][0]["outputs"]
    assert scored["output"] == "logits" and scored["cosine"] > 0.99 and scored["samples"] == SAMPLES
    synthetic = run_cli("report", path, out, "--runs", "2", "--warmup", "0", "--json")
    assert synthetic.exit_code == 0, synthetic.stderr
    assert json.loads(synthetic.stdout)["data"]["synthetic"] is True
    ranking = run_cli("sensitivity", path, "-d", data, "--json")
    assert ranking.exit_code == 0, ranking.stderr
    nodes = json.loads(ranking.stdout)["nodes"]
    assert {row["op_type"] for row in nodes} >= {"Conv", "Gemm"}
    assert all(row["node"] for row in nodes)


# ---------------------------------------------------------------------------------------------------
# Inputs without a leading batch axis: a scalar sample rate and a state [2, batch, 32] (batch on axis 1),
# fed with --data-layout stack


def stateful_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """y = (relu((x * sr / 16000) @ W1 + b1) + mean(state, 0)) @ W2; state_out = tanh(state + that sum)."""
    rng = np.random.default_rng(seed)
    weights = {"W1": rng.standard_normal((64, 32)) * 0.2, "b1": rng.standard_normal(32) * 0.1,
               "W2": rng.standard_normal((32, 8)) * 0.3, "sr_scale": np.array(1 / 16000)}
    weights = {name: np.asarray(value, np.float32) for name, value in weights.items()}
    nodes = [
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="cast_sr"),
        helper.make_node("Mul", ["srf", "sr_scale"], ["ratio"], name="ratio"),
        helper.make_node("Mul", ["x", "ratio"], ["xs"], name="scale_x"),
        helper.make_node("MatMul", ["xs", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
        helper.make_node("ReduceMean", ["state"], ["s"], axes=[0], keepdims=0, name="state_mean"),
        helper.make_node("Add", ["h", "s"], ["hs"], name="mix"),
        helper.make_node("MatMul", ["hs", "W2"], ["y"], name="fc2"),
        helper.make_node("Unsqueeze", ["hs", "axes0"], ["hs1"], name="unsqueeze"),
        helper.make_node("Add", ["state", "hs1"], ["st"], name="state_add"),
        helper.make_node("Tanh", ["st"], ["state_out"], name="state_tanh"),
    ]
    initializers = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, []),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 32])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8]),
               helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "batch", 32])]
    graph = helper.make_graph(nodes, "vad_like", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, weights


def stateful_reference(weights: dict[str, np.ndarray], x, sr, state) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.maximum((x * (np.float32(sr) * weights["sr_scale"])) @ weights["W1"] + weights["b1"], 0)
    mixed = hidden + state.mean(axis=0)
    return mixed @ weights["W2"], np.tanh(state + mixed[None])


@pytest.fixture
def stateful(tmp_path: Path):
    model, weights = stateful_model()
    path = tmp_path / "vad_like.onnx"
    onnx.save_model(model, str(path))
    rng = np.random.default_rng(3)
    count = 16
    arrays = {"x": rng.standard_normal((count, 1, 64)).astype(np.float32),
              "sr": rng.choice([8000, 16000], count).astype(np.int64),
              "state": rng.standard_normal((count, 2, 1, 32)).astype(np.float32)}
    data = tmp_path / "stacked.npz"
    np.savez(data, **arrays, clip_id=np.arange(3))  # an extra array users keep next to the inputs
    return path, data, arrays, weights


def _stateful_outputs(path: Path, arrays: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [tuple(session.run(None, {name: np.asarray(arrays[name][i]) for name in ("x", "sr", "state")}))
            for i in range(len(arrays["sr"]))]


def test_the_stateful_reference_is_the_model(stateful):
    path, _, arrays, weights = stateful
    for i, (y, state_out) in enumerate(_stateful_outputs(path, arrays)):
        want_y, want_state = stateful_reference(weights, arrays["x"][i], arrays["sr"][i], arrays["state"][i])
        np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state_out, want_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("command", ["static", "prune"])
def test_stack_layout_through_quantize_and_prune(run_cli, stateful, tmp_path, command):
    path, data, arrays, weights = stateful
    out = tmp_path / f"{command}.onnx"
    args = (["quantize", path, "-d", data, "--no-speed-check"] if command == "static" else
            ["prune", path, "-s", "0.5", "--calibration-data", data, "--prune-first", "--prune-last",
             "--min-params", "1"])
    result = run_cli(*args, "--data-layout", "stack", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert interface(model) == interface(onnx.load(str(path)))
    if command == "static":
        assert {"QuantizeLinear", "DequantizeLinear"} & _op_types(model) or "MatMulIntegerToFloat" in _op_types(model)
        assert "arrays ignored (not model inputs): clip_id" in summary["notes"]
    else:
        assert summary["calibration"] and {layer["weight"] for layer in summary["layers"]} == {"W1", "W2"}
    for i, (y, state_out) in enumerate(_stateful_outputs(out, arrays)):
        want_y, want_state = stateful_reference(weights, arrays["x"][i], arrays["sr"][i], arrays["state"][i])
        assert y.shape == want_y.shape and state_out.shape == want_state.shape
        if command == "static":
            assert cosine(y, want_y) > 0.99


def test_stack_layout_through_report_and_sensitivity(run_cli, stateful, tmp_path):
    path, data, *_ = stateful
    out = tmp_path / "static.onnx"
    assert run_cli("quantize", path, "-d", data, "--data-layout", "stack", "-o", out, "--no-speed-check").exit_code == 0
    result = run_cli("report", path, out, "--data", data, "--data-layout", "stack", "--runs", "2", "--warmup", "0",
                     "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data"]["samples"] == 16 and not report["data"]["synthetic"]
    scored = {o["output"]: o for o in report["candidates"][0]["outputs"]}
    assert scored["y"]["cosine"] > 0.99
    ranking = run_cli("sensitivity", path, "-d", data, "--data-layout", "stack", "--json")
    assert ranking.exit_code == 0, ranking.stderr
    nodes = {row["node"] for row in json.loads(ranking.stdout)["nodes"]}
    # fc1 (MatMul+Add+Relu) runs as onnxruntime's float FusedGemm even with Q/DQ around it: it stays float
    assert "fc2" in nodes


def test_report_without_data_on_a_scalar_input_model(run_cli, stateful):
    """Synthetic inputs keep the scalar a scalar (exit 3 before: it was given a samples axis)."""
    path, *_ = stateful
    result = run_cli("report", path, "--runs", "2", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["data"]["synthetic"] is True


def test_batch_layout_on_a_scalar_input_model_says_what_to_do(run_cli, stateful, tmp_path):
    path, data, *_ = stateful
    result = run_cli("quantize", path, "-d", data, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "--data-layout stack" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()
