"""The report as data: what was measured for each model, the gates and their verdicts.

`build_report` runs the models (accuracy and agreement in one streaming pass over the data, then
interleaved timing per provider) and returns a `Report`; rendering lives in compressq.evaluate.render.
The JSON form (`Report.to_dict`) is a documented, versioned schema: keys are only ever added.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo

from compressq import __version__
from compressq.data import DATA_LAYOUTS, Dataset, load_dataset, model_inputs, synthetic_dataset
from compressq.errors import DataError, ModelError, UsageError
from compressq.evaluate.per_layer import LayerComparison, LayerErrors, matched_tensors, produced_tensors
from compressq.evaluate.summary import all_nodes, summarize
from compressq.io import first_line, iter_tensors, load_model
from compressq.measure.latency import LatencyStats, speedup, time_interleaved
from compressq.measure.metrics import TopKCounter
from compressq.measure.speed import SpeedMeasurement, measure_speedup
from compressq.measure.task import (
    CLASS_SCORES,
    OutputRole,
    OutputScore,
    TaskScorer,
    correct_samples,
    label_output,
    non_finite_outputs,
    roles_for_batch,
    task_scores,
    worst_agreement,
    worst_cosine,
)
from compressq.ops import FLOAT_WEIGHTED_OPS, INTEGER_WEIGHTED_OPS
from compressq.progress import Progress, Stage
from compressq.runtime import ORT_ERRORS, PROVIDER_NAMES, create_session, provider_chain, with_outputs

SCHEMA = "compressq.report/1"
SYNTHETIC = "synthetic inputs"
REAL = "real data"
SYNTHETIC_SAMPLES = 64
EVAL_BATCH = 64  # accuracy batches; --batch-size is the batch that latency is measured at
# --per-layer holds every matched intermediate of one batch at once (BERT-base: ~25 MB per tensor at 64
# samples x 128 tokens): smaller batches keep that bounded.
PER_LAYER_BATCH = 8
TIMING_FEEDS = 4  # distinct batches cycled through while timing




# ---------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class GateLimits:
    max_accuracy_drop: float | None = None  # points of top-1 accuracy
    min_agreement: float | None = None  # fraction of samples whose top-1 class matches the baseline
    min_cosine: float | None = None
    min_speedup: float | None = None  # baseline median / candidate median
    max_size_ratio: float | None = None  # candidate file bytes / baseline file bytes

    def __post_init__(self) -> None:
        for gate, limit in self.requested().items():
            low, high = _GATE_RANGES[gate]
            if not math.isfinite(limit):
                raise UsageError(f"--{gate} must be a finite number, got {limit}",
                                 hint=f"pass the limit as a plain number, e.g. --{gate} {_EXAMPLE_LIMITS[gate]}")
            if not low <= limit <= high:
                raise UsageError(f"--{gate} must lie in [{low:g}, {high:g}], got {limit:g}",
                                 hint=f"for example --{gate} {_EXAMPLE_LIMITS[gate]}")

    def requested(self) -> dict[str, float]:
        """Gate name (as spelled on the command line, without dashes) -> limit, for gates that were set."""
        return {name.replace("_", "-"): limit for name, limit in asdict(self).items() if limit is not None}


_GATE_RANGES = {"max-accuracy-drop": (0.0, 100.0), "min-agreement": (0.0, 1.0), "min-cosine": (-1.0, 1.0),
                "min-speedup": (0.0, 1000.0), "max-size-ratio": (0.0, 1000.0)}
_EXAMPLE_LIMITS = {"max-accuracy-drop": "1.0", "min-agreement": "0.99", "min-cosine": "0.99",
                   "min-speedup": "1.2", "max-size-ratio": "0.3"}


@dataclass(frozen=True)
class ReportConfig:
    baseline: Path
    candidates: tuple[Path, ...] = ()
    data: Path | None = None
    labels_key: str = "labels"
    require_labels: bool = False  # --labels named explicitly: its absence is an error, not a shrug
    providers: tuple[str, ...] = ("cpu",)
    threads: int | None = 1
    runs: int = 20
    warmup: int = 3
    batch_size: int = 1
    samples: int | None = None
    per_layer: bool = False
    gates: GateLimits = field(default_factory=GateLimits)
    task_outputs: tuple[str, ...] = ()  # --task-output NAME: the outputs that carry the task (empty: the rule decides)
    data_layout: str = "batch"  # --data-layout: batch | stack (compressq.data)

    def __post_init__(self) -> None:
        """Every invalid value is one UsageError naming its option, before any model is read."""
        _at_least(1, runs=self.runs, batch_size=self.batch_size, samples=self.samples, threads=self.threads)
        _at_least(0, warmup=self.warmup)
        if self.data_layout not in DATA_LAYOUTS:
            raise UsageError(f"unknown --data-layout '{self.data_layout}'",
                             hint=f"use one of: {', '.join(DATA_LAYOUTS)}")
        for provider in self.providers:
            if provider.lower() not in PROVIDER_NAMES:
                raise UsageError(f"unknown provider '{provider}'", hint=f"use one of: {', '.join(PROVIDER_NAMES)}")
        requested = self.gates.requested()
        if requested and not self.candidates:
            raise UsageError(f"--{next(iter(requested))} compares a candidate with the baseline, but only one "
                             "model was given", hint="pass the compressed model after the baseline")
        if "max-accuracy-drop" in requested and self.data is None:
            raise UsageError("--max-accuracy-drop needs labelled data; without --data the inputs would be synthetic",
                             hint="pass --data eval.npz holding the model inputs and a 'labels' array")


def _at_least(minimum: int, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < minimum:
            option = "--" + name.replace("_", "-")
            raise UsageError(f"{option} must be at least {minimum}, got {value}",
                             hint=f"for example {option} {max(minimum, 1)}")


# ---------------------------------------------------------------------------------------------------
# The report


@dataclass
class ModelFacts:
    path: str
    file_bytes: int
    gzip_bytes: int
    parameters: int
    zero_fraction: float
    weighted_nodes: int  # Conv/MatMul/Gemm and their integer forms
    quantized_nodes: int
    quantized_share: float


@dataclass
class Accuracy:
    data: str  # always REAL: labels only come with real data
    output: str
    samples: int
    top1: float
    top5: float | None  # None with fewer than five classes


@dataclass
class OutputComparison(OutputScore):
    """One output's score (its role, whether it carries the task, its figures), and on what data."""

    data: str = ""  # SYNTHETIC or REAL, next to every figure so nobody mistakes one for the other


