"""A recovery search that scales: every node's own quantization error from one pass, then a bisection.

One pass: a copy of the float graph gets, next to every node the plan quantizes, a twin that reads the
fp32 inputs through the plan's QuantizeLinear/DequantizeLinear (weights rounded as the rewrite rounds
them, constants as the rewrite quantizes them) and writes the quantized output (absorbed Relu included).
One session exposes both the fp32 output and the twin's, so each node's *own* error (its output noise
with exact inputs) is measured for every node at once, streaming: noise and signal power are summed per
node, batch by batch, nothing is kept.

The search (fewest_in_float): nodes sorted worst first (lowest SQNR), then groups: the shortest worst-first
prefix whose return to float meets the target, found by galloping from one node up (1, 2, 4, ... nodes) and
bisecting inside the last step, O(log k) evaluations for an answer of k nodes. Own error ranks nodes only
roughly (it cannot see what the layers downstream make of an error), so the prefix's last node is kept as
needed and the nodes ranked before it are searched again the same way (needed nodes in float, the rest
int8) until the needed nodes alone meet the target or a budget of O(log n) evaluations is spent. Every
round ends on a set measured to meet and no larger than the last one, so the search can stop anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressq.data import Dataset
from compressq.graph.edit import NameGenerator, toposort
from compressq.graph.index import GraphIndex
from compressq.quantize import scheme
from compressq.quantize.plan import QuantPlan
from compressq.stats.collect import TensorRange, sum_outputs

TWIN_SUFFIX = "_cq_twin"
# Measuring graphs run unoptimized: onnxruntime's basic graph rewrites changed a twin Conv (QDQ input, float
# weight) of PP-OCRv4 rec by up to 0.79 absolute against numpy (8 dB where numpy says 23 dB).
# Noise power of an all-zero reference with all-zero twin: no error. Of a zero reference with noise: worst.
_EMPTY = 0.0


@dataclass(frozen=True)
class NodeError:
    """A node's own quantization error: its output with fp32 inputs, quantized as the plan says, vs fp32."""

    node: str
    op_type: str
    tensor: str           # the fp32 tensor compared (after an absorbed Relu)
    noise_ratio: float    # sum((twin - fp32)^2) / sum(fp32^2) over the samples

    @property
    def sqnr_db(self) -> float:
        if self.noise_ratio <= 0:
            return math.inf
        return -10.0 * math.log10(self.noise_ratio)

    def to_dict(self) -> dict:
        sqnr = self.sqnr_db
        return {"node": self.node, "op_type": self.op_type, "tensor": self.tensor,
                "sqnr_db": None if math.isinf(sqnr) else round(sqnr, 2)}


@dataclass
class _Twin:
    node: str
    op_type: str
    reference: str     # the fp32 tensor compared
    noise: str         # sum of (twin - fp32)^2, reduced in the graph
    signal: str        # sum of fp32^2


class GraphWriter:
    """Adds measuring nodes to a copy of a graph: fake quantization, node copies, in-graph squared sums."""

    def __init__(self, graph: onnx.GraphProto, names: NameGenerator, signed: bool):
        self.graph, self.names, self.signed = graph, names, signed
        self.pending: list[onnx.NodeProto] = []
        self.cache: dict[tuple, str] = {}

    def qdq(self, tensor: str, tensor_range: TensorRange, tag: str = "", source: str | None = None) -> str:
        """QuantizeLinear -> DequantizeLinear of `source` (default `tensor`) over `tensor_range`."""
        source = source or tensor
        key = ("qdq", source, tensor_range.low, tensor_range.high)
        if key not in self.cache:
            params = scheme.activation_params(tensor_range.low, tensor_range.high, self.signed)
            scale = self.constant(params.scale, f"{tensor}_scale{tag}")
            zero = self.constant(params.zero_point, f"{tensor}_zero_point{tag}")
            quantized, output = self.names(f"{source}_q{TWIN_SUFFIX}"), self.names(f"{source}_dq{TWIN_SUFFIX}")
            self.pending += [helper.make_node("QuantizeLinear", [source, scale, zero], [quantized],
                                              name=self.names(f"{source}_Q{TWIN_SUFFIX}")),
                             helper.make_node("DequantizeLinear", [quantized, scale, zero], [output],
                                              name=self.names(f"{source}_DQ{TWIN_SUFFIX}"))]
            self.cache[key] = output
        return self.cache[key]

    def constant(self, values: np.ndarray, base: str) -> str:
        name = self.names(f"{base}{TWIN_SUFFIX}")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def copy(self, node: onnx.NodeProto, inputs: list[str]) -> str:
        """A copy of `node` reading `inputs`; returns its first output's name."""
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = self.names(f"{node.name}{TWIN_SUFFIX}")
        del copy.input[:]
        copy.input.extend(inputs)
        output = self.names(f"{node.output[0]}{TWIN_SUFFIX}")
        del copy.output[:]
        copy.output.extend([output] + [""] * (len(node.output) - 1))
        self.pending.append(copy)
        return output

    def sum_of_squares(self, tensor: str, minus: str | None = None) -> str:
        """A scalar: sum((tensor - minus)^2), or sum(tensor^2)."""
        key = ("sumsq", tensor, minus)
        if key not in self.cache:
            source = tensor
            if minus is not None:
                source = self.names(f"{tensor}_error{TWIN_SUFFIX}")
                self.pending.append(helper.make_node("Sub", [tensor, minus], [source],
                                                     name=self.names(f"{tensor}_Sub{TWIN_SUFFIX}")))
            output = self.names(f"{source}_sumsq{TWIN_SUFFIX}")
            self.pending.append(helper.make_node("ReduceSumSquare", [source], [output], keepdims=0,
                                                 name=self.names(f"{source}_ReduceSumSquare{TWIN_SUFFIX}")))
            self.cache[key] = output
        return self.cache[key]

    def flush(self) -> None:
        self.graph.node.extend(self.pending)
        self.pending = []


