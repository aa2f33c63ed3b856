"""Bias correction: the shift formula against a brute-force reference, and its effect on a real model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compressq.data import load_dataset
from compressq.quantize.api import quantize_model
from compressq.quantize.bias_correction import weight_error_shift
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.plan import ComputeNode
from compressq.runtime import create_session
from tests.conftest import SAMPLES


def _conv_node(weight_axis: int = 0) -> ComputeNode:
    return ComputeNode("c", "Conv", "x", "w", weight_axis, "b", "y")


@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_shift_equals_mean_output_difference_on_constant_channels(group):
    rng = np.random.default_rng(group)
    out_channels, in_channels = 4, 4
    weight = rng.normal(size=(out_channels, in_channels // group, 3, 3))
    error = rng.normal(scale=0.01, size=weight.shape)
    input_mean = rng.normal(size=in_channels)
    # With every pixel of channel i equal to mean_i and no padding, each output pixel of the
    # difference convolution is sum over (i, kh, kw) of error * mean_i within the group.
    expected = np.zeros(out_channels)
    per_group_out = out_channels // group
    for o in range(out_channels):
        first_input = (o // per_group_out) * (in_channels // group)
        for i in range(in_channels // group):
            expected[o] += error[o, i].sum() * input_mean[first_input + i]
    shift = weight_error_shift(_conv_node(), weight, weight + error, input_mean, group)
    np.testing.assert_allclose(shift, expected, rtol=1e-10)


def test_matmul_and_transposed_gemm_shift():
    rng = np.random.default_rng(0)
    weight, error, mean = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)), rng.normal(size=6)
    matmul = ComputeNode("m", "MatMul", "x", "w", 1, "b", "y")
    np.testing.assert_allclose(weight_error_shift(matmul, weight, weight + error, mean), mean @ error)
    gemm_t = ComputeNode("g", "Gemm", "x", "w", 0, "b", "y")
    np.testing.assert_allclose(weight_error_shift(gemm_t, weight.T, (weight + error).T, mean), mean @ error)


def test_bias_correction_reduces_the_mean_output_error_of_the_mobilenet():
    model = onnx.load(str(SAMPLES / "digits_mobilenet.onnx"))
    calibration = load_dataset(SAMPLES / "digits_calib.npz", model)
    evaluation = load_dataset(SAMPLES / "digits_eval.npz", model)
    reference = np.concatenate([create_session(model).run(None, f)[0] for f in evaluation.batches(256)])

    def mean_error(correct: bool) -> float:
        config = QuantizeConfig(speed_check=False, per_channel=False, bias_correction=correct)
        quantized = quantize_model(model, calibration, config).model
        outputs = np.concatenate([create_session(quantized).run(None, f)[0] for f in evaluation.batches(256)])
        return float(np.abs((outputs - reference).mean(axis=0)).mean())

    assert mean_error(True) < 0.8 * mean_error(False)
