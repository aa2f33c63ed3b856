"""BatchNorm folding and cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization").

Equalization rescales consecutive weighted layers W1 -> act -> W2 so that, for every channel i between
them, the range of W1's output channel i and of W2's input channel i become equal:
    s_i = sqrt(r1_i / r2_i),  W1[i] /= s_i (bias too),  W2[:, i] *= s_i.
This is exact whenever act(x / s) = act(x) / s for s > 0: Relu, LeakyRelu, PRelu, Clip(0, no max), or no
activation. A Clip with a max (ReLU6) is not: Clip(x / s, 0, 6) != Clip(x, 0, 6) / s. Instead of replacing
ReLU6 by ReLU (which changes the fp32 model wherever activations exceed 6, as AIMET and the paper do),
such a Clip is rewritten as Relu followed by Min with a per-channel bound 6 / s_i, which is exactly the
original function on the rescaled tensor (`rewrite_bounded_clips=False` skips those pairs instead).
Depthwise and grouped Convs are handled through the channel map of their groups. Several sweeps run over
all pairs, since a layer can be the second of one pair and the first of the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressq.errors import UsageError
from compressq.graph.edit import NameGenerator, remove_unused, toposort
from compressq.graph.index import GraphIndex, node_attributes

HOMOGENEOUS_ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu")
SCALE_LIMITS = (1e-4, 1e4)
SETTLED_LOG_SCALE = 1e-5

# ---------------------------------------------------------------------------------------------------
# BatchNorm folding


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold inference-mode BatchNormalization into the Conv (or Gemm) feeding only it; a copy."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    index = GraphIndex(graph)
    names = NameGenerator(graph)
    folded = {bn.output[0] for bn in list(graph.node) if _fold_one_batchnorm(graph, index, names, bn)}
    kept = [node for node in graph.node if not (node.op_type == "BatchNormalization" and node.output[0] in folded)]
    del graph.node[:]
    graph.node.extend(kept)
    remove_unused(graph)
    toposort(graph)
    return result


def _fold_one_batchnorm(graph: onnx.GraphProto, index: GraphIndex, names: NameGenerator,
                        bn: onnx.NodeProto) -> bool:
    if bn.op_type != "BatchNormalization" or node_attributes(bn).get("training_mode", 0) or any(bn.output[1:]):
        return False
    producer = index.producer.get(bn.input[0])
    only_reader = index.single_consumer(bn.input[0])
    if producer is None or producer.op_type not in ("Conv", "Gemm") or only_reader is None:
        return False
    if only_reader.output[0] != bn.output[0]:  # compared by name: protobuf wrappers need not be identical
        return False
    params = [param for name in bn.input[1:5] if (param := index.constant(name)) is not None]
    weight = index.constant(producer.input[1])
    if weight is None or len(params) != 4:  # a statistic computed at run time cannot be folded
        return False
    gamma, beta, mean, variance = (param.astype(np.float64) for param in params)
    factor = gamma / np.sqrt(variance + node_attributes(bn).get("epsilon", 1e-5))
    shift = beta - mean * factor
    fold = _fold_into_conv if producer.op_type == "Conv" else _fold_into_gemm
    folded = fold(producer, index, weight, factor, shift)
    if folded is None:
        return False
    new_weight, new_bias = folded
    _set_input(graph, names, producer, 1, new_weight.astype(weight.dtype), f"{producer.input[1]}_folded")
    _set_input(graph, names, producer, 2, new_bias.astype(weight.dtype), f"{producer.input[1]}_folded_bias")
    producer.output[0] = bn.output[0]
    return True


def _fold_into_conv(conv: onnx.NodeProto, index: GraphIndex, weight: np.ndarray, factor: np.ndarray,
                    shift: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    bias = _optional_constant(conv, 2, index, weight.shape[0])
    if bias is None:
        return None
    scaled = weight * factor.reshape(-1, *[1] * (weight.ndim - 1))
    return scaled, bias * factor + shift


def _fold_into_gemm(gemm: onnx.NodeProto, index: GraphIndex, weight: np.ndarray, factor: np.ndarray,
                    shift: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    attributes = node_attributes(gemm)
    transposed = attributes.get("transB", 0)
    channels = weight.shape[0] if transposed else weight.shape[1]
    bias = _optional_constant(gemm, 2, index, channels)
    if bias is None or factor.size != channels:
        return None
    scaled = weight * (factor[:, None] if transposed else factor[None, :])
    _set_attribute(gemm, "beta", 1.0)  # the new bias already includes beta
    return scaled, attributes.get("beta", 1.0) * bias * factor + shift


def _optional_constant(node: onnx.NodeProto, position: int, index: GraphIndex, channels: int) -> np.ndarray | None:
    """A bias input as [channels] float64 (zeros when absent); None when it is not a per-channel constant."""
    if len(node.input) <= position or not node.input[position]:
        return np.zeros(channels)
    value = index.constant(node.input[position])
    if value is None or value.size not in (1, channels) or (value.ndim > 1 and value.shape[-1] != value.size):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()


# ---------------------------------------------------------------------------------------------------
# Cross-layer equalization: results and layer descriptions


@dataclass(frozen=True)
class EqualizedPair:
    first: str
    second: str
    activation: str   # the op between them, "none" when they are directly connected
    channels: int
    scale_min: float  # smallest and largest s_i applied (over all sweeps)
    scale_max: float


@dataclass
class EqualizeSummary:
    pairs: list[EqualizedPair] = field(default_factory=list)
    iterations: int = 0  # sweeps run (stops early once the scales settle)
    clips_made_per_channel: list[str] = field(default_factory=list)  # Clip(0, max) -> Relu + Min(bound / s)
    skipped: dict[str, str] = field(default_factory=dict)  # first layer -> why it was not equalized


@dataclass(frozen=True)
class _Layer:
    node: onnx.NodeProto
    weight: np.ndarray  # as stored
    layout: str         # "conv": [out, in/groups, k...]; "out_in": [out, in]; "in_out": [in, out]
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] if self.layout == "in_out" else self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        if self.layout == "conv":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0] if self.layout == "in_out" else self.weight.shape[1]

    @property
    def family(self) -> str:
        return "conv" if self.layout == "conv" else "dense"


@dataclass
class _Pair:
    first: _Layer
    second: _Layer
    activation: onnx.NodeProto | None
    bias_slot: tuple[onnx.NodeProto, int] | None  # where layer 1's bias lives (its input 2, or a bias Add)
    clip_max: float | None                        # bound of a Clip(0, max) between them
    scale: np.ndarray = field(default_factory=lambda: np.ones(0))


def _as_layer(node: onnx.NodeProto, index: GraphIndex) -> _Layer | None:
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    weight = index.constant(node.input[1])
    if weight is None or weight.dtype != np.float32:
        return None
    if node.op_type == "Conv" and weight.ndim >= 3:
        return _Layer(node, weight, "conv", node_attributes(node).get("group", 1))
    if node.op_type == "Gemm" and weight.ndim == 2 and not node_attributes(node).get("transA", 0):
        return _Layer(node, weight, "out_in" if node_attributes(node).get("transB", 0) else "in_out")
    if node.op_type == "MatMul" and weight.ndim == 2:
        return _Layer(node, weight, "in_out")
    return None


# ---------------------------------------------------------------------------------------------------
# Per-channel ranges and scaling (pure numpy)


def _out_in_view(weight: np.ndarray, layout: str) -> np.ndarray:
    """Any layout -> [out, in_per_group, rest]."""
    if layout == "conv":
        return weight.reshape(weight.shape[0], weight.shape[1], -1)
    matrix = weight.T if layout == "in_out" else weight
    return matrix[:, :, None]


def _from_out_in_view(view: np.ndarray, like: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return view.reshape(like.shape)
    matrix = view[:, :, 0]
    return matrix.T if layout == "in_out" else matrix


def _input_channel_map(layer: _Layer) -> np.ndarray:
    """[out, in_per_group]: which input channel each weight column reads (groups included)."""
    view = _out_in_view(layer.weight, layer.layout)
    out_channels, per_group = view.shape[:2]
    group_of_output = np.arange(out_channels) // (out_channels // layer.groups)
    return group_of_output[:, None] * per_group + np.arange(per_group)[None, :]


def output_channel_ranges(weight: np.ndarray, layout: str) -> np.ndarray:
    return np.abs(_out_in_view(weight, layout)).max(axis=(1, 2))


def input_channel_ranges(layer: _Layer, weight: np.ndarray) -> np.ndarray:
    per_column = np.abs(_out_in_view(weight, layer.layout)).max(axis=2)
    ranges = np.zeros(layer.in_channels)
    np.maximum.at(ranges, _input_channel_map(layer).ravel(), per_column.ravel())
    return ranges


def scale_output_channels(weight: np.ndarray, layout: str, divisor: np.ndarray) -> np.ndarray:
    return _from_out_in_view(_out_in_view(weight, layout) / divisor[:, None, None], weight, layout)


def scale_input_channels(layer: _Layer, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    view = _out_in_view(weight, layer.layout) * factor[_input_channel_map(layer)][:, :, None]
    return _from_out_in_view(view, weight, layer.layout)


def equalizing_scale(first_ranges: np.ndarray, second_ranges: np.ndarray) -> np.ndarray:
    """s_i = sqrt(r1_i * r2_i) / r2_i, 1 where a channel is dead in either layer."""
    alive = (first_ranges > 0) & (second_ranges > 0)
    ratio = np.divide(first_ranges, second_ranges, out=np.ones_like(first_ranges), where=alive)
    return np.clip(np.sqrt(ratio), *SCALE_LIMITS)


# ---------------------------------------------------------------------------------------------------
# Finding pairs


def _clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip, None entries for absent bounds; None when a bound is not a constant."""
    attributes = node_attributes(node)
    bounds: list[float | None] = [attributes.get("min"), attributes.get("max")]
    for position in (1, 2):
        if len(node.input) > position and node.input[position]:
            value = index.constant(node.input[position])
            if value is None:
                return None
            bounds[position - 1] = float(value)
    return bounds[0], bounds[1]


