"""`compressq prune`: unstructured, N:M and channel pruning, with an optional least-squares refit.

    result = prune_model(model, PruneConfig(sparsity=0.5), dataset=None, progress=None)
    result.model      the pruned ModelProto (the input model is not modified)
    result.summary    what was pruned, per layer and overall, what stayed dense and why, refit errors

The plan (plan.py) picks the layers, masks.py picks the weights, structured.py rewrites the graph for
channel pruning, refit.py reconstructs the kept weights against the dense model as teacher.

Unstructured and N:M pruning take one weight at a time (global scope too: its threshold is found in passes
over the scores, `masks.global_cut`); a model loaded with its weights mapped (`load_model(read_weights=False)`)
gets each pruned weight written to a spill file as it is made, so memory never holds the model. Channel
pruning and refit read the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from compressq.data import Dataset
from compressq.errors import UsageError
from compressq.graph.edit import NameGenerator
from compressq.graph.index import GraphIndex, implicit_inputs, scopes
from compressq.graph.passes import as_pass, check_if_enabled, run_pass
from compressq.io import (
    TensorSink,
    check_model,
    is_mapped,
    tensor_array,
    tensor_chunks,
    with_weights_read,
)
from compressq.prune.config import PruneConfig
from compressq.prune.masks import (
    GlobalCut,
    cut_mask,
    global_cut,
    global_masks,
    local_mask,
    n_m_mask,
    weight_scores,
    zero_fraction,
)
from compressq.prune.plan import DenseLayer, PrunePlan, graph_order, plan_pruning
from compressq.prune.refit import RefitRecord, RefitSettings, RefitTarget, refit_layers
from compressq.prune.structured import (
    ChannelGroup,
    choose_channels,
    remove_channels,
    trace_channel_groups,
)

__all__ = ["LayerResult", "PruneConfig", "PruneResult", "PruneSummary", "plan_pruning", "prune_model", "weight_masks"]

Progress = Callable[[str, int, int], None]  # (stage, done, total): a bar with a total and an ETA per stage


@dataclass(frozen=True)
class LayerResult:
    node: str
    op_type: str
    weight: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    sparsity: float  # zero weights (unstructured, N:M) or removed output channels (channel)
    channels_before: int | None = None
    channels_after: int | None = None
    note: str = ""
    follows_input: bool = False  # a depthwise Conv whose channels follow its producer's: not counted twice


@dataclass
class PruneSummary:
    pattern: str
    criterion: str
    scope: str
    requested_sparsity: float
    achieved_sparsity: float  # over the pruned layers, in the pattern's unit (weights or channels)
    layers: list[LayerResult]
    dense_layers: list[DenseLayer]
    parameters_before: int
    parameters_after: int
    nonzero_before: int
    nonzero_after: int
    refit: list[RefitRecord] = field(default_factory=list)
    calibration: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        for record in data["refit"]:
            for key in ("error_before", "error_after"):
                record[key] = None if np.isnan(record[key]) else round(record[key], 6)
        return data


@dataclass
class PruneResult:
    model: onnx.ModelProto
    summary: PruneSummary


@dataclass
class _Outcome:
    """What one pruning pass produced, before refit."""

    model: onnx.ModelProto
    layers: list[LayerResult]
    dense: list[DenseLayer]
    refit_targets: list[RefitTarget]
    notes: list[str] = field(default_factory=list)


def prune_model(model: onnx.ModelProto, config: PruneConfig, dataset: Dataset | None = None,
                progress: Progress | None = None) -> PruneResult:
    """Prune a copy of `model` as `config` says; with `dataset`, refit against the dense model."""
    if config.structured or dataset is not None:  # these read every weight at once (a mapped model is read now)
        model = with_weights_read(model)
    teacher = _named_copy(model)
    plan = plan_pruning(teacher, config)
    prune = _prune_channels if config.structured else _prune_weights

    def pruned(dense: onnx.ModelProto) -> tuple[onnx.ModelProto, _Outcome]:
        found = prune(dense, plan, config, progress)
        return found.model, found

    outcome: _Outcome = run_pass("pruning", as_pass(pruned, lambda found: {d.node: d.reason for d in found.dense}),
                                 teacher).details
    if not outcome.layers:
        _refuse_nothing_to_prune(outcome.dense)
    records = []
    if dataset is not None:
        outcome.refit_targets = _main_graph_targets(outcome)
        settings = RefitSettings(config.calibration_samples, config.batch_size, config.refit_ridge, seed=config.seed)
        records = refit_layers(outcome.model, teacher, outcome.refit_targets, dataset, settings,
                               _counter(progress, "refitting layers", len(outcome.refit_targets)))
        outcome.notes += [f"'{r.node}' {r.note}" for r in records if r.note]
    check_model(outcome.model)
    check_if_enabled(model, outcome.model, "prune")
    return PruneResult(outcome.model, _summary(teacher, outcome, config, records, dataset))


def _main_graph_targets(outcome: _Outcome) -> list[RefitTarget]:
    """Refit reads each layer's input as a graph output: layers inside bodies are pruned but not refit."""
    main = {node.name for node in outcome.model.graph.node}
    inner = [target for target in outcome.refit_targets if target.node not in main]
    if inner:
        outcome.notes.append(f"{len(inner)} layers inside If/Loop/Scan bodies pruned without refit (their "
                             "inputs cannot be read out of the body yet)")
    return [target for target in outcome.refit_targets if target.node in main]