@dataclass
class LatencyResult:
    provider: str
    batch_size: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    throughput_per_s: float
    samples_ms: list[float]


@dataclass
class SpeedupResult:
    provider: str
    ratio: float                       # wall clock: what a user waits, with its spread
    ratio_q1: float
    ratio_q3: float
    work_ratio: float | None = None    # by CPU time (measure.speed): what the --min-speedup gate decides on
    work_measured_with: str | None = None


@dataclass
class ModelReport:
    name: str
    facts: ModelFacts
    accuracy: Accuracy | None
    latency: list[LatencyResult]


@dataclass
class CandidateReport(ModelReport):
    size_ratio: float
    gzip_ratio: float
    accuracy_drop_points: float | None
    outputs: list[OutputComparison]
    per_layer: list[LayerComparison] | None
    per_layer_skipped: list[str]
    speedup: list[SpeedupResult]


FINITE_GATE = "finite-outputs"  # not an option: set whenever an output that carries the task is NaN/inf


@dataclass
class GateResult:
    gate: str
    candidate: str
    measured: float
    limit: float
    passed: bool
    qualified: bool = False  # several candidates: name the candidate in the gate's label
    on: str = ""  # what was measured: "output0[4:84] (class scores)", "provider cpu", "file size"
    at_least: bool = True  # the measured value must be >= the limit (else <=)

    @property
    def label(self) -> str:
        return f"{self.gate}[{self.candidate}]" if self.qualified else self.gate

    def failure_line(self) -> str:
        where = f" on {self.on}" if self.on else ""
        if self.gate == FINITE_GATE:
            return f"GATE FAILED: {self.label}: {int(self.measured)} NaN or infinite values{where}"
        relation = "<" if self.at_least else ">"
        return f"GATE FAILED: {self.label} {format_number(self.measured)} {relation} {format_number(self.limit)}" \
            f"{where}"


@dataclass
class DataInfo:
    source: str
    kind: str  # SYNTHETIC or REAL
    synthetic: bool
    samples: int
    labels: str | None
    notes: list[str]


