"""Outlier channels beside the int8 layer (compressq/quantize/outliers.py), against numpy references."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import load_dataset
from compressq.errors import DataError, UsageError
from compressq.quantize import scheme
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.outliers import OUTLIER_RATIO, outlier_channels, split_outliers
from compressq.quantize.smoothquant import collect_channel_absmax, smoothable_activations
from compressq.runtime import create_session

K = 32
OUTLIERS = (3, 17)  # channels 40x larger than the others


def _model(gemm: bool = False) -> onnx.ModelProto:
    """x [batch, 4, 32] read by two MatMuls (w1 [32, 24], w2 [32, 16]) and a Relu; with `gemm`, x is
    [batch, 32] and the second layer a Gemm with transB (w2 [16, 32]) and a bias."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(K, 24)).astype(np.float32)
    w2 = rng.normal(size=(16, K) if gemm else (K, 16)).astype(np.float32)
    second = (helper.make_node("Gemm", ["x", "w2", "b2"], ["y2"], name="fc2", transB=1) if gemm
              else helper.make_node("MatMul", ["x", "w2"], ["y2"], name="fc2"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="fc1"), second,
             helper.make_node("Relu", ["x"], ["r"], name="relu")]
    shape = ["batch", K] if gemm else ["batch", 4, K]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
         for name, dims in (("y1", shape[:-1] + [24]), ("y2", shape[:-1] + [16]), ("r", shape))],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _data(tmp_path, model, samples=256, gemm=False):
    x = np.random.default_rng(1).normal(size=(samples, K) if gemm else (samples, 4, K)).astype(np.float32)
    x[..., list(OUTLIERS)] *= 40.0
    np.savez(tmp_path / "data.npz", x=x)
    return x, load_dataset(tmp_path / "data.npz", model)


@pytest.mark.parametrize("limit", [1, 2, 5, 40])
def test_outlier_channels_are_those_above_the_ratio_largest_first(limit):
    absmax = np.random.default_rng(2).uniform(1.0, 1.5, size=64)
    absmax[[9, 40, 41]] = [30.0, 50.0, 2.0 * np.median(absmax) * 1.01]
    expected = [c for c in np.argsort(-absmax) if absmax[c] > OUTLIER_RATIO * np.median(absmax)][:limit]
    assert outlier_channels(absmax, limit).tolist() == expected
    assert outlier_channels(np.ones(8), limit).size == 0


@pytest.mark.parametrize("gemm", [False, True])
def test_split_keeps_the_float_outputs_and_routes_only_the_outlier_channels(tmp_path, gemm):
    model = _model(gemm)
    x, data = _data(tmp_path, model, gemm=gemm)
    absmax = collect_channel_absmax(model, data, smoothable_activations(model))
    split, summary = split_outliers(model, absmax, channels=4)
    onnx.checker.check_model(split)

    [entry] = summary.activations
    assert entry.activation == "x" and set(entry.channels) == set(OUTLIERS)
    assert entry.consumers == ("fc1", "fc2")
    assert entry.range_before == pytest.approx(np.abs(x).max())
    assert entry.range_after == pytest.approx(np.abs(np.delete(x, OUTLIERS, axis=-1)).max())
    ops = sorted(n.op_type for n in split.graph.node if n.name in summary.float_nodes)
    assert ops == ["Add", "Add", "Gather", "MatMul", "MatMul", "Mul"]  # one mask and one Gather for both layers

    expected = create_session(model).run(None, {"x": x})
    got = create_session(split).run(None, {"x": x})
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3)


