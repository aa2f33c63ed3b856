"""Static int8 quantization: plan, calibrate once, rewrite, then keep only what onnxruntime speeds up.

1. clean the graph (BatchNorm folding) and apply the float rescalings asked for (equalization, SmoothQuant);
2. plan the QDQ placement (no data needed) and run one streaming calibration pass for every tensor the
   widest plan could need;
3. tensors with inf/NaN/sentinel ranges (attention masks) stay float, and so do the nodes that need them;
4. rewrite, ask onnxruntime's optimizer what it fused, return unfused compute nodes to float;
5. time the result against the input; while it is slower, give back the parts that cost time;
6. with an accuracy target, return the most sensitive nodes to float until the target is met.
Every later plan keeps more nodes float than the widest one, so the ranges from step 2 serve them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from compressq.data import Dataset
from compressq.errors import UsageError
from compressq.graph.edit import ensure_opset, name_nodes
from compressq.graph.index import all_nodes
from compressq.graph.passes import Skip, as_pass, run_pass
from compressq.io import check_model
from compressq.measure.speed import (
    FASTER_ENOUGH,
    SpeedCheck,
    SpeedMeasurement,
    clearly_faster,
    convincing,
    meets,
)
from compressq.memory import give_back_freed_memory
from compressq.quantize.bias_correction import mean_observers, node_means
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.embedding import quantize_embeddings
from compressq.quantize.equalize import equalize, fold_batchnorm
from compressq.quantize.fusion import FusionReport, inspect_fusion
from compressq.quantize.gptq import WeightCodes, static_weight_codes
from compressq.quantize.gptq import summarize as summarize_reconstruction
from compressq.quantize.outliers import SplitSummary, split_outliers
from compressq.quantize.plan import QuantPlan, build_plan
from compressq.quantize.plan_file import QuantizationPlan, model_sha256
from compressq.quantize.prepare import prepare_for_quantization
from compressq.quantize.qdq import RewriteStats, rewrite_qdq
from compressq.quantize.range_search import RangeChoice, choose_ranges
from compressq.quantize.range_search import summarize as summarize_choices
from compressq.quantize.smoothquant import collect_channel_absmax, smooth, smoothable_activations
from compressq.stats.collect import Request, TensorRange, collect_range_candidates, collect_ranges, passes_for_method
from compressq.stats.observers import FirstRowsObserver, MinMaxObserver
from compressq.stats.subgraphs import split_by_scope

__all__ = ["FASTER_ENOUGH", "StaticQuantizer", "quantize_static"]

QDQ_MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the axis attribute)
SPEED_CHECK_BATCHES = 4
# When int8 loses at the serving batch, it is timed once at this batch too, to tell the user if batches pay.
LARGER_BATCH = 32
LARGER_BATCH_GAIN = 1.1
# Below these, a layer's int8 gain rarely pays for its Q/DQ work on CPU (bench/FINDINGS.md: stem convs on
# 1-3 input channels run at 0.33-0.56x of float as int8).
SMALL_LAYER_WEIGHTS = 4096
SMALL_REDUCTION = 64
RANGE_SEARCH_SAMPLES = 64  # calibration samples `--method auto` judges candidate ranges on
NON_FINITE_REASON = ("its input/output carries non-finite or sentinel values (e.g. an additive attention "
                     "mask); 8 bits cannot hold them")

Progress = Callable[[str, int, int], None]


@dataclass
class Attempt:
    """One plan rewritten into a model; `keep_float` says which nodes were held back and why."""

    keep_float: dict[str, str]
    model: onnx.ModelProto
    plan: QuantPlan
    stats: RewriteStats
    fusion: FusionReport | None = None
    speedup: float | None = None
    speed: SpeedMeasurement | None = None


@dataclass
class StaticResult:
    model: onnx.ModelProto
    plan: QuantPlan
    stats: RewriteStats
    fusion: FusionReport | None
    speedup: float | None
    float_reasons: list[Skip]
    non_finite_tensors: dict[str, str]
    fallback_steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    speed: SpeedMeasurement | None = None
    plan_record: QuantizationPlan | None = None
    error_correction: dict = field(default_factory=dict)  # what each error-correcting technique changed
    reference_outputs: dict[str, np.ndarray] | None = None  # fp32 outputs of the first samples (calibration pass)


class StaticQuantizer:
    """Holds the cleaned graph and one set of calibrated ranges; makes any number of plans from them.

    With `pinned` (a plan file), nothing is calibrated or timed: its ranges and decisions are re-applied.
    """

    def __init__(self, model: onnx.ModelProto, dataset: Dataset | None, config: QuantizeConfig,
                 progress: Progress | None = None, pinned: QuantizationPlan | None = None,
                 reference_samples: int = 0):
        self.original = model
        self.dataset = dataset
        # fp32 outputs of the first samples, kept from the calibration pass for the self-check (see _calibrate)
        self.reference_samples = reference_samples
        self.reference_outputs: dict[str, np.ndarray] | None = None
        self.config = config
        self.progress = progress
        self.pinned = pinned
        self.decisions: list[dict] = []
        self.smooth_absmax: dict[str, np.ndarray] = {}
        self.bias_means: dict[str, np.ndarray] = {}
        # Bias correction's input means ride along with calibration (one pass over the data for both).
        self.input_mean_observers: dict = {}
        self.range_choices: dict[str, RangeChoice] = {}
        self._speeds: dict[int, SpeedMeasurement] = {}
        self._speed_checks: dict[int, SpeedCheck] = {}  # by batch: fp32 opened once, turns pooled
        opset = run_pass("opset conversion", as_pass(lambda m: (ensure_opset(m, QDQ_MIN_OPSET), None)), model)
        cleaned = run_pass("clean-up", as_pass(prepare_for_quantization), opset.model)
        self.prepared, self.notes = cleaned.model, cleaned.details
        del opset, cleaned
        self.smoothing_muls: list[str] = []
        self.outlier_absmax: dict[str, np.ndarray] = {}
        self.outlier_split: SplitSummary | None = None
        self.prepared = self._apply_float_transforms(self.prepared)
        tables = run_pass("embedding tables to uint8", as_pass(quantize_embeddings), self.prepared)
        self.prepared, embeddings = tables.model, tables.details
        del tables
        self.embedding_tables = len(embeddings.tables)
        if embeddings.tables:
            self.notes.append(f"{len(embeddings.tables)} embedding tables to uint8 (GatherBlockQuantized): "
                              f"{embeddings.float_bytes / 2**20:.1f} -> {embeddings.quantized_bytes / 2**20:.1f} MiB")
        self.signed = config.activations == "int8"
        self.plan_options: dict[str, Any] = dict(exclude=tuple(config.exclude), absorb_activations=not self.signed,
                                 quantize_depthwise=config.quantize_depthwise)
        widest = build_plan(self.prepared, **self.plan_options)
        give_back_freed_memory()  # the model copies made while preparing are gone; the calibration session next
        self.ranges = self._pinned_ranges(widest) if pinned else self._calibrate(widest)
        self.non_finite = {t: r.describe() for t, r in self.ranges.items() if not r.finite}
        self.base_keep_float = _nodes_needing(self.prepared, widest, set(self.non_finite), NON_FINITE_REASON)
        # Quantizing SmoothQuant's own scaling Mul would put back the outliers it moved into the weights.
        self.base_keep_float.update(dict.fromkeys(self.smoothing_muls, "SmoothQuant scaling stays float"))
        if self.outlier_split is not None:  # quantizing the mask's input would bring back the outliers' range
            self.base_keep_float.update(dict.fromkeys(self.outlier_split.float_nodes,
                                                      "outlier channels stay float (--outlier-channels)"))
        self.weight_codes = self._reconstruct_weights(widest)

    # -- building blocks ----------------------------------------------------------------------------

    @property
    def data(self) -> Dataset:
        """The calibration data: every path but a pinned replay has it (api.py refuses static without it)."""
        if self.dataset is None:
            raise UsageError("static quantization needs calibration data",
                             hint="pass --calibration-data DATA, or --mode dynamic")
        return self.dataset

    @property
    def plan_file(self) -> QuantizationPlan:
        """The pinned plan (only the replay paths ask for it)."""
        if self.pinned is None:
            raise UsageError("no plan to re-apply", hint="pass --plan PLAN")
        return self.pinned

    def attempt(self, keep_float: dict[str, str], input_means=None) -> Attempt:
        plan = build_plan(self.prepared, keep_float=keep_float, **self.plan_options)
        rewrite = as_pass(lambda m: rewrite_qdq(m, plan, self.ranges, signed_activations=self.signed,
                                                per_channel=self.config.per_channel, input_means=input_means,
                                                weight_codes=self.weight_codes.codes if self.weight_codes else None),
                          lambda _: {entry.node: entry.reason for entry in plan.skipped})
        done = run_pass("QDQ rewrite", rewrite, self.prepared)
        model, stats = done.model, done.details
        del done
        give_back_freed_memory()  # the rewrite's float copies and temporaries
        return Attempt(keep_float, model, plan, stats)

    def fused_attempt(self, keep_float: dict[str, str]) -> Attempt:
        """An attempt in which every quantized compute node really runs on an integer kernel."""
        current = self.attempt(keep_float)
        for _ in range(3):  # each round only shrinks the plan; two rounds settle in practice
            current.fusion = inspect_fusion(current.model, self.config.provider)
            give_back_freed_memory()  # the optimizer's session
            unfused = {n for n in current.fusion.unfused_compute if n in current.plan.compute}
            if not unfused:
                return current
            reason = f"onnxruntime ({self.config.provider}) has no integer kernel for it here"
            current = self.attempt({**current.keep_float, **dict.fromkeys(unfused, reason)})
        current.fusion = inspect_fusion(current.model, self.config.provider)
        return current

    def speedup(self, candidate: onnx.ModelProto) -> float:
        """fp32 work / `candidate` work at the serving batch and threads (CPU time, close calls re-measured)."""
        return self.measure_speed(candidate).ratio

    def measure_speed(self, candidate: onnx.ModelProto, batch: int | None = None) -> SpeedMeasurement:
        measured = self._speed_check(batch).measure(candidate)
        self._speeds[id(candidate)] = measured
        return measured

    def _speed_check(self, batch: int | None = None) -> SpeedCheck:
        batch = batch or self.config.latency_batch
        if batch not in self._speed_checks:
            self._speed_checks[batch] = SpeedCheck(self.original, self._timing_feeds(batch), self.config.provider,
                                                   threads=self.config.threads)
        return self._speed_checks[batch]

    def _timing_feeds(self, batch: int) -> list[dict]:
        feeds = list(self.data.batches(batch, batch * SPEED_CHECK_BATCHES))
        if self.data.layout == "stack":  # complete feeds (a Scan's [steps, batch, ...] sequence): as stored
            return feeds
        return [_filled_to(feed, batch) for feed in feeds]

    # -- the pipeline -------------------------------------------------------------------------------

    def run(self, accuracy_target=None) -> StaticResult:
        if self.pinned is not None:
            return self._replay()
        give_back_freed_memory()  # the calibration session is gone; the speed check's sessions next
        widest = current = self.fused_attempt(self.base_keep_float)
        steps: list[str] = []
        if self.config.speed_check and current.plan.compute:
            current = self._keep_only_what_is_faster(current, steps)
            self._final_figure(current)
            current = self._float_if_pooled_turns_say_slower(current, steps)
        speed_kept_some = bool(current.plan.compute)  # before an accuracy target hands nodes back
        if accuracy_target is not None and current.plan.compute:
            current = accuracy_target.enforce(self, current, steps)
            current.speed = self._speeds.get(id(current.model), current.speed)
        if self.config.bias_correction and current.plan.compute:
            current = self._correct_biases(current)
        if self.config.speed_check and widest.plan.compute and not speed_kept_some:
            self._say_if_batches_pay(widest)  # only when speed, not an accuracy target, put it all in float
        self._speed_checks.clear()  # their sessions hold weights: not kept past the decisions
        give_back_freed_memory()
        result = self._result(current, steps, self.decisions)
        if self.outlier_split is not None:
            result.error_correction["outliers"] = self.outlier_split.to_dict()
        if self.range_choices:
            result.error_correction["ranges"] = {
                "how": "per tensor, the candidate range with the least error at its consuming layers",
                "chosen": {tensor: choice.to_dict() for tensor, choice in sorted(self.range_choices.items())}}
        if self.weight_codes is not None:
            reports = {n: r for n, r in self.weight_codes.reports.items() if n in current.plan.compute}
            result.error_correction["weights"] = summarize_reconstruction(reports)
        return result

    def _result(self, current: Attempt, steps: list[str], decisions: list[dict]) -> StaticResult:
        model = current.model
        if not current.plan.compute:
            # Nothing paid off: hand back the user's graph untouched rather than our cleaned copy of it.
            model = self.original
            self.notes.append("no node was quantized; the output is the input model")
        check_model(model)
        record = QuantizationPlan(
            model_sha256=model_sha256(self.original), settings=self.config.to_dict(),
            int8_nodes=sorted(current.plan.compute), float_nodes=dict(sorted(current.keep_float.items())),
            activation_ranges=dict(self.ranges), smoothquant_absmax=self.smooth_absmax,
            outlier_absmax=self.outlier_absmax,
            bias_means=self.bias_means if current.plan.compute else {}, decisions=decisions)
        return StaticResult(model, current.plan, current.stats, current.fusion, current.speedup,
                            current.plan.skipped, self.non_finite, steps, self.notes, current.speed, record,
                            reference_outputs=self.reference_outputs)

    def _replay(self) -> StaticResult:
        """Re-apply a reviewed plan: same ranges, same float nodes, no calibration and no timing."""
        pinned = self.plan_file
        current = self.attempt(dict(pinned.float_nodes), input_means=pinned.bias_means or None)
        if sorted(current.plan.compute) != sorted(pinned.int8_nodes):
            raise UsageError("the plan does not fit this model: it lists other int8 nodes than its decisions "
                             "give here (made by another compressq version?)",
                             hint="make a new plan with --save-plan and review it")
        if pinned.bias_means:
            self.bias_means = pinned.bias_means
        if current.plan.compute:
            current.fusion = inspect_fusion(current.model, self.config.provider)
        self.notes.append("re-applied a saved plan: no calibration, no timing")
        return self._result(current, [], list(pinned.decisions))

    def _pinned_ranges(self, widest: QuantPlan) -> dict[str, TensorRange]:
        missing = sorted(set(widest.quantized_tensors) - set(self.plan_file.activation_ranges))
        if missing:
            raise UsageError(f"the plan has no range for {len(missing)} tensors this model needs "
                             f"(first: '{missing[0]}')", hint="make a new plan with --save-plan and review it")
        return dict(self.plan_file.activation_ranges)

    def _say_if_batches_pay(self, widest: Attempt) -> None:
        """int8 lost at the serving batch: time it once at a larger batch, and name the flag if that pays."""
        if self.config.latency_batch >= LARGER_BATCH or any(spec.fixed_batch for spec in self.data.inputs):
            return
        measured = self.measure_speed(widest.model, batch=LARGER_BATCH)
        if measured.ratio >= LARGER_BATCH_GAIN:
            self.notes.append(f"int8 loses at batch {self.config.latency_batch} but runs {measured.ratio:.2f}x "
                              f"faster than fp32 at batch {LARGER_BATCH} ({measured.describe()}): if you serve "
                              f"batches, pass --latency-batch {LARGER_BATCH} (or your serving batch)")

    def _apply_float_transforms(self, prepared: onnx.ModelProto) -> onnx.ModelProto:
        """Equalization and SmoothQuant: rescalings that leave fp32 outputs unchanged but quantize better."""
        if self.config.equalize:
            done = run_pass("cross-layer equalization", as_pass(lambda m: equalize(fold_batchnorm(m)),
                                                                lambda report: report.skipped), prepared)
            prepared, equalized = done.model, done.details
            self.notes.append(f"cross-layer equalization on {len(equalized.pairs)} layer pairs")
        if self.config.smoothquant is not None:
            absmax = self.pinned.smoothquant_absmax if self.pinned else collect_channel_absmax(
                prepared, self.data, smoothable_activations(prepared), batch_size=self.config.batch_size,
                limit=self.config.samples, provider=self.config.provider)
            self.smooth_absmax = dict(absmax)
            alpha = self.config.smoothquant
            done = run_pass("SmoothQuant", as_pass(lambda m: smooth(m, absmax, alpha=alpha),
                                                   lambda report: report.skipped), prepared)
            prepared, summary = done.model, done.details
            self.smoothing_muls = list(summary.inserted_muls)
            self.notes.append(f"SmoothQuant (alpha {self.config.smoothquant}) on {len(summary.groups)} activations")
        if self.config.outlier_channels is not None:
            prepared = self._split_outliers(prepared, self.config.outlier_channels)
        name_nodes(prepared.graph)
        return prepared

    def _split_outliers(self, prepared: onnx.ModelProto, channels: int) -> onnx.ModelProto:
        """--outlier-channels: each activation's largest channels read by a float MatMul beside the int8 layer."""
        absmax = self.pinned.outlier_absmax if self.pinned else collect_channel_absmax(
            prepared, self.data, smoothable_activations(prepared), batch_size=self.config.batch_size,
            limit=self.config.samples, provider=self.config.provider)
        self.outlier_absmax = dict(absmax)
        done = run_pass("outlier channels", as_pass(lambda m: split_outliers(m, absmax, channels),
                                                    lambda report: report.skipped), prepared)
        prepared, self.outlier_split = done.model, done.details
        self.notes.append(f"outlier channels (at most {channels}) of {len(self.outlier_split.activations)} "
                          "activations go around the int8 layers in float")
        return prepared

    def _calibrate(self, plan: QuantPlan) -> dict[str, TensorRange]:
        passes = passes_for_method(self.config.method)
        total = passes * min(self.data.num_samples, self.config.samples or self.data.num_samples)
        if self.config.bias_correction:
            self.input_mean_observers = mean_observers(plan.main_part())
        means = [Request(tensor, observer) for tensor, observer in self.input_mean_observers.items()]
        done = [0]

        def advance(count: int) -> None:
            done[0] += count
            if self.progress:
                self.progress("calibrating", done[0], total)

        # Every quantized tensor, not only today's scale-group roots: a later plan with more nodes kept
        # float can split a group, and its tensors must not need a second calibration pass.
        # Tensors inside If/Loop/Scan bodies: min/max measured where they live (stats/subgraphs.py).
        # They ride along with the main graph's pass (stats.collect carries them out with stats.subgraphs).
        main_tensors, body_tensors = split_by_scope(self.prepared, plan.quantized_tensors)
        bodies = {tensor: MinMaxObserver() for tensor in body_tensors}
        references = self._reference_observers()
        extra = [*means, *(Request(tensor, observer) for tensor, observer in [*bodies.items(), *references.items()])]
        if self.config.method == "auto":
            # Main-graph tensors that only bodies quantize get min/max ranges, in the same pass.
            outer = {t: MinMaxObserver() for t in sorted(set(main_tensors) - set(plan.main_part().quantized_tensors))}
            ranges = self._ranges_by_error(plan.main_part(), advance,
                                           [*extra, *(Request(t, o) for t, o in outer.items())])
            ranges.update({tensor: observer.result() for tensor, observer in outer.items()})
        else:
            ranges = collect_ranges(self.prepared, self.data, main_tensors, method=self.config.method,
                                    percentile=self.config.percentile, batch_size=self.config.batch_size,
                                    samples=self.config.samples, provider=self.config.provider, progress=advance,
                                    extra=extra)
        self.reference_outputs = _complete_rows(references, min(self.reference_samples, self.data.num_samples))
        inner = {tensor: observer.result() for tensor, observer in sorted(bodies.items())}
        if inner and self.config.method != "minmax":
            self.notes.append(f"{len(inner)} tensors inside If/Loop/Scan bodies: min/max ranges "
                              f"(--method {self.config.method} applies to the main graph)")
        unreached = sorted(t for t, o in bodies.items() if o.finite and o.low > o.high)  # no value ever seen
        if unreached:
            self.notes.append(f"{len(unreached)} tensors inside bodies were never reached by the data (first: "
                              f"'{unreached[0]}'): the nodes that need them stay float")
        return {**ranges, **inner}

    def _reference_observers(self) -> dict[str, FirstRowsObserver]:
        """The calibrated graph's outputs are the model's fp32 outputs when what was changed before calibration
        keeps the function (onnxruntime's basic clean-up, equalization and SmoothQuant rescale; quantized
        embedding tables do not), the interface is the same, and samples are rows of a batch."""
        if not self.reference_samples or self.embedding_tables or self.data.layout != "batch" \
                or self.config.method == "auto":
            return {}
        ours = {o.name: o.type.tensor_type.elem_type for o in self.prepared.graph.output}
        theirs = {o.name: o.type.tensor_type.elem_type for o in self.original.graph.output}
        if ours != theirs or not _outputs_batched_like_inputs(self.original):
            return {}
        return {name: FirstRowsObserver(self.reference_samples) for name in ours}

    def _reconstruct_weights(self, plan: QuantPlan) -> WeightCodes | None:
        """--weight-reconstruction gptq: int8 codes chosen on the layers' fp32 inputs (one more data pass)."""
        if self.config.weight_reconstruction == "none":
            return None
        if self.pinned is not None:
            raise UsageError("this plan was made with --weight-reconstruction gptq, whose weight codes come from "
                             "calibration data: re-applying it cannot give the same bytes",
                             hint="quantize again with --calibration-data and --weight-reconstruction gptq")
        found = static_weight_codes(self.prepared, plan, self.data, per_channel=self.config.per_channel,
                                    batch_size=self.config.batch_size, samples=self.config.samples,
                                    provider=self.config.provider)
        self.notes.append(f"GPTQ weight reconstruction: {len(found.codes)} MatMul/Gemm/Conv weights reconstructed, "
                          f"{sum(not r.reconstructed for r in found.reports.values())} layers kept rounded")
        return found

    def _ranges_by_error(self, plan: QuantPlan, advance: Callable[[int], None],
                         means: Sequence[Request] = ()) -> dict[str, TensorRange]:
        """`--method auto`: per tensor, the candidate range that changes its consumers' outputs least."""
        candidates = collect_range_candidates(self.prepared, self.data, plan.quantized_tensors,
                                              batch_size=self.config.batch_size, samples=self.config.samples,
                                              provider=self.config.provider, progress=advance, extra=means)
        samples = min(self.config.samples or RANGE_SEARCH_SAMPLES, RANGE_SEARCH_SAMPLES)
        ranges, self.range_choices = choose_ranges(self.prepared, plan, candidates, self.data,
                                                   signed=self.signed, batch_size=self.config.batch_size,
                                                   samples=samples, provider=self.config.provider)
        if self.range_choices:
            self.notes.append(f"ranges chosen by the error they cause at the consuming layers, "
                              f"{len(self.range_choices)} tensors: {summarize_choices(self.range_choices)}")
        return ranges

    def _keep_only_what_is_faster(self, current: Attempt, steps: list[str]) -> Attempt:
        self._time(current)
        self._decide("every planned node int8", current, kept=meets(_speedup_of(current)))
        if self.progress:
            self.progress("checking speed", 1, 1)
        for label, extra in _fallback_stages(current.plan):
            if convincing(_speedup_of(current)) or not extra:
                continue
            if set(extra) >= set(current.plan.compute) and meets(_speedup_of(current)):
                continue  # all-float is fp32 itself: already measured against it, and it was not faster
            candidate = self.fused_attempt({**current.keep_float, **extra})
            better = self._race(current, candidate)
            steps.append(f"{label}: speedup {current.speedup:.2f}x -> {candidate.speedup:.2f}x")
            self._decide(label, candidate, kept=better)
            if better:
                current = candidate
        return current

    def _race(self, current: Attempt, candidate: Attempt) -> bool:
        """Time fp32, `current` and `candidate` in the same turns; True when the candidate is clearly faster.

        Both attempts get the figures of this run, so the speedup printed is that of the window that decided.
        """
        check = self._speed_check()
        contender = candidate.model if candidate.plan.compute else self.original
        race = check.race(current.model, contender)
        loser = current.model if clearly_faster(race.candidate_over_current, 1.0) else contender
        check.forget(loser)
        self._speeds.pop(id(loser), None)  # its id may be reused by a later attempt once it is freed
        current.speed, current.speedup = race.current, race.current.ratio
        self._speeds[id(current.model)] = race.current
        if candidate.plan.compute:
            candidate.speed, candidate.speedup = race.candidate, race.candidate.ratio
            self._speeds[id(candidate.model)] = race.candidate
        else:
            candidate.speed, candidate.speedup = None, 1.0
        return clearly_faster(race.candidate_over_current, 1.0)

    def _final_figure(self, current: Attempt) -> None:
        """The printed speedup pools every turn the winner was timed in (RUNS at least): a decision that
        settled in a few turns still prints a figure that holds (bench: loaded, printed vs independent)."""
        if current.plan.compute:
            current.speed = self._speed_check().figure(current.model)
            current.speedup = current.speed.ratio
            self._speeds[id(current.model)] = current.speed

    def _float_if_pooled_turns_say_slower(self, current: Attempt, steps: list[str]) -> Attempt:
        """The decision settles in a few turns; the printed figure pools more. When the pooled figure no longer
        meets the bar (a ratio right at it, on a busy machine), the float input stands: int8 is never kept while
        the summary says it is slower."""
        if not current.plan.compute or meets(_speedup_of(current)):
            return current
        steps.append(f"everything kept float: int8 measured {current.speedup:.2f}x over "
                     f"{current.speed.runs if current.speed else 0} turns")
        keep_float = {**current.keep_float, **dict(_fallback_stages(current.plan))[EVERYTHING_FLOAT]}
        plan = build_plan(self.prepared, keep_float=keep_float, **self.plan_options)
        float_input = Attempt(keep_float, self.original, plan, RewriteStats(), speedup=1.0)  # no rewrite needed
        self._decide(f"{EVERYTHING_FLOAT} (pooled figure below the bar)", float_input, kept=True)
        return float_input

    def _time(self, attempt: Attempt) -> Attempt:
        """Measure an attempt's speed; one with nothing quantized is the input itself (1.00x by construction)."""
        if attempt.plan.compute:
            attempt.speed = self.measure_speed(attempt.model)
            attempt.speedup = attempt.speed.ratio
        else:
            attempt.speed, attempt.speedup = None, 1.0
        return attempt

    def _decide(self, step: str, attempt: Attempt, kept: bool) -> None:
        self.decisions.append({"step": step, "speedup": round(_speedup_of(attempt), 3), "kept": kept,
                               "how": attempt.speed.describe() if attempt.speed else "output is the input model"})

    def _correct_biases(self, current: Attempt) -> Attempt:
        means = node_means(current.plan.main_part(), self.input_mean_observers)  # gathered while calibrating
        self.bias_means = dict(means)
        corrected = self.attempt(current.keep_float, input_means=means)
        # Only bias values change: the speed measured for the uncorrected graph holds for this one.
        corrected.fusion, corrected.speedup, corrected.speed = current.fusion, current.speedup, current.speed
        self.notes.append(f"bias correction on {corrected.stats.biases_corrected} layers")
        return corrected


