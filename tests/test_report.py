"""`compressq report`: gates and exit codes, schema keys, data wording, formats, per-layer, providers."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

import sample_models
from compressq.cli.app import app
from compressq.evaluate.report import (
    SCHEMA,
    GateLimits,
    ReportConfig,
    build_report,
    gzip_size,
    quantized_node_counts,
)

SAMPLES = Path(sample_models.__file__).resolve().parent
CNN = SAMPLES / "digits_cnn.onnx"
EVAL = SAMPLES / "digits_eval.npz"
FAST = ["--runs", "3", "--warmup", "1"]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def invoke(*args: str | Path):
    return CliRunner().invoke(app, ["report", *map(str, args)])


def gate_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("GATE FAILED")]


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> Path:
    """The baseline with one convolution's weights scaled by 1.5: clearly, but not wildly, different."""
    model = onnx.load(str(CNN))
    weight = next(t for t in model.graph.initializer if t.name == "onnx::Conv_32")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    path = tmp_path_factory.mktemp("scaled") / "digits_cnn.scaled.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def dynamic_int8(tmp_path_factory) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    path = tmp_path_factory.mktemp("dynamic") / "digits_cnn.int8.onnx"
    quantize_dynamic(str(CNN), str(path))
    return path


@pytest.fixture(scope="module")
def scaled_json(scaled) -> dict:
    result = invoke(CNN, scaled, "--data", EVAL, "--format", "json", "--per-layer", "--min-cosine", "0.5", *FAST)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- gates and exit codes ---------------------------------------------------------------------------


def test_scaled_weight_fails_a_tight_cosine_gate_with_one_line(scaled):
    result = invoke(CNN, scaled, "--min-cosine", "0.9999", *FAST)
    assert result.exit_code == 1
    lines = gate_lines(result.stderr)
    assert len(lines) == 1
    assert re.fullmatch(r"GATE FAILED: min-cosine 0\.9\d+ < 0\.9999 on logits \(class scores\)", lines[0])


def test_scaled_weight_passes_a_loose_cosine_gate(scaled):
    result = invoke(CNN, scaled, "--min-cosine", "0.9", "--max-size-ratio", "1.01", *FAST)
    assert result.exit_code == 0, result.output
    assert gate_lines(result.stderr) == []


def test_every_failed_gate_gets_its_own_line(scaled):
    result = invoke(CNN, scaled, "--data", EVAL, "--min-cosine", "0.9999", "--max-size-ratio", "0.5",
                    "--max-accuracy-drop", "100", *FAST)
    assert result.exit_code == 1
    assert [line.split()[2] for line in gate_lines(result.stderr)] == ["min-cosine", "max-size-ratio"]
    assert gate_lines(result.stderr)[1].endswith("> 0.5 on file size")


def test_several_candidates_name_the_one_that_failed(scaled):
    result = invoke(CNN, CNN, scaled, "--min-cosine", "0.9999", *FAST)
    assert result.exit_code == 1
    [line] = gate_lines(result.stderr)
    assert line.startswith(f"GATE FAILED: min-cosine[{scaled.name}] 0.9")


