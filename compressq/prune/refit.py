"""Least-squares reconstruction against the dense teacher: layer-by-layer distillation without labels.

For every refit layer, in graph order:
  X = the layer's input in the *pruned* model as refit so far (earlier layers are already refit), so each
      layer also absorbs the error that reaches it from upstream instead of letting errors compound;
  Y = the same layer's output in the *dense* model on the same calibration batch.
The kept weights (and the bias) of every output channel become the least-squares solution of X w ~ y,
restricted to the sparsity pattern: pruned weights stay exactly zero. A ridge term pulls towards the pruned
weights, so a layer cannot wander off to fit calibration noise; it also guarantees the calibration error
never grows.

Cost, which is what makes refit usable on real models:
  * one Gram matrix X^T X per layer (per group of a grouped Conv), shared by all output channels, streamed
    run by run (products taken a few thousand rows at a time), so memory depends on the layer's size, never on
    the number of samples;
  * rows (samples x output positions) are subsampled to a budget per layer (`rows_per_feature` x the number
    of weights per output channel, within [`min_rows`, `max_rows`]), spread over at least `spread` times as
    many samples as the budget strictly needs (read off one sample's output); a layer reads only those
    samples, so an early high-resolution convolution runs the model on a few samples, not on every one;
  * the dense teacher runs ONCE, before any refit, over the samples the layers need, in one stats.collect()
    pass cut into runs of as many samples as fit REFIT_BUDGET: every layer's row positions are drawn up front,
    run by run, from its own generator, and only the teacher's values at those rows are kept (rows x outputs
    per layer);
  * each wave then runs only the pruned model's prefix up to its layers' inputs, cut into the same runs (run k
    of the student pairs with run k of the teacher), and layers whose inputs do not depend on each other's
    refit (the branches of a detector head) share one wave: one pass for all of them;
  * all output channels of a layer are solved together (solvers.py): channels sharing one sparsity pattern
    (channel refit, N:M with few patterns) by one factorisation; with unstructured sparsity, where every
    channel has its own pattern and a k^3 solve of its own made refit slow, by conjugate gradients on all
    channels at once, one matrix product with the Gram matrix per iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from compressq.data import Dataset
from compressq.graph.index import GraphIndex, implicit_inputs, node_attributes
from compressq.prune.solvers import masked_ridge_solve, squared_errors
from compressq.prune.structured import replace_constant_input
from compressq.stats.collect import DEFAULT_BUDGET, Request, collect, one_sample_shapes, samples_per_run

# One intra-op thread: onnxruntime's pool spin-waits after each run and starves numpy's BLAS, which
# accumulates the normal equations between runs (3x slower end to end on 2 cores with the default pool).
SESSION_THREADS = 1
# What the tensors of one run may weigh: the dense teacher runs once over the samples with every refit target as
# an output (most of the model's activations), a few samples a run.
REFIT_BUDGET = DEFAULT_BUDGET
# Rows of X multiplied at once into a Gram matrix: as many as fit UPDATE_BYTES (a 3x3x512 convolution's rows
# weigh 18 KB each), between MIN_UPDATE_ROWS and MAX_UPDATE_ROWS.
UPDATE_BYTES = 32 * 2**20
MIN_UPDATE_ROWS, MAX_UPDATE_ROWS = 512, 8192


@dataclass(frozen=True)
class RefitTarget:
    node: str
    kept_outputs: tuple[int, ...] | None = None  # the dense node's output channels that survive (None: all)


@dataclass(frozen=True)
class RefitRecord:
    node: str
    rows: int  # input rows (samples x positions) the fit saw
    error_before: float  # relative output error vs the dense teacher on calibration data
    error_after: float
    note: str = ""


@dataclass(frozen=True)
class RefitSettings:
    samples: int = 256
    batch_size: int = 32
    ridge: float = 0.01  # relative to the mean diagonal of X^T X
    seed: int = 0
    rows_per_feature: int = 8  # row budget per layer: this many rows per weight of an output channel ...
    min_rows: int = 16384  # ... at least this many (small layers see every row they have) ...
    max_rows: int = 32768  # ... and at most this many (the Gram matrix costs rows x features^2)
    spread: int = 4  # rows come from at least `spread` x (budget / rows per sample) samples

    def row_budget(self, features: int) -> int:
        return max(self.min_rows, min(self.max_rows, self.rows_per_feature * features))


class NotRefittable(Exception):
    """This layer's shape of computation is not handled by refit; it keeps its pruned weights."""