def _counter(progress: Progress | None, stage: str, total: int) -> Callable[[int], None] | None:
    """An `advance(n)` callback that reports `stage` as done/total."""
    if progress is None:
        return None
    done = [0]
    progress(stage, 0, total)

    def advance(steps: int) -> None:
        done[0] += steps
        progress(stage, done[0], total)

    return advance


def _named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (layers are reported and matched by name)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = NameGenerator(copy.graph)
    seen: set[str] = set()
    for position, node in enumerate(copy.graph.node):
        if not node.name or node.name in seen:
            node.name = names(f"{node.op_type}_{position}")
        seen.add(node.name)
    return copy


def _refuse_nothing_to_prune(dense: list[DenseLayer]) -> None:
    reasons = "; ".join(f"{d.node or d.weight}: {d.reason}" for d in dense[:4])
    raise UsageError(f"nothing to prune: all {len(dense)} weighted layers stay dense ({reasons})",
                     hint="lower --min-params, pass --prune-first/--prune-last, or loosen --exclude")


# ---------------------------------------------------------------------------------------------------
# Unstructured and N:M


def weight_masks(weights: dict[str, np.ndarray], input_axes: dict[str, int],
                 config: PruneConfig) -> dict[str, np.ndarray]:
    """Keep-masks for every layer's weight: per layer, global, or N:M along each layer's input axis."""
    rng = np.random.default_rng(config.seed)
    scores = {name: weight_scores(weight, config.criterion, rng) for name, weight in weights.items()}
    if config.n_m:
        n, m = config.n_m
        return {name: n_m_mask(score, n, m, input_axes[name]) for name, score in scores.items()}
    if config.scope == "global":
        return global_masks(scores, config.sparsity)
    return {name: local_mask(score, config.sparsity) for name, score in scores.items()}