def quantize_static(model: onnx.ModelProto, dataset: Dataset | None, config: QuantizeConfig,
                    progress: Progress | None = None, accuracy_target=None,
                    pinned: QuantizationPlan | None = None, reference_samples: int = 0) -> StaticResult:
    """`progress(stage, done, total)` reports calibration samples and checking steps. With
    `reference_samples`, the fp32 outputs of that many first samples come back too, read in the calibration
    pass when the calibrated graph computes the model's function (StaticResult.reference_outputs)."""
    return StaticQuantizer(model, dataset, config, progress, pinned, reference_samples).run(accuracy_target)


def _nodes_needing(model: onnx.ModelProto, plan: QuantPlan, tensors: set[str], reason: str) -> dict[str, str]:
    """Nodes whose quantization would need any of `tensors` quantized."""
    names: dict[str, str] = {}
    for compute in plan.compute.values():
        final = plan.absorbed[compute.output].output if compute.output in plan.absorbed else compute.output
        if compute.activation in tensors or final in tensors:
            names[compute.name] = reason
    for node in all_nodes(model.graph):
        if node.name in plan.own_scale_nodes and (set(node.input) | set(node.output)) & tensors:
            names[node.name] = reason
    return names


def _outputs_batched_like_inputs(model: onnx.ModelProto) -> bool:
    """Every output's first axis is declared as the inputs' first axis (the same name or size): its rows are
    samples (a time-major [T, N, C] output is not, even where T happens to equal the samples of a run)."""
    def first_dim(value: onnx.ValueInfoProto) -> str | int | None:  # a name, a size (-1: paddle's dynamic), None
        shape = value.type.tensor_type.shape if value.type.HasField("tensor_type") else None
        if shape is None or not shape.dim:
            return None
        axis = shape.dim[0]
        return axis.dim_param or (axis.dim_value if axis.HasField("dim_value") else None)

    batch_axes = {first_dim(v) for v in model.graph.input} - {None}
    return bool(batch_axes) and all(first_dim(o) in batch_axes for o in model.graph.output)


