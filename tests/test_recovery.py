"""The scalable recovery search: one-pass own errors per node (against numpy) and the bisection over them."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from compressq.quantize import scheme
from compressq.quantize.accuracy import AccuracyFallback, AccuracyProbe, AccuracyTarget
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.recovery import node_errors, smallest_count
from compressq.quantize.static import StaticQuantizer
from tests.conftest import write_fragile

CONFIG = QuantizeConfig(speed_check=False, per_channel=False)


@pytest.fixture
def mlp(tmp_path):
    fragile = write_fragile(tmp_path, samples=128, first_activation="Relu")
    return fragile.model, fragile.data


def _fake_quantize(x: np.ndarray, low: float, high: float) -> np.ndarray:
    params = scheme.activation_params(low, high, signed=False)
    return scheme.dequantize(scheme.quantize(x, params), params)


def test_own_error_of_each_node_matches_a_numpy_reference(mlp):
    model, data = mlp
    quantizer = StaticQuantizer(model, data, CONFIG)
    attempt = quantizer.attempt(quantizer.base_keep_float)
    errors = {e.node: e for e in node_errors(quantizer.prepared, attempt.plan, quantizer.ranges, data,
                                             per_channel=False)}
    assert set(errors) == {"fc1", "fc2", "fc3"}

    x = np.concatenate([feed["x"] for feed in data.batches(128)])
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    a1 = np.maximum(x @ weights["w1"], 0)
    a2 = np.tanh(a1 @ weights["w2"])
    inputs = {"fc1": (x, "x", "w1", "a1"), "fc2": (a1, "a1", "w2", "h2"), "fc3": (a2, "a2", "w3", "logits")}
    for node, (activation, activation_name, weight_name, output_name) in inputs.items():
        rng_in = quantizer.ranges[activation_name]
        weight_params = scheme.weight_params(weights[weight_name], None)
        weight = scheme.dequantize(scheme.quantize(weights[weight_name], weight_params), weight_params)
        twin = _fake_quantize(activation, rng_in.low, rng_in.high) @ weight
        reference = activation @ weights[weight_name]
        if node == "fc1":  # Relu absorbed: the quantized output range starts at zero
            twin, reference = np.maximum(twin, 0), np.maximum(reference, 0)
        if output_name in attempt.plan.quantized_tensors:
            out_range = quantizer.ranges[attempt.plan.param_source[output_name]]
            twin = _fake_quantize(twin, out_range.low, out_range.high)
        expected = np.sum((twin - reference) ** 2) / np.sum(reference ** 2)
        assert errors[node].tensor == output_name
        assert errors[node].noise_ratio == pytest.approx(expected, rel=1e-3)
    assert max(errors.values(), key=lambda e: e.noise_ratio).node == "fc2"


@pytest.mark.parametrize("threshold", [1, 2, 7, 37, 64])
def test_smallest_count_finds_the_threshold_in_log_calls(threshold):
    calls = []

    def meets(count: int) -> bool:
        calls.append(count)
        return count >= threshold

    assert smallest_count(meets, 64) == threshold
    assert len(calls) <= 7  # ceil(log2(64)) + 1
    assert 0 not in calls and all(1 <= c <= 64 for c in calls)


def test_bisect_returns_the_fragile_node_and_records_the_search(mlp):
    model, data = mlp
    quantizer = StaticQuantizer(model, data, CONFIG)
    current = quantizer.fused_attempt(quantizer.base_keep_float)
    fallback = AccuracyFallback(AccuracyTarget(min_agreement=0.97), AccuracyProbe(model, data))
    steps: list[str] = []
    result = fallback.enforce(quantizer, current, steps)
    assert fallback.returned_to_float == ["fc2"]
    assert "fc2" not in result.plan.compute and result.plan.compute  # the others stay int8 where they fuse
    assert fallback.final_figures.agreement >= 0.97
    assert [e.node for e in fallback.node_errors][0] == "fc2"
    assert fallback.search and all(step.count >= 1 for step in fallback.search)
    assert fallback.search[-1].met or any(s.met and s.count == 1 for s in fallback.search)


def test_both_searches_meet_the_target_and_bisect_measures_fewer_models(mlp):
    model, data = mlp
    bisect = quantize_model(model, data, QuantizeConfig(speed_check=False, per_channel=False, min_agreement=0.97))
    one_by_one = quantize_model(model, data, QuantizeConfig(speed_check=False, per_channel=False,
                                                            min_agreement=0.97, recovery="one-by-one"))
    assert bisect.summary.accuracy["agreement"] >= 0.97
    assert one_by_one.summary.accuracy["agreement"] >= 0.97
    assert bisect.summary.returned_to_float == one_by_one.summary.returned_to_float == ["fc2"]


def test_unknown_search_is_a_usage_error():
    from compressq.errors import UsageError

    with pytest.raises(UsageError, match="--recovery"):
        QuantizeConfig(recovery="random")
