"""Weight-only quantization: MatMul weights -> onnxruntime's blocked `com.microsoft::MatMulNBits`.

Activations stay float; each constant weight W [K, N] is cut into blocks of `block_size` values along K
(one row of blocks per output column n), and every block gets its own scale (and, when asymmetric, its
own zero point). MatMulNBits layout (onnxruntime contrib ops, checked against ORT 1.32 in the tests):

  B            uint8 [N, n_blocks, block_size * bits / 8]; 4-bit codes packed low nibble first along K
  scales       float [N, n_blocks]
  zero_points  uint8 [N, ceil(n_blocks * bits / 8)], packed like B; absent = 2^(bits-1) (8 for 4 bits)
  bias         float [N] (input 5; used for Gemm's C)
  dequantized weight = (code - zero_point) * scale; K is zero-padded up to n_blocks * block_size.

Scheme. symmetric=True follows onnxruntime's own symmetric quantizer: the value of largest magnitude
maps to the lowest code (scale = that value / -8, which may be negative), so all 16 codes are used and
no zero points are stored. symmetric=False uses each block's [min, max] (widened to contain 0) with a
4-bit zero point. Measured on the generated BERT weights at block 32 (relative RMS weight error):
symmetric max/7 0.097, symmetric signed-extreme/8 (used) 0.086, asymmetric 0.081 — asymmetric is the
most accurate for 0.125 extra bits per weight; symmetric is the default because it stores no zero
points and onnxruntime's int8-compute kernels (accuracy_level=4) favour it.

Refinement. Given calibration samples X [n, K] for a MatMul's input, each block's scale is shrunk by the
factor in `REFINE_GRID` that minimises that block's contribution to the output error, ||X_b (W_b - Q(W_b))||
(the block-diagonal part of ||X W - X Q(W)||, computed through the Gram matrix X_b^T X_b so memory does
not grow with the samples). 1.0 is in the grid, so no block gets worse than round-to-nearest on that part.

Memory. Candidates carry where their weight is, not its values: each weight is read when its layer is
quantized (memory-mapped when the model's weights are, `io.tensor_array`) and let go after, and a model
loaded with its weights mapped gets each packed weight written to a spill file at once (`io.TensorSink`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import helper

from compressq.errors import DataError, UsageError
from compressq.graph.edit import NameGenerator, remove_unused, share_duplicate_initializers, toposort
from compressq.graph.index import GraphIndex, check_exclude, node_attributes, scopes
from compressq.io import TensorSink, read_mapped_body_weights, tensor_array
from compressq.memory import give_back_freed_memory
from compressq.progress import Progress, Stage
from compressq.quantize.gptq import LayerReport, SampleGrams, block_grid, reconstruct
from compressq.quantize.plan import matches
from compressq.stats.observers import finite_rows

MS_DOMAIN = "com.microsoft"
SUPPORTED_BITS = (4, 8)
WIDE_BITS = 8  # what a layer too sensitive for 4 bits gets (MatMulNBits, the same int8-compute kernel)
MIN_BLOCK_SIZE = 16
REFINE_GRID = np.linspace(0.80, 1.0, 21)
# GPTQ is fitted on 3 of every 4 calibration rows and kept for a layer only where it beats round-to-nearest on
# the 4th (compressq.quantize.gptq.SampleGrams).
GPTQ_HOLD_OUT = 4
MATMUL_NBITS_BIAS_INPUT = 5
# MatMulNBits' accuracy_level 4: activations are quantized to int8 per block inside the kernel and multiplied on
# integer dot products. Measured on the half-gb decoder (one decode step, 1 thread): 3.88x fp32 against 1.54x
# with the default float compute, logits cosine 0.9674 against 0.9676; onnxruntime's quantizer leaves it unset.
INT8_COMPUTE = 4


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class WeightOnlyLayer:
    node: str
    weight: str
    k: int
    n: int
    weight_error: float  # relative RMS error of the dequantized weight
    refined: bool        # scales chosen against calibration data
    bits: int = 4
    # On calibration rows (block-diagonal part of ||X (W - Q(W))||^2, as refinement sees it; None without data):
    output_error: float | None = None         # relative RMS error of the layer's output
    output_error_energy: float | None = None  # squared error of the output, summed over the calibration rows


@dataclass
class WeightOnlySummary:
    bits: int
    block_size: int
    symmetric: bool
    layers: list[WeightOnlyLayer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why it stayed float
    float_weight_bytes: int = 0   # fp32 bytes of the weights that were quantized
    packed_weight_bytes: int = 0  # bytes of their codes + scales + zero points
    reconstruction: dict[str, LayerReport] = field(default_factory=dict)  # node -> GPTQ report (if asked)

    @property
    def compression(self) -> float:
        return self.float_weight_bytes / self.packed_weight_bytes if self.packed_weight_bytes else 1.0


# ---------------------------------------------------------------------------------------------------
# Pure numpy: blocks, rounding, packing


@dataclass(frozen=True)
class BlockQuantized:
    """One weight in MatMulNBits' logical layout, before packing."""

    codes: np.ndarray               # uint8 [N, n_blocks, block_size], values in [0, 2^bits)
    scales: np.ndarray              # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, n_blocks]; None = the implicit 2^(bits-1)
    bits: int
    k: int                          # rows of the original weight (before padding)

    def dequantize(self) -> np.ndarray:
        """The float weight [K, N] that onnxruntime multiplies by."""
        zero = self.zero_points if self.zero_points is not None else np.uint8(2 ** (self.bits - 1))
        offsets = self.codes.astype(np.float32) - np.asarray(zero, np.float32)[..., None]
        blocks = offsets * self.scales[..., None]
        return blocks.reshape(blocks.shape[0], -1)[:, : self.k].T


