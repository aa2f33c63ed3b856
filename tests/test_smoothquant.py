"""compressq.quantize.smoothquant: outliers move into weights, fp32 outputs stay put."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import Dataset, load_dataset
from compressq.errors import DataError, UsageError
from compressq.graph.index import GraphIndex
from compressq.io import load_model
from compressq.quantize.smoothquant import collect_channel_absmax, smooth, smoothable_activations
from compressq.runtime import create_session, with_outputs
from tests.conftest import SAMPLES, make_model

TOLERANCE = 1e-4


def relative_max_error(reference: np.ndarray, output: np.ndarray) -> float:
    return float(np.abs(output - reference).max() / np.abs(reference).max())


def flatness_ratio(channel_absmax: np.ndarray) -> float:
    """max / median of the per-channel ranges: 1 is perfectly flat, outlier channels make it large."""
    return float(channel_absmax.max() / np.median(channel_absmax))


def weight_row_absmax(model: onnx.ModelProto, node_names: tuple[str, ...]) -> np.ndarray:
    """max |W_j| per input channel j over the named MatMul/Gemm nodes."""
    index = GraphIndex(model.graph)
    rows = []
    for node in model.graph.node:
        if node.name in node_names:
            weight = index.constant(node.input[1])
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            rows.append(np.abs(weight).max(axis=0 if transposed else 1))
    return np.max(rows, axis=0)


# ---------------------------------------------------------------------------------------------------
# The transformer sample


@pytest.fixture(scope="module")
def transformer() -> onnx.ModelProto:
    return load_model(SAMPLES / "digits_transformer.onnx")


@pytest.fixture(scope="module")
def calibration(transformer: onnx.ModelProto) -> Dataset:
    return load_dataset(SAMPLES / "digits_seq_calib.npz", transformer)


@pytest.fixture(scope="module")
def ranges(transformer: onnx.ModelProto, calibration: Dataset) -> dict[str, np.ndarray]:
    return collect_channel_absmax(transformer, calibration, smoothable_activations(transformer), batch_size=64)


@pytest.fixture(scope="module")
def smoothed(transformer: onnx.ModelProto, ranges: dict[str, np.ndarray]):
    return smooth(transformer, ranges, alpha=0.5)


def test_smoothing_keeps_fp32_outputs(transformer, smoothed) -> None:
    model, summary = smoothed
    onnx.checker.check_model(model)
    assert len(summary.groups) == 10 and not summary.skipped
    feed = next(load_dataset(SAMPLES / "digits_seq_eval.npz", transformer).batches(256))
    reference = create_session(transformer).run(None, feed)[0]
    assert relative_max_error(reference, create_session(model).run(None, feed)[0]) <= TOLERANCE


def test_qkv_share_one_scale_and_every_weight_changes(transformer, smoothed) -> None:
    model, summary = smoothed
    before, after = GraphIndex(transformer.graph), GraphIndex(model.graph)
    nodes_after = {n.name: n for n in model.graph.node}
    qkv = next(g for g in summary.groups if len(g.consumers) == 3)
    ratios = []
    for node in transformer.graph.node:
        if node.name in {c for g in summary.groups for c in g.consumers}:
            old, new = before.constant(node.input[1]), after.constant(nodes_after[node.name].input[1])
            assert not np.allclose(old, new), node.name
            if node.name in qkv.consumers:
                ratios.append(new[:, 0] / old[:, 0])
    np.testing.assert_allclose(ratios[0], ratios[1], rtol=1e-5)
    np.testing.assert_allclose(ratios[0], ratios[2], rtol=1e-5)


def test_activation_ranges_get_flatter(transformer, calibration, ranges, smoothed) -> None:
    model, summary = smoothed
    after = collect_channel_absmax(model, calibration, [g.smoothed_input for g in summary.groups], batch_size=64)
    before_ratios = [flatness_ratio(ranges[g.activation]) for g in summary.groups]
    after_ratios = [flatness_ratio(after[g.smoothed_input]) for g in summary.groups]
    worst = int(np.argmax(before_ratios))
    assert after_ratios[worst] < before_ratios[worst]
    assert np.mean(after_ratios) < np.mean(before_ratios)
    # With alpha = 0.5 each channel's range is split evenly: max|X_j / s_j| == max|s_j W_j|.
    for group in summary.groups:
        np.testing.assert_allclose(after[group.smoothed_input], weight_row_absmax(model, group.consumers), rtol=1e-4)


def test_one_mul_is_inserted_per_activation_that_cannot_be_folded(smoothed) -> None:
    model, summary = smoothed
    folded_into_mul = [g for g in summary.groups if g.folded_into.startswith("Mul")]
    assert len(folded_into_mul) == 2  # the GELUs' final Mul by 0.5
    assert len(summary.inserted_muls) == 8
    assert {n.name for n in model.graph.node if n.op_type == "Mul"} >= set(summary.inserted_muls)


def test_channel_absmax_streams_to_the_whole_dataset_result(transformer, calibration) -> None:
    names = ["/layers.0/attention_norm/LayerNormalization_output_0", "input"]
    streamed = collect_channel_absmax(transformer, calibration, names, batch_size=7)
    session = create_session(with_outputs(transformer, names))
    everything = session.run(names, next(calibration.batches(calibration.num_samples)))
    for name, values in zip(names, everything):
        np.testing.assert_array_equal(streamed[name], np.abs(values).reshape(-1, values.shape[-1]).max(axis=0))


def test_unknown_tensor_names_are_refused(transformer, calibration) -> None:
    with pytest.raises(UsageError, match="no tensor named 'nope'"):
        collect_channel_absmax(transformer, calibration, ["nope"])


# ---------------------------------------------------------------------------------------------------
# Tiny graphs


def normalized_matmul(residual: bool, seed: int = 0) -> onnx.ModelProto:
    """x -> LayerNormalization -> MatMul -> y (plus, if `residual`, y2 = LN output + 1)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["y"], name="fc")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])]
    if residual:
        nodes.append(helper.make_node("Add", ["n", "one"], ["y2"], name="residual"))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 6]))
    initializers = {"gamma": rng.uniform(0.5, 8.0, 6), "beta": rng.standard_normal(6),
                    "w": rng.standard_normal((6, 3)), "one": np.ones(1)}
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])], outputs,
                      [numpy_helper.from_array(v.astype(np.float32), k) for k, v in initializers.items()])