# ---------------------------------------------------------------------------------------------------
# Normal equations


class NormalEquations:
    """Streaming X^T X (one Gram matrix shared by every output), X^T Y and sum(Y^2) for one group of outputs."""

    def __init__(self, features: int, outputs: int):
        self._gram = np.zeros((features, features))
        self._cross = np.zeros((features, outputs))
        self._energy = np.zeros(outputs)
        self.rows = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._rows_per_product = min(MAX_UPDATE_ROWS, max(MIN_UPDATE_ROWS, UPDATE_BYTES // (4 * features)))

    def update(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        """Add rows; they are multiplied a few thousand at a time (a run of one sample may bring a few dozen rows,
        and a product that small spends more on BLAS's threads and the float64 sum than on the rows)."""
        self._pending.append((inputs, targets))
        self._pending_rows += inputs.shape[0]
        self.rows += inputs.shape[0]
        if self._pending_rows >= self._rows_per_product:
            self._flush()

    def _flush(self) -> None:
        # Products of many rows in float32 (twice BLAS's float64 speed), summed in float64. Extreme data
        # may overflow float32: the statistics then hold inf, and `solve` keeps the pruned weights
        # (solvers.never_worse); numpy's warnings would only be noise on the user's terminal.
        if not self._pending:
            return
        inputs = np.concatenate([rows for rows, _ in self._pending]).astype(np.float32, copy=False)
        targets = np.concatenate([rows for _, rows in self._pending]).astype(np.float32, copy=False)
        self._pending, self._pending_rows = [], 0
        with np.errstate(over="ignore", invalid="ignore"):
            self._gram += inputs.T @ inputs
            self._cross += inputs.T @ targets
            self._energy += np.square(targets, dtype=np.float64).sum(axis=0)

    @property
    def gram(self) -> np.ndarray:
        """X^T X over every row added so far."""
        self._flush()
        return self._gram

    @property
    def cross(self) -> np.ndarray:
        """X^T Y over every row added so far."""
        self._flush()
        return self._cross

    @property
    def target_energy(self) -> np.ndarray:
        """sum(Y^2) per output over every row added so far."""
        self._flush()
        return self._energy

    def squared_error(self, weights: np.ndarray) -> float:
        """sum ||X w_o - y_o||^2 over outputs o, from the accumulated statistics alone (inf or nan when the
        statistics overflowed)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.sum(squared_errors(weights, self.gram, self.cross, self.target_energy)))

    def solve(self, weights: np.ndarray, always_free: np.ndarray, ridge: float) -> np.ndarray:
        """Refit rows of `weights` [outputs, features]: zeros stay zero except `always_free` columns.

        Every output solves its masked ridge problem against the layer's one Gram matrix (solvers.py): shared
        patterns by one factorisation, per-output patterns by conjugate gradients on all outputs at once."""
        keep = (weights != 0) | always_free[None, :]
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite statistics: the pruned weights stay
            fitted, _ = masked_ridge_solve(self.gram, self.cross, self.target_energy, weights, keep, ridge)
        return fitted


# ---------------------------------------------------------------------------------------------------
# Layers seen as matrices


class LinearView:
    """A weighted node as per-group matrices [outputs, inputs (+1 bias column)] acting on input rows."""

    input_name: str
    target_name: str  # the tensor matched against the teacher (MatMul: its bias Add when there is one)
    output_axis: int
    has_bias: bool

    def matrices(self) -> list[np.ndarray]:
        raise NotImplementedError

    def rows(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
             limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Input and target rows per group at `limit` row positions drawn from `rng`."""
        chosen = _sample(self.row_count(y.shape), rng, limit)
        return list(zip(self.input_rows(x, chosen, y.shape), self.split_targets(self.target_rows(y, chosen))))

    def row_count(self, output_shape: tuple[int, ...]) -> int:
        """Row positions (samples x output positions) in an output of this shape."""
        raise NotImplementedError

    def target_rows(self, y: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """The output's values [rows, outputs] at row positions `chosen` (sorted, of `row_count(y.shape)`)."""
        raise NotImplementedError

    def split_targets(self, targets: np.ndarray) -> list[np.ndarray]:
        return [targets]

    def input_rows(self, x: np.ndarray, chosen: np.ndarray, output_shape: tuple[int, ...]) -> list[np.ndarray]:
        """Input rows per group at row positions `chosen` of an output of `output_shape`."""
        raise NotImplementedError

    def store(self, matrices: list[np.ndarray]) -> None:
        raise NotImplementedError

    def always_free(self, features: int) -> np.ndarray:
        free = np.zeros(features, dtype=bool)
        if self.has_bias:
            free[-1] = True
        return free


def _with_ones(rows: np.ndarray, has_bias: bool) -> np.ndarray:
    return np.hstack([rows, np.ones((rows.shape[0], 1), rows.dtype)]) if has_bias else rows


def _sample(count: int, rng: np.random.Generator, limit: int) -> np.ndarray:
    return np.sort(rng.choice(count, size=limit, replace=False)) if count > limit else np.arange(count)


def _positions(chosen: np.ndarray, output_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions of a Conv output [N, C, H, W] as (sample, row, column) indices."""
    height, width = output_shape[2], output_shape[3]
    n, rest = np.divmod(chosen, height * width)
    i, j = np.divmod(rest, width)
    return n, i, j


class ConvView(LinearView):
    def __init__(self, graph: onnx.GraphProto, node: onnx.NodeProto):
        index = GraphIndex(graph)
        self.graph, self.node = graph, node
        self.weight = index.weight(node.input[1])
        if self.weight.ndim != 4:
            raise NotRefittable("only 2-D convolutions are refit")
        self.bias = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        self.has_bias = self.bias is not None
        attributes = node_attributes(node)
        self.groups = attributes.get("group", 1)
        self.strides = attributes.get("strides", [1, 1])
        self.dilations = attributes.get("dilations", [1, 1])
        self.pads = attributes.get("pads", [0, 0, 0, 0])
        self.auto_pad = attributes.get("auto_pad", b"NOTSET")
        self.auto_pad = self.auto_pad.decode() if isinstance(self.auto_pad, bytes) else self.auto_pad
        self.input_name, self.target_name, self.output_axis = node.input[0], node.output[0], 1

    def matrices(self) -> list[np.ndarray]:
        out_per_group = self.weight.shape[0] // self.groups
        result = []
        for g in range(self.groups):
            part = slice(g * out_per_group, (g + 1) * out_per_group)
            matrix = self.weight[part].reshape(out_per_group, -1).astype(np.float64)
            if self.bias is not None:
                matrix = np.hstack([matrix, self.bias[part, None]])
            result.append(matrix)
        return result

    def row_count(self, output_shape):
        batch, _, height, width = output_shape
        return batch * height * width

    def target_rows(self, y, chosen):
        n, i, j = _positions(chosen, y.shape)
        return y[n, :, i, j]  # [rows, out]

    def split_targets(self, targets):
        out_per_group = self.weight.shape[0] // self.groups
        return [targets[:, g * out_per_group:(g + 1) * out_per_group] for g in range(self.groups)]

    def input_rows(self, x, chosen, output_shape):
        windows = self._windows(x)
        if windows.shape[2:4] != tuple(output_shape[2:4]):
            raise NotRefittable("could not reproduce the convolution's output positions")
        n, i, j = _positions(chosen, output_shape)
        patches = windows[n, :, i, j]  # [rows, C, kh, kw]
        in_per_group = self.weight.shape[1]
        return [_with_ones(patches[:, g * in_per_group:(g + 1) * in_per_group].reshape(len(chosen), -1),
                           self.has_bias) for g in range(self.groups)]

    def _windows(self, x: np.ndarray) -> np.ndarray:
        kernel = self.weight.shape[2:]
        extent = [(k - 1) * d + 1 for k, d in zip(kernel, self.dilations)]
        pads = self._pads(x.shape[2:], extent)
        padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        windows = sliding_window_view(padded, tuple(extent), axis=(2, 3))
        (sh, sw), (dh, dw) = self.strides, self.dilations
        return windows[:, :, ::sh, ::sw, ::dh, ::dw]

    def _pads(self, size: tuple[int, ...], extent: list[int]) -> list[int]:
        if self.auto_pad in ("NOTSET", ""):
            return list(self.pads)
        if self.auto_pad == "VALID":
            return [0, 0, 0, 0]
        totals = [max((-(-s // st) - 1) * st + e - s, 0) for s, st, e in zip(size, self.strides, extent)]
        small = [t // 2 for t in totals]
        large = [t - t // 2 for t in totals]
        return small + large if self.auto_pad == "SAME_UPPER" else large + small

    def store(self, matrices):
        out_per_group = self.weight.shape[0] // self.groups
        columns = int(np.prod(self.weight.shape[1:]))
        weight = np.concatenate([m[:, :columns] for m in matrices]).reshape(self.weight.shape)
        replace_constant_input(self.graph, self.node, 1, weight.astype(self.weight.dtype))
        if self.bias is not None:
            bias = np.concatenate([m[:, columns] for m in matrices]).reshape(self.groups * out_per_group)
            replace_constant_input(self.graph, self.node, 2, bias.astype(self.bias.dtype))


class DenseView(LinearView):
    """Gemm, or MatMul with a 2-D constant weight (plus the Add of a constant bias that follows it)."""

    def __init__(self, graph: onnx.GraphProto, node: onnx.NodeProto):
        index = GraphIndex(graph)
        self.graph, self.node, self.index = graph, node, index
        self.raw_weight = index.weight(node.input[1])
        if self.raw_weight.ndim != 2:
            raise NotRefittable("only 2-D weights are refit")
        attributes = node_attributes(node)
        self.alpha = float(attributes.get("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        self.beta = float(attributes.get("beta", 1.0)) if node.op_type == "Gemm" else 1.0
        self.trans_a = bool(attributes.get("transA", 0)) if node.op_type == "Gemm" else False
        self.trans_b = bool(attributes.get("transB", 0)) if node.op_type == "Gemm" else False
        self.input_name, self.target_name, self.output_axis = node.input[0], node.output[0], -1
        self.bias_owner, self.bias_position = self._find_bias()
        self.has_bias = self.bias_owner is not None

    def _find_bias(self) -> tuple[onnx.NodeProto | None, int]:
        node = self.node
        if node.op_type == "Gemm":
            if len(node.input) > 2 and node.input[2] and self.beta != 0:
                return (node, 2) if self.index.is_constant(node.input[2]) else (None, 0)
            return None, 0
        follower = self.index.single_consumer(node.output[0])
        if follower is None or follower.op_type != "Add":
            return None, 0
        other = 1 - list(follower.input).index(node.output[0])
        value = self.index.constant(follower.input[other])
        if value is None or value.shape[-1:] != (self.raw_weight.shape[1],) or value.size != value.shape[-1]:
            return None, 0
        self.target_name = follower.output[0]
        return follower, other

    def _bias_value(self) -> np.ndarray:
        assert self.bias_owner is not None, "only a layer with a constant bias reads it"
        value = self.index.weight(self.bias_owner.input[self.bias_position]).astype(np.float64)
        outputs = self.raw_weight.shape[0 if self.trans_b else 1]
        return np.broadcast_to(value.reshape(-1) * self.beta, (outputs,))

    def matrices(self):
        weight = self.raw_weight if self.trans_b else self.raw_weight.T
        matrix = self.alpha * weight.astype(np.float64)
        if self.has_bias:
            matrix = np.hstack([matrix, self._bias_value()[:, None]])
        return [matrix]

    def row_count(self, output_shape):
        return int(np.prod(output_shape[:-1], dtype=np.int64))

    def target_rows(self, y, chosen):
        return y.reshape(-1, y.shape[-1])[chosen]

    def input_rows(self, x, chosen, output_shape):
        x = x.T if self.trans_a else x
        inputs = x.reshape(-1, x.shape[-1])
        if inputs.shape[0] != self.row_count(output_shape):
            raise NotRefittable("the input's rows do not match the output's")
        return [_with_ones(inputs[chosen], self.has_bias)]

    def store(self, matrices):
        matrix = matrices[0]
        features = self.raw_weight.shape[1 if self.trans_b else 0]
        weight = matrix[:, :features] / self.alpha
        weight = weight if self.trans_b else weight.T
        replace_constant_input(self.graph, self.node, 1, weight.astype(self.raw_weight.dtype))
        if self.has_bias:
            old = self.index.constant(self.bias_owner.input[self.bias_position])
            bias = matrix[:, features] / self.beta
            bias = bias.reshape(old.shape) if old.size == bias.size else bias
            replace_constant_input(self.graph, self.bias_owner, self.bias_position, bias.astype(old.dtype))


def linear_view(graph: onnx.GraphProto, node_name: str) -> LinearView:
    node = next(n for n in graph.node if n.name == node_name)
    if node.op_type == "Conv":
        return ConvView(graph, node)
    if node.op_type in ("Gemm", "MatMul"):
        return DenseView(graph, node)
    raise NotRefittable(f"{node.op_type} layers are not refit")


# ---------------------------------------------------------------------------------------------------
# The loop


def refit_layers(pruned: onnx.ModelProto, teacher: onnx.ModelProto, targets: Sequence[RefitTarget],
                 dataset: Dataset, settings: RefitSettings,
                 progress: Callable[[int], None] | None = None) -> list[RefitRecord]:
    """Refit `targets` of `pruned` (changed in place) in order; returns what each fit achieved.

    The dense teacher runs once for all targets. Targets whose inputs do not depend on each other's refit
    (the branches of a detector head, the convolutions that read one tensor) form one wave and share one
    pass of the pruned model; the result is the same as fitting them one by one. `progress(1)` is
    called after each target, so a caller knows the total (len(targets)) up front."""
    records: dict[str, RefitRecord] = {}
    teacher_rows = _teacher_rows(pruned, teacher, targets, dataset, settings)
    for wave in refit_waves(pruned.graph, targets):
        for record in _refit_wave(pruned, wave, teacher_rows, dataset, settings):
            records[record.node] = record
            if progress:
                progress(1)
    return [records[target.node] for target in targets]


def refit_waves(graph: onnx.GraphProto, targets: Sequence[RefitTarget]) -> list[list[RefitTarget]]:
    """`targets` by depth: a target's wave comes after the waves of every target its input depends on, so
    each target still sees all the refits upstream of it, exactly as when fitting them one by one."""
    producers = {output: node for node in graph.node for output in node.output}
    position = {node.name: index for index, node in enumerate(graph.node)}
    nodes = {node.name: node for node in graph.node}
    depth: dict[str, int] = {}
    for target in sorted(targets, key=lambda t: position.get(t.node, -1)):  # graph order: upstream first
        node = nodes.get(target.node)
        upstream = _upstream_nodes(producers, node.input[0]) if node is not None and node.input else set()
        depth[target.node] = 1 + max((depth[name] for name in upstream if name in depth), default=0)
    waves: list[list[RefitTarget]] = [[] for _ in range(max(depth.values(), default=0))]
    for target in targets:
        waves[depth[target.node] - 1].append(target)
    return waves


def _upstream_nodes(producers: dict[str, onnx.NodeProto], tensor: str) -> set[str]:
    """Names of every node `tensor` depends on."""
    seen: set[str] = set()
    pending = [tensor]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        pending.extend(node.input)
        pending.extend(implicit_inputs(node))
    return seen


def prefix_model(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """The part of `model` that computes `outputs` (every graph input kept, so one feed fits all)."""
    needed = set(outputs)
    kept_nodes = []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            kept_nodes.append(node)
            needed.update(node.input)
            needed.update(implicit_inputs(node))
    prefix = onnx.ModelProto()
    prefix.CopyFrom(model)
    graph = prefix.graph
    del graph.node[:]
    graph.node.extend(reversed(kept_nodes))
    kept_initializers = [t for t in model.graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    del graph.output[:]
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    return prefix


class _TeacherRows:
    """One target's rows of the dense teacher's output, drawn once before any wave (a collect() observer of the
    target's output): for each run it reads, the row positions its fit samples, the run's output shape and the
    teacher's values there.

    Runs are kept by number: the waves cut the data into the same runs (collect's samples_per_run), so run k of
    a student's input pairs with run k here whatever the layer's axes mean (a sequence-first layer, a stack of
    feeds of different lengths). A target reads whole runs until it holds `samples` samples."""

    counts_samples = True

    def __init__(self, target: RefitTarget, view: LinearView, budget: int, samples: int, seed: int):
        self.target, self.view, self.budget, self.samples = target, view, budget, samples
        self.rng = np.random.default_rng(seed)
        self.covered = 0  # samples of the runs read so far
        self.runs = 0
        self.records: dict[int, tuple[np.ndarray, tuple[int, ...], np.ndarray]] = {}
        self.run_size = 1  # samples per run of the teacher's pass, which every wave repeats

    def update(self, y: np.ndarray, samples: int) -> None:
        run, self.runs = self.runs, self.runs + 1
        if self.covered >= self.samples:
            return
        rows_per_sample = self.budget / self.samples
        limit = max(1, round(rows_per_sample * (self.covered + samples)) - round(rows_per_sample * self.covered))
        chosen = _sample(self.view.row_count(y.shape), self.rng, limit)
        self.records[run] = (chosen, tuple(y.shape), _kept(self, self.view.target_rows(y, chosen)))
        self.covered += samples


@dataclass
class _Fit:
    """One target's state while its wave reads data (a collect() observer of the target's input)."""

    target: RefitTarget
    view: LinearView
    matrices: list[np.ndarray]
    equations: list[NormalEquations]
    teacher: _TeacherRows
    runs: int = 0
    failure: str = ""

    def update(self, x: np.ndarray) -> None:
        run, self.runs = self.runs, self.runs + 1
        record = self.teacher.records.pop(run, None)  # read once: freed as it is used
        if record is None or self.failure:
            return
        chosen, shape, targets = record
        try:
            for equation, inputs, outputs in zip(self.equations, self.view.input_rows(x, chosen, shape),
                                                 self.view.split_targets(targets)):
                equation.update(inputs, outputs)
        except NotRefittable as reason:
            self.failure = f"not refit: {reason}"


def _teacher_rows(pruned: onnx.ModelProto, teacher: onnx.ModelProto, targets: Sequence[RefitTarget],
                  dataset: Dataset, settings: RefitSettings) -> dict[str, _TeacherRows]:
    """Every target's teacher rows, from ONE pass of the dense model over the samples.

    The teacher does not change between waves, so running it once per wave repeated its work; the row
    positions a fit samples depend only on its own generator and its budget, so they are drawn here and
    each wave runs only the pruned model."""
    views: dict[str, LinearView] = {}
    for target in targets:
        try:
            views[target.node] = linear_view(pruned.graph, target.node)
        except NotRefittable:
            continue  # its wave says why
    if not views:
        return {}
    prefix = prefix_model(teacher, sorted({view.target_name for view in views.values()}))
    shapes = one_sample_shapes(prefix, dataset, [view.target_name for view in views.values()])
    available = min(settings.samples, dataset.num_samples)
    plans: dict[str, _TeacherRows] = {}
    for target in targets:
        view = views.get(target.node)
        if view is None or target.node in plans:
            continue
        budget = settings.row_budget(view.matrices()[0].shape[1])
        samples = _samples_needed(shapes[view.target_name], view, budget, available, settings)
        plans[target.node] = _TeacherRows(target, view, budget, samples, settings.seed)
    run = samples_per_run(prefix, dataset, settings.batch_size, REFIT_BUDGET)
    collect(prefix, dataset, [Request(plan.view.target_name, plan) for plan in plans.values()],
            batch_size=settings.batch_size, samples=max(plan.samples for plan in plans.values()),
            one_pass=True, threads=SESSION_THREADS, samples_per_run=run)
    for plan in plans.values():
        plan.run_size = run
    return plans


def _kept(plan: _TeacherRows, rows: np.ndarray) -> np.ndarray:
    """The target rows [rows, outputs] of the outputs that survive channel pruning."""
    kept = plan.target.kept_outputs
    return rows if kept is None else rows[:, list(kept)]


def _refit_wave(pruned: onnx.ModelProto, wave: Sequence[RefitTarget], teacher_rows: dict[str, _TeacherRows],
                dataset: Dataset, settings: RefitSettings) -> list[RefitRecord]:
    fits, records = [], []
    for target in wave:
        try:
            view = linear_view(pruned.graph, target.node)
        except NotRefittable as reason:
            records.append(RefitRecord(target.node, 0, float("nan"), float("nan"), f"not refit: {reason}"))
            continue
        matrices = view.matrices()
        fits.append(_Fit(target, view, matrices, [NormalEquations(m.shape[1], m.shape[0]) for m in matrices],
                         teacher_rows.pop(target.node)))
    if fits:
        _read_data(pruned, fits, dataset, settings)
    records += [_solve(fit, settings) for fit in fits]
    order = [target.node for target in wave]
    return sorted(records, key=lambda record: order.index(record.node))


def _read_data(pruned: onnx.ModelProto, fits: list[_Fit], dataset: Dataset, settings: RefitSettings) -> None:
    """Accumulate every fit's normal equations from one pass of the pruned model's prefix (the fits' inputs;
    graph inputs come from the data itself)."""
    graph_inputs = {i.name for i in pruned.graph.input}
    student_outputs = sorted({fit.view.input_name for fit in fits} - graph_inputs)
    student = prefix_model(pruned, student_outputs) if student_outputs else pruned
    # The teacher's runs, in the same cut, up to the last one a fit still needs.
    collect(student, dataset, [Request(fit.view.input_name, fit) for fit in fits], batch_size=settings.batch_size,
            samples=max(fit.teacher.covered for fit in fits), one_pass=True, threads=SESSION_THREADS,
            samples_per_run=fits[0].teacher.run_size)


def _solve(fit: _Fit, settings: RefitSettings) -> RefitRecord:
    if fit.failure:
        return RefitRecord(fit.target.node, 0, float("nan"), float("nan"), fit.failure)
    equations, matrices = fit.equations, fit.matrices
    fitted = [eq.solve(m, fit.view.always_free(m.shape[1]), settings.ridge) for eq, m in zip(equations, matrices)]
    fit.view.store(fitted)
    energy = sum(eq.target_energy.sum() for eq in equations) or 1.0
    before = sum(eq.squared_error(m) for eq, m in zip(equations, matrices))
    after = sum(eq.squared_error(m) for eq, m in zip(equations, fitted))
    if not np.isfinite([energy, before, after]).all():
        return RefitRecord(fit.target.node, equations[0].rows, float("nan"), float("nan"),
                           "not refit: its inputs overflow float32 on this data (pruned weights kept)")
    return RefitRecord(fit.target.node, equations[0].rows, _relative(before, energy), _relative(after, energy))


def _samples_needed(shape: tuple[int, ...], view: LinearView, budget: int, available: int,
                    settings: RefitSettings) -> int:
    """How many samples the row budget needs, spread over `settings.spread` x as many as strictly needed;
    `shape` is the layer's output's for one sample. A layer with many positions per sample (an early,
    high-resolution convolution) so runs the model on a few samples instead of a whole batch."""
    positions = max(1, math.prod(shape[1:]) // max(1, shape[view.output_axis]))
    return max(1, min(available, -(-settings.spread * budget // positions)))


def _relative(squared_error: float, energy: float) -> float:
    return float(np.sqrt(max(squared_error, 0.0) / energy))
