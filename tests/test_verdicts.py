"""Verdicts on the right output: tiny models whose task lives in one output (or one slice of it).

- a YOLOv8-style stacked head [batch, 4 + N, anchors] whose class scores are rounded away by one scale
  sized by the box coordinates, while the whole output's cosine stays near 1;
- a scikit-learn-style classifier (int64 `label` + float `probabilities`);
- an LSTM whose hidden state is fed back as an input;
- a model whose outputs are all NaN.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from compressq.cli.app import app
from compressq.cli.views.quantize import _accuracy_text
from compressq.data import load_dataset
from compressq.measure import metrics
from compressq.quantize.accuracy import AccuracyProbe, AccuracyTarget
from tests.conftest import make_model

CLASSES, ANCHORS, SAMPLES = 6, 160, 32
FAST = ["--runs", "2", "--warmup", "0"]


def invoke(*args):
    return CliRunner().invoke(app, ["report", *map(str, args)])


def gate_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("GATE FAILED")]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- a YOLOv8-style stacked detector head ----------------------------------------------------------


def detector(box_scale: float | None) -> onnx.ModelProto:
    """output0 = images (the head's values), optionally through one uint8 scale sized by box coordinates."""
    channels = 4 + CLASSES
    shape = ["batch", channels, ANCHORS]
    if box_scale is None:
        nodes, inits = [helper.make_node("Identity", ["images"], ["output0"], name="head")], []
    else:
        nodes = [helper.make_node("QuantizeLinear", ["images", "scale", "zero"], ["q"], name="quantize"),
                 helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["output0"], name="dequantize")]
        inits = [numpy_helper.from_array(np.array(box_scale, np.float32), "scale"),
                 numpy_helper.from_array(np.array(0, np.uint8), "zero")]
    return make_model(nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("output0", TensorProto.FLOAT, shape)], inits)


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("yolo")
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 640, (SAMPLES, 4, ANCHORS))
    scores = rng.uniform(0, 1, (SAMPLES, CLASSES, ANCHORS))
    images = np.concatenate([boxes, scores], axis=1).astype(np.float32)
    np.savez(folder / "data.npz", images=images)
    baseline = save(detector(None), folder / "yolo.onnx")
    damaged = save(detector(640 / 255), folder / "yolo.int8.onnx")
    return baseline, damaged, folder / "data.npz", images


def test_yolo_damage_hidden_by_the_whole_output_is_found_in_the_class_slice(yolo):
    baseline, damaged, data, images = yolo
    result = invoke(baseline, damaged, "--data", data, "--min-cosine", "0.99", "--json", *FAST)
    assert result.exit_code == 1, result.output
    rounded = np.clip(np.round(images / (640 / 255)), 0, 255) * (640 / 255)
    whole = metrics.cosine_similarity(images, rounded)
    class_slice = metrics.cosine_similarity(images[:, 4:], rounded[:, 4:])
    assert whole > 0.999 and class_slice < 0.9  # the measured fact the verdict must not hide
    [line] = gate_lines(result.stderr)
    assert line == f"GATE FAILED: min-cosine {class_slice:.6g} < 0.99 on output0[4:10] (class scores)"
    [output] = json.loads(result.stdout)["candidates"][0]["outputs"]
    assert output["role"] == "detector head" and output["top1_agreement"] is None
    assert output["cosine"] == pytest.approx(whole)
    assert [s["label"] for s in output["slices"]] == ["output0[0:4]", "output0[4:10]"]
    assert output["slices"][1]["cosine"] == pytest.approx(class_slice)


def test_yolo_table_never_shows_a_top1_agreement_and_names_the_worst_slice(yolo):
    baseline, damaged, data, _ = yolo
    result = invoke(baseline, damaged, "--data", data, *FAST)
    assert result.exit_code == 0, result.output
    assert "no gates set" in result.stdout
    assert "worst cosine" in result.stdout and "on output0[4:10] (class scores)" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "output0" in line and line.startswith("│")]
    assert len(rows) == 3  # the whole output and its two slices
    assert all("%" not in row for row in rows)  # no top-1 agreement figure for a detector


