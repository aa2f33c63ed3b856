"""Configs validate themselves: every invalid value is a UsageError naming its option, whoever builds the config
(the CLI or a Python caller), and on the command line one line with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressq.errors import UsageError
from compressq.evaluate.report import GateLimits, ReportConfig
from compressq.prune.config import PruneConfig
from compressq.quantize.config import QuantizeConfig
from tests.conftest import SAMPLES

MODEL = Path("m.onnx")


@pytest.mark.parametrize("options,option", [
    (dict(runs=0), "--runs"), (dict(batch_size=0), "--batch-size"), (dict(samples=0), "--samples"),
    (dict(threads=0), "--threads"), (dict(warmup=-1), "--warmup"), (dict(data_layout="rows"), "--data-layout"),
    (dict(providers=("tpu",)), "provider"),
])
def test_report_config_refuses_bad_values(options, option):
    with pytest.raises(UsageError, match=option):
        ReportConfig(MODEL, (MODEL,), **options)


@pytest.mark.parametrize("gates,option", [
    (dict(min_agreement=1.5), "--min-agreement"), (dict(min_cosine=-2.0), "--min-cosine"),
    (dict(max_accuracy_drop=-1.0), "--max-accuracy-drop"), (dict(min_speedup=float("nan")), "--min-speedup"),
    (dict(max_size_ratio=-0.1), "--max-size-ratio"),
])
def test_gate_limits_refuse_out_of_range_values(gates, option):
    with pytest.raises(UsageError, match=option):
        GateLimits(**gates)


def test_gates_need_a_candidate_and_accuracy_drop_needs_data():
    with pytest.raises(UsageError, match="only one model"):
        ReportConfig(MODEL, gates=GateLimits(min_cosine=0.99))
    with pytest.raises(UsageError, match="labelled data"):
        ReportConfig(MODEL, (MODEL,), gates=GateLimits(max_accuracy_drop=1.0))


def test_a_valid_report_config_is_accepted():
    config = ReportConfig(MODEL, (MODEL,), runs=5, gates=GateLimits(min_cosine=0.99, min_speedup=1.1))
    assert config.gates.requested() == {"min-cosine": 0.99, "min-speedup": 1.1}


@pytest.mark.parametrize("options,words", [
    (dict(method="foo"), "--method"), (dict(activations="foo"), "--activations"), (dict(mode="fast"), "--mode"),
    (dict(samples=0), "samples"), (dict(min_agreement=1.5), "min-agreement"),
])
def test_quantize_config_refuses_bad_values(options, words):
    with pytest.raises(UsageError, match=words):
        QuantizeConfig(**options)


@pytest.mark.parametrize("sparsity,pattern,options,words", [
    (1.5, "unstructured", {}, "--sparsity"), (0.5, "3:2", {}, "--pattern"), (0.5, "unstructured",
                                                                             dict(scope="everywhere"), "--scope"),
    (0.5, "unstructured", dict(criterion="vibes"), "--criterion"),
    (0.5, "unstructured", dict(calibration_samples=0), "--calibration-samples"),
])
def test_prune_config_refuses_bad_values(sparsity, pattern, options, words):
    with pytest.raises(UsageError, match=words):
        PruneConfig.from_options(sparsity, pattern, **options)


@pytest.mark.parametrize("args", [
    ("sensitivity", SAMPLES / "digits_cnn.onnx", "--calibration-data", SAMPLES / "digits_calib.npz", "--method", "x"),
    ("quantize", SAMPLES / "digits_cnn.onnx", "--calibration-data", SAMPLES / "digits_calib.npz", "--activations",
     "x"),
    ("report", SAMPLES / "digits_cnn.onnx", SAMPLES / "digits_cnn.onnx", "--min-agreement", "1.5"),
    ("report", SAMPLES / "digits_cnn.onnx", "--provider", "tpu"),
    ("prune", SAMPLES / "digits_cnn.onnx", "--sparsity", "0.5", "--scope", "x"),
])
def test_cli_bad_values_are_one_line_and_exit_2(run_cli, args):
    result = run_cli(*args)
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")