def _complete_rows(observers: dict[str, FirstRowsObserver], wanted: int) -> dict[str, np.ndarray] | None:
    """Every output's rows for the `wanted` first samples, or None when any is missing or unusable."""
    if not observers:
        return None
    rows = {name: observer.result() for name, observer in observers.items()}
    if any(values is None or len(values) < wanted for values in rows.values()):
        return None
    return {name: values[:wanted] for name, values in rows.items() if values is not None}


def _speedup_of(attempt: Attempt) -> float:
    """An attempt's measured speedup; 1.0 (the input itself) before it was timed."""
    return attempt.speedup if attempt.speedup is not None else 1.0


def _filled_to(feed: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """A feed of exactly `batch` samples: a short last batch (or a small dataset) is repeated to fill it."""
    if not feed or any(value.ndim == 0 for value in feed.values()):
        return feed  # a complete feed with a scalar input (stack layout) is timed as it is stored
    have = next(iter(feed.values())).shape[0]
    if have in (0, batch):
        return feed
    repeats = -(-batch // have)
    return {name: np.concatenate([values] * repeats)[:batch] for name, values in feed.items()}


EVERYTHING_FLOAT = "everything kept float"


def _fallback_stages(plan: QuantPlan):
    yield ("depthwise convolutions kept float", {name: "int8 depthwise convolution made the model slower "
                                                 "(measured)" for name, c in plan.compute.items() if c.depthwise})
    yield ("Add/Mul/Concat/Sigmoid/pooling kept float", {n: "quantizing it made the model slower (measured)"
                                                         for n in plan.own_scale_nodes})
    yield ("small layers kept float", {name: "too small for int8 to pay off (measured: the model was slower)"
                                       for name, compute in plan.compute.items()
                                       if compute.weight_size < SMALL_LAYER_WEIGHTS
                                       or compute.reduction_size < SMALL_REDUCTION})
    yield (EVERYTHING_FLOAT, {name: "no int8 variant was faster than float (measured)" for name in plan.compute})
