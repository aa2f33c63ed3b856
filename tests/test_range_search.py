"""`--method auto`: per tensor, the candidate range with the least error at its consumers (numpy reference)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import load_dataset
from compressq.quantize import scheme
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.plan import build_plan
from compressq.quantize.plan_file import read_plan
from compressq.quantize.range_search import choose_ranges
from compressq.stats.collect import collect_range_candidates


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 32)).astype(np.float32)
    w2 = rng.normal(size=(32, 4)).astype(np.float32) * 0.2
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(512, 8)).astype(np.float32)
    x[3] *= 60.0  # one outlier sample: min-max would spend the 8 bits on it
    np.savez(tmp_path / "data.npz", x=x)
    return load_dataset(tmp_path / "data.npz", _model())


def _fake(values: np.ndarray, low: float, high: float) -> np.ndarray:
    params = scheme.activation_params(low, high, signed=False)
    return scheme.dequantize(scheme.quantize(values, params), params)


def test_each_candidate_is_scored_by_its_consumers_output_error(data):
    model = _model()
    plan = build_plan(model)
    candidates = collect_range_candidates(model, data, plan.quantized_tensors, batch_size=64)
    ranges, choices = choose_ranges(model, plan, candidates, data, batch_size=64)

    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x = np.concatenate([feed["x"] for feed in data.batches(512)])
    h = x @ weights["w1"]
    for tensor, values, weight in (("x", x, weights["w1"]), ("h", h, weights["w2"])):
        choice = choices[tensor]
        assert choice.judged_on == (("fc1",) if tensor == "x" else ("fc2",))
        reference = values @ weight
        for label, candidate in candidates[tensor].items():
            if label not in choice.errors:  # a duplicate range of another candidate: measured once
                continue
            expected = np.sum((_fake(values, candidate.low, candidate.high) @ weight - reference) ** 2) \
                / np.sum(reference ** 2)
            assert choice.errors[label] == pytest.approx(expected, rel=2e-3)
        assert choice.method == min(choice.errors, key=choice.errors.get)
        assert ranges[tensor] == candidates[tensor][choice.method]
    # The outlier makes min-max the worst choice for x.
    assert choices["x"].method != "minmax"
    assert choices["x"].errors["minmax"] > choices["x"].errors[choices["x"].method]


def test_auto_is_reported_and_its_ranges_replay_byte_identically(data, tmp_path):
    model = _model()
    result = quantize_model(model, data, QuantizeConfig(method="auto", speed_check=False))
    chosen = result.summary.error_correction["ranges"]["chosen"]
    assert set(chosen) >= {"x"} and chosen["x"]["method"] in ("p99.999", "p99.99", "mse")
    assert any("ranges chosen by the error" in note for note in result.summary.notes)
    path = tmp_path / "plan.json"
    path.write_text(result.plan.to_json())
    replayed = quantize_model(model, None, QuantizeConfig(method="auto", speed_check=False),
                              pinned=read_plan(path))
    assert replayed.model.SerializeToString() == result.model.SerializeToString()


def test_auto_beats_minmax_on_the_outlier_model(data):
    model = _model()
    x = np.concatenate([feed["x"] for feed in data.batches(512)])
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    reference = x @ weights["w1"] @ weights["w2"]
    from compressq.runtime import create_session

    def error(method: str) -> float:
        quantized = quantize_model(model, data, QuantizeConfig(method=method, speed_check=False)).model
        return float(np.mean((create_session(quantized).run(None, {"x": x})[0] - reference) ** 2))

    assert error("auto") < error("minmax")
