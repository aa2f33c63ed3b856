"""THE loop: every statistic a pipeline step asked for, gathered in as few passes over the data as it needs.

    collect(model, dataset, [Request(tensor, observer), ...], provider=..., budget=...)

Pass 1 runs a copy of the graph with reduction nodes added on the wanted tensors (ReduceMin/ReduceMax for
ranges and per-channel abs-max, ReduceSum and Size for channel means): only those small
results leave onnxruntime, as in onnxruntime's own MinMax calibration. Tensors whose values must reach
Python (histograms, Gram matrices, sampled rows, or a reduction the graph cannot express for lack of a known
rank) are fetched after that, only when asked for, in chunks of outputs sized to `budget`, one session and one
pass per chunk (onnxruntime keeps every graph output of a run alive until the run ends, fetched or not), so peak
memory depends neither on the number of samples nor on the model's width; with `one_pass`, all of them from one
session. Histograms need each tensor's exact range first (pass 1 finds it, so they are binned once into their
final bins); other fetched statistics skip pass 1 when shape inference knows their tensors' sizes (else one run
on the first sample measures them). Graph inputs are read from the data itself.

Batches are split into runs of fewer samples when one sample's tensors already weigh much (their shapes
inferred for one sample on a weightless skeleton of the model): an activation map of a 640x480 detector at
batch 32 would otherwise hold gigabytes inside onnxruntime alone. A model whose weights are still mapped from
files runs from them (io.on_disk).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressq.data import Dataset
from compressq.graph.edit import NameGenerator
from compressq.graph.index import TensorType, infer_shapes, opset_version, value_type
from compressq.io import holds_mapped_weights, on_disk
from compressq.runtime import AS_WRITTEN, create_session
from compressq.stats.observers import (
    CANDIDATE_METHODS,
    HISTOGRAM_BINS,
    SENTINEL_MAGNITUDE,
    CandidatesObserver,
    HistogramObserver,
    MinMaxObserver,
    Reduction,
    SumObserver,
    TensorRange,
    range_observer,
)
from compressq.stats.subgraphs import BodyProbes, probe_bodies, split_by_scope

__all__ = ["CANDIDATE_METHODS", "DEFAULT_BUDGET", "HISTOGRAM_BINS", "SENTINEL_MAGNITUDE",
           "CandidatesObserver", "HistogramObserver", "MinMaxObserver", "Request", "TensorRange", "collect",
           "collect_range_candidates", "collect_ranges", "samples_per_run"]

# Bytes of tensors one session may return per run, and the per-run activation weight a batch is split
# to stay under (the sum of all tensors of the samples in one run, an upper bound of what
# onnxruntime's planner keeps alive at once).
DEFAULT_BUDGET = 64 * 2**20
SKELETON_BYTES = 4096  # initializers kept whole for shape inference (shape tensors, scalars)
REDUCIBLE_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE)
Progress = Callable[[int], None]


@dataclass(frozen=True, eq=False)
class Request:
    """One statistic of one tensor: `observer` receives it (reduced in the graph when it can be)."""

    tensor: str
    observer: object  # update(values), result(); `reduction` + update_reduced(...) when reducible


@dataclass
class _Tap:
    """What pass 1 adds for one (tensor, reduction): output names, and who receives them."""

    outputs: tuple[str, ...]
    receivers: list = field(default_factory=list)


def collect(model: onnx.ModelProto, dataset: Dataset, requests: Iterable[Request], *, provider: str = "cpu",
            budget: int = DEFAULT_BUDGET, batch_size: int = 32, samples: int | None = None,
            progress: Progress | None = None, as_written: bool = False, one_pass: bool = False,
            threads: int | None = None, samples_per_run: int | None = None) -> None:
    """Feed every request's observer from `samples` samples of `dataset` (the observers hold the results).

    `as_written`: the graph runs node by node, nothing fused (a graph with fake-quantized twins must not have
    its QDQ pairs turned into integer kernels by onnxruntime's optimizer).

    `one_pass`: every fetched tensor comes from one session in one pass over the data, each observer fed the
    runs in data order (where running the model costs more than the memory a chunked fetch saves).
    `samples_per_run`: runs of exactly that many samples (the last of a batch may hold fewer) instead of as many
    as fit `budget`, so that two collect() calls over the same data cut it into the same runs (refit pairs its
    teacher's runs with its student's by their number); data whose batches cannot be cut runs batch by batch
    either way. An observer with `counts_samples = True` is called `update(values, samples)`, with the samples
    of the run. `threads`: the sessions' intra-op threads (None: onnxruntime's default).

    `progress(count)` is called after each batch of each pass: 1 pass, 2 when a statistic needs the values
    themselves and either their range (histograms) or, for lack of a shape, their size first."""
    requests = list(requests)
    if not requests:
        return
    tappable, elsewhere = map(set, split_by_scope(model, {r.tensor for r in requests}))
    # Tensors inside If/Loop/Scan bodies: their min/max are carried out to main-graph outputs by
    # compressq.stats.subgraphs and read in the same pass; other statistics of them cannot be had.
    in_bodies = [r for r in requests if r.tensor in elsewhere and isinstance(r.observer, MinMaxObserver)]
    requests = [r for r in requests if r.tensor in tappable]
    probes = probe_bodies(model, {r.tensor for r in in_bodies}) if in_bodies else None
    if probes is not None and probes.probes:
        model = probes.model  # a copy with the bodies' reductions carried out
    first = dataset.first_sample()
    if first is None:
        return
    types, one_sample_bytes = _one_sample_types(model, first)
    # Taps in the order their tensors are produced: _Augmented.session lists them so that onnxruntime runs
    # each reduction right after its producer.
    position = _production_order(model)
    requests.sort(key=lambda r: position.get(r.tensor, -1))
    fetched = [r for r in requests if _reduction_for(r.observer, types.get(r.tensor)) is None]
    ranged = {r.tensor for r in fetched if _needs_range(r.observer)}
    # Elements per sample of each fetched tensor: from shape inference where it knows them, else from a Size
    # output of pass 1.
    sizes = {t: n for r in fetched if (t := r.tensor) not in ranged
             and (n := _elements(types.get(t), _rows_in(first))) is not None}
    ranges_first: dict[str, MinMaxObserver] = {}  # exact range of each fetched tensor, found in pass 1
    graph = _Augmented(model, opset_version(model))
    if probes is not None and probes.probes:
        graph.listen_to_bodies(probes, in_bodies)
    for request in requests:
        kind = types.get(request.tensor)
        reduction = _reduction_for(request.observer, kind)
        if reduction is not None:
            graph.tap(request.tensor, reduction, kind, request.observer)
        elif request.tensor in ranged and request.tensor not in ranges_first:
            ranges_first[request.tensor] = MinMaxObserver()
            graph.tap(request.tensor, Reduction("minmax"), kind, ranges_first[request.tensor])
            graph.size_of(request.tensor)
        elif request.tensor not in ranged and request.tensor not in sizes:
            graph.size_of(request.tensor)
    splittable = _splittable(dataset)
    # Samples per run: onnxruntime keeps at most every tensor of the samples it runs alive at once.
    rows = _rows_within(budget, one_sample_bytes, batch_size) if splittable else None
    if splittable and samples_per_run is not None:
        rows = max(1, samples_per_run)
    if graph.has_outputs():  # fetched tensors of known sizes that need no range skip this pass
        session = graph.session(provider, as_written, threads)
        if graph.only_sizes():  # sizes alone: one sample tells them
            sizes.update(_sizes_of_one_sample(session, graph, first))
        else:
            sizes.update(_reduced_pass(session, graph, dataset, batch_size, samples, rows, progress))
        del session
    if not fetched:
        return
    for request in fetched:
        if isinstance(request.observer, HistogramObserver):  # _needs_range, narrowed for the type checker
            request.observer.fix_range(ranges_first[request.tensor])
    wanted = [tensor for tensor in dict.fromkeys(r.tensor for r in fetched)
              if tensor not in ranges_first or ranges_first[tensor].finite]
    per_sample = {t: sizes.get(t, 0.0) * _itemsize(types.get(t)) for t in wanted}
    if wanted:
        fixed = samples_per_run is not None
        _fetching_pass(model, _Fetch(provider, threads, one_pass, fixed), fetched, wanted, per_sample, rows,
                       dataset, batch_size, samples, budget, progress)


def _needs_range(observer) -> bool:
    """The observer bins values into a range it must know before the values arrive (histograms)."""
    return isinstance(observer, HistogramObserver)


def _elements(kind: TensorType | None, rows: int) -> float | None:
    """Elements per sample of a tensor of type `kind` inferred for `rows` samples; None when not all known."""
    shape = _static_shape(kind)
    return None if shape is None else math.prod(shape) / max(rows, 1)


def _static_shape(kind: TensorType | None) -> tuple[int, ...] | None:
    """The shape of type `kind` when every dimension is a known number."""
    if kind is None or kind.shape is None:
        return None
    dims = [d for d in kind.shape if isinstance(d, int) and d >= 0]
    return tuple(dims) if len(dims) == len(kind.shape) else None


def samples_per_run(model: onnx.ModelProto, dataset: Dataset, batch_size: int, budget: int = DEFAULT_BUDGET) -> int:
    """Samples one session run may take so that all its tensors fit `budget` (at least 1; `batch_size` when
    the data's batches cannot be cut): the batch any loop over this data should run the model at."""
    first = dataset.first_sample()
    if first is None or not _splittable(dataset):
        return batch_size
    _, one_sample_bytes = _one_sample_types(model, first)
    return _rows_within(budget, one_sample_bytes, batch_size)


def one_sample_shapes(model: onnx.ModelProto, dataset: Dataset, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Each named tensor's shape for the first sample of `dataset`: from shape inference on a weightless
    skeleton, or, for tensors whose shape it leaves open, from running the model on that sample."""
    first = dataset.first_sample()
    if first is None:
        return {}
    types, _ = _one_sample_types(model, first)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in dict.fromkeys(names):
        shape = _static_shape(types.get(name))
        if shape is not None:
            shapes[name] = shape
    observers = {name: _ShapeObserver() for name in dict.fromkeys(names) if name not in shapes}
    if observers:
        collect(model, dataset, [Request(n, o) for n, o in observers.items()], batch_size=1, samples=1,
                one_pass=True)
        shapes.update((name, observer.shape) for name, observer in observers.items())
    return shapes


class _ShapeObserver:
    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()

    def update(self, values: np.ndarray) -> None:
        self.shape = self.shape or tuple(values.shape)


def output_bytes_per_sample(model: onnx.ModelProto, dataset: Dataset) -> float | None:
    """What the model's outputs weigh per sample, from shape inference on one sample (no session, no weights
    read); None when an output's shape is only known by running the model."""
    first = dataset.first_sample()
    if first is None:
        return None
    types, _ = _one_sample_types(model, first)
    total = 0.0
    for output in model.graph.output:
        elements = _elements(types.get(output.name), _rows_in(first))
        if elements is None:
            return None
        total += elements * _itemsize(types.get(output.name))
    return total


def sum_outputs(model: onnx.ModelProto, names: Sequence[str], dataset: Dataset, *, batch_size: int = 8,
                samples: int | None = None, provider: str = "cpu", progress: Progress | None = None,
                as_written: bool = True) -> dict[str, float]:
    """Each named tensor summed over the data in one pass (the graph's own error sums, for range search and
    recovery: run as written by default, so that fake-quantized twins stay what they emulate)."""
    observers = {name: SumObserver() for name in dict.fromkeys(names)}
    collect(model, dataset, [Request(name, observer) for name, observer in observers.items()], provider=provider,
            batch_size=batch_size, samples=samples, progress=progress, as_written=as_written)
    return {name: observer.result() for name, observer in observers.items()}


def passes_for_method(method: str) -> int:
    """Passes over the data collect_ranges makes for a calibration method (histograms need a second)."""
    return 1 if method == "minmax" else 2


# -- pass 1: reductions in the graph ----------------------------------------------------------------


def _reduced_pass(session, graph: _Augmented, dataset: Dataset, batch_size: int, samples: int | None,
                  rows: int | None, progress: Progress | None) -> dict[str, float]:
    """Run every batch once, in runs of `rows` samples (None: as the dataset gives them); returns the element
    count per sample of each tensor with a Size output (measured on the first run)."""
    names = graph.reduced_outputs()
    size_outputs = graph.size_outputs()
    outputs = names + list(size_outputs.values()) + graph.body_outputs()
    per_sample: dict[str, float] = {}
    for feed in dataset.batches(batch_size, samples):
        for part in _runs(feed, rows):
            values = dict(zip(outputs, session.run(outputs, part)))
            graph.deliver(values, _rows_in(part))
            if size_outputs and not per_sample:
                taken = max(_rows_in(part), 1)
                per_sample = {t: float(values[o]) / taken for t, o in size_outputs.items()}
        if progress:
            progress(dataset.samples_in(feed))
    return per_sample


# -- pass 2: tensors fetched in chunks ---------------------------------------------------------------


@dataclass(frozen=True)
class _Fetch:
    """How the fetching pass opens its sessions and splits its work."""

    provider: str
    threads: int | None
    one_pass: bool
    fixed_runs: bool  # the caller chose the samples per run


def _fetching_pass(model: onnx.ModelProto, how: _Fetch, fetched: list[Request], wanted: list[str],
                   per_sample: dict[str, float], rows: int | None, dataset: Dataset, batch_size: int,
                   samples: int | None, budget: int, progress: Progress | None) -> None:
    """One session per chunk of tensors, each chunk's tensors its only extra outputs: onnxruntime keeps
    every graph output of a run alive to the end of the run, fetched or not, so a chunk is a session (one
    chunk of everything when `how.one_pass`). Graph inputs come from the feed itself."""
    if rows is not None and not how.fixed_runs:
        heaviest = sum(per_sample.values()) if how.one_pass else max(per_sample.values(), default=0.0)
        rows = min(rows, _rows_within(budget, heaviest, batch_size))
    chunks = [list(wanted)] if how.one_pass else \
        _chunks(wanted, {t: per_sample[t] * (rows or batch_size) for t in wanted}, budget)
    receivers: dict[str, list] = {}
    for request in fetched:
        receivers.setdefault(request.tensor, []).append(request.observer)
    fed = {value.name for value in model.graph.input}
    for number, chunk in enumerate(chunks):
        outputs = [tensor for tensor in chunk if tensor not in fed]
        session = _exposing_session(model, outputs, how) if outputs else None
        for feed in dataset.batches(batch_size, samples):
            for part in _runs(feed, rows):
                values = dict(zip(outputs, session.run(outputs, part))) if session is not None else {}
                for tensor in chunk:
                    for observer in receivers[tensor]:
                        _hand_over(observer, values[tensor] if tensor in values else part[tensor],
                                   dataset.samples_in(part))
                del values
            if progress:  # this pass's share of the batch, so that the chunks add up to one pass
                count = dataset.samples_in(feed)
                progress(count * (number + 1) // len(chunks) - count * number // len(chunks))
        del session


def _hand_over(observer, values: np.ndarray, samples: int) -> None:
    if getattr(observer, "counts_samples", False):
        observer.update(values, samples)
    else:
        observer.update(values)


def _sizes_of_one_sample(session, graph: _Augmented, first: dict[str, np.ndarray]) -> dict[str, float]:
    """Elements per sample of each tensor with a Size output, from one run on the first sample."""
    names = graph.size_outputs()
    found = dict(zip(names.values(), session.run(list(names.values()), first)))
    taken = max(_rows_in(first), 1)
    return {tensor: float(found[output]) / taken for tensor, output in names.items()}


def _exposing_session(model: onnx.ModelProto, names: Sequence[str], how: _Fetch):
    """A session of `model` that also returns `names` (appended only while the model is serialized)."""
    present = {o.name for o in model.graph.output}
    outputs = [onnx.ValueInfoProto(name=name) for name in names if name not in present]
    model.graph.output.extend(outputs)
    try:
        return _calibration_session(model, how.provider, threads=how.threads)
    finally:
        _drop_last(model.graph.output, len(outputs))


def _calibration_session(model: onnx.ModelProto, provider: str, as_written: bool = False,
                         threads: int | None = None):
    """A session for the data passes, its idle pool threads asleep instead of spinning: calibration runs one
    long graph after another, where spinning threads only burn CPU time (and on a busy machine take it from the
    threads doing the work). BERT-6, `quantize --no-speed-check` on 256 samples, 2 shared cores, interleaved:
    94.5 / 88.2 CPU s spinning, 73.8 / 81.1 asleep; wall 105 / 76 s against 49 / 77 s.

    A model whose weights are still mapped from files is handed to onnxruntime as a file beside them (none read
    into memory here); the session holds what it needs once made, so the file goes right after."""
    options: dict = {"spinning": False, **({"level": AS_WRITTEN} if as_written else {})}
    if holds_mapped_weights(model):
        with on_disk(model) as (path,):
            return create_session(path, provider, threads, **options)
    return create_session(model, provider, threads, **options)


def _runs(feed: dict[str, np.ndarray], rows: int | None) -> Iterable[dict[str, np.ndarray]]:
    """The feed in runs of `rows` samples (views, no copies); the whole feed when rows is None."""
    count = _rows_in(feed)
    if rows is None or rows >= count:
        yield feed
        return
    for start in range(0, count, rows):
        yield _slice(feed, start, rows)


def _chunks(names: Sequence[str], weights: dict[str, float], budget: int) -> list[list[str]]:
    """Consecutive groups of names whose weights add up to at most `budget` (a heavier name goes alone)."""
    chunks: list[list[str]] = []
    current: list[str] = []
    total = 0.0
    for name in names:
        if current and total + weights[name] > budget:
            chunks.append(current)
            current, total = [], 0.0
        current.append(name)
        total += weights[name]
    if current:
        chunks.append(current)
    return chunks


def _rows_within(budget: int, bytes_per_sample: float, batch_size: int) -> int:
    if bytes_per_sample <= 0:
        return max(batch_size, 1)
    return max(1, min(max(batch_size, 1), int(budget // bytes_per_sample)))


def _splittable(dataset: Dataset) -> bool:
    """Batches may be cut into runs of fewer samples: axis 0 is a free batch axis of every input."""
    return dataset.layout == "batch" and not any(spec.fixed_batch for spec in dataset.inputs)


def _rows_in(feed: dict[str, np.ndarray]) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _slice(feed: dict[str, np.ndarray], start: int, rows: int) -> dict[str, np.ndarray]:
    return {name: values[start:start + rows] for name, values in feed.items()}


def _one_sample_types(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[dict[str, TensorType], float]:
    """Type and shape of every tensor for the shapes of `feed` (one sample), and the bytes of all the main
    graph's tensors whose shapes are then known: what one sample weighs inside onnxruntime at most.

    Shapes are inferred on a skeleton of the model (weights above SKELETON_BYTES keep their type and dims,
    not their data): no copy of the weights is made, whatever the model's size."""
    inferred = infer_shapes(_skeleton(model, feed))
    graph = inferred.graph
    types = {v.name: value_type(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    for tensor in model.graph.initializer:
        types[tensor.name] = TensorType(tensor.data_type, tuple(tensor.dims))
    produced = {o for node in model.graph.node for o in node.output} | set(feed)
    rows = _rows_in(feed)
    total = sum(elements * _itemsize(types.get(name)) for name in produced
                if (elements := _elements(types.get(name), rows)) is not None)
    return types, total


def _skeleton(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> onnx.ModelProto:
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    source, graph = model.graph, skeleton.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    for value in source.input:
        concrete = onnx.ValueInfoProto()
        concrete.CopyFrom(value)
        if value.name in feed and value.type.HasField("tensor_type"):
            shape = concrete.type.tensor_type.shape
            shape.Clear()
            for size in feed[value.name].shape:
                shape.dim.add().dim_value = int(size)
        graph.input.append(concrete)
    for tensor in source.initializer:
        if tensor.ByteSize() <= SKELETON_BYTES:
            graph.initializer.append(tensor)
        else:
            graph.initializer.append(onnx.TensorProto(name=tensor.name, data_type=tensor.data_type,
                                                      dims=list(tensor.dims)))
    return skeleton


def _itemsize(kind: TensorType | None) -> int:
    dtype = kind.dtype if kind is not None else None
    return dtype.itemsize if dtype is not None else 4


# -- the augmented graph ------------------------------------------------------------------------------


def _reduction_for(observer, kind: TensorType | None) -> Reduction | None:
    """The reduction collect adds for `observer` on a tensor of type `kind`, or None: fetch the values.

    Per-channel reductions need the rank (axes are listed); floats other than float32/64 are cast first."""
    reduction = getattr(observer, "reduction", None)
    if reduction is None or reduction.axis is None:
        return reduction
    if kind is None or kind.shape is None:
        return None
    return reduction


class _Augmented:
    """A copy of the model with reduction and Size outputs; routes the run's results to the observers."""

    def __init__(self, model: onnx.ModelProto, opset: int):
        self.source = model
        self.opset = opset
        self.names = NameGenerator(model.graph)
        self.groups: dict[str, list[onnx.NodeProto]] = {}  # tensor -> the nodes that reduce it, in tap order
        self.tapping = ""
        self.probes: BodyProbes | None = None
        self.body_receivers: dict[str, list] = {}
        self.initializers: list[onnx.TensorProto] = []
        self.taps: dict[tuple[str, Reduction], _Tap] = {}
        self.sizes: dict[str, str] = {}

    def tap(self, tensor: str, reduction: Reduction, kind: TensorType | None, observer) -> None:
        self.tapping = tensor
        key = (tensor, reduction)
        if key not in self.taps:
            self.taps[key] = _Tap(self._reduce(tensor, reduction, kind))
        self.taps[key].receivers.append(observer)

    def size_of(self, tensor: str) -> None:
        self.tapping = tensor
        if tensor not in self.sizes:
            self.sizes[tensor] = self._node("Size", [tensor], f"{tensor}/size")

    def reduced_outputs(self) -> list[str]:
        return [name for tap in self.taps.values() for name in tap.outputs]

    def size_outputs(self) -> dict[str, str]:
        return dict(self.sizes)


    def listen_to_bodies(self, probes: BodyProbes, requests: list[Request]) -> None:
        self.probes = probes
        for request in requests:
            self.body_receivers.setdefault(request.tensor, []).append(request.observer)

    def body_outputs(self) -> list[str]:
        return self.probes.outputs if self.probes is not None else []

    def deliver(self, values: dict[str, np.ndarray], rows: int) -> None:
        if self.probes is not None:
            for tensor, (low, high) in self.probes.decode(values).items():
                for observer in self.body_receivers.get(tensor, []):
                    observer.update_reduced(low, high)
        for (_, reduction), tap in self.taps.items():
            results: list = [values[name] for name in tap.outputs]
            if reduction.kind == "rows":  # the values themselves, and the run's sample count to check them by
                results.append(rows)
            for observer in tap.receivers:
                observer.update_reduced(*results)

    def has_outputs(self) -> bool:
        return bool(self.taps or self.sizes or self.body_outputs())

    def only_sizes(self) -> bool:
        return bool(self.sizes) and not (self.taps or self.body_outputs())

    def session(self, provider: str, as_written: bool = False, threads: int | None = None):
        """A session of the model with the reductions and outputs added.

        The additions are appended to the model's own graph for the time it takes to serialize it, then
        removed (in `finally`): a copy of the model would hold its weights twice more (the copy and its
        bytes) at the moment onnxruntime holds them too, and that moment sets the peak for large models."""
        graph = self.source.graph
        present = {o.name for o in graph.output}
        outputs = [onnx.ValueInfoProto(name=name) for name in
                   dict.fromkeys([*self.reduced_outputs(), *self.sizes.values()])
                   if name not in present]
        # onnxruntime's default order is a depth-first walk back from the graph's leaves, the last leaf in the
        # list first: listing the reductions of the earliest tensors last makes each reduction run right after
        # its producer, which frees the tensor. In production order, the reduction of the latest tensor would
        # come first and pull the whole graph in ahead of every other reduction, keeping every tapped tensor
        # alive to the end of the run (ocr_det: 1 GB for one sample instead of 0.25 GB).
        nodes = [node for group in reversed(self.groups.values()) for node in group]
        graph.node.extend(nodes)
        graph.initializer.extend(self.initializers)
        graph.output.extend(outputs)
        try:
            return _calibration_session(self.source, provider, as_written, threads)
        finally:
            _drop_last(graph.node, len(nodes))
            _drop_last(graph.initializer, len(self.initializers))
            _drop_last(graph.output, len(outputs))

    def _reduce(self, tensor: str, reduction: Reduction, kind: TensorType | None) -> tuple[str, ...]:
        if reduction.kind == "rows":  # a graph output is returned anyway; anything else through an Identity
            outputs = {o.name for o in self.source.graph.output}
            return (tensor,) if tensor in outputs else (self._node("Identity", [tensor], f"{tensor}/rows"),)
        source = tensor
        if kind is None or kind.elem_type not in REDUCIBLE_TYPES:  # float16/bf16 or unknown: reduce in float32
            source = self._node("Cast", [tensor], f"{tensor}/float", to=TensorProto.FLOAT)
        axes = None
        if reduction.axis is not None:  # _reduction_for asks for a known rank before an axis
            assert kind is not None and kind.shape is not None
            rank = len(kind.shape)
            channel = reduction.axis % rank
            axes = [a for a in range(rank) if a != channel]
        if reduction.kind == "minmax":
            return (self._reduction_node("ReduceMin", source, axes, f"{tensor}/min"),
                    self._reduction_node("ReduceMax", source, axes, f"{tensor}/max"))
        return (self._reduction_node("ReduceSum", source, axes, f"{tensor}/sum"),
                self._node("Size", [tensor], f"{tensor}/count"))

    def _reduction_node(self, op: str, source: str, axes: list[int] | None, label: str) -> str:
        # ReduceSum takes its axes as an input from opset 13, ReduceMin/ReduceMax from opset 18.
        axes_as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if axes is None or not axes:
            if axes is not None and not axes:  # a rank-1 tensor is all channels: nothing to reduce
                return self._node("Identity", [source], label)
            return self._node(op, [source], label, keepdims=0)
        if axes_as_input:
            axes_name = self.names(f"compressq_stats/{label}/axes")
            self.initializers.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
            return self._node(op, [source, axes_name], label, keepdims=0)
        return self._node(op, [source], label, keepdims=0, axes=axes)

    def _node(self, op: str, inputs: list[str], label: str, **attributes) -> str:
        output = self.names(f"compressq_stats/{label}")
        node = helper.make_node(op, inputs, [output], name=self.names(f"compressq_stats/{label}/node"), **attributes)
        self.groups.setdefault(self.tapping, []).append(node)
        return output


def _production_order(model: onnx.ModelProto) -> dict[str, int]:
    """Position of each tensor's producer in the graph (graph inputs and initializers first)."""
    return {output: index for index, node in enumerate(model.graph.node) for output in node.output}


def _drop_last(field, count: int) -> None:
    if count:
        del field[-count:]


# -- the calibration requests of quantize ------------------------------------------------------------


def collect_ranges(
    model: onnx.ModelProto,
    dataset: Dataset,
    tensor_names: Iterable[str],
    *,
    method: str = "minmax",
    percentile: float = 99.999,
    batch_size: int = 32,
    samples: int | None = None,
    provider: str = "cpu",
    budget: int = DEFAULT_BUDGET,
    progress: Progress | None = None,
    extra: Sequence[Request] = (),
) -> dict[str, TensorRange]:
    """The range of every requested tensor by `method`, from one collect() over the data; `extra` requests
    (another statistic the same step needs, e.g. bias correction's channel means) ride along."""
    observers = {name: range_observer(method, percentile) for name in sorted(set(tensor_names))}
    collect(model, dataset, [*(Request(n, o) for n, o in observers.items()), *extra], provider=provider,
            budget=budget, batch_size=batch_size, samples=samples, progress=progress)
    return {name: _finished(observer) for name, observer in observers.items()}


def collect_range_candidates(model: onnx.ModelProto, dataset: Dataset, tensor_names: Iterable[str], *,
                             batch_size: int = 32, samples: int | None = None, provider: str = "cpu",
                             budget: int = DEFAULT_BUDGET, progress: Progress | None = None,
                             extra: Sequence[Request] = ()) -> dict[str, dict[str, TensorRange]]:
    """Per tensor, every candidate range of CANDIDATE_METHODS (one entry when it is not finite)."""
    observers = {name: CandidatesObserver() for name in sorted(set(tensor_names))}
    collect(model, dataset, [*(Request(n, o) for n, o in observers.items()), *extra], provider=provider,
            budget=budget, batch_size=batch_size, samples=samples, progress=progress)
    return {name: observer.candidates() for name, observer in observers.items()}


def _finished(observer) -> TensorRange:
    result = observer.result()
    return result if isinstance(result, TensorRange) else result["minmax"]