def _prune_weights(teacher: onnx.ModelProto, plan: PrunePlan, config: PruneConfig,
                   progress: Progress | None) -> _Outcome:
    model = _named_copy(teacher)
    found = scopes(model.graph)
    # Every node with the graph it lives in and what that graph can read (bodies see outer weights).
    where = {node.name: (node, scope) for scope in found for node in scope.graph.node}
    indexes = {scope.label: scope.index() for scope in found}
    # The plan only prunes initializers; a layer's TensorProto is read when its turn comes, then let go.
    stored = {layer.node: indexes[where[layer.node][1].label].initializers[layer.weight] for layer in plan.layers}
    sink = TensorSink(teacher)
    cut = _global_cut(plan, stored, config) if config.scope == "global" and not config.n_m else None
    scores = _layer_scores(plan, stored, config)
    layers, ties_seen = [], 0
    for position, layer in enumerate(plan.layers, start=1):
        weight, score = next(scores)
        if config.n_m:
            keep = n_m_mask(score, *config.n_m, layer.input_axis)
        elif config.scope == "global":
            keep, ties_seen = cut_mask(score, cut, ties_seen)
        else:
            keep = local_mask(score, config.sparsity)
        del score
        pruned = np.where(keep, weight, 0).astype(weight.dtype)
        del weight, keep  # one layer's weight, scores and mask at a time
        node, scope = where[layer.node]
        # A body pruning an outer weight gets its own copy; the outer graph drops the dense one if unused.
        _replace_weight(scope.graph, node, pruned, sink)
        layers.append(LayerResult(layer.node, layer.op_type, layer.weight, layer.shape, layer.shape,
                                  zero_fraction(pruned)))
        if progress:
            progress("pruning layers", position, len(plan.layers))
    targets = [RefitTarget(layer.node) for layer in plan.layers]
    if len(found) > 1:
        _drop_unused_initializers(model.graph)
    return _Outcome(model, layers, list(plan.dense), targets)