def test_int8_with_the_split_matches_a_numpy_emulation_and_beats_plain_int8(tmp_path):
    model = _model()
    x, data = _data(tmp_path, model)
    absmax = collect_channel_absmax(model, data, smoothable_activations(model))
    split, summary = split_outliers(model, absmax, channels=4)
    config = dict(speed_check=False, accuracy_check=False, batch_size=64)
    with_split = quantize_model(split, data, QuantizeConfig(exclude=tuple(summary.float_nodes), **config)).model
    plain = quantize_model(model, data, QuantizeConfig(**config)).model
    assert {"fc1", "fc2"} <= {n.name for n in with_split.graph.node if n.op_type in ("MatMul", "Gemm")}

    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w1 = weights["w1"]
    masked = x.copy()
    masked[..., list(OUTLIERS)] = 0.0
    activation = scheme.activation_params(float(masked.min()), float(masked.max()), signed=False)
    weight = scheme.weight_params(w1, 1)
    emulated = (scheme.dequantize(scheme.quantize(masked, activation), activation)
                @ scheme.dequantize(scheme.quantize(w1, weight), weight)) + x[..., list(OUTLIERS)] @ w1[list(OUTLIERS)]
    reference = x @ w1
    got = create_session(with_split).run(["y1"], {"x": x})[0]
    plain_got = create_session(plain).run(["y1"], {"x": x})[0]

    def noise(values):
        return float(np.sum((values - reference) ** 2) / np.sum(reference ** 2))

    assert noise(got) == pytest.approx(noise(emulated), rel=0.25)
    assert noise(got) < noise(plain_got) / 20  # the outliers set plain int8's range: 40x coarser steps


def test_bad_inputs_are_one_line_errors():
    model = _model()
    with pytest.raises(UsageError, match="whole number"):
        split_outliers(model, {"x": np.ones(K)}, channels=0)
    with pytest.raises(DataError, match="channels"):
        split_outliers(model, {"x": np.ones(K + 1)}, channels=2)
    untouched, summary = split_outliers(model, {"r": np.ones(K)}, channels=2)
    assert summary.skipped == {"r": "feeds no MatMul/Gemm with a constant weight"}
    assert not summary.activations and len(untouched.graph.node) == len(model.graph.node)


def test_the_outlier_channels_option_splits_reports_and_replays(tmp_path, run_cli):
    """`quantize --outlier-channels N`: the split made inside quantize (its nodes float, what it did in --json),
    outputs closer to fp32 than plain int8, and a saved plan re-applied to the same bytes without data."""
    model = _model()
    x, _ = _data(tmp_path, model)
    path, split_out, plain_out, again = (tmp_path / n for n in ("m.onnx", "split.onnx", "plain.onnx", "again.onnx"))
    onnx.save_model(model, str(path))
    common = ["-d", tmp_path / "data.npz", "--no-speed-check", "--no-accuracy-check", "--json"]
    made = run_cli("quantize", path, *common, "--outlier-channels", "4", "-o", split_out,
                   "--save-plan", tmp_path / "plan.json")
    assert made.exit_code == 0, made.stderr
    report = json.loads(made.stdout)
    (entry,) = [e for e in report["error_correction"]["outliers"]["split"] if e["activation"] == "x"]
    assert sorted(entry["channels"]) == sorted(OUTLIERS) and {"fc1", "fc2"} <= set(entry["consumers"])
    assert {"fc1", "fc2"} <= set(report["quantized_nodes"])
    assert run_cli("quantize", path, *common, "-o", plain_out).exit_code == 0
    reference = x @ numpy_helper.to_array(model.graph.initializer[0])
    errors = [float(np.sum((create_session(str(p)).run(["y1"], {"x": x})[0] - reference) ** 2))
              for p in (split_out, plain_out)]
    assert errors[0] < errors[1] / 20
    replayed = run_cli("quantize", path, "--plan", tmp_path / "plan.json", "-o", again)
    assert replayed.exit_code == 0, replayed.stderr
    assert again.read_bytes() == split_out.read_bytes()


@pytest.mark.parametrize("extra", [["--outlier-channels", "0"], ["--outlier-channels", "2", "--mode", "dynamic"]])
def test_the_outlier_channels_option_refuses_what_it_cannot_do(tmp_path, run_cli, extra):
    path = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(path))
    _data(tmp_path, _model())
    result = run_cli("quantize", path, "-d", tmp_path / "data.npz", *extra, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()
