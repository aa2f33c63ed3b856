"""One entry point for every quantization mode, returning the model and a summary as plain data."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from compressq.data import Dataset, synthetic_dataset
from compressq.errors import DataError, UsageError
from compressq.graph.index import GraphIndex
from compressq.graph.passes import Skip, as_pass, check_if_enabled, run_pass
from compressq.io import holds_mapped_weights, is_mapped, on_disk, read_mapped_tensor, with_weights_read
from compressq.measure.decode import decode_step_feeds
from compressq.measure.speed import measure_speedup, meets
from compressq.memory import give_back_freed_memory
from compressq.progress import Progress
from compressq.quantize import float16
from compressq.quantize.accuracy import (
    AccuracyFallback,
    AccuracyProbe,
    AccuracyTarget,
    NodeSensitivity,
    node_sensitivity,
)
from compressq.quantize.config import METHODS, MODES, QuantizeConfig
from compressq.quantize.dynamic import quantize_dynamic
from compressq.quantize.embedding import quantize_embeddings
from compressq.quantize.gptq import summarize as summarize_reconstruction
from compressq.quantize.plan_file import QuantizationPlan
from compressq.quantize.static import StaticQuantizer, quantize_static
from compressq.runtime import ORT_ERRORS, create_session
from compressq.stats.collect import Request, collect, output_bytes_per_sample, samples_per_run
from compressq.stats.observers import RowReservoir

__all__ = ["METHODS", "MODES", "QuantizeResult", "QuantizeSummary", "analyze_sensitivity", "quantize_model"]

SELF_CHECK_SAMPLES = 128


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
    speedup: float | None = None             # input work / output work, measured as speed_measured_with says
    speed_measured_with: str | None = None
    latency_batch: int = 1
    threads: int = 1
    weight_bits: int = 8
    speed_steps: list[str] = field(default_factory=list)
    accuracy: dict | None = None             # figures against fp32 (see accuracy_data for which samples)
    accuracy_data: str | None = None
    returned_to_float: list[str] = field(default_factory=list)
    speed_decisions: list[dict] = field(default_factory=list)
    plan_reapplied: bool = False
    error_correction: dict = field(default_factory=dict)  # ranges chosen, recovery search (static mode)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"quantized_node_count": len(self.quantized_nodes), "float_node_count": len(self.float_nodes),
                **asdict(self)}


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    summary: QuantizeSummary
    plan: QuantizationPlan | None = None   # static mode: what was decided, for --save-plan and the metadata


def quantize_model(model: onnx.ModelProto, dataset: Dataset | None, config: QuantizeConfig,
                   progress: Callable[[str, int, int], None] | None = None,
                   eval_dataset: Dataset | None = None, pinned: QuantizationPlan | None = None) -> QuantizeResult:
    """Quantize `model` (not modified) as `config` says; static mode needs `dataset` or a `pinned` plan.

    With an accuracy target in `config`, `eval_dataset` (default: `dataset`) is what it is measured on.
    A `pinned` plan (read_plan) is re-applied as it is: no calibration, no timing, the same output bytes.
    An fp16 model is quantized with float32 inside and keeps its fp16 interface (quantize/float16.py).
    A model loaded with its weights mapped (`load_model(read_weights=False)`) is rewritten a weight at a time in
    dynamic and weight-only modes, GPTQ codes included (calibration rows and the speed check come from sessions
    opened on files); static mode and fp16 models read it into memory.
    """
    if holds_mapped_weights(model) and not _streams(model, dataset, config, pinned):
        model = with_weights_read(model)
    if float16.holds_float16(model):
        return float16.quantize_widened(model, lambda wide: _quantize_model(wide, dataset, config, progress,
                                                                           eval_dataset, pinned))
    return _quantize_model(model, dataset, config, progress, eval_dataset, pinned)


def _quantize_model(model: onnx.ModelProto, dataset: Dataset | None, config: QuantizeConfig, progress,
                    eval_dataset: Dataset | None, pinned: QuantizationPlan | None) -> QuantizeResult:
    started = time.perf_counter()
    _check_task_outputs(model, config.task_outputs)
    if pinned is not None:
        result = _replay(model, config, pinned, progress)
    elif config.mode == "static":
        if dataset is None:
            raise UsageError("static quantization needs calibration data",
                             hint="pass --calibration-data DATA, or --mode dynamic")
        result = _static(model, dataset, config, progress, eval_dataset or dataset)
    elif config.mode == "dynamic":
        result = _dynamic(model, config, progress)
    else:
        result = _weight_only(model, dataset, config, progress, eval_dataset or dataset)
    if config.mode != "static" and config.speed_check and result.summary.quantized_nodes:
        timing_data = dataset if dataset is not None else synthetic_dataset(model, samples=8)
        feeds = list(timing_data.batches(config.latency_batch, config.latency_batch * 4))
        try:
            measured, workload = _speedup(model, result.model, feeds, config)
        except ORT_ERRORS as exc:  # synthetic inputs the model rejects: report, do not guess
            result.summary.notes.append(f"speed not checked: the model rejected synthetic inputs "
                                        f"({str(exc).splitlines()[0][:120]}); pass --calibration-data")
        else:
            result.summary.speedup = measured.ratio
            result.summary.speed_measured_with = f"{measured.describe()}{workload}"
            result.summary.latency_batch, result.summary.threads = measured.batch, config.threads
            if config.mode == "dynamic" and not meets(measured.ratio):
                result = _undo_slower_dynamic(model, result)
    check_if_enabled(model, result.model, f"quantize --mode {config.mode}")
    result.summary.seconds = time.perf_counter() - started
    return result


def _speedup(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list, config: QuantizeConfig):
    """measure_speedup, and what workload it timed; mapped models are timed from files written next to their
    weights, not read into memory (onnxruntime holds its own copy of the weights either way)."""
    if not (holds_mapped_weights(model) or holds_mapped_weights(quantized)):
        return _timed(model, quantized, feeds, config)
    with on_disk(model, quantized) as (baseline, candidate):
        return _timed(baseline, candidate, feeds, config)


DECODE_FEED_ERRORS: tuple[type[Exception], ...] = (DataError, *ORT_ERRORS)


def _timed(baseline, candidate, feeds: list, config: QuantizeConfig):
    """A decoder with a KV cache is timed on what generation runs: one new token after the cache its first
    prompt fills (weight-only int4 pays there, on memory-bound matrix-vector products, and not on prefill)."""
    try:
        decode = decode_step_feeds(baseline, feeds[0], config.provider)
    except DECODE_FEED_ERRORS:  # a cache layout we cannot extend: the data's own batches still time it
        decode = None
    measured = measure_speedup(baseline, candidate, decode or feeds, config.provider, threads=config.threads)
    return measured, ", one decode step after the first prompt's KV cache" if decode else ""


def _streams(model: onnx.ModelProto, dataset: Dataset | None, config: QuantizeConfig,
             pinned: QuantizationPlan | None) -> bool:
    """Whether this run can keep the weights on disk: dynamic (its data only times it, from files) or weight-only
    (its calibration rows come from a session opened on files, GPTQ included: it reads one weight at a time), in
    float32."""
    streaming_mode = config.mode in ("dynamic", "weight-only")
    return pinned is None and streaming_mode and not float16.holds_float16(model)


def _check_task_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> None:
    outputs = [o.name for o in model.graph.output]
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise UsageError(f"--task-output '{unknown[0]}' is not an output of this model",
                         hint=f"outputs: {', '.join(outputs)}")


def _skipped(entries: list[Skip]) -> list[dict]:
    return [{"node": s.node, "op_type": s.op_type, "reason": s.reason} for s in entries]


def _static(model, dataset: Dataset, config: QuantizeConfig, progress, eval_dataset: Dataset) -> QuantizeResult:
    fallback = None
    target = accuracy_target(config)
    if target.given:
        probe = AccuracyProbe(model, eval_dataset, task_outputs=config.task_outputs, provider=config.provider)
        target.check(probe)  # before calibration: a target that cannot be measured is a usage error
        fallback = AccuracyFallback(target, probe, progress)
    self_check = self_check_samples(model, dataset, config.provider) \
        if config.accuracy_check and fallback is None else 0
    outcome = quantize_static(model, dataset, config, progress, fallback, reference_samples=self_check)
    summary = _static_summary(outcome, config, dataset)
    summary.returned_to_float = fallback.returned_to_float or [] if fallback else []
    summary.error_correction = {**outcome.error_correction, **({"recovery": fallback.report()} if fallback else {})}
    if fallback and fallback.final_figures:
        summary.accuracy = fallback.final_figures.to_dict()
        summary.accuracy_data = f"evaluation data ({fallback.probe.samples} samples)"
    elif outcome.plan.compute and config.accuracy_check:
        # No target given: still say what int8 cost, measured on calibration samples (never silently worse).
        # Runs as small as calibration's (the same memory budget): onnxruntime's activations would set the peak.
        give_back_freed_memory()  # the speed check's sessions are gone: the fp32 one opened next reuses their room
        probe = AccuracyProbe(model, dataset, limit=self_check, task_outputs=config.task_outputs,
                              batch_size=samples_per_run(model, dataset, config.batch_size),
                              reference_outputs=outcome.reference_outputs, provider=config.provider)
        summary.accuracy = probe.measure(outcome.model).to_dict()
        reused = "; fp32 outputs from the calibration pass" if outcome.reference_outputs is not None else ""
        summary.accuracy_data = (f"calibration data ({probe.samples} samples{reused}; pass --eval-data for "
                                 "held-out)")
    elif outcome.plan.compute:
        summary.notes.append("accuracy against fp32 not measured (--no-accuracy-check)")
    return QuantizeResult(outcome.model, summary, outcome.plan_record)


def _replay(model, config: QuantizeConfig, pinned: QuantizationPlan, progress) -> QuantizeResult:
    outcome = quantize_static(model, None, config, progress, pinned=pinned)
    summary = _static_summary(outcome, config, None)
    summary.plan_reapplied = True
    return QuantizeResult(outcome.model, summary, outcome.plan_record)


def _static_summary(outcome, config: QuantizeConfig, dataset: Dataset | None) -> QuantizeSummary:
    samples = min(dataset.num_samples, config.samples or dataset.num_samples) if dataset is not None else 0
    return QuantizeSummary(
        mode="static", method=config.method, quantized_nodes=sorted(outcome.plan.compute),
        float_nodes=_skipped(outcome.float_reasons),
        calibration_samples=samples, calibration_synthetic=bool(dataset and dataset.synthetic),
        activation_pairs=outcome.stats.activation_pairs, activations_absorbed=outcome.stats.activations_absorbed,
        integer_kernels=outcome.fusion.integer_kernels if outcome.fusion else {},
        non_finite_tensors=outcome.non_finite_tensors, speedup=outcome.speedup,
        speed_measured_with=_speed_how(outcome), latency_batch=config.latency_batch, threads=config.threads,
        speed_steps=outcome.fallback_steps, notes=[*(dataset.notes if dataset else []), *outcome.notes],
        speed_decisions=outcome.plan_record.decisions if outcome.plan_record else [],
    )


def _speed_how(outcome) -> str | None:
    if outcome.speed is not None:
        return outcome.speed.describe()
    if outcome.speedup is not None and not outcome.plan.compute:
        return "output is the input model"
    return None


SELF_CHECK_BUDGET_BYTES = 256 * 2**20  # fp32 outputs and inputs the self-check keeps for its comparison


def self_check_samples(model: onnx.ModelProto, dataset: Dataset, provider: str = "cpu") -> int:
    """How many samples the post-quantize accuracy check keeps, at most SELF_CHECK_SAMPLES, within a budget.

    The fp32 reference outputs are kept for every sample; their size per sample comes from shape inference
    (no fp32 session opened for it: one would hold the weights again), or from one run where shapes depend
    on values.
    """
    feed = dataset.first_sample()
    if feed is None:
        return 0
    outputs = output_bytes_per_sample(model, dataset)
    if outputs is None:
        outputs = sum(np.asarray(v).nbytes for v in create_session(model, provider).run(None, feed))
    per_sample = sum(v.nbytes for v in feed.values()) + outputs
    return int(max(1, min(SELF_CHECK_SAMPLES, SELF_CHECK_BUDGET_BYTES // max(per_sample, 1))))


def _dynamic(model, config: QuantizeConfig, progress: Progress | None = None) -> QuantizeResult:
    outcome = run_pass("dynamic int8", lambda m: quantize_dynamic(m, tuple(config.exclude), config.per_channel,
                                                                  progress), model)
    tables = run_pass("embedding tables to uint8", as_pass(quantize_embeddings), _gather_tables_read(outcome.model))
    quantized, embeddings = tables.model, tables.details
    summary = QuantizeSummary(mode="dynamic", method=None, quantized_nodes=outcome.modified,
                              float_nodes=_skipped(outcome.skipped))
    if embeddings.tables:
        summary.notes.append(f"{len(embeddings.tables)} embedding tables to uint8 (GatherBlockQuantized)")
    elif not outcome.modified:  # nothing changed: the caller gets its own model back (written as it came)
        return QuantizeResult(model, summary)
    return QuantizeResult(quantized, summary)


def _gather_tables_read(model: onnx.ModelProto) -> onnx.ModelProto:
    """The tables embedding.py may quantize (plain Gather tables of one reader), read into `model` (the pass's own
    copy) when they are mapped: that pass reads initializers in memory. One table, the only weight read whole."""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    tables = {node.input[0] for node in model.graph.node if node.op_type == "Gather" and readers[node.input[0]] == 1}
    for tensor in model.graph.initializer:
        if tensor.name in tables and is_mapped(tensor):
            read_mapped_tensor(tensor)
    return model


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


# 8-bit layers of a mixed-precision run: one scale per 128 weights (8.25 bits a weight, not 9 at blocks of 32), their
# error still far below the 4-bit layers' (int8's step is 16x finer)
WIDE_BLOCK_SIZE = 128


def accuracy_target(config: QuantizeConfig) -> AccuracyTarget:
    return AccuracyTarget(config.max_drop, config.min_agreement, config.min_cosine)


def _weight_only(model, dataset: Dataset | None, config: QuantizeConfig,
                 progress: Progress | None = None, eval_dataset: Dataset | None = None) -> QuantizeResult:
    from compressq.quantize.weight_only import quantize_weights_only

    if config.weight_reconstruction != "none" and dataset is None:
        raise UsageError(f"--weight-reconstruction {config.weight_reconstruction} needs calibration data",
                         hint="pass --calibration-data DATA")
    # GPTQ needs the rows themselves; refining scales needs only each block's Gram matrix, summed over every row
    # (memory independent of the samples: a 512-row reservoir per MatMul input held 0.19 GB on the half-gb decoder)
    gptq = config.weight_reconstruction != "none"
    calibration = matmul_input_samples(model, dataset, config) if dataset is not None and gptq else None
    grams = matmul_input_grams(model, dataset, config) if dataset is not None and not gptq else None
    rewrite = as_pass(lambda m: quantize_weights_only(m, bits=config.bits, block_size=config.block_size,
                                                      exclude=tuple(config.exclude), calibration=calibration,
                                                      calibration_grams=grams,
                                                      reconstruction=config.weight_reconstruction, progress=progress),
                      lambda report: report.skipped)
    done = run_pass(f"int{config.bits} weight-only", rewrite, model)
    quantized, outcome = done.model, done.details
    refined = sum(layer.refined for layer in outcome.layers)
    summary = QuantizeSummary(mode="weight-only", method=None, weight_bits=config.bits,
                              quantized_nodes=[layer.node for layer in outcome.layers],
                              float_nodes=[{"node": n, "op_type": "MatMul", "reason": r}
                                           for n, r in outcome.skipped.items()],
                              notes=[f"{config.bits}-bit weights, blocks of {config.block_size}",
                                     f"scales refined against calibration data on {refined} layers"
                                     if dataset is not None else "round-to-nearest scales (no calibration data)"])
    if config.weight_reconstruction != "none":
        report = summarize_reconstruction(outcome.reconstruction)
        summary.error_correction["weights"] = report
        summary.notes.append(f"GPTQ weight codes on {report['layers_reconstructed']} of {len(outcome.layers)} "
                             "layers (mean relative output error on held-out calibration rows "
                             f"{report['mean_error_before']:.3g} -> {report['mean_error_after']:.3g})")
    if accuracy_target(config).given and outcome.layers:
        quantized = _widened_until_met(model, quantized, outcome, eval_dataset, config, summary, progress)
    return QuantizeResult(quantized if outcome.layers else model, summary)  # nothing quantized: the input itself


def _widened_until_met(model: onnx.ModelProto, quantized: onnx.ModelProto, outcome, dataset: Dataset | None,
                       config: QuantizeConfig, summary: QuantizeSummary, progress) -> onnx.ModelProto:
    """The 4-bit rewrite with its most sensitive layers at 8 bits until the accuracy target is met, measured."""
    from compressq.quantize.precision import Layer, widen_until_met
    from compressq.quantize.weight_only import quantize_weights_only

    if dataset is None:
        raise UsageError("an accuracy target needs data to measure it on", hint="pass --calibration-data DATA")
    target = accuracy_target(config)
    probe = AccuracyProbe(model, dataset, task_outputs=config.task_outputs, provider=config.provider)
    target.check(probe)
    wide, _ = quantize_weights_only(model, bits=8, block_size=max(config.block_size, WIDE_BLOCK_SIZE),
                                    exclude=tuple(config.exclude), progress=progress)
    produced = {node.name: node.output[0] for node in model.graph.node if node.output}
    layers = [Layer(layer.node, produced[layer.node], layer.k * layer.n, layer.output_error_energy or 0.0)
              for layer in outcome.layers if layer.node in produced]  # main graph only: bodies stay 4-bit
    mixed, report = widen_until_met(quantized, wide, layers, probe, target, progress)
    summary.error_correction["precision"] = report.to_dict()
    summary.accuracy, summary.accuracy_data = report.after, f"evaluation data ({probe.samples} samples)"
    summary.notes.append(f"{len(report.wide_layers)} of {len(outcome.layers)} layers at 8 bits to meet the "
                         f"target: {report.target} ({report.candidates_measured} candidates measured)")
    return mixed


def analyze_sensitivity(model: onnx.ModelProto, dataset: Dataset, eval_dataset: Dataset, config: QuantizeConfig,
                        progress: Callable[[str, int, int], None] | None = None) -> list[NodeSensitivity]:
    """Each quantizable node quantized alone, measured against fp32 on `eval_dataset`; worst first."""
    if float16.holds_float16(model):  # ranked as quantize would do it: float32 inside, fp16 interface
        model = float16.widen(model)[0]
    quantizer = StaticQuantizer(model, dataset, config, progress)
    probe = AccuracyProbe(model, eval_dataset, task_outputs=config.task_outputs, provider=config.provider)
    return node_sensitivity(quantizer, probe, quantizer.base_keep_float, progress)


WEIGHT_ONLY_ROWS = 4096  # rows of X per MatMul input: enough for a stable Gram matrix, bounded memory


def matmul_input_samples(model: onnx.ModelProto, dataset: Dataset, config: QuantizeConfig) -> dict[str, np.ndarray]:
    """Rows [n, K] of every constant-weight MatMul/Gemm input, at most WEIGHT_ONLY_ROWS each (reservoir)."""
    return _over_matmul_inputs(model, dataset, config, lambda: RowReservoir(WEIGHT_ONLY_ROWS, np.random.default_rng(0)))


def matmul_input_grams(model: onnx.ModelProto, dataset: Dataset, config: QuantizeConfig) -> dict[str, np.ndarray]:
    """Per-block Gram matrices (weight_only.block_gram, blocks of config.block_size) of every constant-weight
    MatMul/Gemm input, summed over every row of the data."""
    from compressq.quantize.weight_only import BlockGramObserver

    return _over_matmul_inputs(model, dataset, config, lambda: BlockGramObserver(config.block_size))


def _over_matmul_inputs(model: onnx.ModelProto, dataset: Dataset, config: QuantizeConfig, observer):
    """One collect() pass over the data with an `observer()` on every constant-weight MatMul/Gemm input: all of
    them fetched from one session (a mapped model runs from its files), a run of as many samples as fit the
    budget together (a decoder's 71 inputs at 8 x 64 tokens weigh 0.2 GB)."""
    index = GraphIndex(model.graph)
    names = sorted({n.input[0] for n in model.graph.node
                    if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and index.is_constant(n.input[1])})
    observers = {name: observer() for name in names}
    collect(model, dataset, [Request(name, o) for name, o in observers.items()], provider=config.provider,
            batch_size=config.batch_size, samples=config.samples, one_pass=True)
    # The session's weights are freed but stay in the heap: on the half-gb decoder 0.45 GB of it, under every
    # weight quantized next (GPTQ's peak 0.92 GiB with it, 1.92x the model)
    give_back_freed_memory()
    return {name: found for name, o in observers.items() if (found := o.result()) is not None}
