"""Which layers get pruned, and why the others stay dense. The plan is data: cheap to compute, easy to test.

A weighted layer is a Conv, ConvTranspose, Gemm or MatMul whose weight (input 1) is a float initializer.
Layers stay dense when the user excludes them, when they are the first or last weighted layer (by
default: they are the most sensitive), or when they hold fewer parameters than `min_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from compressq.graph.index import GraphIndex, check_exclude, first_match, node_attributes, scopes
from compressq.prune.config import PruneConfig

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class WeightedLayer:
    node: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    input_axis: int  # the reduction dimension of the weight: N:M groups run along it
    output_axis: int  # output channels (filters / neurons)

    @property
    def parameters(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class DenseLayer:
    node: str
    op_type: str
    weight: str
    parameters: int
    reason: str


@dataclass(frozen=True)
class PrunePlan:
    layers: tuple[WeightedLayer, ...]
    dense: tuple[DenseLayer, ...]

    def layer(self, node: str) -> WeightedLayer | None:
        return next((layer for layer in self.layers if layer.node == node), None)

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)


def weight_axes(node: onnx.NodeProto, weight_rank: int) -> tuple[int, int] | None:
    """(input axis, output axis) of a weighted node's weight, or None when it has no such layout."""
    attributes = node_attributes(node)
    if node.op_type == "Conv":
        return 1, 0
    if node.op_type == "ConvTranspose":
        return 0, 1
    if node.op_type == "Gemm":
        return (1, 0) if attributes.get("transB", 0) else (0, 1)
    if node.op_type == "MatMul" and weight_rank >= 2:
        return weight_rank - 2, weight_rank - 1
    return None


def plan_pruning(model: onnx.ModelProto, config: PruneConfig) -> PrunePlan:
    """Every weighted layer, sorted into pruned and dense (with the reason), in graph order."""
    check_exclude(model.graph, config.exclude)
    candidates: list[WeightedLayer] = []
    dense: list[DenseLayer] = []
    for scope in scopes(model.graph):  # If/Loop/Scan bodies too; a body reads the weights around it
        index = scope.index()
        for node in scope.graph.node:
            if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or not index.is_constant(node.input[1]):
                continue
            layer_or_reason = _weighted_layer(node, index)
            if isinstance(layer_or_reason, str):
                dense.append(DenseLayer(node.name, node.op_type, node.input[1], _size(index, node.input[1]),
                                        layer_or_reason))
            else:
                candidates.append(layer_or_reason)
    pruned = []
    for position, layer in enumerate(candidates):
        reason = _dense_reason(layer, position, len(candidates), config)
        if reason:
            dense.append(DenseLayer(layer.node, layer.op_type, layer.weight, layer.parameters, reason))
        else:
            pruned.append(layer)
    order = {name: i for i, name in enumerate(graph_order(model))}
    dense.sort(key=lambda d: order[d.node])
    return PrunePlan(tuple(pruned), tuple(dense))


def graph_order(model: onnx.ModelProto) -> list[str]:
    """Node names, main graph first, then each body in walk order: the order layers are listed in."""
    return [node.name for scope in scopes(model.graph) for node in scope.graph.node]


def _weighted_layer(node: onnx.NodeProto, index: GraphIndex) -> WeightedLayer | str:
    weight_name = node.input[1]
    if weight_name not in index.initializers:
        return "weight is computed by a Constant node, not stored as an initializer"
    tensor = index.initializers[weight_name]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if not np.issubdtype(dtype, np.floating):
        return f"weight is {np.dtype(dtype).name} (already quantized)"
    users = len(index.consumers.get(weight_name, []))
    if users > 1:
        return f"weight is shared by {users} nodes"
    axes = weight_axes(node, len(tensor.dims))
    if axes is None:
        return "weight is 1-D"
    return WeightedLayer(node.name, node.op_type, weight_name, tuple(tensor.dims), *axes)


def _dense_reason(layer: WeightedLayer, position: int, count: int, config: PruneConfig) -> str | None:
    pattern = first_match((layer.node, layer.op_type, layer.weight), config.exclude)
    if pattern is not None:
        return f"excluded by --exclude '{pattern}'"
    if config.keep_first and position == 0:
        return "first weighted layer (pass --prune-first to prune it)"
    if config.keep_last and position == count - 1:
        return "last weighted layer (pass --prune-last to prune it)"
    if layer.parameters < config.min_parameters:
        return f"tiny: {layer.parameters} parameters < --min-params {config.min_parameters}"
    if config.n_m and layer.shape[layer.input_axis] % config.n_m[1]:
        return (f"input dimension {layer.shape[layer.input_axis]} is not a multiple of {config.n_m[1]} "
                f"({config.pattern} needs whole groups)")
    return None


def _size(index: GraphIndex, name: str) -> int:
    """Elements of a constant; an initializer's from its dims (a weight left in its file is not read for it)."""
    tensor = index.initializers.get(name)
    if tensor is not None:
        return int(np.prod(tensor.dims, dtype=np.int64))
    value = index.constant(name)
    return int(value.size) if value is not None else 0