def _activation_clip_max(node: onnx.NodeProto, index: GraphIndex) -> tuple[bool, float | None]:
    """(scale-equivariant after an optional per-channel rewrite?, the Clip max to rewrite)."""
    if node.op_type in HOMOGENEOUS_ACTIVATIONS:
        return True, None
    if node.op_type != "Clip":
        return False, None
    bounds = _clip_bounds(node, index)
    if bounds is None or bounds[0] not in (None, 0.0):
        return False, None
    return True, bounds[1]


def _bias_add(tensor: str, index: GraphIndex) -> tuple[onnx.NodeProto, int] | None:
    """An Add of a constant right after a MatMul: the layer's bias."""
    add = index.single_consumer(tensor)
    if add is None or add.op_type != "Add":
        return None
    other = 1 if add.input[0] == tensor else 0
    return (add, other) if index.is_constant(add.input[other]) else None


def _find_pair(first: _Layer, index: GraphIndex, rewrite_bounded_clips: bool) -> _Pair | str | None:
    """The layer after `first` (through a bias Add and one activation), a reason it cannot pair, or
    None when no weighted layer follows."""
    tensor = first.node.output[0]
    bias_slot = (first.node, 2) if first.node.op_type in ("Conv", "Gemm") else None
    if first.node.op_type == "MatMul" and (add := _bias_add(tensor, index)) is not None:
        bias_slot, tensor = add, add[0].output[0]
    following = index.single_consumer(tensor)
    activation, clip_max = None, None
    if following is not None and following.op_type in (*HOMOGENEOUS_ACTIVATIONS, "Clip"):
        equivariant, clip_max = _activation_clip_max(following, index)
        if not equivariant:
            return f"{following.op_type} '{following.name}' does not commute with per-channel scaling"
        activation, tensor = following, following.output[0]
        following = index.single_consumer(tensor)
    if following is None:
        return _why_no_single_consumer(tensor, index)
    second = _as_layer(following, index)
    if second is None or following.input[0] != tensor:
        return None
    if second.family != first.family or second.in_channels != first.out_channels:
        return f"'{second.node.name}' does not read the {first.out_channels} channels of '{first.node.name}' one by one"
    if activation is not None and clip_max is not None and not rewrite_bounded_clips:
        return f"Clip '{activation.name}' has a max bound (rewrite_bounded_clips=False)"
    if bias_slot is not None and _computed_input(*bias_slot, index):
        return f"the bias of '{first.node.name}' is computed at run time, so it cannot be rescaled"
    return _Pair(first, second, activation, bias_slot, clip_max)