def weight_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """W [K, N] -> [N, n_blocks, block_size], K zero-padded to a whole number of blocks."""
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n), np.float32)
    padded[:k] = weight
    return padded.T.reshape(n, n_blocks, block_size)


def quantize_blocks(blocks: np.ndarray, bits: int, symmetric: bool,
                    shrink: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest codes, scales and zero points per block; `shrink` (<= 1) narrows each block's
    range (broadcast over [N, n_blocks])."""
    shrink = np.asarray(shrink, np.float32)
    levels = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        positions = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, positions, axis=-1)[..., 0] * shrink
        scales = np.where(extreme == 0, 1.0, extreme / -half).astype(np.float32)
        codes = np.clip(np.rint(blocks / scales[..., None]), -half, half - 1) + half
        return codes.astype(np.uint8), scales, None
    low = np.minimum(blocks.min(axis=-1), 0) * shrink
    high = np.maximum(blocks.max(axis=-1), 0) * shrink
    scales = np.where(high > low, (high - low) / levels, 1.0).astype(np.float32)
    zero_points = np.clip(np.rint(-low / scales), 0, levels)
    codes = np.clip(np.rint(blocks / scales[..., None]) + zero_points[..., None], 0, levels)
    return codes.astype(np.uint8), scales, zero_points.astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis into bytes, low bits first (an odd count is padded with 0)."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes.copy()
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_codes`: the first `count` codes along the last axis."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    pairs = np.stack([packed & 0x0F, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :count]


def block_gram(samples: np.ndarray, block_size: int, n_blocks: int) -> np.ndarray:
    """Per-block Gram matrices X_b^T X_b [n_blocks, block_size, block_size] of samples [n, K]."""
    rows = samples.reshape(-1, samples.shape[-1]).astype(np.float64)
    padded = np.zeros((rows.shape[0], n_blocks * block_size))
    padded[:, : rows.shape[1]] = rows
    per_block = padded.reshape(rows.shape[0], n_blocks, block_size)
    return np.einsum("sbk,sbl->bkl", per_block, per_block)


class BlockGramObserver:
    """The per-block Gram matrices (block_gram) of a MatMul input's rows, summed over the data: a collect()
    observer whose memory does not depend on the number of samples."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.total: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        rows = finite_rows(values)
        gram = block_gram(rows, self.block_size, -(-rows.shape[1] // self.block_size))
        self.total = gram if self.total is None else self.total + gram

    def result(self) -> np.ndarray | None:
        return self.total


def output_error(weight: np.ndarray, quantized: BlockQuantized, block_size: int, samples: np.ndarray | None,
                 gram: np.ndarray | None) -> tuple[float | None, float | None]:
    """(relative RMS error, squared error summed over the rows) of X W's approximation X Q(W) on calibration rows
    (`samples` [n, K] or their block Gram matrices), block-diagonal part: what refinement minimises. Computed a
    group of output columns at a time: the float temporaries of a 1024 x 8192 lm_head stay a few MB."""
    n_blocks = -(-weight.shape[0] // block_size)
    if gram is None and samples is not None:
        gram = block_gram(samples, block_size, n_blocks)
    if gram is None:
        return None, None
    columns = max(1, COLUMN_CHUNK_BYTES // 8 // max(1, n_blocks * block_size))
    error_energy = energy = 0.0
    for start in range(0, weight.shape[1], columns):
        blocks = weight_blocks(weight[:, start:start + columns], block_size).astype(np.float64)
        codes = replace(quantized, codes=quantized.codes[start:start + columns],
                        scales=quantized.scales[start:start + columns],
                        zero_points=None if quantized.zero_points is None
                        else quantized.zero_points[start:start + columns])
        error = blocks - weight_blocks(codes.dequantize(), block_size)
        error_energy += float(np.einsum("nbl,nbl->", np.einsum("nbk,bkl->nbl", error, gram), error))
        energy += float(np.einsum("nbl,nbl->", np.einsum("nbk,bkl->nbl", blocks, gram), blocks))
    return (error_energy / energy) ** 0.5 if energy > 0 else 0.0, error_energy


def refined_shrink(blocks: np.ndarray, gram: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Per-block range factor from REFINE_GRID with the lowest output error on the calibration data.

    The blocks' bounds are found once and the blocks laid out block-row first once: every grid factor then
    rounds and multiplies contiguous arrays (BLAS), with the same codes quantize_blocks would give."""
    layout = np.ascontiguousarray(blocks.transpose(1, 0, 2))  # [n_blocks, N, block_size]
    bounds = _block_bounds(layout, symmetric)
    best_error = np.full(layout.shape[:2], np.inf)
    best_shrink = np.ones(layout.shape[:2], np.float32)
    for factor in REFINE_GRID:
        error = (layout - _rounded(layout, bounds, bits, symmetric, np.float32(factor))).astype(np.float64)
        # numpy's own loop, not BLAS: these [N, 32] x [32, 32] products are too small for BLAS threads, whose
        # spinning on a busy machine made the same step 20x slower (175 s instead of 8.5 s on the half-gb decoder)
        found = np.einsum("bnl,bnl->bn", np.einsum("bnk,bkl->bnl", error, gram), error)
        better = found < best_error
        best_error[better] = found[better]
        best_shrink[better] = factor
    return np.ascontiguousarray(best_shrink.T)


def _block_bounds(blocks: np.ndarray, symmetric: bool) -> tuple[np.ndarray, ...]:
    """Symmetric: each block's value of largest magnitude (sign kept); else its min and max, 0 included."""
    if symmetric:
        positions = np.abs(blocks).argmax(axis=-1)[..., None]
        return (np.take_along_axis(blocks, positions, axis=-1)[..., 0],)
    return np.minimum(blocks.min(axis=-1), 0), np.maximum(blocks.max(axis=-1), 0)


def _rounded(blocks: np.ndarray, bounds: tuple[np.ndarray, ...], bits: int, symmetric: bool,
             shrink: np.float32) -> np.ndarray:
    """The dequantized blocks quantize_blocks(..., shrink) gives, without its integer codes."""
    if symmetric:
        half = 2 ** (bits - 1)
        extreme = bounds[0] * shrink
        scales = np.where(extreme == 0, 1.0, extreme / -half).astype(np.float32)[..., None]
        return np.clip(np.rint(blocks / scales), -half, half - 1) * scales
    levels = 2**bits - 1
    low, high = bounds[0] * shrink, bounds[1] * shrink
    scales = np.where(high > low, (high - low) / levels, 1.0).astype(np.float32)
    zero_points = np.clip(np.rint(-low / scales), 0, levels)[..., None]
    scales = scales[..., None]
    return (np.clip(np.rint(blocks / scales) + zero_points, 0, levels) - zero_points) * scales


def quantize_weight(weight: np.ndarray, bits: int, block_size: int, symmetric: bool,
                    samples: np.ndarray | None = None, gram: np.ndarray | None = None) -> BlockQuantized:
    """Block-quantize W [K, N]; with `samples` [n, K] (or their `gram`, block_gram's [n_blocks, block_size,
    block_size]) the scales are refined against them."""
    blocks = weight_blocks(weight, block_size)
    shrink: np.ndarray | float = 1.0
    if gram is None and samples is not None:
        gram = block_gram(samples, block_size, blocks.shape[1])
    if gram is not None:
        shrink = refined_shrink(blocks, gram, bits, symmetric)
    codes, scales, zero_points = quantize_blocks(blocks, bits, symmetric, shrink)
    return BlockQuantized(codes, scales, zero_points, bits, weight.shape[0])


# ---------------------------------------------------------------------------------------------------
# Graph rewrite


@dataclass(frozen=True)
class _Candidate:
    node: onnx.NodeProto
    weight_name: str
    k: int
    n: int
    weight: onnx.TensorProto | np.ndarray  # as stored: read when the layer is quantized (a Constant's value)
    transposed: bool                        # stored [N, K] (Gemm transB)
    bias: np.ndarray | None                 # [N] (Gemm's beta * C)

    def weight_kn(self) -> np.ndarray:
        """The weight [K, N] float32, read now (a fresh read each call: nothing keeps it)."""
        return self.weight_columns(0, self.n)

    def weight_columns(self, start: int, stop: int) -> np.ndarray:
        """Columns start..stop of the weight [K, N], read now."""
        stored = tensor_array(self.weight) if isinstance(self.weight, onnx.TensorProto) else self.weight
        return np.ascontiguousarray(stored[start:stop].T if self.transposed else stored[:, start:stop])


def quantize_weights_only(
    model: onnx.ModelProto,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    calibration: Mapping[str, np.ndarray] | None = None,
    exclude: Sequence[str] = (),
    *,
    calibration_grams: Mapping[str, np.ndarray] | None = None,
    wide_layers: Collection[str] = (),
    accuracy_level: int | None = INT8_COMPUTE,
    progress: Progress | None = None,
    reconstruction: str = "none",
) -> tuple[onnx.ModelProto, WeightOnlySummary]:
    """Rewrite MatMul (and plain Gemm) nodes with a constant 2-D float32 weight into MatMulNBits.

    `calibration` maps a MatMul's input tensor name to samples [n, K] of it (refines the scales);
    `calibration_grams` maps it to the block Gram matrices of its samples instead (block_gram: what refinement
    needs, a few MB whatever the number of samples; GPTQ needs the samples);
    `exclude` holds glob patterns on node names or op types; `progress(stage, done, total)` counts layers
    (compressq.progress); `reconstruction="gptq"` chooses the codes of calibrated layers by GPTQ error feedback
    (compressq.quantize.gptq) on the same scales; nodes named in `wide_layers` get WIDE_BITS codes instead of
    `bits` (quantize/precision.py chooses them). The input model is not modified.
    """
    _check_settings(bits, block_size)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    summary = WeightOnlySummary(bits, block_size, symmetric)
    check_exclude(graph, tuple(exclude))
    # Every graph, If/Loop/Scan bodies included; a body's packed weights are stored in that body (innermost
    # first, so an outer float weight that only bodies read is dropped from its graph afterwards).
    found = list(reversed(scopes(graph)))
    candidates, home = [], {}
    for scope in found:
        for candidate in _candidates(scope.graph, scope.index(), exclude, summary.skipped):
            candidates.append(candidate)
            home[id(candidate)] = scope.graph
    samples = _calibration_samples(calibration or {}, candidates,
                                   set().union(*(_matmul_inputs(scope.graph) for scope in found)))
    block_grams = _checked_grams(calibration_grams or {}, candidates, block_size,
                                 set().union(*(_matmul_inputs(scope.graph) for scope in found)))
    calibrated = set(samples) | set(block_grams)
    names = NameGenerator(graph)
    sink = TensorSink(model)
    # Tied weights share one packed copy per graph: its inputs and weight error are kept, not its codes
    packed_weights: dict[tuple[int, str, int], tuple[list[str], float]] = {}
    grams = SampleGrams(samples, hold_out=GPTQ_HOLD_OUT)  # computed on first use, once per MatMul input
    readers_left = Counter(candidate.node.input[0] for candidate in candidates)
    stage = Stage(progress, f"quantizing weights to int{bits}", len(candidates))
    for candidate in candidates:
        target = home[id(candidate)]
        layer_bits = WIDE_BITS if candidate.node.name in wide_layers else bits
        key = (id(target), candidate.weight_name, layer_bits)
        errors: tuple[float | None, float | None] = (None, None)
        if key not in packed_weights or candidate.node.input[0] in calibrated:
            if candidate.node.input[0] in calibrated:
                weight_kn, source = candidate.weight_kn(), candidate.node.input[0]
                quantized = quantize_weight(weight_kn, layer_bits, block_size, symmetric, samples.get(source),
                                            block_grams.get(source))
                if reconstruction == "gptq" and candidate.node.input[0] in samples:
                    quantized, summary.reconstruction[candidate.node.name] = _reconstructed(
                        weight_kn, quantized, grams, candidate.node.input[0], block_size)
                readers_left[source] -= 1
                if not readers_left[source]:
                    grams.release(source)
                weight_error = _relative_error(weight_kn, quantized.dequantize())
                errors = output_error(weight_kn, quantized, block_size, samples.get(source), block_grams.get(source))
                del weight_kn
            else:
                quantized, weight_error = _quantized_by_columns(candidate, layer_bits, block_size, symmetric)
            inputs = _add_quantized_initializers(target, names, sink, candidate.weight_name, quantized)
            packed_weights[key] = (inputs, weight_error)
            summary.float_weight_bytes += candidate.k * candidate.n * 4
            summary.packed_weight_bytes += _packed_bytes(quantized)
            del quantized  # one layer's codes at a time
            give_back_freed_memory()  # its float temporaries (GPTQ's: 0.45 GB of heap on the half-gb decoder)
        inputs, weight_error = packed_weights[key]
        summary.layers.append(WeightOnlyLayer(candidate.node.name, candidate.weight_name, candidate.k, candidate.n,
                                              weight_error, candidate.node.input[0] in calibrated, layer_bits,
                                              *errors))
        _replace_with_matmul_nbits(target, names, sink, candidate, inputs, layer_bits, block_size,
                                   accuracy_level)
        stage.advance()
    if summary.layers:
        _import_ms_domain(result)
    for scope in reversed(scopes(graph)):  # float weights a body no longer reads go too
        remove_unused(scope.graph)
    read_mapped_body_weights(result.graph)  # compared by value below
    share_duplicate_initializers(graph)  # two branches reading one outer weight: one packed copy
    toposort(graph)
    return result, summary


COLUMN_CHUNK_BYTES = 32 * 2**20  # float weight columns quantized at a time


def _quantized_by_columns(candidate: _Candidate, bits: int, block_size: int,
                          symmetric: bool) -> tuple[BlockQuantized, float]:
    """`quantize_weight` without calibration, a group of output columns at a time (blocks run along K within one
    column, so the codes are the same), and the weight's relative error: the float temporaries of rounding and
    of the error never hold a whole big weight (a 2048x32000 lm_head: 32 MB of columns instead of 262 MB)."""
    columns = max(1, COLUMN_CHUNK_BYTES // max(1, candidate.k * 4))
    parts, error, norm = [], 0.0, 0.0
    for start in range(0, candidate.n, columns):
        chunk = candidate.weight_columns(start, start + columns)
        part = quantize_weight(chunk, bits, block_size, symmetric)
        error += float(np.square(chunk - part.dequantize(), dtype=np.float64).sum())
        norm += float(np.square(chunk, dtype=np.float64).sum())
        parts.append(part)
        del chunk
    quantized = BlockQuantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                               np.concatenate([p.zero_points for p in parts]) if not symmetric else None,
                               bits, candidate.k)
    return quantized, (error / norm) ** 0.5 if norm else 0.0


def _reconstructed(weight_kn: np.ndarray, quantized: BlockQuantized, grams: SampleGrams, source: str,
                   block_size: int) -> tuple[BlockQuantized, LayerReport]:
    """The same scales and zero points, codes chosen by GPTQ on the layer's calibration rows (kept only where
    they beat round-to-nearest on the rows held out of the fit)."""
    grid = block_grid(quantized.scales, quantized.zero_points, quantized.bits, quantized.k, block_size)
    gram, factor = grams.get(source)
    codes_kn, report = reconstruct(weight_kn, gram, grid, factor, check=grams.check(source))
    if not report.reconstructed:
        return quantized, report
    codes = quantized.codes.copy()  # rows past K (padding) keep their codes
    codes.reshape(codes.shape[0], -1)[:, : quantized.k] = codes_kn.T
    return replace(quantized, codes=codes), report


def _check_settings(bits: int, block_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise UsageError(f"weight-only quantization supports 4 or 8 bits, not {bits}", hint="pass --bits 4 or 8")
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(f"block size {block_size} is not a power of two >= {MIN_BLOCK_SIZE}",
                         hint="use 32, 64 or 128")


def _candidates(graph: onnx.GraphProto, index: GraphIndex, exclude: Sequence[str],
                skipped: dict[str, str]) -> list[_Candidate]:
    found = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
            continue
        if matches(node, tuple(exclude)):
            skipped[node.name] = "excluded"
            continue
        candidate_or_reason = _as_candidate(node, index)
        if isinstance(candidate_or_reason, str):
            skipped[node.name] = candidate_or_reason
        else:
            found.append(candidate_or_reason)
    return found


def _as_candidate(node: onnx.NodeProto, index: GraphIndex) -> _Candidate | str:
    stored = _stored_weight(index, node.input[1])
    if stored is None:
        return "weight is not a constant"
    dtype, dims = _dtype_and_dims(stored)
    if dtype != np.float32 or len(dims) != 2:
        return f"weight is {dtype} with {len(dims)} dims (needs a 2-D float32 weight)"
    if node.op_type == "MatMul":
        return _Candidate(node, node.input[1], dims[0], dims[1], stored, False, None)
    return _gemm_candidate(node, index, stored, dims)


def _stored_weight(index: GraphIndex, name: str) -> onnx.TensorProto | np.ndarray | None:
    """An initializer as its TensorProto (read later, one at a time), a Constant node's value, or None."""
    return index.initializers[name] if name in index.initializers else index.constant(name)


def _dtype_and_dims(stored: onnx.TensorProto | np.ndarray) -> tuple[np.dtype, tuple[int, ...]]:
    if isinstance(stored, np.ndarray):
        return stored.dtype, stored.shape
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(stored.data_type)), tuple(int(d) for d in stored.dims)


def _gemm_candidate(node: onnx.NodeProto, index: GraphIndex, stored: onnx.TensorProto | np.ndarray,
                    dims: tuple[int, ...]) -> _Candidate | str:
    attributes = node_attributes(node)
    if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0:
        return "Gemm with transA or alpha != 1"
    transposed = bool(attributes.get("transB", 0))
    k, n = (dims[1], dims[0]) if transposed else dims
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = _small_constant(index, node.input[2])
        if c is None or c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
            return "Gemm bias is not a constant of N values"
        bias = np.broadcast_to(c.reshape(-1) * attributes.get("beta", 1.0), (n,))
    return _Candidate(node, node.input[1], k, n, stored, transposed,
                      bias.astype(np.float32) if bias is not None else None)


def _small_constant(index: GraphIndex, name: str) -> np.ndarray | None:
    tensor = index.initializers.get(name)
    return np.array(tensor_array(tensor)) if tensor is not None else index.constant(name)


def _matmul_inputs(graph: onnx.GraphProto) -> set[str]:
    return {node.input[0] for node in graph.node if node.op_type in ("MatMul", "Gemm")}


def _checked_grams(grams: Mapping[str, np.ndarray], candidates: list[_Candidate], block_size: int,
                   matmul_inputs: set[str]) -> dict[str, np.ndarray]:
    """The grams of the candidates' inputs; those of MatMuls left float (excluded, not 2-D float32) are unused."""
    widths = {c.node.input[0]: c.k for c in candidates}
    checked = {}
    for name, gram in grams.items():
        if name in matmul_inputs and name not in widths:
            continue
        if name not in widths:
            raise DataError(f"calibration statistics given for '{name}', which feeds no MatMul or Gemm",
                            hint="key them by the MatMul input's tensor name")
        expected = (-(-widths[name] // block_size), block_size, block_size)
        if tuple(gram.shape) != expected:
            raise DataError(f"calibration statistics for '{name}' have shape {tuple(gram.shape)}; blocks of "
                            f"{block_size} over {widths[name]} features need {expected}")
        checked[name] = gram
    return checked


def _calibration_samples(calibration: Mapping[str, np.ndarray], candidates: list[_Candidate],
                         matmul_inputs: set[str]) -> dict[str, np.ndarray]:
    """Samples per quantized MatMul input, as [n, K]; those of excluded or skipped MatMuls are ignored."""
    widths = {c.node.input[0]: c.k for c in candidates}
    samples = {}
    for name, values in calibration.items():
        if name not in matmul_inputs:
            raise DataError(f"calibration samples given for '{name}', which feeds no MatMul or Gemm",
                            hint=f"MatMul inputs: {', '.join(sorted(matmul_inputs)[:5])}")
        if name not in widths:
            continue
        values = np.asarray(values, np.float32)
        if values.shape[-1] != widths[name]:
            raise DataError(f"calibration samples for '{name}' have {values.shape[-1]} features; "
                            f"the MatMul expects {widths[name]}", hint="pass samples of shape [n, K]")
        samples[name] = values.reshape(-1, widths[name])
    return samples


def _add_quantized_initializers(graph: onnx.GraphProto, names: NameGenerator, sink: TensorSink, weight_name: str,
                                quantized: BlockQuantized) -> list[str]:
    bits = quantized.bits
    tensors = [(f"{weight_name}_q{bits}", pack_codes(quantized.codes, bits)),
               (f"{weight_name}_scales", quantized.scales)]
    if quantized.zero_points is not None:
        tensors.append((f"{weight_name}_zero_points", pack_codes(quantized.zero_points, bits)))
    inputs = []
    for base, array in tensors:
        name = names(base)
        graph.initializer.append(sink.tensor(np.ascontiguousarray(array), name))
        inputs.append(name)
    return inputs


def _replace_with_matmul_nbits(graph: onnx.GraphProto, names: NameGenerator, sink: TensorSink,
                               candidate: _Candidate, quantized_inputs: list[str], bits: int, block_size: int,
                               accuracy_level: int | None) -> None:
    node = candidate.node
    inputs = [node.input[0], *quantized_inputs]
    if candidate.bias is not None:
        bias_name = names(f"{candidate.weight_name}_bias")
        graph.initializer.append(sink.tensor(candidate.bias, bias_name))
        inputs += [""] * (MATMUL_NBITS_BIAS_INPUT - len(inputs)) + [bias_name]
    attributes: dict[str, Any] = {"K": candidate.k, "N": candidate.n, "bits": bits, "block_size": block_size}
    if accuracy_level is not None:
        attributes["accuracy_level"] = accuracy_level
    replacement = helper.make_node("MatMulNBits", inputs, list(node.output),
                                   name=names(f"{node.name}_Q{bits}"), domain=MS_DOMAIN, **attributes)
    node.CopyFrom(replacement)  # in place: the node keeps its position in the graph


def _packed_bytes(quantized: BlockQuantized) -> int:
    codes = quantized.codes.size * quantized.bits // 8
    zero_points = pack_codes(quantized.zero_points, quantized.bits).size if quantized.zero_points is not None else 0
    return codes + quantized.scales.nbytes + zero_points


def _relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    norm = float(np.linalg.norm(reference))
    return float(np.linalg.norm(reference - approximation)) / norm if norm else 0.0


def _import_ms_domain(model: onnx.ModelProto) -> None:
    if not any(entry.domain == MS_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
