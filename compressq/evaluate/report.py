"""The report as data: what was measured for each model, the gates and their verdicts.

`build_report` runs the models (accuracy and agreement in one streaming pass over the data, then
interleaved timing per provider) and returns a `Report`; rendering lives in compressq.evaluate.render.
The JSON form (`Report.to_dict`) is a documented, versioned schema: keys are only ever added.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo

from compressq import __version__
from compressq.data import Dataset, load_dataset, model_inputs, synthetic_dataset
from compressq.errors import DataError, ModelError, UsageError
from compressq.evaluate.latency import LatencyStats, speedup, time_interleaved
from compressq.evaluate.metrics import OutputAgreement, TopKCounter, is_class_output
from compressq.evaluate.per_layer import LayerComparison, LayerErrors, matched_tensors, produced_tensors
from compressq.graph import iter_tensors, load_model
from compressq.runtime import create_session, provider_chain, with_outputs
from compressq.summary import all_nodes, summarize

SCHEMA = "compressq.report/1"
SYNTHETIC = "synthetic inputs"
REAL = "real data"
SYNTHETIC_SAMPLES = 64
EVAL_BATCH = 64  # accuracy batches; --batch-size is the batch that latency is measured at
# --per-layer holds every matched intermediate of one batch at once (BERT-base: ~25 MB per tensor at 64
# samples x 128 tokens): smaller batches keep that bounded.
PER_LAYER_BATCH = 8
TIMING_FEEDS = 4  # distinct batches cycled through while timing

INTEGER_WEIGHTED_OPS = frozenset({
    "QLinearConv", "ConvInteger", "MatMulInteger", "QGemm", "QLinearMatMul", "MatMulNBits",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QOrderedMatMul",
})
FLOAT_WEIGHTED_OPS = frozenset({"Conv", "MatMul", "Gemm"})

# Called with (what is running, how many steps); returns the callback that advances by n steps.
StartTask = Callable[[str, int], Callable[[int], None]]


# ---------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class GateLimits:
    max_accuracy_drop: float | None = None  # points of top-1 accuracy
    min_agreement: float | None = None  # fraction of samples whose top-1 class matches the baseline
    min_cosine: float | None = None
    min_speedup: float | None = None  # baseline median / candidate median
    max_size_ratio: float | None = None  # candidate file bytes / baseline file bytes

    def requested(self) -> dict[str, float]:
        """Gate name (as spelled on the command line, without dashes) -> limit, for gates that were set."""
        return {name.replace("_", "-"): limit for name, limit in asdict(self).items() if limit is not None}


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
class OutputComparison:
    output: str
    data: str  # SYNTHETIC or REAL, next to every figure so nobody mistakes one for the other
    samples: int
    top1_agreement: float | None  # None for outputs that are not class scores
    cosine: float
    sqnr_db: float
    max_abs_error: float


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
    ratio: float
    ratio_q1: float
    ratio_q3: float


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


@dataclass
class GateResult:
    gate: str
    candidate: str
    measured: float
    limit: float
    passed: bool
    qualified: bool = False  # several candidates: name the candidate in the gate's label

    @property
    def label(self) -> str:
        return f"{self.gate}[{self.candidate}]" if self.qualified else self.gate

    def failure_line(self) -> str:
        return f"GATE FAILED: {self.label}: {format_number(self.measured)} vs {format_number(self.limit)}"


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


def check_gate_usage(config: ReportConfig) -> None:
    requested = config.gates.requested()
    if requested and not config.candidates:
        raise UsageError(f"--{next(iter(requested))} compares a candidate with the baseline, but only one "
                         "model was given", hint="pass the compressed model after the baseline")
    if "max-accuracy-drop" in requested and config.data is None:
        raise UsageError("--max-accuracy-drop needs labelled data; without --data the inputs would be synthetic",
                         hint="pass --data eval.npz holding the model inputs and a 'labels' array")


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


def build_report(config: ReportConfig, start_task: StartTask | None = None) -> Report:
    check_gate_usage(config)
    check_providers(config.providers)
    names = display_names([config.baseline, *config.candidates])
    baseline = _Model(names[0], config.baseline, load_model(config.baseline))
    candidates = [_Model(name, path, load_model(path)) for name, path in zip(names[1:], config.candidates)]
    for candidate in candidates:
        _check_same_interface(baseline, candidate)
    dataset = _dataset(config, baseline.proto)
    evaluation = _evaluate(baseline, candidates, dataset, config, start_task)
    latencies = _time_all([baseline, *candidates], dataset, config, start_task)
    baseline_report = ModelReport(baseline.name, model_facts(baseline.proto, baseline.path),
                                  evaluation.accuracy(baseline.name), latencies[baseline.name])
    candidate_reports = [_candidate_report(c, baseline_report, evaluation, latencies[c.name])
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
                           require_labels=config.require_labels)
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
            "batch_size": config.batch_size, "samples": config.samples, "per_layer": config.per_layer}


def _candidate_report(candidate: _Model, baseline: ModelReport, evaluation: _Evaluation,
                      latency: list[LatencyResult]) -> CandidateReport:
    facts = model_facts(candidate.proto, candidate.path)
    accuracy = evaluation.accuracy(candidate.name)
    drop = (baseline.accuracy.top1 - accuracy.top1) * 100.0 if accuracy and baseline.accuracy else None
    by_provider = {result.provider: result for result in baseline.latency}
    speedups = [_speedup(by_provider[result.provider], result) for result in latency]
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


def _speedup(baseline: LatencyResult, candidate: LatencyResult) -> SpeedupResult:
    ratio = speedup(LatencyStats(baseline.median_ms, baseline.p90_ms, baseline.samples_ms),
                    LatencyStats(candidate.median_ms, candidate.p90_ms, candidate.samples_ms))
    return SpeedupResult(candidate.provider, ratio.ratio, ratio.ratio_q1, ratio.ratio_q3)


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
    """Running sums for every model: top-k hits, per-output agreement, per-layer errors."""

    def __init__(self, baseline: _Model, candidates: list[_Model], data_kind: str,
                 layer_names: dict[str, dict[str, str]]) -> None:
        self.data_kind = data_kind
        self.output_names = [o.name for o in baseline.proto.graph.output]
        self.topk = {model.name: TopKCounter() for model in [baseline, *candidates]}
        self.agreements = {c.name: {name: OutputAgreement() for name in self.output_names} for c in candidates}
        op_types = produced_tensors(baseline.proto)
        self.layer_errors = {name: LayerErrors(tensors, op_types) for name, tensors in layer_names.items()}
        self.label_output: str | None = None
        self.classes = 0

    def update(self, outputs: dict[str, dict[str, np.ndarray]], baseline_name: str,
               labels: np.ndarray | None) -> None:
        reference = outputs[baseline_name]
        if labels is not None:
            self._update_accuracy(outputs, labels)
        for candidate, reducers in self.agreements.items():
            for name, reducer in reducers.items():
                _check_same_shape(candidate, name, reference[name], outputs[candidate][name])
                reducer.update(reference[name], outputs[candidate][name])
            if candidate in self.layer_errors:
                self.layer_errors[candidate].update(reference, outputs[candidate])

    def _update_accuracy(self, outputs: dict[str, dict[str, np.ndarray]], labels: np.ndarray) -> None:
        first = next(iter(outputs.values()))
        if self.label_output is None:
            self.label_output = _scores_for_labels(first, self.output_names, labels)
            self.classes = first[self.label_output].shape[-1]
        for model, values in outputs.items():
            logits = values[self.label_output]
            self.topk[model].update(logits.reshape(-1, self.classes), np.asarray(labels).reshape(-1))

    def accuracy(self, model: str) -> Accuracy | None:
        counter = self.topk.get(model)
        if counter is None or counter.samples == 0 or self.label_output is None:
            return None
        top5 = counter.accuracy(5) if self.classes >= 5 else None
        return Accuracy(REAL, self.label_output, counter.samples, counter.accuracy(1), top5)

    def output_comparisons(self, candidate: str) -> list[OutputComparison]:
        rows = []
        for name, reducer in self.agreements[candidate].items():
            result = reducer.result()
            rows.append(OutputComparison(name, self.data_kind, result.samples, result.top1_agreement,
                                         result.cosine, result.sqnr_db, result.max_abs_error))
        return rows


def _check_same_shape(candidate: str, output: str, reference: np.ndarray, test: np.ndarray) -> None:
    if np.shape(reference) != np.shape(test):
        raise ModelError(f"{candidate} output '{output}' has shape {list(np.shape(test))}, the baseline's "
                         f"{list(np.shape(reference))}", hint="outputs are compared element by element; "
                         "compare models with the same output shapes")


def _scores_for_labels(values: dict[str, np.ndarray], output_names: list[str], labels: np.ndarray) -> str:
    """The output that scores classes for these labels: shape [*labels.shape, classes]."""
    labels = np.asarray(labels)
    for name in output_names:
        shape = values[name].shape
        if is_class_output(shape) and tuple(shape[:-1]) == labels.shape:
            return name
    shapes = ", ".join(f"{n} {list(values[n].shape)}" for n in output_names)
    raise DataError(f"labels of shape {list(labels.shape)} match no output of shape [*labels, classes] "
                    f"(outputs: {shapes})",
                    hint="labels hold one class index per sample (or per position for sequence outputs)")


def _evaluate(baseline: _Model, candidates: list[_Model], dataset: Dataset, config: ReportConfig,
              start_task: StartTask | None) -> _Evaluation:
    layer_names = {c.name: matched_tensors(baseline.proto, c.proto) for c in candidates} if config.per_layer else {}
    evaluation = _Evaluation(baseline, candidates, SYNTHETIC if dataset.synthetic else REAL, layer_names)
    exposed_by_baseline = sorted({name for matches in layer_names.values() for name in matches})
    sessions = {baseline.name: _accuracy_session(baseline.proto, exposed_by_baseline, config)}
    for candidate in candidates:
        exposed = list(layer_names.get(candidate.name, {}).values())
        sessions[candidate.name] = _accuracy_session(candidate.proto, exposed, config)
    total = min(dataset.num_samples, config.samples) if config.samples else dataset.num_samples
    advance = start_task("evaluating", total) if start_task else None
    batch_size = PER_LAYER_BATCH if config.per_layer else EVAL_BATCH
    for feed, labels in dataset.labelled_batches(batch_size, config.samples):
        outputs = {name: _run_named(session, feed) for name, session in sessions.items()}
        evaluation.update(outputs, baseline.name, labels)
        if advance:
            advance(len(next(iter(feed.values()))))
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
              start_task: StartTask | None) -> dict[str, list[LatencyResult]]:
    feeds = _timing_feeds(dataset, config.batch_size)
    batch = len(next(iter(feeds[0].values())))
    results: dict[str, list[LatencyResult]] = {model.name: [] for model in models}
    for provider in config.providers:
        sessions = {m.name: create_session(m.path, provider, threads=config.threads or None) for m in models}
        advance = start_task(f"timing on {provider}", config.runs) if start_task else None
        stats = time_interleaved(sessions, feeds, runs=config.runs, warmup=config.warmup, progress=advance)
        for name, timing in stats.items():
            results[name].append(LatencyResult(provider, batch, timing.median_ms, timing.p90_ms, timing.mean_ms,
                                               timing.throughput(batch), timing.samples_ms))
    return results


def _timing_feeds(dataset: Dataset, batch_size: int) -> list[dict]:
    """A few distinct full batches (a short last batch would time a different workload)."""
    feeds = list(islice(dataset.batches(batch_size, batch_size * TIMING_FEEDS), TIMING_FEEDS))
    full = [feed for feed in feeds if len(next(iter(feed.values()))) == len(next(iter(feeds[0].values())))]
    return full or feeds[:1]


# ---------------------------------------------------------------------------------------------------
# Gates


def evaluate_gates(report: Report, limits: GateLimits) -> list[GateResult]:
    requested = limits.requested()
    qualified = len(report.candidates) > 1
    gates = []
    for candidate in report.candidates:
        for gate, limit in requested.items():
            measured, at_least = _measure(gate, candidate)
            passed = measured >= limit if at_least else measured <= limit
            gates.append(GateResult(gate, candidate.name, measured, limit, bool(passed), qualified))
    return gates


def _measure(gate: str, candidate: CandidateReport) -> tuple[float, bool]:
    """The candidate's value for a gate (worst over outputs and providers), and whether higher is better."""
    if gate == "max-accuracy-drop":
        if candidate.accuracy_drop_points is None:
            raise UsageError("--max-accuracy-drop needs labels matching a class-score output")
        return candidate.accuracy_drop_points, False
    if gate == "min-agreement":
        agreements = [o.top1_agreement for o in candidate.outputs if o.top1_agreement is not None]
        if not agreements:
            raise UsageError("--min-agreement needs an output that scores classes ([batch, classes] or "
                             "[batch, positions, classes])", hint="use --min-cosine for other outputs")
        return min(agreements), True
    if gate == "min-cosine":
        return min(o.cosine for o in candidate.outputs), True
    if gate == "min-speedup":
        return min(s.ratio for s in candidate.speedup), True
    if gate == "max-size-ratio":
        return candidate.size_ratio, False
    raise UsageError(f"unknown gate {gate}")
