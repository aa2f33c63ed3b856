"""compressq.quantize.weight_only: MatMul weights -> MatMulNBits, checked against numpy and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from compressq.errors import DataError, UsageError
from compressq.graph.index import GraphIndex, node_attributes
from compressq.measure.metrics import cosine_similarity
from compressq.quantize.weight_only import (
    INT8_COMPUTE,
    pack_codes,
    quantize_weight,
    quantize_weights_only,
    unpack_codes,
)
from compressq.runtime import create_session, with_outputs
from sample_models.generated import bert_model, make_inputs
from tests.conftest import make_model

RNG = np.random.default_rng(0)


def single_matmul(k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(weight, "W")])


def split_nibbles(packed: np.ndarray, bits: int) -> np.ndarray:
    """4-bit: each byte holds two codes, the low nibble first; 8-bit: one code per byte."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1) if bits == 4 else packed


def reference_dequantize(model: onnx.ModelProto) -> np.ndarray:
    """W [K, N] as the MatMulNBits spec defines it, decoded here independently of the module."""
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attributes["K"], attributes["N"], attributes["bits"], attributes["block_size"]
    index = GraphIndex(model.graph)
    packed, scales = index.constant(node.input[1]), index.constant(node.input[2]).reshape(n, -1)
    n_blocks = -(-k // block)
    assert packed.shape == (n, n_blocks, block * bits // 8)
    codes = split_nibbles(packed, bits).reshape(n, n_blocks, block)
    zero_points = np.full((n, n_blocks), 2 ** (bits - 1), np.float32)
    if len(node.input) > 3 and node.input[3]:
        stored = split_nibbles(index.constant(node.input[3]).reshape(n, -1), bits)
        zero_points = stored.reshape(n, -1)[:, :n_blocks].astype(np.float32)
    weight = (codes.astype(np.float32) - zero_points[..., None]) * scales[..., None]
    return weight.reshape(n, -1)[:, :k].T


def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    return float(np.linalg.norm(reference - approximation) / np.linalg.norm(reference))


# ---------------------------------------------------------------------------------------------------
# Packing


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([4, 8]), rows=st.integers(1, 4), length=st.integers(1, 65), seed=st.integers(0, 99))
def test_unpack_inverts_pack(bits: int, rows: int, length: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 2**bits, (rows, length)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape[-1] == (-(-length * bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, length), codes)


def test_four_bit_codes_are_packed_low_nibble_first() -> None:
    np.testing.assert_array_equal(pack_codes(np.array([1, 2, 3], np.uint8), 4), [0x21, 0x03])


# ---------------------------------------------------------------------------------------------------
# The rewrite against onnxruntime


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [96, 100, 33])  # whole blocks, a partial last block, odd K
def test_onnxruntime_multiplies_by_the_numpy_dequantized_weight(bits: int, symmetric: bool, k: int) -> None:
    model = single_matmul(k, 24)
    weight = GraphIndex(model.graph).constant("W")
    # float compute: the layout is checked to 1e-5 (the default int8 compute rounds the activations too)
    quantized, summary = quantize_weights_only(model, bits=bits, block_size=32, symmetric=symmetric,
                                               accuracy_level=None)
    onnx.checker.check_model(quantized)
    assert [n.op_type for n in quantized.graph.node] == ["MatMulNBits"]
    assert {t.name for t in quantized.graph.initializer}.isdisjoint({"W"})

    dequantized = reference_dequantize(quantized)
    np.testing.assert_allclose(dequantized, quantize_weight(weight, bits, 32, symmetric).dequantize(), atol=1e-6)
    error = relative_error(weight, dequantized)
    assert 0 < error < (0.15 if bits == 4 else 0.01)
    assert summary.layers[0].weight_error == pytest.approx(error, rel=1e-4)

    x = RNG.standard_normal((5, k)).astype(np.float32)
    output = create_session(quantized).run(None, {"x": x})[0]
    expected = x.astype(np.float64) @ dequantized.astype(np.float64)
    assert np.abs(output - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_by_default_the_kernel_multiplies_on_int8_activations(bits: int) -> None:
    model = single_matmul(96, 24)
    quantized, _ = quantize_weights_only(model, bits=bits, block_size=32)
    node = quantized.graph.node[0]
    assert node_attributes(node)["accuracy_level"] == INT8_COMPUTE
    float_compute, _ = quantize_weights_only(model, bits=bits, block_size=32, accuracy_level=None)
    assert "accuracy_level" not in node_attributes(float_compute.graph.node[0])

    x = RNG.standard_normal((5, 96)).astype(np.float32)
    integer = create_session(quantized).run(None, {"x": x})[0]
    floating = create_session(float_compute).run(None, {"x": x})[0]
    # int8 activations per block: about 0.4 % of the output's scale, far below the int4 weight error (~9 %)
    assert 0 < np.abs(integer - floating).max() <= 0.02 * np.abs(floating).max()


def test_gemm_with_transposed_weight_and_bias_keeps_its_bias() -> None:
    rng = np.random.default_rng(1)
    weight, bias = rng.standard_normal((16, 64)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    model = make_model(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=1, beta=0.5)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "C")])
    quantized, _ = quantize_weights_only(model, bits=4, block_size=32, accuracy_level=None)  # exact float compute
    x = rng.standard_normal((3, 64)).astype(np.float32)
    output = create_session(quantized).run(None, {"x": x})[0]
    expected = x @ reference_dequantize(quantized) + 0.5 * bias
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


