"""Sensitivity analysis and the accuracy-driven fallback, on a model with one fragile layer."""

from __future__ import annotations

import dataclasses
import json

import pytest

from compressq.errors import TargetNotMet
from compressq.quantize.api import analyze_sensitivity, quantize_model
from compressq.quantize.config import QuantizeConfig
from tests.conftest import SAMPLES

CONFIG = QuantizeConfig(speed_check=False, per_channel=False)


def test_sensitivity_ranks_the_fragile_layer_worst(fragile):
    model, data, _, _ = fragile
    ranking = analyze_sensitivity(model, data, data, CONFIG)
    assert [r.node for r in ranking][0] == "fc2"
    assert ranking[0].figures.min_cosine < ranking[-1].figures.min_cosine
    assert {r.node for r in ranking} == {"fc1", "fc2", "fc3"}


def test_fallback_returns_the_most_sensitive_node_and_meets_the_target(fragile):
    model, data, _, _ = fragile
    plain = quantize_model(model, data, CONFIG)
    assert "fc2" in plain.summary.quantized_nodes
    result = quantize_model(model, data, QuantizeConfig(speed_check=False, per_channel=False, min_agreement=0.97))
    assert result.summary.returned_to_float[0] == "fc2"
    assert result.summary.accuracy["agreement"] >= 0.97
    assert "fc2" not in result.summary.quantized_nodes and result.summary.quantized_nodes
    assert any("returned to float" in f["reason"] for f in result.summary.float_nodes if f["node"] == "fc2")


def test_impossible_target_fails_with_target_not_met(fragile):
    model, data, _, _ = fragile
    config = QuantizeConfig(speed_check=False, per_channel=False, min_agreement=1.0)
    object.__setattr__(config, "min_agreement", 1.01)  # past validation: the guard inside must still hold
    with pytest.raises(TargetNotMet):
        quantize_model(model, data, config)


def test_max_drop_without_labels_is_a_clear_error(run_cli, fragile, tmp_path):
    _, _, path, data = fragile
    result = run_cli("quantize", path, "-d", data, "--max-drop", "0.5", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "labels" in result.stderr


def test_cli_target_missed_exits_1_and_writes_nothing(run_cli, fragile, tmp_path):
    _, _, path, data = fragile
    result = run_cli("quantize", path, "-d", data, "--min-agreement", "1.0", "--per-tensor", "--no-speed-check",
                     "-o", tmp_path / "o.onnx", "--json")
    # Agreement 1.0 is reachable (everything float at worst), so this must pass, not fail.
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"]["agreement"] == 1.0


def test_cli_sensitivity_json_on_a_sample_model(run_cli):
    result = run_cli("sensitivity", SAMPLES / "digits_cnn.onnx", "-d", SAMPLES / "digits_calib.npz",
                     "--data", SAMPLES / "digits_eval.npz", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["nodes"]
    assert len(rows) == 4 and {"node", "agreement", "min_cosine", "drop_points"} <= set(rows[0])
    cosines = [r["agreement"] for r in rows]
    assert cosines == sorted(cosines)


def test_without_a_target_the_accuracy_cost_is_still_measured_and_warned(run_cli, fragile, tmp_path):
    _, _, path, data = fragile
    result = run_cli("quantize", path, "-d", data, "--per-tensor", "--no-speed-check", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.stderr
    assert "vs fp32 on calibration data" in result.stdout
    assert "WARNING: int8 changed this model's outputs" in result.stderr
    as_json = run_cli("quantize", path, "-d", data, "--per-tensor", "--no-speed-check", "-o", tmp_path / "p.onnx",
                      "--json")
    summary = json.loads(as_json.stdout)
    assert summary["accuracy"]["agreement"] < 0.99 and summary["accuracy_data"].startswith("calibration data")


def test_sensitivity_scores_the_named_task_output_only(run_cli, fragile):
    _, _, path, data = fragile
    result = run_cli("sensitivity", path, "-d", data, "--task-output", "nope")
    assert result.exit_code == 2 and "'nope' is not an output" in result.stderr
    named = run_cli("sensitivity", path, "-d", data, "--task-output", "logits", "--json")
    assert named.exit_code == 0, named.stderr
    rows = json.loads(named.stdout)["nodes"]
    assert all(row["task_outputs"] == ["logits (class scores)"] for row in rows)
    assert rows[0]["node"] == "fc2" and rows[0]["cosine_output"] == "logits (class scores)"


def test_cli_exits_1_when_the_target_is_missed_and_writes_nothing(run_cli, fragile, tmp_path, monkeypatch):
    """The whole fallback path runs; only the measurement is made to say 'never close enough', as an evaluation
    set that disagrees with fp32 itself would. Exit 1 (a target missed), one line, no output file."""
    import compressq.quantize.accuracy as accuracy

    real_measure = accuracy.AccuracyProbe.measure

    def never_close_enough(self, candidate):
        return dataclasses.replace(real_measure(self, candidate), agreement=0.5)

    monkeypatch.setattr(accuracy.AccuracyProbe, "measure", never_close_enough)
    output = tmp_path / "out.onnx"
    result = run_cli("quantize", fragile.model_path, "--calibration-data", fragile.data_path, "--min-agreement", "0.99",
                     "--per-tensor", "--no-speed-check", "-o", output)
    assert result.exit_code == 1, result.stderr
    assert "accuracy target missed" in result.stderr
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "fragile.onnx"]
