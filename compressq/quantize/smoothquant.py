"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights of the following MatMul/Gemm.

For an activation X feeding MatMuls with constant weights, channel j gets
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (W_j: row j of W [K, N], max over all consumers)
and X W = (X / s) (s W): every consumer's weight rows are multiplied by s, and X is divided by s by
folding 1/s into its producer when that is a LayerNormalization (scale and bias) / RMS norm or a Mul by a
constant, and otherwise by inserting one Mul by the constant 1/s in front of the consumers. Consumers
sharing X (Q, K and V) share one s. Folding needs X to feed nothing else (Shape aside); a residual branch
reading X keeps the original X and the consumers read a new, smoothed tensor.

`collect_channel_absmax` gathers the per-channel (last axis) abs-max of the activations in one collect()
pass (per-channel min/max reduced inside the graph), so memory does not grow with the samples or the width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressq.data import Dataset
from compressq.errors import DataError, UsageError
from compressq.graph.edit import NameGenerator, remove_unused, toposort
from compressq.graph.index import GraphIndex, node_attributes
from compressq.stats.collect import Request, collect
from compressq.stats.observers import ChannelAbsMaxObserver

NORMALIZATIONS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
SCALE_INVARIANT_READERS = ("Shape", "Size")
SCALE_LIMITS = (1e-5, 1e5)
RANGE_FLOOR = 1e-5


@dataclass(frozen=True)
class SmoothedGroup:
    activation: str              # the tensor whose channels were divided by s
    consumers: tuple[str, ...]   # MatMul/Gemm nodes whose weight rows were multiplied by s
    folded_into: str             # "LayerNormalization 'x'", "Mul 'x'", or "new Mul 'x'"
    smoothed_input: str          # the tensor the consumers read now
    channels: int
    scale_min: float
    scale_max: float
    inserted_mul: str | None = None  # name of the Mul node added when 1/s could not be folded


@dataclass
class SmoothSummary:
    alpha: float
    groups: list[SmoothedGroup] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # activation -> why it was not smoothed
    # Mul nodes added in front of consumers. Keep them float when quantizing: quantizing their input
    # would meet the very outliers that smoothing moved out of the MatMul's input.
    inserted_muls: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Consumer:
    node: onnx.NodeProto
    weight: np.ndarray
    input_axis: int  # the weight axis indexed by the activation's channels


# ---------------------------------------------------------------------------------------------------
# Statistics


def smoothable_activations(model: onnx.ModelProto) -> list[str]:
    """Inputs of MatMul/Gemm nodes with a constant 2-D float weight: what `smooth` can act on."""
    index = GraphIndex(model.graph)
    return list(dict.fromkeys(node.input[0] for node in model.graph.node if as_consumer(node, index)))