def _computed_input(node: onnx.NodeProto, position: int, index: GraphIndex) -> bool:
    """The input is there and is not a constant."""
    return len(node.input) > position and bool(node.input[position]) and not index.is_constant(node.input[position])


def _why_no_single_consumer(tensor: str, index: GraphIndex) -> str | None:
    users = len(index.consumers.get(tensor, []))
    if tensor in index.graph_outputs:
        return f"'{tensor}' is a graph output" if users else None
    return f"'{tensor}' feeds {users} nodes" if users else None


def _find_pairs(graph: onnx.GraphProto, index: GraphIndex, rewrite_bounded_clips: bool,
                skipped: dict[str, str]) -> list[_Pair]:
    pairs = []
    for node in graph.node:
        first = _as_layer(node, index)
        found = _find_pair(first, index, rewrite_bounded_clips) if first is not None else None
        if isinstance(found, str):
            skipped[node.name] = found
        elif found is not None:
            pairs.append(found)
    return pairs


# ---------------------------------------------------------------------------------------------------
# Equalization


class _Tensors:
    """Working float64 copies of the weights and biases being rescaled, keyed by (node output, input)."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self.values: dict[tuple[str, int], np.ndarray] = {}
        self.nodes: dict[tuple[str, int], onnx.NodeProto] = {}

    def get(self, node: onnx.NodeProto, position: int) -> np.ndarray | None:
        """The working copy of an optional input (a bias); None when the node has no such input."""
        if len(node.input) <= position or not node.input[position]:
            return None
        return self.require(node, position)

    def require(self, node: onnx.NodeProto, position: int) -> np.ndarray:
        key = (node.output[0], position)
        if key not in self.values:
            constant = self.index.constant(node.input[position])
            assert constant is not None, "_find_pair pairs only layers whose weights and biases are constants"
            self.values[key] = constant.astype(np.float64)
            self.nodes[key] = node
        return self.values[key]

    def set(self, node: onnx.NodeProto, position: int, value: np.ndarray) -> None:
        self.values[(node.output[0], position)] = value

    def write_back(self, graph: onnx.GraphProto, names: NameGenerator) -> None:
        for (output, position), value in self.values.items():
            node = self.nodes[(output, position)]
            _set_input(graph, names, node, position, value.astype(np.float32), f"{node.input[position]}_equalized")


def equalize(model: onnx.ModelProto, iterations: int = 10, *, rewrite_bounded_clips: bool = True,
             ) -> tuple[onnx.ModelProto, EqualizeSummary]:
    """Cross-layer equalization of Conv->Conv and Gemm/MatMul->Gemm/MatMul pairs; fold BatchNorm first
    (`fold_batchnorm`), a BatchNormalization between two layers stops the pair. Returns a copy."""
    if iterations < 1:
        raise UsageError(f"equalization needs at least one sweep, not {iterations}", hint="the default is 10")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    index = GraphIndex(graph)
    summary = EqualizeSummary()
    pairs = _find_pairs(graph, index, rewrite_bounded_clips, summary.skipped)
    tensors = _Tensors(index)
    for pair in pairs:
        pair.scale = np.ones(pair.first.out_channels)
    for _ in range(iterations if pairs else 0):
        summary.iterations += 1
        largest_step = max(_equalize_pair(pair, tensors) for pair in pairs)
        if largest_step < SETTLED_LOG_SCALE:
            break
    names = NameGenerator(graph)
    tensors.write_back(graph, names)
    for pair in pairs:
        summary.pairs.append(EqualizedPair(
            pair.first.node.name, pair.second.node.name, pair.activation.op_type if pair.activation else "none",
            pair.first.out_channels, float(pair.scale.min()), float(pair.scale.max())))
        if pair.clip_max is not None:
            summary.clips_made_per_channel.append(_clip_per_channel(graph, names, pair))
    toposort(graph)  # the Min nodes were appended; remove_unused expects a sorted graph
    remove_unused(graph)
    return result, summary


def _equalize_pair(pair: _Pair, tensors: _Tensors) -> float:
    """One rescaling of a pair; returns the largest |log s_i| it applied."""
    first_weight = tensors.require(pair.first.node, 1)
    second_weight = tensors.require(pair.second.node, 1)
    scale = equalizing_scale(output_channel_ranges(first_weight, pair.first.layout),
                             input_channel_ranges(pair.second, second_weight))
    tensors.set(pair.first.node, 1, scale_output_channels(first_weight, pair.first.layout, scale))
    tensors.set(pair.second.node, 1, scale_input_channels(pair.second, second_weight, scale))
    if pair.bias_slot is not None and (bias := tensors.get(*pair.bias_slot)) is not None:
        per_channel = np.broadcast_to(bias, np.broadcast_shapes(bias.shape, scale.shape))
        tensors.set(*pair.bias_slot, per_channel / scale)
    pair.scale = pair.scale * scale
    return float(np.abs(np.log(scale)).max())


def _clip_per_channel(graph: onnx.GraphProto, names: NameGenerator, pair: _Pair) -> str:
    """Clip(x, 0, max) on the rescaled tensor -> Min(Relu(x), max / s) with the bound per channel."""
    clip = pair.activation
    assert clip is not None and pair.clip_max is not None, "only a pair through a bounded Clip has a clip_max"
    spatial_dims = pair.first.weight.ndim - 2 if pair.first.family == "conv" else 0
    bound = (pair.clip_max / pair.scale).astype(np.float32).reshape(-1, *[1] * spatial_dims)
    bound_name = names(f"{clip.name or clip.output[0]}_per_channel_max")
    graph.initializer.append(numpy_helper.from_array(bound, bound_name))
    rectified = names(f"{clip.output[0]}_relu")
    relu = helper.make_node("Relu", [clip.input[0]], [rectified], name=names(f"{clip.name}_relu"))
    bounded = helper.make_node("Min", [rectified, bound_name], [clip.output[0]], name=names(f"{clip.name}_min"))
    original_name = clip.name
    clip.CopyFrom(relu)
    graph.node.append(bounded)
    return original_name


# ---------------------------------------------------------------------------------------------------
# Small graph edits


def _set_input(graph: onnx.GraphProto, names: NameGenerator, node: onnx.NodeProto, position: int,
               value: np.ndarray, name_base: str) -> None:
    """Store `value` as a fresh initializer and point input `position` of `node` at it."""
    name = names(name_base)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    while len(node.input) <= position:
        node.input.append("")
    node.input[position] = name


def _set_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])
