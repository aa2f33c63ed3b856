"""compressq.quantize.gptq: GPTQ weight codes against a plain numpy OBQ reference, and end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import load_dataset
from compressq.errors import UsageError
from compressq.graph.index import GraphIndex
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.gptq import (
    SampleGrams,
    block_grid,
    conv_geometry,
    factorize,
    gptq_codes,
    per_column_grid,
    reconstruct,
    relative_output_error,
    round_to_nearest,
)
from compressq.quantize.weight_only import quantize_weight
from compressq.runtime import create_session
from compressq.stats.observers import GramObserver, PatchGramObserver
from tests.conftest import make_model


def correlated_rows(rows: int, k: int, seed: int) -> np.ndarray:
    """Inputs whose features are strongly correlated (what makes error feedback worth anything)."""
    mixing = np.eye(k) + 0.6 * np.random.default_rng(k).standard_normal((k, k)) / np.sqrt(k)  # one per width
    return (np.random.default_rng(seed).standard_normal((rows, k)) @ mixing).astype(np.float32)


def obq_reference(weight_kn: np.ndarray, gram: np.ndarray, grid) -> np.ndarray:
    """Optimal Brain Quantization as first written down: rows in order, each rounded, its error moved onto
    the rows left by the inverse of the Gram matrix restricted to them (recomputed at every step)."""
    work = weight_kn.astype(np.float64).copy()
    codes = np.zeros(weight_kn.shape)
    k = weight_kn.shape[0]
    for row in range(k):
        codes[row] = grid.codes(row, work[row])
        error = work[row] - grid.values(row, codes[row])
        remaining = np.arange(row, k)
        inverse = np.linalg.inv(gram[np.ix_(remaining, remaining)])
        work[row + 1:] -= np.outer(inverse[1:, 0] / inverse[0, 0], error)
    return codes


def test_two_weights_worked_by_hand():
    # x1, x2 correlated 0.9; w = (0.4, 0.4) on the integer grid. Rounding gives (0, 0). GPTQ rounds w1 to 0,
    # moves 0.9 * 0.4 onto w2 (0.76), which rounds to 1: errors (0.4, -0.6) instead of (0.4, 0.4).
    grid = per_column_grid(np.array([1.0]), 2, 1, -127, 127)
    weight = np.array([[0.4], [0.4]])
    gram = np.array([[1.0, 0.9], [0.9, 1.0]])
    codes, report = reconstruct(weight, gram, grid, damping=0.0, act_order=False)
    assert codes.ravel().tolist() == [0.0, 1.0]
    # ||X e||^2 = e^T H e: (0.16 + 0.16 + 2 * 0.9 * 0.16) = 0.608 before, (0.16 + 0.36 - 2 * 0.9 * 0.24) = 0.088
    # after, both over ||X w||^2 = 0.608.
    assert report.error_before == pytest.approx(1.0)
    assert report.error_after == pytest.approx(0.088 / 0.608)
    assert report.reconstructed


def test_three_weights_worked_by_hand():
    # A chain x1 - x2 - x3 (correlation 0.5 between neighbours, 0 between x1 and x3), w = (0.4, 0.3, 0.3),
    # grid step 1, rows in order. H^-1 = [[1.5, -1, .5], [-1, 2, -1], [.5, -1, 1.5]].
    # Row 1: 0.4 -> 0, error 0.4; w2 -= 0.4 * (-1 / 1.5) -> 0.5667, w3 -= 0.4 * (0.5 / 1.5) -> 0.1667.
    # Row 2: 0.5667 -> 1, error -0.4333; over {x2, x3}, H^-1 = [[4/3, -2/3], [-2/3, 4/3]]:
    #   w3 -= -0.4333 * (-0.5) -> -0.05 -> 0.  Codes (0, 1, 0); rounding gives (0, 0, 0).
    # Errors e^T H e: (0.4, -0.7, 0.3) -> 0.25, (0.4, 0.3, 0.3) -> 0.55, over ||X w||^2 = 0.55.
    grid = per_column_grid(np.array([1.0]), 3, 1, -127, 127)
    gram = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]])
    weight = np.array([[0.4], [0.3], [0.3]])
    codes, report = reconstruct(weight, gram, grid, damping=0.0, act_order=False)
    assert codes.ravel().tolist() == [0.0, 1.0, 0.0]
    assert obq_reference(weight, gram, grid).ravel().tolist() == [0.0, 1.0, 0.0]
    assert report.error_before == pytest.approx(1.0)
    assert report.error_after == pytest.approx(0.25 / 0.55)


@pytest.mark.parametrize("seed", range(4))
def test_cholesky_blocks_equal_the_obq_reference(seed):
    rng = np.random.default_rng(seed)
    rows = correlated_rows(200, 12, seed)
    gram = rows.astype(np.float64).T @ rows
    weight = rng.standard_normal((12, 5)) * 0.1
    grid = per_column_grid(np.abs(weight).max(axis=0) / 7, 12, 5, -8, 7)
    factor = factorize(gram, damping=0.0, act_order=False)
    expected = obq_reference(weight, gram, grid)
    for block_rows in (1, 5, 12, 128):  # lazy updates between blocks give the same codes
        assert np.array_equal(gptq_codes(weight, factor, grid, block_rows=block_rows), expected)


def test_uncorrelated_inputs_give_round_to_nearest():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 8))
    grid = per_column_grid(np.abs(weight).max(axis=0) / 127, 16, 8, -127, 127)
    gram = np.diag(rng.uniform(0.5, 2.0, 16))
    for act_order in (False, True):
        factor = factorize(gram, act_order=act_order)
        assert np.array_equal(gptq_codes(weight, factor, grid), round_to_nearest(weight, grid))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bits", [8, 4])
def test_never_worse_than_rounding_on_the_calibration_rows(seed, bits):
    rng = np.random.default_rng(seed)
    rows = correlated_rows(512, 48, seed)
    gram = rows.astype(np.float64).T @ rows
    weight = (rng.standard_normal((48, 24)) * 0.05).astype(np.float32)
    if bits == 8:
        scale = np.abs(weight).max(axis=0) / 127
        grid = per_column_grid(scale, 48, 24, -127, 127)
    else:
        quantized = quantize_weight(weight, 4, 16, symmetric=True)
        grid = block_grid(quantized.scales, None, 4, 48, 16)
    codes, report = reconstruct(weight, gram, grid)
    assert codes.min() >= grid.low and codes.max() <= grid.high
    assert np.array_equal(codes, np.rint(codes))
    measured = np.sum((rows @ (weight - grid.dequantize(codes))) ** 2) / np.sum((rows @ weight) ** 2)
    nearest = np.sum((rows @ (weight - grid.dequantize(round_to_nearest(weight, grid)))) ** 2) \
        / np.sum((rows @ weight) ** 2)
    assert measured == pytest.approx(report.error_after, rel=1e-5)
    assert nearest == pytest.approx(report.error_before, rel=1e-5)
    assert report.reconstructed and measured < 0.9 * nearest


def test_a_reconstruction_that_does_not_help_is_dropped():
    grid = per_column_grid(np.array([1.0, 1.0]), 3, 2, -127, 127)
    on_grid = np.array([[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]])  # rounding is already exact
    rows = correlated_rows(50, 3, 0).astype(np.float64)
    codes, report = reconstruct(on_grid, rows.T @ rows, grid)
    assert np.array_equal(codes, on_grid) and not report.reconstructed
    assert report.error_before == report.error_after == 0.0
    codes, report = reconstruct(on_grid + 0.3, None, grid)  # no calibration rows reached the layer
    assert np.array_equal(codes, round_to_nearest(on_grid + 0.3, grid)) and not report.reconstructed


def test_gptq_is_judged_on_held_out_rows_when_given():
    """Fitted to rows that span few directions, GPTQ lowers the error on those rows; on rows that weigh every
    direction alike (an identity Gram) nearest rounding is already the best code, so GPTQ is dropped there."""
    rows = correlated_rows(60, 8, 4).astype(np.float64)
    weight = np.random.default_rng(5).standard_normal((8, 3))
    grid = per_column_grid(np.abs(weight).max(axis=0) / 7, 8, 3, -8, 7)
    _, fitted = reconstruct(weight, rows.T @ rows, grid)
    assert fitted.reconstructed
    codes, judged = reconstruct(weight, rows.T @ rows, grid, check=np.eye(8))
    assert not judged.reconstructed and "held-out" in judged.reason
    assert np.array_equal(codes, round_to_nearest(weight, grid))


def test_sample_grams_hold_out_every_nth_row():
    rows = correlated_rows(40, 5, 6).astype(np.float64)
    grams = SampleGrams({"x": rows}, hold_out=4)
    gram, _ = grams.get("x")
    held = np.arange(40) % 4 == 3
    np.testing.assert_allclose(gram, rows[~held].T @ rows[~held], rtol=1e-6)
    np.testing.assert_allclose(grams.check("x"), rows[held].T @ rows[held], rtol=1e-6)
    assert SampleGrams({"x": rows}).check("x") is None  # no hold-out: judged on the fitted rows


def test_dead_inputs_keep_their_rounded_weights():
    rows = correlated_rows(300, 6, 2).astype(np.float64)
    rows[:, 2] = 0.0  # an input that is always zero
    weight = np.random.default_rng(3).standard_normal((6, 4))
    grid = per_column_grid(np.abs(weight).max(axis=0) / 7, 6, 4, -8, 7)
    codes, _ = reconstruct(weight, rows.T @ rows, grid)
    assert np.array_equal(codes[2], round_to_nearest(weight, grid)[2])


def test_gram_observer_streams_the_gram_matrix():
    rows = correlated_rows(70, 5, 4)
    observer = GramObserver()
    assert observer.result() is None
    observer.update(rows[:30].reshape(3, 10, 5))  # [batch, sequence, features]: rows are all but the last axis
    observer.update(rows[30:])
    np.testing.assert_allclose(observer.result(), rows.astype(np.float64).T @ rows, rtol=1e-5)
    assert observer.rows == 70
    observer.update(np.full((2, 5), np.inf, np.float32))
    assert observer.result() is None  # a non-finite tensor gives no Gram matrix rather than a wrong one


def test_relative_output_error_matches_the_rows():
    rows = correlated_rows(40, 4, 5).astype(np.float64)
    weight = np.random.default_rng(6).standard_normal((4, 3))
    approximate = weight + 0.01
    expected = np.sum((rows @ (weight - approximate)) ** 2) / np.sum((rows @ weight) ** 2)
    assert relative_output_error(weight, approximate, rows.T @ rows) == pytest.approx(expected)


# -- end to end ---------------------------------------------------------------------------------------


K, N = 64, 48


def matmul_model(transposed_gemm: bool = False) -> onnx.ModelProto:
    weight = (np.random.default_rng(7).standard_normal((K, N)) * 0.1).astype(np.float32)
    if transposed_gemm:
        node = helper.make_node("Gemm", ["x", "W"], ["y"], name="mm", transB=1)
        stored = np.ascontiguousarray(weight.T)
    else:
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
        stored = weight
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
                      [numpy_helper.from_array(stored, "W")])


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calibration.npz"
    np.savez(path, x=correlated_rows(2048, K, 8))
    return path


def output_error(model: onnx.ModelProto, reference: onnx.ModelProto, rows: np.ndarray) -> float:
    expected = create_session(reference).run(None, {"x": rows})[0]
    got = create_session(model).run(None, {"x": rows})[0]
    return float(np.sum((got - expected) ** 2) / np.sum(expected ** 2))


def initializers_named(model: onnx.ModelProto, part: str) -> dict[str, np.ndarray]:
    index = GraphIndex(model.graph)
    return {name: index.constant(name) for name in index.initializers if part in name}


@pytest.mark.parametrize("transposed_gemm", [False, True])
def test_static_int8_output_closer_to_fp32_with_the_same_scales(calibration_file, transposed_gemm):
    model = matmul_model(transposed_gemm)
    dataset = load_dataset(calibration_file, model)
    unseen = correlated_rows(512, K, 9)
    results = {}
    for strategy in ("none", "gptq"):
        config = QuantizeConfig(weight_reconstruction=strategy, speed_check=False, accuracy_check=False,
                                activations="int8")
        results[strategy] = quantize_model(model, dataset, config)
    plain, rebuilt = results["none"], results["gptq"]
    for name, scale in initializers_named(plain.model, "W_scale").items():
        np.testing.assert_array_equal(initializers_named(rebuilt.model, "W_scale")[name], scale)
    codes = next(iter(initializers_named(rebuilt.model, "W_quantized").values()))
    assert codes.dtype == np.int8 and codes.min() >= -127
    assert not np.array_equal(codes, next(iter(initializers_named(plain.model, "W_quantized").values())))
    assert output_error(rebuilt.model, model, unseen) < output_error(plain.model, model, unseen)
    layer = rebuilt.summary.error_correction["weights"]["layers"]["mm"]
    assert layer["reconstructed"] and layer["error_after"] < 0.8 * layer["error_before"]
    assert "weights" not in plain.summary.error_correction


def test_weight_only_int4_output_closer_to_fp32_with_the_same_scales(calibration_file):
    model = matmul_model()
    dataset = load_dataset(calibration_file, model)
    unseen = correlated_rows(512, K, 9)
    results = {strategy: quantize_model(model, dataset, QuantizeConfig(
        mode="weight-only", bits=4, block_size=16, weight_reconstruction=strategy, speed_check=False))
        for strategy in ("none", "gptq")}
    plain, rebuilt = results["none"], results["gptq"]
    np.testing.assert_array_equal(next(iter(initializers_named(rebuilt.model, "_scales").values())),
                                  next(iter(initializers_named(plain.model, "_scales").values())))
    assert output_error(rebuilt.model, model, unseen) < 0.9 * output_error(plain.model, model, unseen)
    report = rebuilt.summary.error_correction["weights"]
    assert report["layers_reconstructed"] == 1 and report["mean_error_after"] < report["mean_error_before"]


def test_reconstruction_needs_calibration_data():
    with pytest.raises(UsageError, match="calibration data"):
        QuantizeConfig(mode="dynamic", weight_reconstruction="gptq")
    with pytest.raises(UsageError, match="unknown --weight-reconstruction"):
        QuantizeConfig(weight_reconstruction="adaround")
    with pytest.raises(UsageError, match="calibration data"):
        quantize_model(matmul_model(), None, QuantizeConfig(mode="weight-only", weight_reconstruction="gptq"))


def test_a_plan_with_reconstructed_weights_is_not_replayed_without_data(calibration_file):
    model = matmul_model()
    config = QuantizeConfig(weight_reconstruction="gptq", speed_check=False, accuracy_check=False)
    made = quantize_model(model, load_dataset(calibration_file, model), config)
    with pytest.raises(UsageError, match="weight-reconstruction gptq"):
        quantize_model(model, None, config, pinned=made.plan)


def test_cli_reports_the_errors_per_layer_in_json(tmp_path, calibration_file):
    import json

    from typer.testing import CliRunner

    from compressq.cli import app as cli

    source = tmp_path / "mm.onnx"
    onnx.save(matmul_model(), source)
    arguments = ["quantize", str(source), "-d", str(calibration_file), "--mode", "weight-only", "--bits", "4",
                 "--weight-reconstruction", "gptq", "--no-speed-check", "--json", "-o", str(tmp_path / "out.onnx")]
    result = CliRunner().invoke(cli.app, arguments)
    assert result.exit_code == 0, result.output
    layer = json.loads(result.stdout)["error_correction"]["weights"]["layers"]["mm"]
    assert layer["reconstructed"] and layer["error_after"] < layer["error_before"]
    wrong = CliRunner().invoke(cli.app, [*arguments[:-3], "--weight-reconstruction", "best", "-o",
                                         str(tmp_path / "other.onnx")])
    assert wrong.exit_code == 2 and "unknown --weight-reconstruction 'best'" in wrong.stderr


# -- convolutions: im2col patches ---------------------------------------------------------------------


def conv_model(weight: np.ndarray, **attributes) -> onnx.ModelProto:
    return make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attributes)],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[1], 10, 9])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[0], None, None])],
                      [numpy_helper.from_array(weight, "W")])


def correlated_maps(samples: int, channels: int, seed: int) -> np.ndarray:
    """Feature maps whose channels are mixed (one mixing per channel count) and smooth in space."""
    rows = correlated_rows(samples * 10 * 9, channels, seed).reshape(samples, 10, 9, channels)
    smooth = rows + np.roll(rows, 1, axis=1) + np.roll(rows, 1, axis=2)
    return np.ascontiguousarray(smooth.transpose(0, 3, 1, 2))


def test_patch_gram_rows_reproduce_the_convolution():
    rng = np.random.default_rng(10)
    weight = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    attributes = dict(strides=[2, 1], dilations=[1, 2], pads=[1, 0, 2, 1])
    maps = rng.standard_normal((2, 3, 10, 9)).astype(np.float32)
    expected = create_session(conv_model(weight, **attributes)).run(None, {"x": maps})[0]
    geometry = conv_geometry(conv_model(weight, **attributes).graph.node[0], weight)
    observer = PatchGramObserver(geometry, rows_per_sample=10**6)
    rows = np.concatenate([observer._patches(sample) for sample in maps])
    np.testing.assert_allclose(rows @ weight.reshape(4, -1).T, expected.transpose(0, 2, 3, 1).reshape(-1, 4),
                               atol=1e-5)
    observer.update(maps)
    np.testing.assert_allclose(observer.result(), rows.astype(np.float64).T @ rows, rtol=1e-5)
    assert conv_geometry(conv_model(weight, group=1).graph.node[0], weight) is not None
    grouped = np.zeros((4, 1, 3, 3), np.float32)
    assert conv_geometry(conv_model(grouped, group=4).graph.node[0], grouped) is None  # kept rounded


def test_static_int8_conv_output_closer_to_fp32(tmp_path):
    weight = (np.random.default_rng(11).standard_normal((16, 12, 3, 3)) * 0.1).astype(np.float32)
    model = conv_model(weight, pads=[1, 1, 1, 1])
    path = tmp_path / "maps.npz"
    np.savez(path, x=correlated_maps(64, 12, 12))
    dataset = load_dataset(path, model)
    unseen = correlated_maps(32, 12, 13)
    results = {strategy: quantize_model(model, dataset, QuantizeConfig(
        weight_reconstruction=strategy, speed_check=False, accuracy_check=False)) for strategy in ("none", "gptq")}
    plain, rebuilt = results["none"], results["gptq"]
    np.testing.assert_array_equal(next(iter(initializers_named(rebuilt.model, "W_scale").values())),
                                  next(iter(initializers_named(plain.model, "W_scale").values())))
    codes = next(iter(initializers_named(rebuilt.model, "W_quantized").values()))
    assert codes.shape == weight.shape and codes.dtype == np.int8
    errors = {}
    for strategy, result in results.items():
        expected = create_session(model).run(None, {"x": unseen})[0]
        got = create_session(result.model).run(None, {"x": unseen})[0]
        errors[strategy] = float(np.sum((got - expected) ** 2) / np.sum(expected ** 2))
    assert errors["gptq"] < errors["none"]
    assert rebuilt.summary.error_correction["weights"]["layers"]["conv"]["reconstructed"]
