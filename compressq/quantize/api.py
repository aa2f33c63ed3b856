"""One entry point for every quantization mode, returning the model and a summary as plain data."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from compressq.data import Dataset, synthetic_dataset
from compressq.errors import UsageError
from compressq.graph import GraphIndex
from compressq.quantize.accuracy import (
    AccuracyFallback,
    AccuracyProbe,
    AccuracyTarget,
    NodeSensitivity,
    node_sensitivity,
)
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.dynamic import quantize_dynamic
from compressq.quantize.embedding import quantize_embeddings
from compressq.quantize.plan import Skipped
from compressq.quantize.static import StaticQuantizer, measure_speedup, quantize_static
from compressq.runtime import ORT_ERRORS, create_session, with_outputs

MODES = ("static", "dynamic", "weight-only")
SELF_CHECK_SAMPLES = 128
METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class QuantizeSummary:
    mode: str
    method: str | None
    quantized_nodes: list[str]
    float_nodes: list[dict]                  # {"node", "op_type", "reason"}
    calibration_samples: int = 0
    calibration_synthetic: bool = False
    activation_pairs: int = 0
    activations_absorbed: int = 0
    integer_kernels: dict[str, int] = field(default_factory=dict)
    non_finite_tensors: dict[str, str] = field(default_factory=dict)
    speedup: float | None = None             # input median / output median, 1 thread, measured
    latency_batch: int = 1
    weight_bits: int = 8
    speed_steps: list[str] = field(default_factory=list)
    accuracy: dict | None = None             # figures against fp32 (see accuracy_data for which samples)
    accuracy_data: str | None = None
    returned_to_float: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"quantized_node_count": len(self.quantized_nodes), "float_node_count": len(self.float_nodes),
                **asdict(self)}


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    summary: QuantizeSummary


def quantize_model(model: onnx.ModelProto, dataset: Dataset | None, config: QuantizeConfig,
                   progress: Callable[[str, int, int], None] | None = None,
                   eval_dataset: Dataset | None = None) -> QuantizeResult:
    """Quantize `model` (not modified) as `config` says; static mode needs `dataset`.

    With an accuracy target in `config`, `eval_dataset` (default: `dataset`) is what it is measured on.
    """
    started = time.perf_counter()
    if config.mode not in MODES:
        raise UsageError(f"unknown mode '{config.mode}'", hint=f"use one of: {', '.join(MODES)}")
    if config.mode == "static":
        if dataset is None:
            raise UsageError("static quantization needs calibration data",
                             hint="pass --calibration-data DATA, or --mode dynamic")
        result = _static(model, dataset, config, progress, eval_dataset or dataset)
    elif config.mode == "dynamic":
        result = _dynamic(model, config)
    else:
        result = _weight_only(model, dataset, config)
    if config.mode != "static" and config.speed_check and result.summary.quantized_nodes:
        timing_data = dataset if dataset is not None else synthetic_dataset(model, samples=8)
        feeds = list(timing_data.batches(config.latency_batch, config.latency_batch * 4))
        try:
            result.summary.speedup = measure_speedup(model, result.model, feeds, config.provider)
        except ORT_ERRORS as exc:  # synthetic inputs the model rejects: report, do not guess
            result.summary.notes.append(f"speed not checked: the model rejected synthetic inputs "
                                        f"({str(exc).splitlines()[0][:120]}); pass --calibration-data")
        else:
            result.summary.latency_batch = config.latency_batch
            if config.mode == "dynamic" and result.summary.speedup < 1.0:
                result = _undo_slower_dynamic(model, result)
    result.summary.seconds = time.perf_counter() - started
    return result


def _skipped(entries: list[Skipped]) -> list[dict]:
    return [{"node": s.node, "op_type": s.op_type, "reason": s.reason} for s in entries]


def _static(model, dataset: Dataset, config: QuantizeConfig, progress, eval_dataset: Dataset) -> QuantizeResult:
    fallback = None
    if config.max_drop is not None or config.min_agreement is not None:
        target = AccuracyTarget(config.max_drop, config.min_agreement)
        probe = AccuracyProbe(model, eval_dataset)
        target.check(probe)  # before calibration: a target that cannot be measured is a usage error
        fallback = AccuracyFallback(target, probe, progress)
    outcome = quantize_static(model, dataset, config, progress, fallback)
    summary = QuantizeSummary(
        mode="static", method=config.method, quantized_nodes=sorted(outcome.plan.compute),
        float_nodes=_skipped(outcome.float_reasons),
        calibration_samples=min(dataset.num_samples, config.samples or dataset.num_samples),
        calibration_synthetic=dataset.synthetic,
        activation_pairs=outcome.stats.activation_pairs, activations_absorbed=outcome.stats.activations_absorbed,
        integer_kernels=outcome.fusion.integer_kernels if outcome.fusion else {},
        non_finite_tensors=outcome.non_finite_tensors, speedup=outcome.speedup, latency_batch=config.latency_batch,
        speed_steps=outcome.fallback_steps, notes=[*dataset.notes, *outcome.notes],
        returned_to_float=fallback.returned_to_float or [] if fallback else [],
    )
    if fallback and fallback.final_figures:
        summary.accuracy = fallback.final_figures.to_dict()
        summary.accuracy_data = f"evaluation data ({fallback.probe.samples} samples)"
    elif outcome.plan.compute:
        # No target given: still say what int8 cost, measured on calibration samples (never silently worse).
        probe = AccuracyProbe(model, dataset, limit=SELF_CHECK_SAMPLES)
        summary.accuracy = probe.measure(outcome.model).to_dict()
        summary.accuracy_data = f"calibration data ({probe.samples} samples; pass --eval-data for held-out)"
    return QuantizeResult(outcome.model, summary)


def _dynamic(model, config: QuantizeConfig) -> QuantizeResult:
    outcome = quantize_dynamic(model, tuple(config.exclude), config.per_channel)
    quantized, embeddings = quantize_embeddings(outcome.model)
    summary = QuantizeSummary(mode="dynamic", method=None, quantized_nodes=outcome.quantized,
                              float_nodes=_skipped(outcome.skipped))
    if embeddings.tables:
        summary.notes.append(f"{len(embeddings.tables)} embedding tables to uint8 (GatherBlockQuantized)")
    return QuantizeResult(quantized, summary)


def _undo_slower_dynamic(model: onnx.ModelProto, result: QuantizeResult) -> QuantizeResult:
    """Dynamic int8 that runs slower is not worth having: hand back the input, and say why."""
    summary = result.summary
    reason = f"dynamic int8 made the model slower ({summary.speedup:.2f}x, measured)"
    summary.float_nodes = [{"node": n, "op_type": "MatMul/Gemm", "reason": reason} for n in summary.quantized_nodes] \
        + summary.float_nodes
    summary.speed_steps.append(f"everything kept float: speedup {summary.speedup:.2f}x -> 1.00x")
    summary.notes.append("no node was quantized; the output is the input model")
    summary.quantized_nodes = []
    summary.speedup = 1.0
    return QuantizeResult(model, summary)


def _weight_only(model, dataset: Dataset | None, config: QuantizeConfig) -> QuantizeResult:
    from compressq.quantize.weight_only import quantize_weights_only

    calibration = matmul_input_samples(model, dataset, config) if dataset is not None else None
    quantized, outcome = quantize_weights_only(model, bits=config.bits, block_size=config.block_size,
                                               exclude=tuple(config.exclude), calibration=calibration)
    refined = sum(layer.refined for layer in outcome.layers)
    summary = QuantizeSummary(mode="weight-only", method=None, weight_bits=config.bits,
                              quantized_nodes=[layer.node for layer in outcome.layers],
                              float_nodes=[{"node": n, "op_type": "MatMul", "reason": r}
                                           for n, r in outcome.skipped.items()],
                              notes=[f"{config.bits}-bit weights, blocks of {config.block_size}",
                                     f"scales refined against calibration data on {refined} layers"
                                     if calibration else "round-to-nearest scales (no calibration data)"])
    return QuantizeResult(quantized, summary)


def analyze_sensitivity(model: onnx.ModelProto, dataset: Dataset, eval_dataset: Dataset, config: QuantizeConfig,
                        progress: Callable[[str, int, int], None] | None = None) -> list[NodeSensitivity]:
    """Each quantizable node quantized alone, measured against fp32 on `eval_dataset`; worst first."""
    quantizer = StaticQuantizer(model, dataset, config, progress)
    probe = AccuracyProbe(model, eval_dataset)
    return node_sensitivity(quantizer, probe, quantizer.base_keep_float, progress)


WEIGHT_ONLY_ROWS = 4096  # rows of X per MatMul input: enough for a stable Gram matrix, bounded memory


def matmul_input_samples(model: onnx.ModelProto, dataset: Dataset, config: QuantizeConfig) -> dict[str, np.ndarray]:
    """Rows [n, K] of every constant-weight MatMul/Gemm input, at most WEIGHT_ONLY_ROWS each (reservoir)."""
    index = GraphIndex(model.graph)
    names = sorted({n.input[0] for n in model.graph.node
                    if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and index.is_constant(n.input[1])})
    if not names:
        return {}
    session = create_session(with_outputs(model, names))
    rng = np.random.default_rng(0)
    kept: dict[str, np.ndarray] = {}
    for feed in dataset.batches(config.batch_size, config.samples):
        for name, values in zip(names, session.run(names, feed)):
            rows = values.reshape(-1, values.shape[-1])
            pool = rows if name not in kept else np.concatenate([kept[name], rows])
            if len(pool) > WEIGHT_ONLY_ROWS:
                pool = pool[rng.choice(len(pool), WEIGHT_ONLY_ROWS, replace=False)]
            kept[name] = pool
    return kept
