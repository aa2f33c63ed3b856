"""Graph rewriting: a plan plus activation ranges in, a QuantizeLinear/DequantizeLinear graph out.

Weights become int8 initializers read through DequantizeLinear (no float copy is kept), biases int32 with
scale = input scale x weight scale, and every planned activation tensor gets one QuantizeLinear ->
DequantizeLinear pair shared by all its consumers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressq.graph.edit import NameGenerator, copy_model, remove_unused, share_duplicate_initializers, toposort
from compressq.graph.index import Scope, implicit_inputs, node_attributes, opset_version, scopes
from compressq.quantize import scheme
from compressq.quantize.bias_correction import weight_error_shift
from compressq.quantize.integer_select import select_on_integers
from compressq.quantize.plan import ComputeNode, QuantPlan
from compressq.stats.collect import TensorRange


@dataclass
class RewriteStats:
    weights_quantized: int = 0
    biases_quantized: int = 0
    biases_left_float: int = 0
    activation_pairs: int = 0
    activations_absorbed: int = 0
    biases_corrected: int = 0


class _Rewriter:
    """Rewrites one graph (the main graph or one If/Loop/Scan body) by its part of the plan."""

    def __init__(self, scope: Scope, plan: QuantPlan, ranges: dict[str, TensorRange], signed: bool,
                 per_channel: bool, input_means: dict[str, np.ndarray], names: NameGenerator,
                 weight_codes: dict[str, np.ndarray] | None = None,
                 borrowed: dict[str, onnx.TensorProto] | None = None):
        self.scope = scope
        self.graph = scope.graph
        self.plan = plan
        self.ranges = ranges
        self.signed = signed
        self.per_channel = per_channel
        self.input_means = input_means
        self.weight_codes = weight_codes or {}
        self.index = scope.index()
        self.index.initializers.update(borrowed or {})  # weights read from the source model (rewrite_qdq)
        self.names = names
        self.nodes_by_name = {n.name: n for n in self.graph.node}
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_initializers: list[onnx.TensorProto] = []
        self.dequantized_weights: dict[str, tuple[str, scheme.QuantParams]] = {}
        self.param_names: dict[str, tuple[str, str]] = {}
        self.stats = RewriteStats()

    def activation_params(self, tensor: str) -> scheme.QuantParams:
        tensor_range = self.ranges[self.plan.param_source[tensor]]
        return scheme.activation_params(tensor_range.low, tensor_range.high, self.signed)

    def rewrite(self) -> RewriteStats:
        for compute in self.plan.compute.values():
            self._quantize_weights(compute)
        for tensor in sorted(self.plan.quantized_tensors):
            self._insert_pair(tensor)
        self._quantize_constant_operands()
        self._remove_absorbed()
        self._drop_replaced_initializers()
        self.graph.node.extend(self.new_nodes)
        self.graph.initializer.extend(self.new_initializers)
        toposort(self.graph, _outer_names(self.scope))
        remove_unused(self.graph)
        return self.stats

    # -- weights and biases -------------------------------------------------------------------------

    def _quantize_weights(self, compute: ComputeNode) -> None:
        node = self.nodes_by_name[compute.name]
        dequantized, weight_params = self._dequantized_weight(compute)
        node.input[1] = dequantized
        if compute.bias is None:
            return
        bias_values = self.index.constant(compute.bias)
        if bias_values is not None and compute.op_type == "Gemm" and bias_values.ndim == 2 \
                and bias_values.shape[0] == 1:
            bias_values = bias_values.reshape(-1)  # C of shape [1, N] broadcasts exactly like [N]
        if bias_values is not None and compute.name in self.input_means:
            bias_values = bias_values - self._weight_error_shift(compute, node, weight_params)
        input_scale = self.activation_params(compute.activation).scale
        params = scheme.bias_params(input_scale, weight_params.scale)
        if bias_values is None or bias_values.ndim != 1 or params.scale.size not in (1, bias_values.size):
            self.stats.biases_left_float += 1
            return
        quantized = scheme.quantize_bias(bias_values, params)
        if quantized is None:
            self.stats.biases_left_float += 1
            return
        node.input[2] = self._dequantize_constant(compute.bias, quantized, params)
        self.stats.biases_quantized += 1

    def _weight_error_shift(self, compute: ComputeNode, node: onnx.NodeProto,
                            params: scheme.QuantParams) -> np.ndarray:
        weight = self.index.weight(compute.weight)
        restored = scheme.dequantize(self._weight_codes(compute.weight, weight, params), params)
        group = node_attributes(node).get("group", 1)
        shift = weight_error_shift(compute, weight, restored, self.input_means[compute.name], group)
        self.stats.biases_corrected += 1
        return shift.astype(np.float32)

    def _dequantized_weight(self, compute: ComputeNode) -> tuple[str, scheme.QuantParams]:
        if compute.weight in self.dequantized_weights:  # tied weights: one int8 copy
            return self.dequantized_weights[compute.weight]
        weight = self.index.weight(compute.weight)
        axis = compute.weight_axis if self.per_channel else None
        params = scheme.weight_params(weight, axis)
        name = self._dequantize_constant(compute.weight, self._weight_codes(compute.weight, weight, params), params)
        self.dequantized_weights[compute.weight] = (name, params)
        self.stats.weights_quantized += 1
        return name, params

    def _weight_codes(self, name: str, weight: np.ndarray, params: scheme.QuantParams) -> np.ndarray:
        """Round-to-nearest codes, or the reconstructed ones given for this weight (same scales: only the
        integer codes differ, see compressq.quantize.gptq)."""
        given = self.weight_codes.get(name)
        if given is not None and given.shape == weight.shape and given.dtype == params.dtype:
            return given
        return scheme.quantize(weight, params)

    def _dequantize_constant(self, source: str, values: np.ndarray, params: scheme.QuantParams) -> str:
        quantized_name = self.names(f"{source}_quantized")
        scale_name = self.names(f"{source}_scale")
        zero_name = self.names(f"{source}_zero_point")
        self.new_initializers += [
            numpy_helper.from_array(values, quantized_name),
            numpy_helper.from_array(params.scale.astype(np.float32), scale_name),
            numpy_helper.from_array(params.zero_point, zero_name),
        ]
        output = self.names(f"{source}_dequantized")
        attributes: dict[str, Any] = {"axis": params.axis} if params.axis is not None and params.scale.ndim else {}
        self.new_nodes.append(helper.make_node("DequantizeLinear", [quantized_name, scale_name, zero_name],
                                               [output], name=self.names(f"{source}_DequantizeLinear"),
                                               **attributes))
        return output

    # -- activations --------------------------------------------------------------------------------

    def _scale_and_zero_point(self, tensor: str) -> tuple[str, str]:
        source = self.plan.param_source[tensor]
        if source not in self.param_names:
            params = self.activation_params(tensor)
            scale_name, zero_name = self.names(f"{source}_scale"), self.names(f"{source}_zero_point")
            self.new_initializers += [numpy_helper.from_array(params.scale, scale_name),
                                      numpy_helper.from_array(params.zero_point, zero_name)]
            self.param_names[source] = (scale_name, zero_name)
        return self.param_names[source]

    def _insert_pair(self, tensor: str) -> None:
        scale_name, zero_name = self._scale_and_zero_point(tensor)
        quantized = self.names(f"{tensor}_quantized")
        if tensor in self.plan.produced_quantized:
            # The producer becomes an integer kernel: it writes a renamed float tensor, and the original
            # name carries the dequantized value, so every consumer and graph output stays wired.
            float_name = self.names(f"{tensor}_float")
            self._rename_producer_output(tensor, float_name)
            quantize_input, dequantized = float_name, tensor
        else:
            dequantized = self.names(f"{tensor}_dequantized")
            quantize_input = tensor
            self._redirect_quantized_consumers(tensor, dequantized)
        self.new_nodes += [
            helper.make_node("QuantizeLinear", [quantize_input, scale_name, zero_name], [quantized],
                             name=self.names(f"{tensor}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [quantized, scale_name, zero_name], [dequantized],
                             name=self.names(f"{tensor}_DequantizeLinear")),
        ]
        self.stats.activation_pairs += 1

    def _rename_producer_output(self, tensor: str, new_name: str) -> None:
        absorbed_from = next((out for out, act in self.plan.absorbed.items() if act.output == tensor), None)
        producer_output = absorbed_from if absorbed_from is not None else tensor
        producer = self.index.producer[producer_output]
        for position, name in enumerate(producer.output):
            if name == producer_output:
                producer.output[position] = new_name

    def _redirect_quantized_consumers(self, tensor: str, dequantized: str) -> None:
        for consumer in self.index.consumers.get(tensor, []):
            if not self._reads_quantized(consumer, tensor):
                continue
            for position, name in enumerate(consumer.input):
                if name == tensor:
                    consumer.input[position] = dequantized

    def _reads_quantized(self, node: onnx.NodeProto, tensor: str) -> bool:
        compute = self.plan.compute.get(node.name)
        if compute is not None:
            return compute.activation == tensor
        return node.name in self.plan.own_scale_nodes or node.name in self.plan.shared_scale_nodes

    def _quantize_constant_operands(self) -> None:
        """A float constant of a quantized Add/Mul becomes int8 (uint8) + DequantizeLinear, own scale."""
        for node in self.graph.node:
            if node.name not in self.plan.own_scale_nodes:
                continue
            for position, name in enumerate(node.input):
                value = self.index.constant(name) if name else None
                if value is None or value.dtype != np.float32:
                    continue
                params = scheme.activation_params(float(value.min()), float(value.max()), self.signed)
                node.input[position] = self._dequantize_constant(name, scheme.quantize(value, params), params)

    def _remove_absorbed(self) -> None:
        absorbed = {a.node for a in self.plan.absorbed.values()}
        kept = [n for n in self.graph.node if n.name not in absorbed]
        self.stats.activations_absorbed = len(self.graph.node) - len(kept)
        del self.graph.node[:]
        self.graph.node.extend(kept)

    def _drop_replaced_initializers(self) -> None:
        # Bodies are rewritten first: what they still read of this graph's weights stays.
        still_used = {name for node in [*self.graph.node, *self.new_nodes]
                      for name in [*node.input, *implicit_inputs(node)]}
        # Deleted in place: re-adding the kept ones would copy every weight (compacted() copies once, at the end).
        for position in reversed(range(len(self.graph.initializer))):
            if self.graph.initializer[position].name not in still_used:
                del self.graph.initializer[position]


def rewrite_qdq(model: onnx.ModelProto, plan: QuantPlan, ranges: dict[str, TensorRange], *,
                signed_activations: bool = False, per_channel: bool = True,
                input_means: dict[str, np.ndarray] | None = None,
                weight_codes: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, RewriteStats]:
    """A new model with the plan applied; `model` is not modified.

    `input_means` (node name -> mean of its float input per channel) turns on bias correction;
    `weight_codes` (weight name -> int8 codes on scheme.weight_params' grid) replaces round-to-nearest.
    """
    # The float weights the rewrite replaces are read from `model`, not copied: the copy holds the rest (a copy of
    # everything made BERT-6's every attempt hold its 170 MB of float weights twice, with the int8 ones on top).
    replaced = replaced_weights(model.graph, plan.main_part())
    result = copy_model(model, drop_initializers=set(replaced))
    names = NameGenerator(result.graph)
    stats = RewriteStats()
    # Innermost bodies first: a weight of an outer graph that a body quantized into its own int8 copy is
    # then unused there, and the outer graph drops its float copy.
    for scope in reversed(scopes(result.graph)):
        part = plan.parts.get(scope.label, plan) if plan.parts else plan
        if plan.parts and scope.label not in plan.parts:
            continue
        done = _Rewriter(scope, part, ranges, signed_activations, per_channel, input_means or {}, names,
                         weight_codes, borrowed=replaced if scope.is_main else {}).rewrite()
        select_on_integers(scope.graph, opset_version(result))  # onnxruntime keeps a QDQ Max/Min float
        for key, value in vars(done).items():
            setattr(stats, key, getattr(stats, key) + value)
    share_duplicate_initializers(result.graph)  # two branches reading one outer weight: one int8 copy
    return compacted(result), stats


def replaced_weights(graph: onnx.GraphProto, plan: QuantPlan) -> dict[str, onnx.TensorProto]:
    """The initializers of `graph` that the rewrite replaces whole: weights read only as the weight of the plan's
    compute nodes (a weight anything else reads, a bias, or one listed as a graph input stays)."""
    readers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for position, name in enumerate([*node.input, *implicit_inputs(node)]):
            readers.setdefault(name, []).append((node.name, position))
    listed = {value.name for value in graph.input} | {value.name for value in graph.output}
    weights = {compute.weight for compute in plan.compute.values()}
    computes = set(plan.compute)
    return {tensor.name: tensor for tensor in graph.initializer
            if tensor.name in weights and tensor.name not in listed
            and all(node in computes and position == 1 for node, position in readers.get(tensor.name, []))}


def compacted(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy holding only what `model` holds now. protobuf (upb) keeps every replaced or deleted field in the
    message's arena until the whole message is freed: a rewritten model otherwise carries the float weights
    it replaced (MiniLM: a 23.6 MB int8 model held 113 MB resident)."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    return fresh


def _outer_names(scope: Scope) -> set[str]:
    """Tensors of the graphs around a body, which it may read."""
    names: set[str] = set()
    parent = scope.parent
    while parent is not None:
        graph = parent.graph
        names.update(i.name for i in graph.input)
        names.update(t.name for t in graph.initializer)
        names.update(o for node in graph.node for o in node.output)
        parent = parent.parent
    return names
