"""Bias correction: remove the mean output shift that rounding weights to int8 adds to each layer.

For a linear layer, the expected output error of quantized weights is E[(W_q - W) x] = (W_q - W) E[x]:
it depends only on the weight error and the per-channel mean of the layer's input. One pass of the float
model over the calibration data gives those means (a running mean per channel, memory flat); the shift is
subtracted from the layer's bias before the bias is quantized. Measuring the input means on the float
model keeps layers independent: correcting one layer never double-counts another's correction.
(Zero padding at image borders makes the Conv estimate slightly approximate there.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from compressq.data import Dataset
from compressq.quantize.plan import ComputeNode, QuantPlan
from compressq.runtime import create_session, with_outputs


class _ChannelMean:
    """Running mean per channel (axis 1 for Conv outputs, the last axis otherwise)."""

    def __init__(self, axis: int):
        self.axis = axis
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        axis = self.axis if self.axis >= 0 else values.ndim + self.axis
        moved = np.moveaxis(values, axis, -1).reshape(-1, values.shape[axis]).astype(np.float64)
        self.total = moved.sum(axis=0) if self.total is None else self.total + moved.sum(axis=0)
        self.count += moved.shape[0]

    def result(self) -> np.ndarray:
        return self.total / max(self.count, 1)


def input_channel_means(
    reference: onnx.ModelProto,
    plan: QuantPlan,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    samples: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per quantized node with a bias: the mean of its float input per input channel."""
    nodes = {name: c for name, c in plan.compute.items() if c.bias is not None}
    tensors = sorted({c.activation for c in nodes.values()})
    if not tensors:
        return {}
    session = create_session(with_outputs(reference, tensors))
    axis_of = {c.activation: 1 if c.op_type == "Conv" else -1 for c in nodes.values()}
    means = {t: _ChannelMean(axis_of[t]) for t in tensors}
    for feed in dataset.batches(batch_size, samples):
        for tensor, values in zip(tensors, session.run(tensors, feed)):
            means[tensor].update(values)
        if progress:
            progress(next(iter(feed.values())).shape[0])
    return {name: means[c.activation].result() for name, c in nodes.items()}


def weight_error_shift(compute: ComputeNode, weight: np.ndarray, quantized_weight: np.ndarray,
                       input_mean: np.ndarray, group: int = 1) -> np.ndarray:
    """(W_q - W) E[x] per output channel, for Conv (any group count), Gemm and MatMul weights."""
    error = quantized_weight.astype(np.float64) - weight.astype(np.float64)
    if compute.op_type == "Conv":
        out_channels, in_per_group = error.shape[:2]
        per_input = error.reshape(out_channels, in_per_group, -1).sum(axis=2)
        outputs_per_group = out_channels // group
        channel = (np.arange(out_channels) // outputs_per_group)[:, None] * in_per_group + np.arange(in_per_group)
        return (per_input * input_mean[channel]).sum(axis=1)
    if compute.weight_axis == 0:  # Gemm with transB: weight [N, K]
        return error @ input_mean
    return input_mean @ error  # MatMul / Gemm weight [K, N]
