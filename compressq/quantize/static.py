"""Static int8 quantization: plan, calibrate once, rewrite, then keep only what onnxruntime speeds up.

1. plan the QDQ placement on the cleaned graph (no data needed);
2. one streaming calibration pass for every tensor the plan could need;
3. tensors with inf/NaN/sentinel ranges (attention masks) stay float, and so do the nodes that need them;
4. rewrite, ask onnxruntime's optimizer what it fused, return unfused compute nodes to float;
5. time the result against the input; while it is slower, give back the parts that cost time.
Steps 3-5 re-plan with more nodes kept float; the ranges from step 2 cover every later plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from compressq.calibration import collect_ranges
from compressq.data import Dataset
from compressq.evaluate.latency import time_interleaved
from compressq.graph import check_model, ensure_opset
from compressq.quantize.bias_correction import input_channel_means
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.equalize import equalize, fold_batchnorm
from compressq.quantize.fusion import FusionReport, inspect_fusion
from compressq.quantize.plan import QuantPlan, Skipped, build_plan, name_nodes
from compressq.quantize.prepare import prepare_for_quantization
from compressq.quantize.qdq import RewriteStats, rewrite_qdq
from compressq.quantize.smoothquant import collect_channel_absmax, smooth, smoothable_activations
from compressq.runtime import create_session

QDQ_MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the axis attribute)
SPEED_CHECK_RUNS = 15
SPEED_CHECK_BATCHES = 4
SMALL_LAYER_WEIGHTS = 4096  # below this, a layer's int8 gain rarely pays for its Q/DQ work on CPU


@dataclass
class StaticResult:
    model: onnx.ModelProto
    plan: QuantPlan
    stats: RewriteStats
    fusion: FusionReport | None
    speedup: float | None
    float_reasons: list[Skipped]
    non_finite_tensors: dict[str, str]
    fallback_steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Attempt:
    """One plan rewritten and checked; remembers which nodes were kept float and why."""

    def __init__(self, keep_float: dict[str, str], model, plan, stats, fusion, speedup):
        self.keep_float, self.model, self.plan, self.stats = keep_float, model, plan, stats
        self.fusion, self.speedup = fusion, speedup


def quantize_static(model: onnx.ModelProto, dataset: Dataset, config: QuantizeConfig,
                    progress: Callable[[str, int, int], None] | None = None) -> StaticResult:
    """`progress(stage, done, total)` reports calibration samples and checking steps."""
    prepared, notes = prepare_for_quantization(ensure_opset(model, QDQ_MIN_OPSET))
    prepared = _apply_float_transforms(prepared, dataset, config, notes)
    signed = config.activations == "int8"
    options = dict(exclude=tuple(config.exclude), absorb_activations=not signed,
                   quantize_depthwise=config.quantize_depthwise)
    widest = build_plan(prepared, **options)
    ranges = _calibrate(prepared, widest, dataset, config, progress)
    non_finite = {t: r.describe() for t, r in ranges.items() if not r.finite}
    keep_float = _nodes_needing(prepared, widest, non_finite, "its input/output carries non-finite or sentinel "
                                "values (e.g. an additive attention mask); 8 bits cannot hold them")

    def attempt(keep: dict[str, str]) -> _Attempt:
        plan = build_plan(prepared, keep_float=keep, **options)
        quantized, stats = rewrite_qdq(prepared, plan, ranges, signed_activations=signed,
                                       per_channel=config.per_channel)
        return _Attempt(keep, quantized, plan, stats, None, None)

    current = attempt(keep_float)
    current = _return_unfused_to_float(current, attempt, config)
    steps: list[str] = []
    if config.speed_check and current.plan.compute:
        current = _keep_only_what_is_faster(model, current, attempt, dataset, config, steps, progress)
    if config.bias_correction and current.plan.compute:
        _correct_biases(prepared, current, ranges, dataset, config, signed, notes)
    if not current.plan.compute:
        # Nothing paid off: hand back the user's graph untouched rather than our cleaned copy of it.
        current.model = model
        notes.append("no node was quantized; the output is the input model")
    check_model(current.model)
    float_reasons = current.plan.skipped
    return StaticResult(current.model, current.plan, current.stats, current.fusion, current.speedup,
                        float_reasons, non_finite, steps, notes)


def _apply_float_transforms(prepared: onnx.ModelProto, dataset: Dataset, config: QuantizeConfig,
                            notes: list[str]) -> onnx.ModelProto:
    """Equalization and SmoothQuant: rescalings that leave fp32 outputs unchanged but quantize better."""
    if config.equalize:
        prepared, summary = equalize(fold_batchnorm(prepared))
        notes.append(f"cross-layer equalization on {len(summary.pairs)} layer pairs")
    if config.smoothquant is not None:
        activations = smoothable_activations(prepared)
        absmax = collect_channel_absmax(prepared, dataset, activations, batch_size=config.batch_size,
                                        limit=config.samples)
        prepared, summary = smooth(prepared, absmax, alpha=config.smoothquant)
        notes.append(f"SmoothQuant (alpha {config.smoothquant}) on {len(summary.groups)} activations")
    name_nodes(prepared.graph)
    return prepared


def _correct_biases(prepared, current: _Attempt, ranges, dataset: Dataset, config: QuantizeConfig, signed: bool,
                    notes: list[str]) -> None:
    means = input_channel_means(prepared, current.plan, dataset, batch_size=config.batch_size,
                                samples=config.samples)
    current.model, current.stats = rewrite_qdq(prepared, current.plan, ranges, signed_activations=signed,
                                               per_channel=config.per_channel, input_means=means)
    notes.append(f"bias correction on {current.stats.biases_corrected} layers")


def _calibrate(model, plan: QuantPlan, dataset: Dataset, config: QuantizeConfig, progress):
    total = min(dataset.num_samples, config.samples or dataset.num_samples)
    done = [0]

    def advance(count: int) -> None:
        done[0] += count
        if progress:
            progress("calibrating", done[0], total)

    # Every quantized tensor, not only today's scale-group roots: a later plan with more nodes kept float
    # can split a group, and its tensors must not need a second calibration pass.
    return collect_ranges(model, dataset, plan.quantized_tensors, method=config.method,
                          percentile=config.percentile, batch_size=config.batch_size, samples=config.samples,
                          provider="cpu", progress=advance)


def _nodes_needing(model: onnx.ModelProto, plan: QuantPlan, tensors: dict[str, str], reason: str) -> dict[str, str]:
    """Nodes whose quantization would need any of `tensors` quantized."""
    bad = set(tensors)
    names: dict[str, str] = {}
    for compute in plan.compute.values():
        final = plan.absorbed[compute.output].output if compute.output in plan.absorbed else compute.output
        if compute.activation in bad or final in bad:
            names[compute.name] = reason
    for node in model.graph.node:
        if node.name in plan.own_scale_nodes and (set(node.input) | set(node.output)) & bad:
            names[node.name] = reason
    return names


def _return_unfused_to_float(current: _Attempt, attempt, config: QuantizeConfig) -> _Attempt:
    for _ in range(3):  # each round can only shrink the plan; two rounds settle in practice
        current.fusion = inspect_fusion(current.model, config.provider)
        unfused = {name for name in current.fusion.unfused_compute if name in current.plan.compute}
        if not unfused:
            return current
        keep = dict(current.keep_float)
        keep.update({name: f"onnxruntime ({config.provider}) has no integer kernel for it here" for name in unfused})
        current = attempt(keep)
    current.fusion = inspect_fusion(current.model, config.provider)
    return current


def _speed_feeds(dataset: Dataset, config: QuantizeConfig) -> list[dict]:
    batch = config.latency_batch
    return list(dataset.batches(batch, batch * SPEED_CHECK_BATCHES))


def measure_speedup(baseline: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list[dict], provider: str,
                    runs: int = SPEED_CHECK_RUNS) -> float:
    sessions = {"baseline": create_session(baseline, provider, threads=1),
                "candidate": create_session(candidate, provider, threads=1)}
    stats = time_interleaved(sessions, feeds, runs=runs, warmup=3)
    return stats["baseline"].median_ms / stats["candidate"].median_ms


def _fallback_stages(plan: QuantPlan):
    yield ("Add/Concat/pooling kept float", {n: "quantizing it made the model slower (measured)"
                                             for n in plan.own_scale_nodes})
    yield ("small layers kept float", {name: "too small for int8 to pay off (measured: the model was slower)"
                                       for name, compute in plan.compute.items()
                                       if compute.weight_size < SMALL_LAYER_WEIGHTS})
    yield ("everything kept float", {name: "no int8 variant was faster than float (measured)"
                                     for name in plan.compute})


def _keep_only_what_is_faster(original, current: _Attempt, attempt, dataset, config, steps, progress) -> _Attempt:
    feeds = _speed_feeds(dataset, config)
    current.speedup = measure_speedup(original, current.model, feeds, config.provider)
    if progress:
        progress("checking speed", 1, 1)
    for label, extra in _fallback_stages(current.plan):
        if current.speedup >= 1.0 or not extra:
            continue
        keep = {**current.keep_float, **extra}
        candidate = _return_unfused_to_float(attempt(keep), attempt, config)
        candidate.speedup = measure_speedup(original, candidate.model, feeds, config.provider) \
            if candidate.plan.compute else 1.0
        steps.append(f"{label}: speedup {current.speedup:.2f}x -> {candidate.speedup:.2f}x")
        if candidate.speedup > current.speedup:
            current = candidate
    return current
