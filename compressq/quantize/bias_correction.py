"""Bias correction: remove the mean output shift that rounding weights to int8 adds to each layer.

For a linear layer, the expected output error of quantized weights is E[(W_q - W) x] = (W_q - W) E[x]:
it depends only on the weight error and the per-channel mean of the layer's input. One pass of the float
model over the calibration data gives those means (per-channel sums reduced inside the graph, memory flat;
a calibration pass carries them along: `mean_observers`); the shift is
subtracted from the layer's bias before the bias is quantized. Measuring the input means on the float
model keeps layers independent: correcting one layer never double-counts another's correction.
(Zero padding at image borders makes the Conv estimate slightly approximate there.)
"""

from __future__ import annotations

import numpy as np

from compressq.quantize.plan import ComputeNode, QuantPlan
from compressq.stats.observers import ChannelMeanObserver


def mean_observers(plan: QuantPlan) -> dict[str, ChannelMeanObserver]:
    """One running channel mean per input tensor of a quantized node with a bias (axis 1 for Conv inputs,
    the last axis otherwise): requests a calibration pass can carry along (compressq.stats.collect)."""
    nodes = [c for c in plan.compute.values() if c.bias is not None]
    return {c.activation: ChannelMeanObserver(1 if c.op_type == "Conv" else -1)
            for c in sorted(nodes, key=lambda c: c.name)}


def node_means(plan: QuantPlan, observers: dict[str, ChannelMeanObserver]) -> dict[str, np.ndarray]:
    """Per quantized node of `plan` with a bias: the mean of its float input per input channel."""
    means: dict[str, np.ndarray] = {}
    for name, compute in plan.compute.items():
        observer = observers.get(compute.activation)
        mean = observer.result() if observer is not None and compute.bias is not None else None
        if mean is not None:
            means[name] = mean
    return means


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