class _TwinBuilder:
    """Adds the quantized twins to a copy of the float graph (the rewrite's arithmetic, fp32 inputs)."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, ranges: dict[str, TensorRange], signed: bool,
                 per_channel: bool):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        self.plan, self.ranges, self.signed, self.per_channel = plan, ranges, signed, per_channel
        self.index = GraphIndex(self.graph)
        self.writer = GraphWriter(self.graph, NameGenerator(self.graph), signed)
        self.nodes = {n.name: n for n in self.graph.node}
        self.fake_quantized: dict[str, str] = {}
        self.twins: list[_Twin] = []

    def build(self) -> tuple[onnx.ModelProto, list[_Twin]]:
        for name, compute in self.plan.compute.items():
            node = self.nodes[name]
            inputs = list(node.input)
            inputs[0] = self._qdq(compute.activation)
            inputs[1] = self._weight(compute.weight, compute.weight_axis)
            self._twin(node, inputs)
        for node in self.graph.node:
            if node.name in self.plan.own_scale_nodes:
                self._twin(node, [self._operand(i) for i in node.input])
        self.writer.flush()
        toposort(self.graph)
        return self.model, self.twins

    def _twin(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        output = node.output[0]
        final, twin = output, self.writer.copy(node, inputs)
        absorbed = self.plan.absorbed.get(output)
        if absorbed is not None:
            activation = self.nodes[absorbed.node]
            twin = self.writer.copy(activation, [twin if i == output else i for i in activation.input])
            final = absorbed.output
        if final in self.plan.quantized_tensors:
            twin = self._qdq(final, source=twin)
        self.twins.append(_Twin(node.name, node.op_type, final, self.writer.sum_of_squares(twin, minus=final),
                                self.writer.sum_of_squares(final)))

    def _operand(self, name: str) -> str:
        if not name:
            return name
        value = self.index.constant(name)
        if value is not None:
            if value.dtype != np.float32:
                return name
            params = scheme.activation_params(float(value.min()), float(value.max()), self.signed)
            return self._constant(name, scheme.dequantize(scheme.quantize(value, params), params))
        return self._qdq(name) if name in self.plan.quantized_tensors else name

    def _weight(self, name: str, axis: int | None) -> str:
        weight = self.index.constant(name)
        assert weight is not None, f"the plan quantizes only constant weights, not '{name}'"
        params = scheme.weight_params(weight, axis if self.per_channel else None)
        return self._constant(name, scheme.dequantize(scheme.quantize(weight, params), params))

    def _constant(self, name: str, values: np.ndarray) -> str:
        if name not in self.fake_quantized:
            self.fake_quantized[name] = self.writer.constant(values.astype(np.float32), name)
        return self.fake_quantized[name]

    def _qdq(self, tensor: str, source: str | None = None) -> str:
        return self.writer.qdq(tensor, self.ranges[self.plan.param_source.get(tensor, tensor)], source=source)


def twin_model(model: onnx.ModelProto, plan: QuantPlan, ranges: dict[str, TensorRange], *, signed: bool = False,
               per_channel: bool = True) -> tuple[onnx.ModelProto, list[_Twin]]:
    """The float graph plus one quantized twin per planned node; `model` is not modified."""
    return _TwinBuilder(model, plan, ranges, signed, per_channel).build()


def node_errors(model: onnx.ModelProto, plan: QuantPlan, ranges: dict[str, TensorRange], dataset: Dataset, *,
                signed: bool = False, per_channel: bool = True, batch_size: int = 8, samples: int | None = None,
                progress: Callable[[int], None] | None = None, provider: str = "cpu") -> list[NodeError]:
    """Each planned node's own error on `dataset`, measured for all nodes in one pass; worst first."""
    combined, twins = twin_model(model, plan, ranges, signed=signed, per_channel=per_channel)
    if not twins:
        return []
    names = sorted({name for twin in twins for name in (twin.noise, twin.signal)})
    totals = sum_outputs(combined, names, dataset, batch_size=batch_size, samples=samples, provider=provider,
                         progress=progress)
    errors = [NodeError(t.node, t.op_type, t.reference, _ratio(totals[t.noise], totals[t.signal])) for t in twins]
    return sorted(errors, key=lambda e: -e.noise_ratio)