@pytest.mark.parametrize("args, message", [
    (["--min-cosine", "0.9"], "only one model"),
    ([CNN, "--max-accuracy-drop", "1"], "needs labelled data"),
    ([CNN, "--data", EVAL, "--labels", "nope"], "no labels array 'nope'"),
    ([CNN, "--data", SAMPLES / "digits_calib.npz", "--max-accuracy-drop", "1"], "has no 'labels' array"),
    ([CNN, "--provider", "tpu"], "unknown provider"),
    ([CNN, "--format", "yaml"], ""),
])
def test_usage_errors_exit_2(args, message):
    result = invoke(CNN, *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_json_lists_every_gate_with_its_verdict(scaled):
    result = invoke(CNN, scaled, "--format", "json", "--min-cosine", "0.9999", "--max-size-ratio", "2", *FAST)
    assert result.exit_code == 1
    report = json.loads(result.stdout)  # stdout holds JSON only: the gate line went to stderr
    gates = {gate["gate"]: gate for gate in report["gates"]}
    assert set(gates) == {"min-cosine", "max-size-ratio"}
    assert gates["min-cosine"]["passed"] is False and gates["min-cosine"]["limit"] == 0.9999
    assert gates["max-size-ratio"]["passed"] is True and gates["max-size-ratio"]["measured"] == pytest.approx(1.0)
    assert report["passed"] is False


# --- schema ------------------------------------------------------------------------------------------


def test_schema_keys_are_stable(scaled_json):
    report = scaled_json
    assert report["schema"] == SCHEMA == "compressq.report/1"
    assert set(report) == {"schema", "compressq_version", "data", "settings", "baseline", "candidates", "gates",
                           "passed"}
    assert set(report["data"]) == {"source", "kind", "synthetic", "samples", "labels", "notes"}
    assert set(report["settings"]) == {"providers", "accuracy_provider", "threads", "runs", "warmup", "batch_size",
                                       "samples", "per_layer", "task_outputs"}
    assert set(report["baseline"]) == {"name", "facts", "accuracy", "latency"}
    assert set(report["baseline"]["facts"]) == {"path", "file_bytes", "gzip_bytes", "parameters", "zero_fraction",
                                                "weighted_nodes", "quantized_nodes", "quantized_share"}
    assert set(report["baseline"]["accuracy"]) == {"data", "output", "samples", "top1", "top5"}
    assert set(report["baseline"]["latency"][0]) == {"provider", "batch_size", "median_ms", "p90_ms", "mean_ms",
                                                     "throughput_per_s", "samples_ms"}
    [candidate] = report["candidates"]
    assert set(candidate) == {"name", "facts", "accuracy", "latency", "size_ratio", "gzip_ratio",
                              "accuracy_drop_points", "outputs", "per_layer", "per_layer_skipped", "speedup"}
    assert set(candidate["outputs"][0]) == {"output", "data", "samples", "top1_agreement", "cosine", "sqnr_db",
                                            "max_abs_error", "role", "task", "metric", "exact_match", "non_finite",
                                            "slices"}
    assert set(candidate["per_layer"][0]) == {"tensor", "op_type", "candidate_tensor", "cosine", "sqnr_db",
                                              "max_abs_error"}
    assert set(candidate["speedup"][0]) == {"provider", "ratio", "ratio_q1", "ratio_q3", "work_ratio",
                                            "work_measured_with"}
    assert set(report["gates"][0]) == {"gate", "candidate", "measured", "limit", "passed", "on"}


def test_accuracy_matches_a_direct_onnxruntime_run(scaled, scaled_json):
    data = np.load(EVAL)

    def top1(path: Path) -> float:
        logits = ort.InferenceSession(str(path)).run(None, {"input": data["input"]})[0]
        return float(np.mean(logits.argmax(1) == data["labels"]))

    baseline, [candidate] = scaled_json["baseline"], scaled_json["candidates"]
    assert baseline["accuracy"]["top1"] == pytest.approx(top1(CNN))
    assert candidate["accuracy"]["top1"] == pytest.approx(top1(scaled))
    assert candidate["accuracy_drop_points"] == pytest.approx((top1(CNN) - top1(scaled)) * 100)
    assert baseline["accuracy"]["samples"] == len(data["labels"])


# --- synthetic vs real data wording ------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["table", "markdown", "json"])
def test_synthetic_inputs_are_named_as_such(scaled, output_format):
    result = invoke(CNN, scaled, "--format", output_format, *FAST)
    assert result.exit_code == 0, result.output
    assert "synthetic inputs" in result.stdout
    if output_format == "json":
        report = json.loads(result.stdout)
        assert report["data"]["kind"] == "synthetic inputs" and report["data"]["synthetic"] is True
        assert all(o["data"] == "synthetic inputs" for o in report["candidates"][0]["outputs"])
        assert report["baseline"]["accuracy"] is None
    else:
        assert "real data" not in result.stdout
        agreement_rows = [line for line in result.stdout.splitlines() if "logits" in line]
        assert agreement_rows and all("synthetic inputs" in row for row in agreement_rows)


@pytest.mark.parametrize("output_format", ["table", "markdown", "json"])
def test_real_data_is_named_as_such(scaled, output_format):
    result = invoke(CNN, scaled, "--data", EVAL, "--format", output_format, *FAST)
    assert result.exit_code == 0, result.output
    assert "real data" in result.stdout
    assert "synthetic" not in result.stdout.replace('"synthetic": false', "")


# --- formats and --output ----------------------------------------------------------------------------


def test_html_is_one_self_contained_file_with_charts(scaled, tmp_path):
    target = tmp_path / "report.html"
    result = invoke(CNN, scaled, "--data", EVAL, "--per-layer", "--format", "html", "--output", target, *FAST)
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp file left behind
    page = target.read_text()
    assert page.count("<svg") == 3  # per-output error, per-layer error, latency distribution
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert result.stdout == ""


def test_json_output_file_is_written_and_stdout_stays_empty(scaled, tmp_path):
    target = tmp_path / "report.json"
    result = invoke(CNN, scaled, "--format", "json", "-o", target, *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text())["schema"] == SCHEMA
    assert result.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_output_may_not_replace_a_model(scaled):
    result = invoke(CNN, scaled, "--output", scaled, *FAST)
    assert result.exit_code == 2
    assert "refusing to overwrite" in result.stderr


def test_one_model_reports_size_and_latency_only():
    result = invoke(CNN, "--format", "json", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["candidates"] == [] and report["gates"] == [] and report["passed"] is True
    assert report["baseline"]["latency"][0]["median_ms"] > 0


# --- per-layer ---------------------------------------------------------------------------------------


def test_per_layer_errors_are_matched_by_name_and_sorted_worst_first(dynamic_int8):
    report = build_report(ReportConfig(CNN, (dynamic_int8,), data=EVAL, per_layer=True, runs=2, warmup=0))
    [candidate] = report.candidates
    layers = candidate.per_layer
    baseline_tensors = {name for node in onnx.load(str(CNN)).graph.node for name in node.output}
    assert layers and all(layer.tensor in baseline_tensors for layer in layers)
    assert [layer.sqnr_db for layer in layers] == sorted(layer.sqnr_db for layer in layers)
    assert all(0.99 < layer.cosine <= 1.0 for layer in layers)


def test_per_layer_reads_the_dequantized_tensor_of_a_qdq_candidate(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": np.load(SAMPLES / "digits_calib.npz")["input"][:32]}])

        def get_next(self):
            return next(self.feeds, None)

    path = tmp_path / "digits_cnn.qdq.onnx"
    quantize_static(str(CNN), str(path), Reader(), quant_format=QuantFormat.QDQ)
    report = build_report(ReportConfig(CNN, (path,), data=EVAL, per_layer=True, runs=2, warmup=0, samples=128))
    [candidate] = report.candidates
    assert candidate.facts.quantized_share == 1.0
    read_through_dequantize = [layer for layer in candidate.per_layer if layer.candidate_tensor != layer.tensor]
    assert read_through_dequantize
    # ReLU outputs that the quantizer folded into QuantizeLinear still match closely once dequantized
    assert all(layer.sqnr_db > 15 for layer in candidate.per_layer)


# --- size facts --------------------------------------------------------------------------------------


def test_quantized_share_counts_integer_ops(dynamic_int8):
    assert quantized_node_counts(onnx.load(str(CNN))) == (4, 0)
    assert quantized_node_counts(onnx.load(str(dynamic_int8))) == (4, 4)


def test_gzip_size_is_what_gzip_produces():
    expected = len(gzip.compress(CNN.read_bytes(), compresslevel=6, mtime=0))
    assert abs(gzip_size(CNN) - expected) <= 32  # gzip headers may differ by a file name field


def test_gates_can_be_evaluated_without_the_cli(scaled):
    report = build_report(ReportConfig(CNN, (scaled,), runs=2, warmup=0, gates=GateLimits(min_cosine=0.9999)))
    assert not report.passed
    assert report.failed_gates[0].failure_line().startswith("GATE FAILED: min-cosine 0.9")


# --- providers ---------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="CUDAExecutionProvider is available here")
def test_cuda_without_the_provider_is_one_clear_line():
    result = invoke(CNN, "--provider", "cuda", *FAST)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDAExecutionProvider is not available" in lines[0]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_is_timed_next_to_cpu(dynamic_int8):
    result = invoke(CNN, dynamic_int8, "--provider", "cpu", "--provider", "cuda", "--format", "json", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["provider"] for r in report["baseline"]["latency"]] == ["cpu", "cuda"]
    assert [s["provider"] for s in report["candidates"][0]["speedup"]] == ["cpu", "cuda"]


# --- the HTML in a real browser ----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(scaled, tmp_path):
    image = pytest.importorskip("PIL.Image")
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    result = invoke(CNN, scaled, "--data", EVAL, "--per-layer", "--format", "html", "-o", page, *FAST)
    assert result.exit_code == 0, result.output
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,3000", f"--screenshot={shot}",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = image.open(shot).convert("RGB")
    colors = {color for _, color in pixels.getcolors(maxcolors=1 << 20)}
    assert (0x4A, 0x7A, 0xB5) in colors  # the SQNR bars were drawn
    assert (0xF5, 0xF8, 0xFC) in colors  # the verdict box at the top
    assert len(colors) > 50  # text, tables and charts, not a blank or error page