def test_yolo_quantize_probe_names_the_class_slice(yolo):
    baseline, damaged, data, _ = yolo
    model = onnx.load(str(baseline))
    probe = AccuracyProbe(model, load_dataset(data, model))
    figures = probe.measure(onnx.load(str(damaged)))
    assert figures.agreement is None
    assert figures.cosine_output == "output0[4:10] (class scores)" and figures.min_cosine < 0.9
    text = _accuracy_text(figures.to_dict())
    assert "agreement" not in text and "min cosine" in text and "output0[4:10] (class scores)" in text


def test_min_agreement_on_a_detector_is_a_usage_error_naming_what_is_scored(yolo):
    baseline, damaged, data, _ = yolo
    result = invoke(baseline, damaged, "--data", data, "--min-agreement", "0.9", *FAST)
    assert result.exit_code == 2
    assert "output0 (detector head)" in result.stderr
    model = onnx.load(str(baseline))
    probe = AccuracyProbe(model, load_dataset(data, model))
    with pytest.raises(Exception, match="--min-agreement needs class scores"):
        AccuracyTarget(min_agreement=0.9).check(probe)


# --- a scikit-learn-style classifier ---------------------------------------------------------------


def sklearn_like(weight: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["input", "W"], ["scores"], name="linear"),
             helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1, name="softmax"),
             helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0, name="argmax")]
    return make_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                      [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
                       helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
                      [numpy_helper.from_array(weight, "W")])


@pytest.fixture(scope="module")
def sklearn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sklearn")
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    moved = (weight + rng.normal(size=(4, 3)) * 0.03).astype(np.float32)
    inputs = rng.normal(size=(512, 4)).astype(np.float32)
    labels = (inputs @ weight).argmax(1)
    np.savez(folder / "data.npz", input=inputs, labels=labels)
    baseline = save(sklearn_like(weight), folder / "model.onnx")
    candidate = save(sklearn_like(moved), folder / "model.int8.onnx")
    return baseline, candidate, folder / "data.npz", inputs, weight, moved


