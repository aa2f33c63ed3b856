"""Channel pruning: remove whole output channels and fix every consumer. All graph surgery of prune/ lives here.

Three passes, each usable and testable alone:

  trace_channel_groups(model, prunable)   which tensors share one channel space, and what must be sliced
                                          when channels of that space go (data, no rewrite)
  choose_channels(model, groups, ...)     which channels of each group stay (lowest L2 norm goes)
  remove_channels(model, groups, kept)    the rewrite, on a copy: smaller weights, smaller tensors

A channel space starts at a weighted layer's output (Conv/ConvTranspose with group=1, Gemm, MatMul with a
2-D weight) and follows the tensor through ops that treat channels independently: BatchNormalization,
InstanceNormalization, elementwise activations, pooling, depthwise Conv (its channels and `group` follow),
elementwise Add/Sub/Mul/... (a residual join: the spaces of all operands become one group, pruned
together or not at all), and Flatten/Reshape to [N, C*H*W] (channel c -> features c*HW .. c*HW+HW-1).
It ends at the input channels of the next weighted layers. A space that reaches anything else (Concat,
LayerNormalization, Softmax, Transpose, Shape, a graph output, ...) is left whole: Concat offsets are
not tracked, so the producers feeding a Concat stay unpruned.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from compressq.graph.edit import NameGenerator, remove_unused
from compressq.graph.index import GraphIndex, implicit_inputs, node_attributes, tensor_types
from compressq.prune.masks import channel_l2_norms, kept_channel_counts, strongest_channels

ELEMENTWISE_UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt",
    "Reciprocal", "Mish", "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
})
ELEMENTWISE_BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
# Per-channel parameters: which inputs hold one value per channel.
NORMALIZATION_PARAMETERS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclass(frozen=True)
class Layout:
    """Where the channels of a tensor sit."""

    axis: int  # counted from the end: -1 is the last axis
    rank: int | None
    block: int = 1  # features per channel once a Flatten/Reshape merged spatial dims into the channel axis

    @property
    def channels_first(self) -> bool:
        """Channels at axis 1, as Conv, BatchNormalization and pooling expect."""
        return self.rank is not None and self.rank + self.axis == 1


@dataclass(frozen=True)
class ConstantSlice:
    """Keep only the surviving channels of one constant input of one node."""

    node: str
    input_index: int
    axis: int
    block: int = 1


@dataclass
class ChannelGroup:
    """Tensors that share one channel space; everything listed here shrinks together."""

    channels: int
    producers: list[ConstantSlice] = field(default_factory=list)  # output-channel slices of producer weights
    consumers: list[str] = field(default_factory=list)  # weighted nodes whose input channels shrink
    followers: list[str] = field(default_factory=list)  # depthwise Convs: their channels and group follow
    slices: list[ConstantSlice] = field(default_factory=list)  # every other constant to slice
    reshapes: list[tuple[str, int]] = field(default_factory=list)  # (Reshape node, block): target shape to fix
    tensors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # why the group cannot shrink; empty when it can

    @property
    def prunable(self) -> bool:
        return not self.blocked

    @property
    def producer_nodes(self) -> list[str]:
        return [s.node for s in self.producers if s.input_index == 1]

    def all_slices(self) -> list[ConstantSlice]:
        return self.producers + self.slices

    def absorb(self, other: ChannelGroup) -> None:
        for name in ("producers", "consumers", "followers", "slices", "reshapes", "tensors"):
            getattr(self, name).extend(getattr(other, name))
        for reason in other.blocked:
            self.block(reason)

    def block(self, reason: str) -> None:
        if reason not in self.blocked:
            self.blocked.append(reason)


@dataclass(frozen=True)
class _WeightedNode:
    """How a Conv/ConvTranspose/Gemm/MatMul with a constant weight lays out its channels."""

    kind: str  # "linear" (group=1, Gemm, 2-D MatMul), "depthwise", or "other"
    in_axis: int = 0
    out_axis: int = 0
    in_channels: int = 0
    out_channels: int = 0
    output_layout: Layout | None = None
    bias: ConstantSlice | None = None
    reason: str = ""


# ---------------------------------------------------------------------------------------------------
# Tracing channel spaces


def trace_channel_groups(model: onnx.ModelProto, prunable: Mapping[str, str | None]) -> list[ChannelGroup]:
    """Channel groups of `model`. `prunable` maps every weighted node to None (may shrink) or the reason
    it stays dense; a group with any dense producer is blocked (pruned together or not at all)."""
    return _ChannelTracer(model, prunable).run()


class _ChannelTracer:
    def __init__(self, model: onnx.ModelProto, prunable: Mapping[str, str | None]):
        self.graph = model.graph
        self.index = GraphIndex(model.graph)
        self.types = tensor_types(model)
        self.prunable = prunable
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []
        self.space: dict[str, int] = {}
        self.layout: dict[str, Layout] = {}

    def run(self) -> list[ChannelGroup]:
        for node in self.graph.node:
            self._visit(node)
        for name in self.index.graph_outputs:
            if name in self.space:
                self._block(name, f"its channels reach the graph output '{name}'")
        roots = sorted({self._find(i) for i in range(len(self.groups))})
        return [self.groups[root] for root in roots]

    # -- union-find over groups

    def _find(self, group_id: int) -> int:
        while self.parent[group_id] != group_id:
            self.parent[group_id] = self.parent[self.parent[group_id]]
            group_id = self.parent[group_id]
        return group_id

    def _group(self, tensor: str) -> ChannelGroup:
        return self.groups[self._find(self.space[tensor])]

    def _union(self, first: str, second: str) -> None:
        a, b = self._find(self.space[first]), self._find(self.space[second])
        if a == b:
            return
        if self.groups[a].channels != self.groups[b].channels:
            reason = f"joins {self.groups[a].channels} and {self.groups[b].channels} channels"
            self.groups[a].block(reason)
            self.groups[b].block(reason)
        self.groups[a].absorb(self.groups[b])
        self.parent[b] = a

    def _new_group(self, channels: int) -> int:
        self.groups.append(ChannelGroup(channels))
        self.parent.append(len(self.parent))
        return len(self.groups) - 1

    def _assign(self, tensor: str, group_id: int, layout: Layout) -> None:
        self.space[tensor] = group_id
        self.layout[tensor] = layout
        self.groups[self._find(group_id)].tensors.append(tensor)

    def _follow(self, node: onnx.NodeProto, source: str, layout: Layout | None = None) -> None:
        """The node's first output carries the same channels as `source`; other outputs must be unused."""
        self._assign(node.output[0], self.space[source], layout or self.layout[source])
        extra = [o for o in node.output[1:] if o and (self.index.consumers.get(o) or o in self.index.graph_outputs)]
        if extra:
            self._block(source, f"{node.op_type} '{node.name}' uses its extra output '{extra[0]}'")

    def _block(self, tensor: str, reason: str) -> None:
        self._group(tensor).block(reason)

    # -- visiting nodes in graph (topological) order

    def _visit(self, node: onnx.NodeProto) -> None:
        tracked = [name for name in node.input if name in self.space]
        tracked += [name for name in implicit_inputs(node) if name in self.space]
        weighted = self._weighted(node)
        if tracked:
            self._consume(node, tracked, weighted)
        if weighted is not None and weighted.kind == "linear":
            self._start_group(node, weighted)

    def _consume(self, node: onnx.NodeProto, tracked: list[str], weighted: _WeightedNode | None) -> None:
        data = node.input[0] if node.input else ""
        op = node.op_type
        if weighted is not None and tracked == [data]:
            self._consume_weighted(node, weighted)
        elif op in NORMALIZATION_PARAMETERS and tracked == [data]:
            self._normalization(node)
        elif (op in ELEMENTWISE_UNARY_OPS or op in POOL_OPS) and tracked == [data]:
            self._channelwise(node)
        elif op in ELEMENTWISE_BINARY_OPS:
            self._elementwise_join(node)
        elif op in ("Flatten", "Reshape") and tracked == [data]:
            self._flatten(node)
        else:
            for name in tracked:
                self._block(name, f"its channels reach {op} '{node.name}', whose channel mapping is not tracked")

    def _start_group(self, node: onnx.NodeProto, weighted: _WeightedNode) -> None:
        group_id = self._new_group(weighted.out_channels)
        group = self.groups[group_id]
        group.producers.append(ConstantSlice(node.name, 1, weighted.out_axis))
        if weighted.bias is not None:
            group.producers.append(weighted.bias)
        reason = self.prunable.get(node.name, "not planned")
        if reason:
            group.block(f"'{node.name}' is left dense ({reason})")
        assert weighted.output_layout is not None, "every linear layer says how its output holds the channels"
        self._assign(node.output[0], group_id, weighted.output_layout)

    def _consume_weighted(self, node: onnx.NodeProto, weighted: _WeightedNode) -> None:
        data = node.input[0]
        group, layout = self._group(data), self.layout[data]
        if weighted.kind == "depthwise":
            if layout.channels_first and layout.block == 1 and weighted.out_channels == group.channels:
                group.followers.append(node.name)
                group.slices.append(ConstantSlice(node.name, 1, 0))
                if weighted.bias is not None:
                    group.slices.append(weighted.bias)
                self._follow(node, data)
                return
            self._block(data, f"depthwise Conv '{node.name}' does not match its channels")
            return
        if weighted.kind != "linear":
            self._block(data, f"its channels reach {node.op_type} '{node.name}' ({weighted.reason})")
            return
        conv_like = node.op_type in ("Conv", "ConvTranspose")
        fits = (layout.channels_first and layout.block == 1) if conv_like else layout.axis == -1
        if not fits or weighted.in_channels != group.channels * layout.block:
            self._block(data, f"{node.op_type} '{node.name}' reads the channels in a layout that is not tracked")
            return
        group.consumers.append(node.name)
        group.slices.append(ConstantSlice(node.name, 1, weighted.in_axis, layout.block))

    def _normalization(self, node: onnx.NodeProto) -> None:
        data = node.input[0]
        group, layout = self._group(data), self.layout[data]
        if not layout.channels_first or layout.block != 1:
            self._block(data, f"{node.op_type} '{node.name}' normalizes an axis that is not the channel axis")
            return
        for position in NORMALIZATION_PARAMETERS[node.op_type]:
            if not self.index.is_constant(node.input[position]):
                self._block(data, f"{node.op_type} '{node.name}' has non-constant parameters")
                return
            group.slices.append(ConstantSlice(node.name, position, 0))
        self._follow(node, data)

    def _channelwise(self, node: onnx.NodeProto) -> None:
        data = node.input[0]
        layout = self.layout[data]
        if node.op_type in POOL_OPS and not layout.channels_first:
            self._block(data, f"{node.op_type} '{node.name}' pools over the channel axis")
            return
        for name in node.input[1:]:
            value = self.index.constant(name) if name else None
            if name and (value is None or value.size > 1):
                self._block(data, f"{node.op_type} '{node.name}' has per-element parameters")
                return
        self._follow(node, data)

    def _elementwise_join(self, node: onnx.NodeProto) -> None:
        tracked = [name for name in node.input if name in self.space]
        untracked = [name for name in node.input if name and name not in self.space
                     and not self.index.is_constant(name)]
        first = tracked[0]
        layouts = {(self.layout[name].axis, self.layout[name].block) for name in tracked}
        if untracked:
            self._block(first, f"{node.op_type} '{node.name}' joins them with '{untracked[0]}', "
                               "whose channels are not tracked")
        if len(layouts) > 1:
            self._block(first, f"{node.op_type} '{node.name}' joins tensors with different channel layouts")
        for name in tracked[1:]:
            self._union(first, name)
        layout = self.layout[first]
        group = self._group(first)
        ranks = [self.layout[name].rank for name in tracked]
        for position, name in enumerate(node.input):
            if name and name not in self.space and self.index.is_constant(name):
                value = self.index.weight(name)
                ranks.append(value.ndim)
                self._slice_broadcast_constant(node, position, value, group, layout, first)
        known = [r for r in ranks if r is not None]
        rank = max(known) if len(known) == len(ranks) else None
        self._follow(node, first, Layout(layout.axis, rank, layout.block))

    def _slice_broadcast_constant(self, node: onnx.NodeProto, position: int, value: np.ndarray,
                                  group: ChannelGroup, layout: Layout, tensor: str) -> None:
        axis = value.ndim + layout.axis
        if axis < 0 or value.shape[axis] == 1:
            return  # broadcast over the channels: nothing to slice
        if value.shape[axis] == group.channels * layout.block:
            group.slices.append(ConstantSlice(node.name, position, axis, layout.block))
        else:
            self._block(tensor, f"{node.op_type} '{node.name}' has a constant that does not match the channels")

    def _flatten(self, node: onnx.NodeProto) -> None:
        """Flatten/Reshape [N, C, *spatial] -> [N, C*prod(spatial)]: channel c owns a block of features."""
        data = node.input[0]
        layout, group = self.layout[data], self._group(data)
        input_features = self._per_sample_shape(data)
        output_features = self._per_sample_shape(node.output[0])
        if not layout.channels_first or input_features is None or output_features is None \
                or len(output_features) != 1:
            self._block(data, f"{node.op_type} '{node.name}' mixes the channel axis with others")
            return
        block = layout.block * int(np.prod(input_features[1:], dtype=np.int64))
        features = group.channels * block
        if output_features[0] != features or not self._flattens_after_batch(node, features):
            self._block(data, f"{node.op_type} '{node.name}' mixes the channel axis with others")
            return
        if node.op_type == "Reshape" and int(self.index.weight(node.input[1])[1]) == features:
            group.reshapes.append((node.name, block))
        self._follow(node, data, Layout(-1, 2, block))

    def _flattens_after_batch(self, node: onnx.NodeProto, features: int) -> bool:
        if node.op_type == "Flatten":
            return node_attributes(node).get("axis", 1) == 1
        target = self.index.constant(node.input[1])
        if target is None or target.shape != (2,):
            return False
        batch, width = int(target[0]), int(target[1])
        return batch != -1 if width == -1 else width == features

    def _per_sample_shape(self, name: str) -> tuple[int, ...] | None:
        """The axes after the batch, when every one of them is a number (the batch may be symbolic)."""
        kind = self.types.get(name)
        if kind is None or kind.shape is None:
            return None
        dims = [d for d in kind.shape[1:] if isinstance(d, int)]
        return tuple(dims) if len(dims) == len(kind.shape) - 1 else None

    # -- weighted nodes

    def _weighted(self, node: onnx.NodeProto) -> _WeightedNode | None:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            return None
        weight = self.index.constant(node.input[1])
        if weight is None:
            return None
        bias = self._bias(node, weight)
        if isinstance(bias, str):
            return _WeightedNode("other", reason=bias)
        if node.op_type == "Conv":
            return self._conv(node, weight, bias)
        if node.op_type == "ConvTranspose":
            group = node_attributes(node).get("group", 1)
            if group != 1:
                return _WeightedNode("other", reason=f"group={group}")
            return _WeightedNode("linear", 0, 1, weight.shape[0], weight.shape[1] * group,
                                 Layout(1 - weight.ndim, weight.ndim), bias)
        if node.op_type == "Gemm":
            return self._gemm(node, weight, bias)
        if weight.ndim != 2:
            return _WeightedNode("other", reason=f"{weight.ndim}-D weight")
        rank = self.types.get(node.output[0])
        output_rank = len(rank.shape) if rank is not None and rank.shape is not None else None
        return _WeightedNode("linear", 0, 1, weight.shape[0], weight.shape[1], Layout(-1, output_rank), None)

    def _conv(self, node: onnx.NodeProto, weight: np.ndarray, bias: ConstantSlice | None) -> _WeightedNode:
        group = node_attributes(node).get("group", 1)
        layout = Layout(1 - weight.ndim, weight.ndim)
        if group == 1:
            return _WeightedNode("linear", 1, 0, weight.shape[1], weight.shape[0], layout, bias)
        if group == weight.shape[0] and weight.shape[1] == 1:
            return _WeightedNode("depthwise", 1, 0, group, group, layout, bias)
        return _WeightedNode("other", reason=f"grouped convolution, group={group}")

    def _gemm(self, node: onnx.NodeProto, weight: np.ndarray, bias: ConstantSlice | None) -> _WeightedNode:
        attributes = node_attributes(node)
        if attributes.get("transA", 0):
            return _WeightedNode("other", reason="transA=1")
        in_axis, out_axis = (1, 0) if attributes.get("transB", 0) else (0, 1)
        return _WeightedNode("linear", in_axis, out_axis, weight.shape[in_axis], weight.shape[out_axis],
                             Layout(-1, 2), bias)

    def _bias(self, node: onnx.NodeProto, weight: np.ndarray) -> ConstantSlice | str | None:
        if node.op_type == "MatMul" or len(node.input) < 3 or not node.input[2]:
            return None
        value = self.index.constant(node.input[2])
        if value is None:
            return "bias is not constant"
        if node.op_type == "Gemm":
            out_axis = 0 if node_attributes(node).get("transB", 0) else 1
            if value.ndim == 0 or value.shape[-1] == 1:
                return None  # one bias broadcast to every output: nothing to slice
            return ConstantSlice(node.name, 2, value.ndim - 1) if value.shape[-1] == weight.shape[out_axis] \
                else "bias does not match the outputs"
        return ConstantSlice(node.name, 2, 0)