def _ratio(noise: float, signal: float) -> float:
    if noise == 0:
        return _EMPTY
    return noise / signal if signal > 0 else math.inf


@dataclass
class SearchStep:
    """One candidate the search measured: the `count` worst nodes in float."""

    count: int
    met: bool
    figures: dict

    def to_dict(self) -> dict:
        return {"nodes_in_float": self.count, "met": self.met, "figures": self.figures}


def smallest_count(meets: Callable[[int], bool], total: int) -> int:
    """The smallest k in [1, total] with meets(k), given that 0 fails and `total` meets (not called).

    Bisection: O(log total) calls. Where `meets` is not monotone, the k returned meets the target and
    k - 1 does not (or k - 1 is 0)."""
    return _bisect_between(meets, 1, total)


def _bisect_between(meets: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest k in [low, high] with meets(k), given meets(high) (not called) and not meets(low - 1)."""
    while low < high:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle + 1
    return high


def smallest_prefix(meets: Callable[[int], bool], total: int, start: int = 1,
                    budget: int | None = None, gallop: bool = True) -> tuple[int, bool]:
    """(k, settled): the smallest k in [start, total] with meets(k), given meets(total) (not called).

    Galloping from the small end (start, start + 1, start + 3, start + 7, ...), then bisection inside the last
    step: O(log k) calls, so an answer of a few nodes costs a few evaluations, and the candidates measured
    first are the fast ones (most nodes still int8); without `gallop`, a plain bisection of [start, total].
    When `budget` calls run out first, k is the smallest value known to meet and settled is False."""
    calls = 0
    failed, high = start - 1, total  # every k <= failed fails (start - 1: given); high meets

    def exhausted() -> bool:
        return budget is not None and calls >= budget

    k, step = start, 1
    while gallop and k < high:
        if exhausted():
            return high, False
        calls += 1
        if meets(k):
            high = k
            break
        failed, k, step = k, k + step, step * 2
    low = failed + 1
    while low < high:
        if exhausted():
            return high, False
        middle = (low + high) // 2
        calls += 1
        if meets(middle):
            high = middle
        else:
            low = middle + 1
    return high, True


def fewest_in_float(meets: Callable[[tuple[str, ...]], bool], order: Sequence[str], budget: int) -> tuple[str, ...]:
    """Nodes to return to float, as few as `budget` evaluations of `meets` can find; `order`: worst first.

    Given: nothing in float fails, everything in `order` in float meets (neither is called).
    Round one: the shortest worst-first prefix that meets. Its first probe is half of the nodes: when that
    fails, the answer lies in the upper half (a plain bisection there); when it meets, galloping from one
    node up finds a short answer in O(log k). The prefix's last node is needed; the nodes before it may only
    be there because the ranking put them there, so each next round keeps the needed nodes in float and
    tries them alone, then with the better-ranked half of the rest: when that half is not enough either, the
    target needs most of the graph in float and the search stops (PP-OCRv4 rec: 10 evaluations, where more
    rounds would re-measure models as slow as fp32); when it is, galloping finds the next needed node.
    Every round ends on a set measured to meet and no larger than the last one."""
    order = tuple(order)
    if len(order) < 2:
        return order  # all of them: known to meet
    calls = [0]

    def prefix_meets(needed: tuple[str, ...], pool: tuple[str, ...]) -> Callable[[int], bool]:
        def meets_with(k: int) -> bool:
            calls[0] += 1
            return meets(needed + pool[:k])
        return meets_with

    count, settled = _first_round(prefix_meets((), order), len(order), budget)
    if not settled:
        return order[:count]
    needed: tuple[str, ...] = (order[count - 1],)
    candidates = order[:count - 1]
    while candidates and calls[0] < budget:
        with_needed = prefix_meets(needed, candidates)
        if with_needed(0):
            return needed
        half = len(candidates) // 2
        if half < 1 or calls[0] >= budget or not with_needed(half):
            break
        count, settled = smallest_prefix(with_needed, half, start=1, budget=budget - calls[0])
        if not settled:
            return needed + candidates[:count]
        needed, candidates = needed + (candidates[count - 1],), candidates[:count - 1]
    return needed + candidates


def _first_round(meets: Callable[[int], bool], total: int, budget: int) -> tuple[int, bool]:
    """Round one of fewest_in_float: the shortest prefix that meets, half of the nodes probed first."""
    half = total // 2
    if budget < 1:
        return total, False
    if meets(half):
        return smallest_prefix(meets, half, start=1, budget=budget - 1)
    return smallest_prefix(meets, total, start=half + 1, budget=budget - 1, gallop=False)