def test_sklearn_label_output_does_not_fail_a_cosine_gate(sklearn):
    baseline, candidate, data, inputs, weight, moved = sklearn
    labels, moved_labels = (inputs @ weight).argmax(1), (inputs @ moved).argmax(1)
    assert 0 < np.mean(labels != moved_labels) < 0.05
    assert metrics.cosine_similarity(labels, moved_labels) < 0.999  # what the old rule failed on
    result = invoke(baseline, candidate, "--data", data, "--min-cosine", "0.999", "--json", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    [gate] = report["gates"]
    assert gate["on"] == "probabilities (class scores)" and gate["passed"]
    outputs = {o["output"]: o for o in report["candidates"][0]["outputs"]}
    assert outputs["label"]["cosine"] is None and outputs["label"]["role"] == "labels"
    assert outputs["label"]["exact_match"] == pytest.approx(np.mean(labels == moved_labels))
    assert outputs["probabilities"]["top1_agreement"] == pytest.approx(np.mean(labels == moved_labels))


def test_sklearn_min_agreement_scores_labels_by_exact_match(sklearn):
    baseline, candidate, data, inputs, weight, moved = sklearn
    agreement = np.mean((inputs @ weight).argmax(1) == (inputs @ moved).argmax(1))
    result = invoke(baseline, candidate, "--data", data, "--min-agreement", "0.9999", *FAST)
    assert result.exit_code == 1
    [line] = gate_lines(result.stderr)
    assert line.startswith(f"GATE FAILED: min-agreement {agreement:.6g} < 0.9999 on ")
    assert line.endswith("(class scores)") or line.endswith("label (labels)")


def test_sklearn_accuracy_is_read_from_the_task_output_in_report_and_quantize(sklearn):
    baseline, candidate, data, inputs, weight, moved = sklearn
    truth = (inputs @ weight).argmax(1)
    report = json.loads(invoke(baseline, candidate, "--data", data, "--json", *FAST).stdout)
    assert report["candidates"][0]["accuracy"]["top1"] == pytest.approx(np.mean((inputs @ moved).argmax(1) == truth))
    model = onnx.load(str(baseline))
    probe = AccuracyProbe(model, load_dataset(data, model))
    figures = probe.measure(onnx.load(str(candidate)))
    assert probe.reference_accuracy == 1.0
    assert figures.accuracy == pytest.approx(report["candidates"][0]["accuracy"]["top1"])
    assert set(figures.task_outputs) == {"label (labels)", "probabilities (class scores)"}


def test_task_output_option_chooses_what_the_gates_score(sklearn):
    baseline, candidate, data, *_ = sklearn
    result = invoke(baseline, candidate, "--data", data, "--task-output", "label", "--min-cosine", "0.5", *FAST)
    assert result.exit_code == 2
    assert "label (labels)" in result.stderr
    result = invoke(baseline, candidate, "--data", data, "--task-output", "nope", *FAST)
    assert result.exit_code == 2 and "'nope' is not an output" in result.stderr
    probe_model = onnx.load(str(baseline))
    probe = AccuracyProbe(probe_model, load_dataset(data, probe_model), task_outputs=("probabilities",))
    assert probe.measure(onnx.load(str(candidate))).task_outputs == ("probabilities (class scores)",)


# --- an LSTM whose state is fed back ---------------------------------------------------------------

HIDDEN = 8


def lstm(seed: int) -> onnx.ModelProto:
    """Batch-first interface around ONNX LSTM: logits from the last state, and the state (hn, cn) out."""
    rng = np.random.default_rng(seed)
    weights = {"W": rng.normal(size=(1, 4 * HIDDEN, 3)) * 0.5, "R": rng.normal(size=(1, 4 * HIDDEN, HIDDEN)) * 0.5,
               "Wy": rng.normal(size=(HIDDEN, 5))}
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["h0"], ["h0_t"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["c0"], ["c0_t"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["x_t", "W", "R", "", "", "h0_t", "c0_t"], ["y", "hn_t", "cn_t"],
                         hidden_size=HIDDEN, name="lstm"),
        helper.make_node("Transpose", ["hn_t"], ["hn"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["cn_t"], ["cn"], perm=[1, 0, 2]),
        helper.make_node("Squeeze", ["hn", "axis1"], ["last"]),
        helper.make_node("MatMul", ["last", "Wy"], ["logits"]),
    ]
    state = ["batch", 1, HIDDEN]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 3]),
              helper.make_tensor_value_info("h0", TensorProto.FLOAT, state),
              helper.make_tensor_value_info("c0", TensorProto.FLOAT, state)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5]),
               helper.make_tensor_value_info("hn", TensorProto.FLOAT, state),
               helper.make_tensor_value_info("cn", TensorProto.FLOAT, state)]
    inits = [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()]
    return make_model(nodes, inputs, outputs, [*inits, numpy_helper.from_array(np.array([1]), "axis1")])


def test_lstm_hidden_state_is_never_scored_by_argmax(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(64, 5, 3)).astype(np.float32),
             h0=rng.normal(size=(64, 1, HIDDEN)).astype(np.float32),
             c0=rng.normal(size=(64, 1, HIDDEN)).astype(np.float32))
    baseline, candidate = save(lstm(0), tmp_path / "lstm.onnx"), save(lstm(1), tmp_path / "lstm.other.onnx")
    result = invoke(baseline, candidate, "--data", tmp_path / "data.npz", "--json", *FAST)
    assert result.exit_code == 0, result.output
    outputs = {o["output"]: o for o in json.loads(result.stdout)["candidates"][0]["outputs"]}
    for state in ("hn", "cn"):
        assert outputs[state]["role"] == "recurrent state"
        assert outputs[state]["top1_agreement"] is None and outputs[state]["cosine"] is not None
        assert outputs[state]["task"] is False
    assert outputs["logits"]["task"] is True and outputs["logits"]["top1_agreement"] is not None
    assert "on logits (class scores)" in result.stderr  # the verdict line names what it scored


# --- NaN outputs, NaN thresholds, no gates, formats -------------------------------------------------