# ---------------------------------------------------------------------------------------------------
# Choosing channels


def channel_scores(model: onnx.ModelProto, group: ChannelGroup, criterion: str,
                   rng: np.random.Generator) -> np.ndarray:
    """One score per channel: the L2 norm over every producer's filter for that channel (or random)."""
    if criterion == "random":
        return rng.random(group.channels)
    index = GraphIndex(model.graph)
    nodes = {node.name: node for node in model.graph.node}
    squared = np.zeros(group.channels)
    for weight_slice in group.producers:
        if weight_slice.input_index != 1:
            continue
        weight = index.weight(nodes[weight_slice.node].input[1])
        squared += np.square(channel_l2_norms(weight, weight_slice.axis))
    return np.sqrt(squared)


def choose_channels(model: onnx.ModelProto, groups: list[ChannelGroup], sparsity: float, criterion: str,
                    seed: int, multiple: int = 1) -> dict[int, np.ndarray]:
    """Kept channel indices for every prunable group (by position in `groups`) that loses any;
    see masks.kept_channel_counts for how `multiple` aligns the counts."""
    prunable = [position for position, group in enumerate(groups) if group.prunable]
    counts = kept_channel_counts([groups[p].channels for p in prunable], sparsity, multiple)
    kept = {}
    for position, keep_count in zip(prunable, counts):
        if keep_count < groups[position].channels:
            rng = np.random.default_rng([seed, position])
            kept[position] = strongest_channels(channel_scores(model, groups[position], criterion, rng), keep_count)
    return kept