def _layer_scores(plan: PrunePlan, stored: dict[str, onnx.TensorProto],
                  config: PruneConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(weight, scores) of every planned layer in plan order, read one at a time; random scores are drawn from one
    generator in that order, so every pass over the layers sees the same scores (as weight_masks draws them)."""
    rng = np.random.default_rng(config.seed)
    for layer in plan.layers:
        weight = tensor_array(stored[layer.node])
        scores = weight_scores(weight, config.criterion, rng)
        yield weight, scores
        del weight, scores  # before the next layer is read: one weight in memory at a time


def _global_cut(plan: PrunePlan, stored: dict[str, onnx.TensorProto], config: PruneConfig) -> GlobalCut | None:
    def scores_only() -> Iterator[np.ndarray]:
        for weight, scores in _layer_scores(plan, stored, config):
            del weight
            yield scores
            del scores

    return global_cut(scores_only, config.sparsity)


def _replace_weight(graph: onnx.GraphProto, node: onnx.NodeProto, pruned: np.ndarray, sink: TensorSink) -> None:
    """Give `node` its pruned weight, made by the sink (in memory, or in a spill file for a mapped model): in
    place when only this node reads the weight, else under a fresh name (other readers keep the old value)."""
    name = node.input[1]
    readers = sum(list(n.input).count(name) for n in graph.node)
    declared = {i.name for i in graph.input} | {o.name for o in graph.output}
    position = next((i for i, t in enumerate(graph.initializer) if t.name == name), None)
    if position is not None and readers == 1 and name not in declared:
        graph.initializer[position].CopyFrom(sink.tensor(pruned, name))
        return
    fresh = NameGenerator(graph)(f"{name}.pruned")
    graph.initializer.append(sink.tensor(pruned, fresh))
    node.input[1] = fresh


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Initializers nothing reads any more, bodies' outer reads included (a body now holds its own copy)."""
    used = {name for node in graph.node for name in [*node.input, *implicit_inputs(node)]}
    used |= {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


# ---------------------------------------------------------------------------------------------------
# Channels


def _prune_channels(model: onnx.ModelProto, plan: PrunePlan, config: PruneConfig,
                    progress: Progress | None) -> _Outcome:
    plan = _body_layers_dense(model, plan)
    dense_reasons = {d.node: d.reason for d in plan.dense}
    prunable: dict[str, str | None] = {layer.node: None for layer in plan.layers}
    groups = trace_channel_groups(model, {**prunable, **dense_reasons})
    kept = choose_channels(model, groups, config.sparsity, config.criterion, config.seed, config.channel_multiple)
    rewritten = remove_channels(model, groups, kept)
    layers = _channel_results(model, rewritten, groups, kept)
    order = {name: i for i, name in enumerate(graph_order(model))}
    dense = sorted([*plan.dense, *_blocked_layers(plan, groups, kept, config)], key=lambda d: order[d.node])
    if progress:
        progress("pruning channels", len(layers), len(layers))
    targets = _channel_refit_targets(model, groups, kept)
    return _Outcome(rewritten, layers, dense, targets, _granularity_notes(groups, kept, config))


BODY_CHANNELS_REASON = ("inside an If/Loop/Scan body: removing channels there would change the body's "
                        "outputs (unstructured and N:M pruning reach it)")


def _body_layers_dense(model: onnx.ModelProto, plan: PrunePlan) -> PrunePlan:
    """Channel pruning stays in the main graph: a body's outputs must keep their shapes in every branch and
    iteration, which channel groups do not track across the body boundary."""
    main = {node.name for node in model.graph.node}
    inner = [layer for layer in plan.layers if layer.node not in main]
    if not inner:
        return plan
    dense = [DenseLayer(layer.node, layer.op_type, layer.weight, layer.parameters, BODY_CHANNELS_REASON)
             for layer in inner]
    return PrunePlan(tuple(layer for layer in plan.layers if layer.node in main), (*plan.dense, *dense))


def _channel_results(before: onnx.ModelProto, after: onnx.ModelProto, groups: list[ChannelGroup],
                     kept: dict[int, np.ndarray]) -> list:
    shapes_before = _weight_shapes(before)
    shapes_after = _weight_shapes(after)
    order = {node.name: i for i, node in enumerate(before.graph.node)}
    results = []
    for position, keep in kept.items():
        group = groups[position]
        removed = 1 - len(keep) / group.channels
        joined = f"pruned together with {len(group.producer_nodes) - 1} more" if len(group.producer_nodes) > 1 else ""
        for name in group.producer_nodes:
            results.append(_channel_result(name, shapes_before, shapes_after, group, keep, removed, joined))
        for name in group.followers:
            results.append(_channel_result(name, shapes_before, shapes_after, group, keep, removed,
                                           "depthwise: follows its input's channels", follows_input=True))
    return sorted(results, key=lambda r: order[r.node])


def _channel_result(name, shapes_before, shapes_after, group, keep, removed, note, *,
                    follows_input: bool = False) -> LayerResult:
    op_type, weight, shape = shapes_before[name]
    return LayerResult(name, op_type, weight, shape, shapes_after[name][2], removed, group.channels, len(keep), note,
                       follows_input)


def _weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    index = GraphIndex(model.graph)
    shapes = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
            value = index.constant(node.input[1])
            if value is not None:
                shapes[node.name] = (node.op_type, node.input[1], tuple(value.shape))
    return shapes


def _blocked_layers(plan: PrunePlan, groups: list[ChannelGroup], kept: dict[int, np.ndarray],
                    config: PruneConfig) -> list[DenseLayer]:
    """Planned layers whose channels all stay, with the reason."""
    producing = {name: position for position, g in enumerate(groups) for name in g.producer_nodes}
    following = {name: position for position, g in enumerate(groups) for name in g.followers}
    dense = []
    for layer in plan.layers:
        position = producing.get(layer.node, following.get(layer.node))
        if position in kept:
            continue
        reason = _why_channels_stay(groups[position], config) if position is not None else \
            "channel pruning cannot shrink this layer's outputs (grouped convolution or a weight of rank > 2)"
        if layer.node in following:
            reason = f"depthwise: follows its input's channels, which stay ({reason})"
        dense.append(DenseLayer(layer.node, layer.op_type, layer.weight, layer.parameters, reason))
    return dense


def _why_channels_stay(group: ChannelGroup, config: PruneConfig) -> str:
    if group.blocked:
        return group.blocked[0]
    return f"{group.channels} channels: removing {config.sparsity:.0%} of them rounds to none"


def _channel_refit_targets(model: onnx.ModelProto, groups: list[ChannelGroup],
                           kept: dict[int, np.ndarray]) -> list[RefitTarget]:
    """Every layer whose output or input channels shrank, in graph order (depthwise followers excluded:
    their surviving channels compute exactly what they did)."""
    kept_outputs: dict[str, tuple[int, ...] | None] = {}
    for position in kept:
        for name in groups[position].consumers:
            kept_outputs.setdefault(name, None)
    for position, keep in kept.items():
        for name in groups[position].producer_nodes:
            kept_outputs[name] = tuple(int(i) for i in keep)
    return [RefitTarget(node.name, kept_outputs[node.name]) for node in model.graph.node if node.name in kept_outputs]


def _granularity_notes(groups: list[ChannelGroup], kept: dict[int, np.ndarray], config: PruneConfig) -> list[str]:
    removed = {position: 1 - len(keep) / groups[position].channels for position, keep in kept.items()}
    if not removed or all(abs(r - config.sparsity) <= 0.01 for r in removed.values()):
        return []
    aligned = config.channel_multiple > 1 and all(
        len(keep) % config.channel_multiple == 0 for position, keep in kept.items()
        if groups[position].channels % config.channel_multiple == 0)
    how = (f"kept counts are multiples of {config.channel_multiple} so onnxruntime's blocked kernels apply"
           if aligned else "a layer loses whole channels only")
    return [f"per-layer sparsity ranges {min(removed.values()):.1%} to {max(removed.values()):.1%} ({how})"]


# ---------------------------------------------------------------------------------------------------
# Summary


def _summary(teacher: onnx.ModelProto, outcome: _Outcome, config: PruneConfig, records: list[RefitRecord],
             dataset: Dataset | None) -> PruneSummary:
    before, after = _parameter_counts(teacher), _parameter_counts(outcome.model)
    return PruneSummary(
        pattern=config.pattern, criterion=config.criterion, scope=config.scope,
        requested_sparsity=config.sparsity, achieved_sparsity=_achieved(outcome.layers, config),
        layers=outcome.layers, dense_layers=outcome.dense,
        parameters_before=before[0], parameters_after=after[0], nonzero_before=before[1], nonzero_after=after[1],
        refit=records, calibration=_calibration_text(dataset), notes=outcome.notes,
    )


def _achieved(layers: list[LayerResult], config: PruneConfig) -> float:
    if config.structured:
        producers = [r for r in layers if not r.follows_input]
        total = sum(r.channels_before or 0 for r in producers)
        return 1 - sum(r.channels_after or 0 for r in producers) / total if total else 0.0
    sizes = [int(np.prod(r.shape_before)) for r in layers]
    return sum(r.sparsity * n for r, n in zip(layers, sizes)) / sum(sizes) if sizes else 0.0


def _parameter_counts(model: onnx.ModelProto) -> tuple[int, int]:
    total = nonzero = 0
    for tensor in (t for scope in scopes(model.graph) for t in scope.graph.initializer):
        if np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).kind != "f":
            continue
        # a mapped weight a chunk at a time (never whole); one in memory as it is
        for values in (tensor_chunks(tensor) if is_mapped(tensor) else [numpy_helper.to_array(tensor)]):
            total += values.size
            nonzero += int(np.count_nonzero(values))
    return total, nonzero


def _calibration_text(dataset: Dataset | None) -> str | None:
    if dataset is None:
        return None
    kind = "synthetic" if dataset.synthetic else "calibration"
    return f"{dataset.source} ({dataset.num_samples} {kind} samples)"