def all_nan() -> onnx.ModelProto:
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["n"]),
             helper.make_node("Sub", ["n", "one"], ["m"]), helper.make_node("Sqrt", ["m"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                      [numpy_helper.from_array(np.array(1.0, np.float32), "one")])


@pytest.mark.parametrize("output_format", ["table", "json", "markdown"])
def test_all_nan_outputs_are_their_own_failed_verdict(tmp_path, output_format):
    path = save(all_nan(), tmp_path / "nan.onnx")
    other = save(all_nan(), tmp_path / "nan2.onnx")
    result = invoke(path, other, "--format", output_format, *FAST)
    assert result.exit_code == 1, result.output
    assert gate_lines(result.stderr) == ["GATE FAILED: finite-outputs: 256 NaN or infinite values on y (class scores)"]
    if output_format == "json":
        [output] = json.loads(result.stdout)["candidates"][0]["outputs"]
        assert output["non_finite"] == 256 and output["sqnr_db"] is None and output["max_abs_error"] is None
    else:
        assert "not finite" in result.stdout and "200.0" not in result.stdout


@pytest.mark.parametrize("option", ["--min-speedup", "--min-cosine", "--max-size-ratio", "--min-agreement",
                                    "--max-accuracy-drop"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_thresholds_are_usage_errors(yolo, option, value):
    baseline, damaged, data, _ = yolo
    result = invoke(baseline, damaged, "--data", data, option, value, *FAST)
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert f"{option} must be a finite number" in line


def test_report_without_gates_says_so_with_the_headline(sklearn):
    baseline, candidate, data, *_ = sklearn
    result = invoke(baseline, candidate, "--data", data, "--format", "json", *FAST)
    assert result.exit_code == 0
    [verdict] = [line for line in result.stderr.splitlines() if "no gates set" in line]
    assert "size 1.00x" in verdict and "speedup" in verdict and "top-1 drop" in verdict
    assert "probabilities (class scores)" in verdict
    single = invoke(baseline, "--format", "json", *FAST)
    assert "no gates set" in single.stderr


def test_json_flag_is_an_alias_of_format_json(sklearn):
    baseline, candidate, data, *_ = sklearn
    result = invoke(baseline, candidate, "--data", data, "--json", *FAST)
    assert result.exit_code == 0 and json.loads(result.stdout)["schema"] == "compressq.report/1"
    clash = invoke(baseline, candidate, "--json", "--format", "html", *FAST)
    assert clash.exit_code == 2 and "two formats" in clash.stderr


def scripted() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["<script>alert(1)</script>"], name="<script>n</script>"),
             helper.make_node("Relu", ["<script>alert(1)</script>"], ["logits"], name="relu")]
    weight = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
                      [numpy_helper.from_array(weight, "W")])


@pytest.mark.parametrize("output_format", ["markdown", "html"])
def test_names_from_the_model_are_escaped(tmp_path, output_format):
    path = save(scripted(), tmp_path / "m.onnx")
    model = scripted()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(model.graph.initializer[0]) * 1.1, "W"))
    other = save(model, tmp_path / "m2.onnx")
    result = invoke(path, other, "--per-layer", "--format", output_format, *FAST)
    assert result.exit_code == 0, result.output
    assert "<script" not in result.stdout
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in result.stdout


@pytest.mark.parametrize("output_format", ["markdown", "html"])
def test_reports_open_with_a_verdict_and_explain_every_metric(sklearn, output_format):
    baseline, candidate, data, *_ = sklearn
    result = invoke(baseline, candidate, "--data", data, "--min-cosine", "0.5", "--format", output_format, *FAST)
    assert result.exit_code == 0, result.output
    page = result.stdout
    verdict_at = page.index("Verdict:")
    assert verdict_at < page.index("Size") and "passed the one gate" in page[verdict_at:verdict_at + 200]
    for metric in ("cosine", "SQNR dB", "top-1 agreement", "max abs error", "speedup"):
        assert any(f"{metric}</dt>" in line or f"**{metric}**" in line for line in page.splitlines()), metric
    if output_format == "html":
        assert "SQNR vs the baseline (dB)" in page and "latency per run (ms)" in page