@pytest.mark.parametrize(("residual", "folded_into"), [(False, "LayerNormalization 'ln'"), (True, "new Mul")])
def test_layernorm_is_folded_unless_something_else_reads_it(residual: bool, folded_into: str) -> None:
    model = normalized_matmul(residual)
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    ranges = {"n": np.abs(create_session(with_outputs(model, ["n"])).run(["n"], {"x": x})[0]).max(axis=0)}
    smoothed, summary = smooth(model, ranges, alpha=0.5)
    onnx.checker.check_model(smoothed)
    assert summary.groups[0].folded_into.startswith(folded_into)
    assert len(summary.inserted_muls) == int(residual)
    references, outputs = (create_session(m).run(None, {"x": x}) for m in (model, smoothed))
    for reference, output in zip(references, outputs):
        assert relative_max_error(reference, output) <= TOLERANCE


def test_mismatched_ranges_and_alpha_are_refused() -> None:
    model = normalized_matmul(False)
    with pytest.raises(DataError, match="channels"):
        smooth(model, {"n": np.ones(5)})
    with pytest.raises(UsageError, match="alpha"):
        smooth(model, {"n": np.ones(6)}, alpha=1.5)
    _, summary = smooth(model, {"x": np.ones(6)})
    assert summary.skipped == {"x": "feeds no MatMul/Gemm with a constant weight"}
