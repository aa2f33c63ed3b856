"""Pure numpy quantization arithmetic: scales, zero points, rounding, per-channel weights.

Conventions follow the ONNX QuantizeLinear definition: q = saturate(round_half_even(x / scale) + zero_point).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_RANGE = (-128, 127)
UINT8_RANGE = (0, 255)
# Symmetric weights use [-127, 127] so that negating a weight never saturates (and zero stays exactly zero).
WEIGHT_QMAX = 127
INT32_LIMIT = 2**31 - 1
_TINY = np.float32(1e-12)
# A range narrower than this (a constant or dead activation) still needs a positive float32 scale.
MIN_SCALE = 1e-12


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one tensor (arrays of one element each, or per-channel along `axis`)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype


def activation_params(low: float, high: float, signed: bool) -> QuantParams:
    """uint8 asymmetric (signed=False) or int8 symmetric (signed=True) parameters for a range.

    The range always contains zero so that zero (padding, ReLU floor) is represented exactly.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if signed:
        bound = max(abs(low), abs(high))
        scale = max(bound / 127.0, MIN_SCALE)
        return QuantParams(np.array(scale, np.float32), np.array(0, np.int8))
    scale = max((high - low) / 255.0, MIN_SCALE)
    zero_point = int(np.clip(round(-low / scale), 0, 255))
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, np.uint8))


def weight_params(weight: np.ndarray, axis: int | None) -> QuantParams:
    """Symmetric int8 parameters, per channel along `axis` (None: one scale for the whole tensor)."""
    if axis is None:
        bound = np.float32(max(weight.max(), -weight.min())) if weight.size else np.float32(0)
        scale = np.maximum(bound / WEIGHT_QMAX, _TINY).astype(np.float32)
        return QuantParams(np.array(scale, np.float32), np.array(0, np.int8))
    reduce_axes = tuple(a for a in range(weight.ndim) if a != axis)
    # max(max, -min) rather than max(abs): no temporary the size of the weight (33 MB on a recognizer's head)
    bound = np.maximum(weight.max(axis=reduce_axes), -weight.min(axis=reduce_axes)) if reduce_axes \
        else np.abs(weight)
    scale = np.maximum(bound / WEIGHT_QMAX, _TINY).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, np.int8), axis)


def _broadcast(values: np.ndarray, params: QuantParams, ndim: int) -> np.ndarray:
    if params.axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[params.axis] = values.size
    return values.reshape(shape)


def quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    info = np.iinfo(params.dtype)
    scale = _broadcast(params.scale, params, x.ndim)
    zero_point = _broadcast(params.zero_point.astype(np.int32), params, x.ndim)
    # One float32 temporary, updated in place (integer-valued and clipped: the same codes as float64 sums).
    q = np.asarray(np.divide(x, scale, dtype=np.float32))  # a 0-d input gives a scalar: made an array
    np.rint(q, out=q)
    q += zero_point
    np.clip(q, info.min, info.max, out=q)
    return q.astype(params.dtype)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    scale = _broadcast(params.scale, params, q.ndim)
    zero_point = _broadcast(params.zero_point.astype(np.int32), params, q.ndim)
    return ((q.astype(np.int32) - zero_point) * scale).astype(np.float32)


def bias_params(input_scale: np.ndarray, weight_scale: np.ndarray) -> QuantParams:
    """int32 bias with scale = input scale x weight scale, as integer kernels accumulate it."""
    scale = (np.float32(input_scale) * weight_scale).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, np.int32), 0 if scale.ndim else None)


def quantize_bias(bias: np.ndarray, params: QuantParams) -> np.ndarray | None:
    """int32 bias, or None when it would overflow int32 (the bias then stays float)."""
    q = np.rint(bias.astype(np.float64) / params.scale.astype(np.float64))
    if np.any(np.abs(q) > INT32_LIMIT):
        return None
    return q.astype(np.int32)
