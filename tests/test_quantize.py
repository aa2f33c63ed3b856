"""Static/dynamic quantization: numpy kernels, calibration observers, the plan, the rewrite, the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from compressq.data import load_dataset
from compressq.errors import UsageError
from compressq.graph.edit import name_nodes
from compressq.measure.speed import FASTER_ENOUGH
from compressq.quantize import scheme
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.fusion import inspect_fusion
from compressq.quantize.plan import build_plan
from compressq.quantize.static import quantize_static
from compressq.runtime import create_session
from compressq.stats.collect import HistogramObserver, MinMaxObserver
from tests.conftest import SAMPLES

FORCED = QuantizeConfig(speed_check=False)

# ---------------------------------------------------------------------------------------------------
# scheme: pure numpy


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(-100, 100, width=32)))
def test_symmetric_weight_round_trip_error_is_at_most_half_a_step(values):
    params = scheme.weight_params(values, axis=None)
    restored = scheme.dequantize(scheme.quantize(values, params), params)
    assert np.all(np.abs(restored - values) <= params.scale * 0.5 + 1e-6)


@settings(max_examples=50, deadline=None)
@given(st.floats(-50, 0), st.floats(0, 50))
def test_activation_range_represents_zero_exactly(low, high):
    params = scheme.activation_params(low, high, signed=False)
    zero = np.zeros(1, np.float32)
    assert scheme.dequantize(scheme.quantize(zero, params), params)[0] == 0.0


def test_per_channel_scale_is_channel_absmax_over_127():
    weight = np.arange(24, dtype=np.float32).reshape(4, 6) - 10
    params = scheme.weight_params(weight, axis=0)
    np.testing.assert_allclose(params.scale, np.abs(weight).max(axis=1) / 127)
    assert scheme.quantize(weight, params).max() <= 127 and scheme.quantize(weight, params).min() >= -127


def test_bias_that_overflows_int32_stays_float():
    params = scheme.bias_params(np.float32(1e-6), np.array([1e-6], np.float32))
    assert scheme.quantize_bias(np.array([1e6], np.float32), params) is None
    assert scheme.quantize_bias(np.array([1e-3], np.float32), params) is not None


# ---------------------------------------------------------------------------------------------------
# calibration observers


def test_minmax_observer_streams_to_the_global_range():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(8, 5)).astype(np.float32) * (i + 1) for i in range(6)]
    observer = MinMaxObserver()
    for batch in batches:
        observer.update(batch)
    everything = np.concatenate(batches)
    assert observer.result().low == pytest.approx(everything.min())
    assert observer.result().high == pytest.approx(everything.max())


def test_histogram_percentile_follows_numpy_while_the_range_widens():
    rng = np.random.default_rng(1)
    batches = [rng.normal(scale=1 + i, size=20000).astype(np.float32) for i in range(4)]
    observer = HistogramObserver("percentile", percentile=99.0)
    for batch in batches:
        observer.update(batch)
    everything = np.concatenate(batches)
    expected_high = np.percentile(everything, 99.0)
    assert observer.result().high == pytest.approx(expected_high, rel=0.05)
    assert observer.result().high < everything.max()


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_histogram_methods_clip_outliers(method):
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(size=100000), [400.0]]).astype(np.float32)
    observer = HistogramObserver(method)
    observer.update(values)
    assert 0 < observer.result().high < 400.0


def test_sentinel_values_mark_a_tensor_as_not_quantizable():
    observer = MinMaxObserver()
    observer.update(np.array([0.0, 1.0, np.finfo(np.float32).min], np.float32))
    assert observer.result().finite is False


# ---------------------------------------------------------------------------------------------------
# plan


def _conv_relu_model(depthwise: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    channels = 8
    w1 = rng.normal(size=(channels, 3, 3, 3)).astype(np.float32)
    w2_shape = (channels, 1, 3, 3) if depthwise else (channels, channels, 3, 3)
    w2 = rng.normal(size=w2_shape).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1],
                         group=channels if depthwise else 1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels, 16, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_plan_absorbs_relu_and_quantizes_both_convs():
    plan = build_plan(_conv_relu_model())
    assert set(plan.compute) == {"conv1", "conv2"}
    assert plan.absorbed["c1"].node == "relu1"
    assert "r1" in plan.quantized_tensors and "c1" not in plan.quantized_tensors


def test_static_quantizer_without_data_or_plan_is_a_usage_error():
    # The library door (quantize_static) refuses what quantize_model refuses, instead of an AttributeError
    # deep in calibration.
    with pytest.raises(UsageError, match="needs calibration data"):
        quantize_static(_conv_relu_model(), None, QuantizeConfig(speed_check=False))


def test_plan_can_keep_depthwise_float_and_says_why():
    assert build_plan(_conv_relu_model(depthwise=True)).compute["conv2"].depthwise
    plan = build_plan(_conv_relu_model(depthwise=True), quantize_depthwise=False)
    assert "conv2" not in plan.compute
    assert any(s.node == "conv2" and "depthwise" in s.reason for s in plan.skipped)


def test_exclude_matches_node_names_and_op_types():
    assert "conv1" not in build_plan(_conv_relu_model(), exclude=("conv1",)).compute
    assert not build_plan(_conv_relu_model(), exclude=("Conv",)).compute


def test_name_nodes_fills_missing_and_duplicate_names():
    model = _conv_relu_model()
    model.graph.node[0].name = ""
    model.graph.node[1].name = "conv2"
    name_nodes(model.graph)
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == 3 and all(names)


# ---------------------------------------------------------------------------------------------------
# rewrite and accuracy on the trained sample models


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(str(SAMPLES / name))


def _eval_outputs(model: onnx.ModelProto, data_path: Path) -> tuple[np.ndarray, np.ndarray]:
    dataset = load_dataset(data_path, model)
    session = create_session(model)
    outputs, labels = [], []
    for feed, batch_labels in dataset.labelled_batches(128):
        outputs.append(session.run(None, feed)[0])
        labels.append(batch_labels)
    return np.concatenate(outputs), np.concatenate(labels)


@pytest.fixture(scope="module")
def forced_int8():
    """Each sample model quantized with the speed check off, so every quantizable node is int8."""
    cases = {"digits_cnn": "digits_calib.npz", "digits_mobilenet": "digits_calib.npz",
             "digits_transformer": "digits_seq_calib.npz"}
    results = {}
    for name, calib in cases.items():
        model = _load(f"{name}.onnx")
        results[name] = quantize_model(model, load_dataset(SAMPLES / calib, model), FORCED)
    return results


@pytest.mark.parametrize("name,eval_file,max_drop", [
    ("digits_cnn", "digits_eval.npz", 0.3), ("digits_mobilenet", "digits_eval.npz", 1.0)])
def test_int8_accuracy_drop_is_within_the_bar(forced_int8, name, eval_file, max_drop):
    reference, labels = _eval_outputs(_load(f"{name}.onnx"), SAMPLES / eval_file)
    quantized, _ = _eval_outputs(forced_int8[name].model, SAMPLES / eval_file)
    drop = 100 * ((reference.argmax(1) == labels).mean() - (quantized.argmax(1) == labels).mean())
    assert forced_int8[name].summary.quantized_nodes
    assert drop <= max_drop


def test_transformer_int8_agrees_with_fp32(forced_int8):
    reference, _ = _eval_outputs(_load("digits_transformer.onnx"), SAMPLES / "digits_seq_eval.npz")
    quantized, _ = _eval_outputs(forced_int8["digits_transformer"].model, SAMPLES / "digits_seq_eval.npz")
    assert (reference.argmax(1) == quantized.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mobilenet", "digits_transformer"])
def test_every_quantized_node_runs_on_an_integer_kernel(forced_int8, name):
    result = forced_int8[name]
    fusion = inspect_fusion(result.model)
    assert fusion.unfused_compute == ()
    # >=: onnxruntime may also quantize a float Conv it finds between our DQ and Q nodes on its own.
    assert sum(fusion.integer_kernels.get(op, 0) for op in ("QLinearConv", "QGemm", "QLinearMatMul",
                                                            "MatMulIntegerToFloat")) \
        >= len(result.summary.quantized_nodes) > 0


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mobilenet", "digits_transformer"])
def test_output_keeps_no_float_copy_of_quantized_weights(forced_int8, name):
    model = forced_int8[name].model
    onnx.checker.check_model(model)
    original = _load(f"{name}.onnx")
    quantized_weights = {n.input[1] for n in original.graph.node
                         if n.name in forced_int8[name].summary.quantized_nodes}
    float_names = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    int8_weights = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert len(int8_weights) >= len(quantized_weights) > 0
    assert not quantized_weights & float_names
    assert model.ByteSize() < original.ByteSize()


def test_dynamic_batch_axis_still_works(forced_int8):
    session = create_session(forced_int8["digits_cnn"].model)
    for batch in (1, 5):
        assert session.run(None, {"input": np.zeros((batch, 1, 8, 8), np.float32)})[0].shape == (batch, 10)


def _masked_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),  # keeps onnxruntime from fusing MatMul+Add
        helper.make_node("Add", ["t", "mask_bias"], ["scores"], name="add_mask"),
        helper.make_node("MatMul", ["scores", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
                     helper.make_tensor_value_info("mask_bias", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_sentinel_mask_tensors_stay_float_and_are_reported(tmp_path):
    model = _masked_matmul_model()
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((64, 16)) < 0.2, np.finfo(np.float32).min, 0).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(64, 16)).astype(np.float32), mask_bias=mask)
    result = quantize_model(model, load_dataset(tmp_path / "calib.npz", model), FORCED)
    assert "scores" in result.summary.non_finite_tensors
    assert result.summary.quantized_nodes == ["mm1"]
    assert any(f["node"] == "mm2" and "non-finite" in f["reason"] for f in result.summary.float_nodes)


def test_existing_qdq_is_not_quantized_twice(forced_int8, tmp_path):
    once = forced_int8["digits_cnn"].model
    twice = quantize_model(once, load_dataset(SAMPLES / "digits_calib.npz", once), FORCED)
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    assert not twice.summary.quantized_nodes
    assert count(twice.model, "QuantizeLinear") == count(once, "QuantizeLinear")


def test_dynamic_mode_uses_integer_matmuls_and_stays_close():
    model = _load("digits_transformer.onnx")
    result = quantize_model(model, None, QuantizeConfig(mode="dynamic", speed_check=False))
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in result.model.graph.node) == len(
        result.summary.quantized_nodes) > 0
    reference, _ = _eval_outputs(model, SAMPLES / "digits_seq_eval.npz")
    quantized, _ = _eval_outputs(result.model, SAMPLES / "digits_seq_eval.npz")
    assert (reference.argmax(1) == quantized.argmax(1)).mean() >= 0.98


def test_speed_check_never_leaves_a_slower_model_on_a_tiny_cnn():
    model = _load("digits_cnn.onnx")
    result = quantize_model(model, load_dataset(SAMPLES / "digits_calib.npz", model), QuantizeConfig())
    assert result.summary.speedup is not None
    if result.summary.quantized_nodes:
        assert result.summary.speedup >= FASTER_ENOUGH  # "equal within noise" keeps int8 for its size
    else:
        assert result.model is model  # nothing paid off: the user's graph comes back unchanged
        assert result.summary.speed_steps


# ---------------------------------------------------------------------------------------------------
# CLI


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_writes_default_output_and_leaves_input_untouched(run_cli, tmp_path):
    model = tmp_path / "cnn.onnx"
    model.write_bytes((SAMPLES / "digits_cnn.onnx").read_bytes())
    before = _digest(model)
    result = run_cli("quantize", model, "--calibration-data", SAMPLES / "digits_calib.npz", "--no-speed-check",
                     "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["output"] == str(tmp_path / "cnn.int8.onnx")
    assert summary["mode"] == "static" and len(summary["quantized_nodes"]) == 4
    assert summary["output_bytes"] < summary["input_bytes"]
    assert _digest(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.int8.onnx", "cnn.onnx"]
    stamp = {p.key: p.value for p in onnx.load(str(tmp_path / "cnn.int8.onnx")).metadata_props}
    assert stamp["compressq.command"] == "quantize" and '"mode": "static"' in stamp["compressq.settings"]


def test_cli_without_data_quantizes_dynamically_and_says_so(run_cli, tmp_path):
    result = run_cli("quantize", SAMPLES / "digits_transformer.onnx", "-o", tmp_path / "t.onnx", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["mode"] == "dynamic"
    assert "no calibration data" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--mode", "static"], "needs --calibration-data"),
    (["--method", "magic", "-d", str(SAMPLES / "digits_calib.npz")], "unknown --method"),
    (["--provider", "cuda"], "CUDAExecutionProvider"),
    (["-d", str(SAMPLES / "digits_seq_calib.npz")], "model expects rank"),
])
def test_cli_bad_options_give_one_line_and_exit_2(run_cli, tmp_path, args, message):
    if message == "CUDAExecutionProvider":
        import onnxruntime
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("CUDA is available here")
    result = run_cli("quantize", SAMPLES / "digits_cnn.onnx", "-o", tmp_path / "out.onnx", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out.onnx").exists()


def test_cli_refuses_to_overwrite_its_input(run_cli, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes((SAMPLES / "digits_transformer.onnx").read_bytes())
    result = run_cli("quantize", model, "-o", model)
    assert result.exit_code == 2 and "overwrite" in result.stderr
    assert _digest(model) == _digest(SAMPLES / "digits_transformer.onnx")


def test_dynamic_mode_that_runs_slower_hands_back_the_input(monkeypatch):
    import compressq.quantize.api as api
    from compressq.measure.speed import SpeedMeasurement

    slower = SpeedMeasurement(0.5, 0.5, 0.5, 1.0, 2.0, 15, 1, 1, "fake clock")
    monkeypatch.setattr(api, "measure_speedup", lambda *args, **kwargs: slower)
    model = _load("digits_transformer.onnx")
    result = quantize_model(model, None, QuantizeConfig(mode="dynamic"))
    assert result.model is model
    assert not result.summary.quantized_nodes and result.summary.speedup == 1.0
    assert any("slower" in f["reason"] for f in result.summary.float_nodes)


def test_weight_only_mode_with_calibration_refines_every_layer():
    model = _load("digits_transformer.onnx")
    data = load_dataset(SAMPLES / "digits_seq_calib.npz", model)
    result = quantize_model(model, data, QuantizeConfig(mode="weight-only", bits=4, speed_check=False))
    assert sum(n.op_type == "MatMulNBits" for n in result.model.graph.node) == len(result.summary.quantized_nodes)
    assert any("refined" in note for note in result.summary.notes)
    reference, _ = _eval_outputs(model, SAMPLES / "digits_seq_eval.npz")
    quantized, _ = _eval_outputs(result.model, SAMPLES / "digits_seq_eval.npz")
    assert (reference.argmax(1) == quantized.argmax(1)).mean() >= 0.97


def _silu_hardswish_model() -> onnx.ModelProto:
    """Conv -> SiLU (x * Sigmoid(x)) -> Conv -> HardSwish as exported (x * Clip(x + 3, 0, 6) / 6) -> Conv."""
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(8, c, 3, 3)).astype(np.float32) * 0.3 for c in (3, 8, 8)]
    constants = {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32),
                 "six": np.array(6.0, np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c0"], ["s0"], name="sigmoid"),
        helper.make_node("Mul", ["c0", "s0"], ["silu"], name="silu_mul"),
        helper.make_node("Conv", ["silu", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "three"], ["a1"], name="hs_add"),
        helper.make_node("Clip", ["a1", "zero", "six"], ["k1"], name="hs_clip"),
        helper.make_node("Div", ["k1", "six"], ["d1"], name="hs_div"),
        helper.make_node("Mul", ["c1", "d1"], ["hs"], name="hs_mul"),
        helper.make_node("Conv", ["hs", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    initializers = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    initializers += [numpy_helper.from_array(v, k) for k, v in constants.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16, 16])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_silu_and_exported_hardswish_run_on_integer_kernels(tmp_path):
    model = _silu_hardswish_model()
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(32, 3, 16, 16)).astype(np.float32))
    data = load_dataset(tmp_path / "c.npz", model)
    result = quantize_model(model, data, FORCED)
    kernels = inspect_fusion(result.model).integer_kernels
    assert kernels.get("QLinearSigmoid") == 1
    assert kernels.get("QLinearMul") == 3  # SiLU's Mul, HardSwish's Mul, and its Div by 6 as a Mul
    assert kernels.get("QLinearAdd") == 1  # x + 3, with the constant quantized
    feed = {"x": rng.normal(size=(4, 3, 16, 16)).astype(np.float32)}
    reference = create_session(model).run(None, feed)[0]
    quantized = create_session(result.model).run(None, feed)[0]
    cosine = float((reference * quantized).sum() / np.linalg.norm(reference) / np.linalg.norm(quantized))
    assert cosine > 0.99


def test_dynamic_mode_without_data_times_models_with_small_lookup_tables():
    """Synthetic ids must stay inside every table (token types have two rows), or the speed check crashes."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["types", "ids"], ["embedded"], name="token_types"),
             helper.make_node("MatMul", ["embedded", "w"], ["y"], name="proj")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 256])],
        [numpy_helper.from_array(rng.normal(size=(2, 256)).astype(np.float32), "types"),
         numpy_helper.from_array(rng.normal(size=(256, 256)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = quantize_model(model, None, QuantizeConfig(mode="dynamic"))
    assert result.summary.speedup is not None


def test_cli_refuses_an_output_folder_that_does_not_exist_before_calibrating(run_cli, tmp_path, monkeypatch):
    import compressq.cli.quantize as command

    def must_not_run(*args, **kwargs):
        raise AssertionError("quantization ran although the output could never be written")

    monkeypatch.setattr(command, "quantize_model", must_not_run)
    result = run_cli("quantize", SAMPLES / "digits_cnn.onnx", "-d", SAMPLES / "digits_calib.npz",
                     "-o", tmp_path / "missing" / "out.onnx")
    assert result.exit_code == 2 and "does not exist" in result.stderr