@dataclass
class Report:
    schema: str
    compressq_version: str
    data: DataInfo
    settings: dict
    baseline: ModelReport
    candidates: list[CandidateReport]
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    @property
    def failed_gates(self) -> list[GateResult]:
        return [gate for gate in self.gates if not gate.passed]

    def to_dict(self) -> dict:
        data = asdict(self)
        for gate in data["gates"]:
            gate.pop("qualified")
            gate.pop("at_least")
        data["passed"] = self.passed
        return _json_safe(data)


def format_number(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _json_safe(value):
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------------
# Checks before any model runs


def check_providers(providers: tuple[str, ...]) -> None:
    for provider in providers:
        provider_chain(provider)  # raises ProviderError with the install hint


# ---------------------------------------------------------------------------------------------------
# Building


@dataclass
class _Model:
    name: str
    path: Path
    proto: onnx.ModelProto


def build_report(config: ReportConfig, progress: Progress | None = None) -> Report:
    """Compare the baseline with each candidate: size, accuracy on the outputs that carry the task, latency
    (wall clock) and work (CPU time), and the gates' verdicts. `progress(stage, done, total)` is told how
    far each stage is."""
    check_providers(config.providers)
    names = display_names([config.baseline, *config.candidates])
    baseline = _Model(names[0], config.baseline, load_model(config.baseline))
    candidates = [_Model(name, path, load_model(path)) for name, path in zip(names[1:], config.candidates)]
    for candidate in candidates:
        _check_same_interface(baseline, candidate)
    dataset = _dataset(config, baseline.proto)
    try:
        evaluation = _evaluate(baseline, candidates, dataset, config, progress)
        latencies = _time_all([baseline, *candidates], dataset, config, progress)
        work = _work_speedups(baseline, candidates, dataset, config, progress)
    except ORT_ERRORS as exc:
        if not dataset.synthetic:
            raise
        # Random inputs of guessed sizes are not always valid (an audio front end padding a 16-sample frame).
        raise DataError(f"the model does not run on synthetic inputs ({first_line(exc)[:160]})",
                        hint="pass --data with real inputs") from exc
    baseline_report = ModelReport(baseline.name, model_facts(baseline.proto, baseline.path),
                                  evaluation.accuracy(baseline.name), latencies[baseline.name])
    candidate_reports = [_candidate_report(c, baseline_report, evaluation, latencies[c.name], work)
                         for c in candidates]
    report = Report(SCHEMA, __version__, _data_info(dataset, config), _settings(config), baseline_report,
                    candidate_reports, [])
    report.gates = evaluate_gates(report, config.gates)
    return report


def display_names(paths: list[Path]) -> list[str]:
    """File names, or the paths as given where two files share a name (every model needs its own key)."""
    names: list[str] = []
    for path in paths:
        name = path.name if [p.name for p in paths].count(path.name) == 1 else str(path)
        names.append(name if name not in names else f"{name}#{len(names) + 1}")
    return names


def _check_same_interface(baseline: _Model, candidate: _Model) -> None:
    wanted = {spec.name for spec in model_inputs(baseline.proto)}
    got = {spec.name for spec in model_inputs(candidate.proto)}
    if wanted != got:
        raise ModelError(f"{candidate.name} takes inputs {sorted(got)} but the baseline takes {sorted(wanted)}",
                         hint="compare models exported from the same network")
    missing = [o.name for o in baseline.proto.graph.output
               if o.name not in {c.name for c in candidate.proto.graph.output}]
    if missing:
        raise ModelError(f"{candidate.name} lacks the baseline's outputs {missing}",
                         hint="outputs are matched by name; keep the baseline's output names")


def _dataset(config: ReportConfig, model: onnx.ModelProto) -> Dataset:
    if config.data is None:
        return synthetic_dataset(model, samples=config.samples or SYNTHETIC_SAMPLES)
    dataset = load_dataset(config.data, model, labels_key=config.labels_key,
                           require_labels=config.require_labels, layout=config.data_layout)
    if "max-accuracy-drop" in config.gates.requested() and not dataset.has_labels:
        raise UsageError(f"--max-accuracy-drop needs labels, but {config.data} has no '{config.labels_key}' array",
                         hint="add the true labels to the data, or name their array with --labels")
    return dataset


def _data_info(dataset: Dataset, config: ReportConfig) -> DataInfo:
    samples = min(dataset.num_samples, config.samples) if config.samples else dataset.num_samples
    return DataInfo(dataset.source, SYNTHETIC if dataset.synthetic else REAL, dataset.synthetic, samples,
                    dataset.labels_key, list(dataset.notes))


def _settings(config: ReportConfig) -> dict:
    return {"providers": list(config.providers), "accuracy_provider": config.providers[0],
            "threads": config.threads or 0, "runs": config.runs, "warmup": config.warmup,
            "batch_size": config.batch_size, "samples": config.samples, "per_layer": config.per_layer,
            "task_outputs": list(config.task_outputs)}


def _candidate_report(candidate: _Model, baseline: ModelReport, evaluation: _Evaluation,
                      latency: list[LatencyResult], work: dict[tuple[str, str], SpeedMeasurement],
                      ) -> CandidateReport:
    facts = model_facts(candidate.proto, candidate.path)
    accuracy = evaluation.accuracy(candidate.name)
    drop = (baseline.accuracy.top1 - accuracy.top1) * 100.0 if accuracy and baseline.accuracy else None
    by_provider = {result.provider: result for result in baseline.latency}
    speedups = [_speedup(by_provider[result.provider], result, work.get((candidate.name, result.provider)))
                for result in latency]
    layers = evaluation.layer_errors.get(candidate.name)
    return CandidateReport(
        candidate.name, facts, accuracy, latency,
        size_ratio=facts.file_bytes / max(baseline.facts.file_bytes, 1),
        gzip_ratio=facts.gzip_bytes / max(baseline.facts.gzip_bytes, 1),
        accuracy_drop_points=drop,
        outputs=evaluation.output_comparisons(candidate.name),
        per_layer=layers.results() if layers else None,
        per_layer_skipped=sorted(layers.skipped) if layers else [],
        speedup=speedups,
    )


def _speedup(baseline: LatencyResult, candidate: LatencyResult, work: SpeedMeasurement | None) -> SpeedupResult:
    ratio = speedup(LatencyStats(baseline.median_ms, baseline.p90_ms, baseline.samples_ms),
                    LatencyStats(candidate.median_ms, candidate.p90_ms, candidate.samples_ms))
    return SpeedupResult(candidate.provider, ratio.ratio, ratio.ratio_q1, ratio.ratio_q3,
                         work.ratio if work else None, work.describe() if work else None)


def _work_speedups(baseline: _Model, candidates: list[_Model], dataset: Dataset, config: ReportConfig,
                   progress: Progress | None) -> dict[tuple[str, str], SpeedMeasurement]:
    """Each candidate against the baseline by CPU time (measure.speed): the figure the speed gate decides on,
    so that a gate in CI does not fail because a neighbour was busy. Wall clock stays in the latency table."""
    feeds = _timing_feeds(dataset, config.batch_size)
    threads = config.threads or 1
    stage = Stage(progress, "measuring work (CPU time)", len(candidates) * len(config.providers))
    work = {}
    for provider in config.providers:
        for candidate in candidates:
            work[(candidate.name, provider)] = measure_speedup(baseline.path, candidate.path, feeds, provider,
                                                               threads=threads)
            stage.advance()
    return work


# ---------------------------------------------------------------------------------------------------
# Size facts


def model_facts(model: onnx.ModelProto, path: Path) -> ModelFacts:
    summary = summarize(model, path)
    weighted, quantized = quantized_node_counts(model)
    return ModelFacts(str(path), summary.file_bytes, gzip_size(path), summary.parameters, summary.zero_fraction,
                      weighted, quantized, quantized / weighted if weighted else 0.0)


def quantized_node_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """(Conv/MatMul/Gemm nodes, how many of them run quantized).

    Quantized means an integer op, or a float op whose weight arrives through DequantizeLinear (QDQ
    form: onnxruntime fuses that pair into an integer kernel)."""
    nodes = list(all_nodes(model.graph))
    producers = {name: node.op_type for node in nodes for name in node.output}
    weighted = quantized = 0
    for node in nodes:
        if node.op_type in INTEGER_WEIGHTED_OPS:
            weighted += 1
            quantized += 1
        elif node.op_type in FLOAT_WEIGHTED_OPS:
            weighted += 1
            weight = node.input[1] if len(node.input) > 1 else ""
            quantized += producers.get(weight) == "DequantizeLinear"
    return weighted, quantized


def gzip_size(path: Path) -> int:
    """Bytes after gzip of the model and its external data: what a download costs. Streams the files."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip container
    total = 0
    for file in model_files(path):
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def model_files(path: Path) -> list[Path]:
    header = onnx.load(str(path), load_external_data=False)
    locations = sorted({ExternalDataInfo(t).location for t in iter_tensors(header.graph)
                        if t.data_location == onnx.TensorProto.EXTERNAL})
    return [path] + [path.parent / location for location in locations if (path.parent / location).exists()]


# ---------------------------------------------------------------------------------------------------
# Accuracy and agreement: one streaming pass over the data


class _Evaluation:
    """Running sums for every model: top-k hits, per-output scores, per-layer errors.

    Each output's role (compressq.measure.task) is decided once, from the baseline's first batch."""

    def __init__(self, baseline: _Model, candidates: list[_Model], data_kind: str,
                 layer_names: dict[str, dict[str, str]], task_outputs: tuple[str, ...]) -> None:
        self.baseline = baseline
        self.data_kind = data_kind
        self.task_outputs = task_outputs
        self.candidate_names = [c.name for c in candidates]
        self.output_names = [o.name for o in baseline.proto.graph.output]
        self.topk = {model.name: TopKCounter() for model in [baseline, *candidates]}
        self.correct = dict.fromkeys(self.topk, 0)
        self.labelled = dict.fromkeys(self.topk, 0)
        self.roles: list[OutputRole] | None = None
        self.scorers: dict[str, TaskScorer] = {}
        op_types = produced_tensors(baseline.proto)
        self.layer_errors = {name: LayerErrors(tensors, op_types) for name, tensors in layer_names.items()}
        self.label_role: OutputRole | None = None
        self.classes = 0

    def update(self, feed: dict[str, np.ndarray], outputs: dict[str, dict[str, np.ndarray]],
               labels: np.ndarray | None) -> None:
        reference = outputs[self.baseline.name]
        if self.roles is None:
            task_values = {name: reference[name] for name in self.output_names}
            self.roles = roles_for_batch(self.baseline.proto, feed, task_values, self.task_outputs)
            self.scorers = {name: TaskScorer(self.roles) for name in self.candidate_names}
        if labels is not None:
            self._update_accuracy(outputs, labels, self.roles)
        for candidate, scorer in self.scorers.items():
            for name in self.output_names:
                _check_same_shape(candidate, name, reference[name], outputs[candidate][name])
            scorer.update(reference, outputs[candidate])
            if candidate in self.layer_errors:
                self.layer_errors[candidate].update(reference, outputs[candidate])

    def _update_accuracy(self, outputs: dict[str, dict[str, np.ndarray]], labels: np.ndarray,
                         roles: list[OutputRole]) -> None:
        first = outputs[self.baseline.name]
        labels = np.asarray(labels)
        if self.label_role is None:
            shapes = {name: first[name].shape[1:] for name in self.output_names}
            self.label_role = label_output(roles, shapes, labels.shape[1:])
            if self.label_role is None:
                raise _labels_match_nothing(labels, roles, first)
            self.classes = first[self.label_role.name].shape[-1] if self.label_role.role == CLASS_SCORES else 0
        name = self.label_role.name
        for model, values in outputs.items():
            self.correct[model] += int(np.sum(correct_samples(self.label_role, values[name], labels)))
            self.labelled[model] += len(labels)
            if self.classes:
                self.topk[model].update(values[name].reshape(-1, self.classes), labels.reshape(-1))

    def accuracy(self, model: str) -> Accuracy | None:
        if self.label_role is None or not self.labelled.get(model):
            return None
        counter = self.topk[model]
        top5 = counter.accuracy(5) if self.classes >= 5 and counter.samples else None
        return Accuracy(REAL, self.label_role.name, self.labelled[model],
                        self.correct[model] / self.labelled[model], top5)

    def output_comparisons(self, candidate: str) -> list[OutputComparison]:
        scorer = self.scorers.get(candidate)
        if scorer is None:
            return []
        return [OutputComparison(**{f.name: getattr(score, f.name) for f in fields(score)}, data=self.data_kind)
                for score in scorer.results()]


def _check_same_shape(candidate: str, output: str, reference: np.ndarray, test: np.ndarray) -> None:
    if np.shape(reference) != np.shape(test):
        raise ModelError(f"{candidate} output '{output}' has shape {list(np.shape(test))}, the baseline's "
                         f"{list(np.shape(reference))}", hint="outputs are compared element by element; "
                         "compare models with the same output shapes")


def _labels_match_nothing(labels: np.ndarray, roles: list[OutputRole], values: dict[str, np.ndarray]) -> DataError:
    shapes = ", ".join(f"{r.name} {list(values[r.name].shape)} ({r.role})" for r in roles if r.task)
    return DataError(f"labels of shape {list(labels.shape)} match no output that carries the task: class scores "
                     f"[*labels, classes] or integer labels [*labels] (outputs: {shapes})",
                     hint="labels hold one class index per sample (or per position); name the output with "
                          "--task-output")


def _evaluate(baseline: _Model, candidates: list[_Model], dataset: Dataset, config: ReportConfig,
              progress: Progress | None) -> _Evaluation:
    layer_names = {c.name: matched_tensors(baseline.proto, c.proto) for c in candidates} if config.per_layer else {}
    evaluation = _Evaluation(baseline, candidates, SYNTHETIC if dataset.synthetic else REAL, layer_names,
                             config.task_outputs)
    exposed_by_baseline = sorted({name for matches in layer_names.values() for name in matches})
    sessions = {baseline.name: _accuracy_session(baseline.proto, exposed_by_baseline, config)}
    for candidate in candidates:
        exposed = list(layer_names.get(candidate.name, {}).values())
        sessions[candidate.name] = _accuracy_session(candidate.proto, exposed, config)
    total = min(dataset.num_samples, config.samples) if config.samples else dataset.num_samples
    stage = Stage(progress, "evaluating", total)
    batch_size = PER_LAYER_BATCH if config.per_layer else EVAL_BATCH
    for feed, labels in dataset.labelled_batches(batch_size, config.samples):
        outputs = {name: _run_named(session, feed) for name, session in sessions.items()}
        evaluation.update(feed, outputs, labels)
        stage.advance(dataset.samples_in(feed))
    return evaluation


def _accuracy_session(model: onnx.ModelProto, exposed: list[str], config: ReportConfig):
    # Exposing intermediates keeps onnxruntime from fusing them away; timing uses plain sessions.
    source = with_outputs(model, exposed) if exposed else model
    return create_session(source, config.providers[0], threads=config.threads or None)


def _run_named(session, feed: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


# ---------------------------------------------------------------------------------------------------
# Latency


def _time_all(models: list[_Model], dataset: Dataset, config: ReportConfig,
              progress: Progress | None) -> dict[str, list[LatencyResult]]:
    feeds = _timing_feeds(dataset, config.batch_size)
    batch = dataset.samples_in(feeds[0])
    results: dict[str, list[LatencyResult]] = {model.name: [] for model in models}
    for provider in config.providers:
        sessions = {m.name: create_session(m.path, provider, threads=config.threads or None) for m in models}
        stage = Stage(progress, f"timing on {provider}", config.runs)
        stats = time_interleaved(sessions, feeds, runs=config.runs, warmup=config.warmup, progress=stage.advance)
        for name, timing in stats.items():
            results[name].append(LatencyResult(provider, batch, timing.median_ms, timing.p90_ms, timing.mean_ms,
                                               timing.throughput(batch), timing.samples_ms))
    return results


def _timing_feeds(dataset: Dataset, batch_size: int) -> list[dict]:
    """A few distinct full batches (a short last batch would time a different workload)."""
    feeds = list(islice(dataset.batches(batch_size, batch_size * TIMING_FEEDS), TIMING_FEEDS))
    full = [feed for feed in feeds if dataset.samples_in(feed) == dataset.samples_in(feeds[0])]
    return full or feeds[:1]


# ---------------------------------------------------------------------------------------------------
# Gates


def evaluate_gates(report: Report, limits: GateLimits) -> list[GateResult]:
    requested = limits.requested()
    qualified = len(report.candidates) > 1
    gates = []
    for candidate in report.candidates:
        for gate, limit in requested.items():
            measured, at_least, on = _measure(gate, candidate)
            passed = measured >= limit if at_least else measured <= limit
            gates.append(GateResult(gate, candidate.name, measured, limit, bool(passed), qualified, on, at_least))
        broken = non_finite_outputs(candidate.outputs)
        if broken:  # its own verdict, with or without gates: no figure of a NaN output means anything
            gates.append(GateResult(FINITE_GATE, candidate.name, float(sum(o.non_finite for o in broken)), 0.0,
                                    False, qualified, ", ".join(o.describe() for o in broken), False))
    return gates


def _scored(candidate: CandidateReport) -> str:
    return ", ".join(o.describe() for o in task_scores(candidate.outputs)) or "none"


def _measure(gate: str, candidate: CandidateReport) -> tuple[float, bool, str]:
    """The candidate's value for a gate (worst over the task outputs, slices and providers), whether higher
    is better, and where it was measured."""
    if gate == "max-accuracy-drop":
        if candidate.accuracy_drop_points is None or candidate.accuracy is None:
            raise UsageError("--max-accuracy-drop needs labels matching an output that carries the task")
        return candidate.accuracy_drop_points, False, f"{candidate.accuracy.output} (accuracy against labels)"
    if gate == "min-agreement":
        worst = worst_agreement(candidate.outputs)
        if worst is None:
            raise UsageError(f"--min-agreement needs class scores or integer labels among the outputs that carry "
                             f"the task (scored: {_scored(candidate)})",
                             hint="use --min-cosine for these outputs, or name a class-score output with --task-output")
        return worst.value, True, worst.where
    if gate == "min-cosine":
        worst = worst_cosine(candidate.outputs)
        if worst is None:
            raise UsageError(f"--min-cosine needs float outputs among those that carry the task; integer labels "
                             f"are scored by exact match (scored: {_scored(candidate)})",
                             hint="use --min-agreement for label outputs")
        return worst.value, True, worst.where
    if gate == "min-speedup":
        figures = [(s.work_ratio if s.work_ratio is not None else s.ratio, s) for s in candidate.speedup]
        value, slowest = min(figures, key=lambda pair: pair[0])
        how = slowest.work_measured_with or "wall clock"
        return value, True, f"provider {slowest.provider}, {how}"
    if gate == "max-size-ratio":
        return candidate.size_ratio, False, "file size"
    raise UsageError(f"unknown gate {gate}")


# ---------------------------------------------------------------------------------------------------
# Verdict and headline


def headline(candidate: CandidateReport) -> str:
    """The deltas that matter, each with where it was measured: size, speed, accuracy, agreement, cosine."""
    parts = [f"size {candidate.size_ratio:.2f}x"]
    parts += [f"speedup {s.ratio:.2f}x on {s.provider}" for s in candidate.speedup]
    if candidate.accuracy_drop_points is not None and candidate.accuracy is not None:
        parts.append(f"top-1 drop {candidate.accuracy_drop_points:.2f} points on {candidate.accuracy.output}")
    broken = non_finite_outputs(candidate.outputs)
    if broken:
        parts.append("NaN or infinite values in " + ", ".join(o.describe() for o in broken))
    agreement = worst_agreement(candidate.outputs)
    if agreement is not None:
        parts.append(f"agreement {agreement.value * 100:.2f}% on {agreement.where}")
    cosine = worst_cosine(candidate.outputs)
    if cosine is not None and not broken:
        parts.append(f"worst cosine {cosine.value:.6f} on {cosine.where}")
    return ", ".join(parts)


def verdict(report: Report) -> str:
    """One line: the gates' outcome, then each candidate's headline."""
    if report.failed_gates:
        failed = "; ".join(f"{g.label} on {g.on}" if g.on else g.label for g in report.failed_gates)
        state = f"FAILED {len(report.failed_gates)} of {len(report.gates)} gates ({failed})"
    elif report.gates:
        state = "passed the one gate" if len(report.gates) == 1 else f"passed all {len(report.gates)} gates"
    else:
        state = "no gates set"
    if not report.candidates:
        return f"{state} (one model: size and latency only)"
    measured_on = f" (figures measured on {report.data.kind})" if report.data.synthetic else ""
    return f"{state}; " + "; ".join(f"{c.name}: {headline(c)}" for c in report.candidates) + measured_on