def collect_channel_absmax(model: onnx.ModelProto, dataset: Dataset, tensor_names: Iterable[str],
                           batch_size: int = 32, *, limit: int | None = None, provider: str = "cpu",
                           progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each named tensor over the dataset: one collect pass, per-channel
    ReduceMin/ReduceMax inside the graph."""
    names = list(dict.fromkeys(tensor_names))
    _check_tensors_exist(model, names)
    observers = {name: ChannelAbsMaxObserver(axis=-1) for name in names}
    collect(model, dataset, [Request(n, o) for n, o in observers.items()], provider=provider,
            batch_size=batch_size, samples=limit, progress=progress)
    found = {name: observer.result() for name, observer in observers.items()}
    return {name: absmax for name, absmax in found.items() if absmax is not None}


def _check_tensors_exist(model: onnx.ModelProto, names: list[str]) -> None:
    produced = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}
    missing = [name for name in names if name not in produced]
    if missing:
        raise UsageError(f"the model has no tensor named {', '.join(repr(m) for m in missing[:3])}",
                         hint="pass names of node outputs or graph inputs")


# ---------------------------------------------------------------------------------------------------
# Smoothing


def smooth(model: onnx.ModelProto, activation_absmax: Mapping[str, np.ndarray], alpha: float = 0.5,
           ) -> tuple[onnx.ModelProto, SmoothSummary]:
    """Smooth every activation named in `activation_absmax` into its MatMul/Gemm consumers; a copy."""
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"SmoothQuant alpha must be between 0 and 1, not {alpha}", hint="0.5 suits most encoders")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    index = GraphIndex(graph)
    names = NameGenerator(graph)
    summary = SmoothSummary(alpha)
    for activation, absmax in activation_absmax.items():
        consumers = weight_consumers(index, activation)
        if not consumers:
            summary.skipped[activation] = "feeds no MatMul/Gemm with a constant weight"
            continue
        group = _smooth_group(graph, index, names, activation, consumers, absmax, alpha)
        summary.groups.append(group)
        if group.inserted_mul is not None:
            summary.inserted_muls.append(group.inserted_mul)
    toposort(graph)  # inserted Muls were appended; remove_unused expects a sorted graph
    remove_unused(graph)
    return result, summary


def smoothing_scale(activation_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 for channels that are zero in X or W."""
    alive = (activation_absmax > 0) & (weight_absmax > 0)
    activation_range = np.maximum(activation_absmax, RANGE_FLOOR).astype(np.float64)
    weight_range = np.maximum(weight_absmax, RANGE_FLOOR).astype(np.float64)
    scale = activation_range**alpha / weight_range ** (1.0 - alpha)
    return np.where(alive, np.clip(scale, *SCALE_LIMITS), 1.0)


def weight_consumers(index: GraphIndex, activation: str) -> list[_Consumer]:
    """The MatMul/Gemm nodes that multiply `activation` (their first input) by a constant 2-D float weight."""
    return [c for node in index.consumers.get(activation, [])
            if node.input[0] == activation and (c := as_consumer(node, index)) is not None]


def as_consumer(node: onnx.NodeProto, index: GraphIndex) -> _Consumer | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    weight = index.constant(node.input[1])
    if weight is None or weight.dtype != np.float32 or weight.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return _Consumer(node, weight, 0)
    attributes = node_attributes(node)
    if attributes.get("transA", 0):
        return None
    return _Consumer(node, weight, 1 if attributes.get("transB", 0) else 0)


def _smooth_group(graph: onnx.GraphProto, index: GraphIndex, names: NameGenerator, activation: str,
                  consumers: list[_Consumer], absmax: np.ndarray, alpha: float) -> SmoothedGroup:
    channels = consumers[0].weight.shape[consumers[0].input_axis]
    absmax = np.asarray(absmax, np.float64).reshape(-1)
    if absmax.size != channels or any(c.weight.shape[c.input_axis] != channels for c in consumers):
        raise DataError(f"activation ranges for '{activation}' have {absmax.size} channels; "
                        f"its MatMul/Gemm weights expect {channels}",
                        hint="collect them with collect_channel_absmax on the same model")
    weight_absmax = np.max([np.abs(c.weight).max(axis=1 - c.input_axis) for c in consumers], axis=0)
    scale = smoothing_scale(absmax, weight_absmax, alpha)
    for consumer in consumers:
        _scale_weight_rows(graph, names, consumer, scale)
    folded_into, smoothed_input, inserted_mul = _divide_activation(graph, index, names, activation, consumers, scale)
    return SmoothedGroup(activation, tuple(c.node.name for c in consumers), folded_into, smoothed_input,
                         channels, float(scale.min()), float(scale.max()), inserted_mul)


def _scale_weight_rows(graph: onnx.GraphProto, names: NameGenerator, consumer: _Consumer,
                       scale: np.ndarray) -> None:
    shape = (-1, 1) if consumer.input_axis == 0 else (1, -1)
    scaled = (consumer.weight.astype(np.float64) * scale.reshape(shape)).astype(np.float32)
    consumer.node.input[1] = _add_initializer(graph, names, f"{consumer.node.input[1]}_smoothed", scaled)


def _divide_activation(graph: onnx.GraphProto, index: GraphIndex, names: NameGenerator, activation: str,
                       consumers: list[_Consumer], scale: np.ndarray) -> tuple[str, str, str | None]:
    """Fold 1/s into the producer when nothing else reads the activation, else insert a Mul;
    returns (where 1/s went, the tensor the consumers read, the inserted Mul or None)."""
    group = {c.node.output[0] for c in consumers}
    others = [n for n in index.consumers.get(activation, [])
              if n.output[0] not in group and n.op_type not in SCALE_INVARIANT_READERS]
    producer = index.producer.get(activation)
    if producer is not None and not others and activation not in index.graph_outputs:
        if producer.op_type in NORMALIZATIONS and _fold_into_normalization(graph, index, names, producer, scale):
            return f"{producer.op_type} '{producer.name}'", activation, None
        if producer.op_type == "Mul" and _fold_into_mul(graph, index, names, producer, scale):
            return f"Mul '{producer.name}'", activation, None
    return _insert_mul(graph, names, activation, consumers, scale)


def _fold_into_normalization(graph: onnx.GraphProto, index: GraphIndex, names: NameGenerator,
                             norm: onnx.NodeProto, scale: np.ndarray) -> bool:
    found = {p: index.constant(norm.input[p]) for p in (1, 2) if len(norm.input) > p and norm.input[p]}
    parameters = {p: value for p, value in found.items() if value is not None}
    if 1 not in parameters or len(parameters) != len(found) or any(
            v.ndim != 1 or v.size != scale.size for v in parameters.values()):
        return False
    for position, value in parameters.items():
        divided = (value.astype(np.float64) / scale).astype(value.dtype)
        norm.input[position] = _add_initializer(graph, names, f"{norm.input[position]}_smoothed", divided)
    return True


def _fold_into_mul(graph: onnx.GraphProto, index: GraphIndex, names: NameGenerator, mul: onnx.NodeProto,
                   scale: np.ndarray) -> bool:
    for position in (0, 1):
        factor = index.constant(mul.input[position])
        if factor is not None and _broadcasts_per_channel(factor, scale.size):
            divided = (factor.astype(np.float64) / scale).astype(np.float32)  # broadcasts onto the last axis
            mul.input[position] = _add_initializer(graph, names, f"{mul.input[position]}_smoothed", divided)
            return True
    return False


def _broadcasts_per_channel(factor: np.ndarray | None, channels: int) -> bool:
    """A float32 constant that a [channels] vector can be folded into along the last axis."""
    return (factor is not None and factor.dtype == np.float32
            and (factor.ndim == 0 or factor.shape[-1] in (1, channels)))


def _insert_mul(graph: onnx.GraphProto, names: NameGenerator, activation: str, consumers: list[_Consumer],
                scale: np.ndarray) -> tuple[str, str, str]:
    inverse = _add_initializer(graph, names, f"{activation}_smooth_inverse_scale", (1.0 / scale).astype(np.float32))
    smoothed = names(f"{activation}_smoothed")
    mul = helper.make_node("Mul", [activation, inverse], [smoothed], name=names(f"{activation}_smooth"))
    graph.node.append(mul)
    for consumer in consumers:
        consumer.node.input[0] = smoothed
    return f"new Mul '{mul.name}'", smoothed, mul.name


def _add_initializer(graph: onnx.GraphProto, names: NameGenerator, base: str, value: np.ndarray) -> str:
    name = names(base)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return name