# ---------------------------------------------------------------------------------------------------
# Rewriting


def block_indices(channels: np.ndarray, block: int) -> np.ndarray:
    """Feature indices of the kept channels once each channel spans `block` consecutive features."""
    return (channels[:, None] * block + np.arange(block)[None, :]).ravel()


def remove_channels(model: onnx.ModelProto, groups: list[ChannelGroup],
                    kept: Mapping[int, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` without the channels that `kept` drops: weights, biases, BatchNorm parameters,
    depthwise `group` counts and Reshape targets shrink; value_info is dropped (it described old shapes)."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    nodes = {node.name: node for node in graph.node}
    cuts: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for position, keep in kept.items():
        group = groups[position]
        for weight_slice in group.all_slices():
            indices = block_indices(keep, weight_slice.block)
            cuts[(weight_slice.node, weight_slice.input_index)].append((weight_slice.axis, indices))
        for name in group.followers:
            _set_attribute(nodes[name], "group", len(keep))
        for name, block in group.reshapes:
            _shrink_reshape_target(graph, nodes[name], len(keep) * block)
    _apply_cuts(graph, nodes, cuts)
    del graph.value_info[:]
    remove_unused(graph)
    return pruned


def _apply_cuts(graph: onnx.GraphProto, nodes: dict[str, onnx.NodeProto],
                cuts: Mapping[tuple[str, int], list[tuple[int, np.ndarray]]]) -> None:
    index = GraphIndex(graph)
    for (node_name, position), node_cuts in cuts.items():
        node = nodes[node_name]
        value = index.weight(node.input[position])
        for axis, indices in node_cuts:
            value = np.take(value, indices, axis=axis)
        replace_constant_input(graph, node, position, value)


def replace_constant_input(graph: onnx.GraphProto, node: onnx.NodeProto, position: int,
                           value: np.ndarray) -> None:
    """Give `node` a new constant at input `position`: in place when only this input reads the
    initializer, else as a fresh initializer (other readers keep the old value)."""
    name = node.input[position]
    readers = sum(list(n.input).count(name) for n in graph.node)
    declared = {i.name for i in graph.input} | {o.name for o in graph.output}
    initializer = next((t for t in graph.initializer if t.name == name), None)
    if initializer is not None and readers == 1 and name not in declared:
        initializer.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return
    fresh = NameGenerator(graph)(f"{name}.pruned")
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), fresh))
    node.input[position] = fresh


def _set_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.i = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _shrink_reshape_target(graph: onnx.GraphProto, node: onnx.NodeProto, features: int) -> None:
    target = GraphIndex(graph).weight(node.input[1]).copy()
    target[1] = features
    replace_constant_input(graph, node, 1, target)