def test_excluded_nodes_stay_float_and_the_input_model_is_untouched() -> None:
    model = single_matmul(64, 8)
    before = model.SerializeToString()
    quantized, summary = quantize_weights_only(model, exclude=["mat*"])
    assert [n.op_type for n in quantized.graph.node] == ["MatMul"]
    assert summary.skipped == {"matmul": "excluded"} and not summary.layers
    quantize_weights_only(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("settings_", [{"bits": 3}, {"block_size": 48}, {"block_size": 8}])
def test_unsupported_settings_are_refused(settings_: dict) -> None:
    with pytest.raises(UsageError):
        quantize_weights_only(single_matmul(32, 4), **settings_)


def test_calibration_for_an_unknown_tensor_is_refused() -> None:
    with pytest.raises(DataError, match="feeds no MatMul"):
        quantize_weights_only(single_matmul(32, 4), calibration={"nope": np.zeros((4, 32))})


def test_calibration_of_an_excluded_layer_is_ignored() -> None:
    _, summary = quantize_weights_only(single_matmul(32, 4), calibration={"x": np.zeros((4, 32))}, exclude=["*"])
    assert not summary.layers


def test_calibration_with_the_wrong_width_is_refused() -> None:
    with pytest.raises(DataError, match="features"):
        quantize_weights_only(single_matmul(32, 4), calibration={"x": np.zeros((4, 31))})


# ---------------------------------------------------------------------------------------------------
# The generated BERT-style encoder


@pytest.fixture(scope="module")
def bert() -> onnx.ModelProto:
    return bert_model(layers=1, hidden=128, heads=4, intermediate=512, seq_len=16)


def test_int4_bert_is_small_close_to_fp32_and_runs(bert: onnx.ModelProto) -> None:
    quantized, summary = quantize_weights_only(bert, bits=4, block_size=32)
    onnx.checker.check_model(quantized)
    assert len(summary.layers) == 6  # Q, K, V, attention output, FFN in and out
    index = GraphIndex(quantized.graph)
    assert not [n.name for n in quantized.graph.node if n.op_type == "MatMul" and index.is_constant(n.input[1])]
    assert len(quantized.SerializeToString()) <= 0.2 * len(bert.SerializeToString())
    assert summary.compression > 6

    feeds = make_inputs(bert, batch=2, seq_len=16)
    reference = create_session(bert).run(None, feeds)[0]
    output = create_session(quantized).run(None, feeds)[0]
    assert not np.array_equal(output, reference)
    assert cosine_similarity(reference, output) >= 0.99


def test_refinement_lowers_a_layers_output_error_on_held_out_data(bert: onnx.ModelProto) -> None:
    layer = next(n for n in bert.graph.node if n.name == "encoder.layer0.ffn_output.matmul")
    weight = GraphIndex(bert.graph).constant(layer.input[1])
    session = create_session(with_outputs(bert, [layer.input[0]]))

    def activations(seed: int) -> np.ndarray:
        feeds = make_inputs(bert, batch=16, seed=seed, seq_len=16)
        return session.run([layer.input[0]], feeds)[0].reshape(-1, weight.shape[0])

    calibration, held_out = activations(0), activations(1)
    plain, _ = quantize_weights_only(bert, exclude=["*attention*", "*intermediate*"])
    refined, summary = quantize_weights_only(bert, calibration={layer.input[0]: calibration},
                                             exclude=["*attention*", "*intermediate*"])
    assert [entry.refined for entry in summary.layers] == [True]

    def output_error(model: onnx.ModelProto, x: np.ndarray) -> float:
        return relative_error(x @ weight, x @ reference_dequantize(model))

    for x in (calibration, held_out):
        assert output_error(refined, x) < output_error(plain, x)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, n", [(96, 40), (70, 9)])
def test_refined_shrink_picks_per_block_the_grid_factor_with_the_least_output_error(symmetric, k, n):
    """Against a plain reference: every factor quantized by quantize_blocks, the error ||X_b (w_b - q_b)||^2 of
    every block computed from the calibration rows themselves, the smallest kept (first one on ties)."""
    from compressq.quantize.weight_only import REFINE_GRID, block_gram, quantize_blocks, refined_shrink, weight_blocks

    rng = np.random.default_rng(k + n)
    weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    rows = rng.standard_normal((64, k)).astype(np.float32)
    blocks = weight_blocks(weight, 32)
    padded = np.zeros((64, blocks.shape[1] * 32))
    padded[:, :k] = rows
    errors = []
    for factor in REFINE_GRID:
        codes, scales, zero_points = quantize_blocks(blocks, 4, symmetric, factor)
        zero = zero_points if zero_points is not None else np.full(scales.shape, 8, np.uint8)
        restored = (codes.astype(np.float64) - zero[..., None]) * scales[..., None]  # [N, n_blocks, 32]
        difference = (blocks - restored).reshape(n, -1)  # [N, n_blocks * 32]
        per_row = (padded[:, None, :] * difference[None]).reshape(64, n, -1, 32).sum(axis=-1)  # X_b (w_b - q_b)
        errors.append((per_row ** 2).sum(axis=0))  # [N, n_blocks]
    expected = np.asarray(REFINE_GRID, np.float32)[np.argmin(np.stack(errors), axis=0)]
    chosen = refined_shrink(blocks, block_gram(rows, 32, blocks.shape[1]), 4, symmetric)
    assert chosen.shape == expected.shape and np.mean(chosen == expected) > 0.97  # float sums may tie-break apart


def test_refining_on_block_grams_equals_refining_on_the_rows_they_sum():
    """The CLI hands weight-only the block Gram matrices of every row (memory independent of the samples);
    the codes are those the rows themselves give."""
    from compressq.errors import DataError
    from compressq.quantize.weight_only import block_gram

    model = single_matmul(96, 40)
    rows = np.random.default_rng(3).standard_normal((300, 96)).astype(np.float32)
    by_rows, _ = quantize_weights_only(model, bits=4, block_size=32, calibration={"x": rows})
    grams = {"x": block_gram(rows[:100], 32, 3) + block_gram(rows[100:], 32, 3)}  # summed run by run
    by_grams, summary = quantize_weights_only(model, bits=4, block_size=32, calibration_grams=grams)
    assert summary.layers and all(layer.refined for layer in summary.layers)
    for mine, theirs in zip(by_grams.graph.initializer, by_rows.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(mine), numpy_helper.to_array(theirs))
    with pytest.raises(DataError, match="need"):
        quantize_weights_only(model, bits=4, block_size=32, calibration_grams={"x": np.zeros((2, 32, 32))})


def test_the_row_reservoir_keeps_every_row_with_the_same_chance():
    from compressq.stats.observers import RowReservoir

    counts = np.zeros(2000)
    for seed in range(200):
        reservoir = RowReservoir(100, np.random.default_rng(seed))
        for start in range(0, 2000, 64):  # batches of 64 rows, the last one short
            reservoir.add(np.arange(start, min(start + 64, 2000), dtype=np.float64)[:, None])
        kept = reservoir.result()[:, 0].astype(int)
        assert len(kept) == 100 and len(set(kept)) == 100
        counts[kept] += 1
    first, last = counts[:1000].sum(), counts[1000:].sum()
    assert abs(first - last) / (first + last) < 0.05  # each half ~50 % of the kept rows
    small = RowReservoir(100, np.random.default_rng(0))
    small.add(np.arange(30.0)[:, None])
    assert small.result()[:, 0].tolist() == list(range(30))  # fewer rows than the reservoir: all of them
