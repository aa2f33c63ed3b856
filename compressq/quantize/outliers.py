"""Outlier channels beside the int8 layer: the few input channels that set an activation's range stay float.

A transformer's activations carry a handful of channels 10-20x larger than the rest (MiniLM: one channel at
28.5 where the median is 1.75, measured on the bench's calibration sentences), and a per-tensor int8 range
sized for them leaves the other channels a few levels each. For an activation X read by MatMul/Gemm nodes
with constant weights W [K, N] and its outlier channels O (absmax above OUTLIER_RATIO x the median, at most
`channels` of them, largest first):

    X W = (X * m) W + X[:, O] W[O, :]          m: 1, and 0 on the channels O

The first product is the layer as it was, reading X with the outlier channels zeroed, so its int8 range is
that of the ordinary channels; the second is a float MatMul over |O| channels (|O| / K of the layer's work:
16 of 384 on MiniLM) added to the output. Consumers sharing X (Q, K and V) share one mask and one Gather.
The mask Mul, the Gather, the side MatMul and the Add stay float (`float_nodes`): quantizing the Mul's
input would bring back the range the split removed. This is LLM.int8()'s decomposition (Dettmers et al.
2022) with the outlier channels fixed from calibration, so it runs on onnxruntime's ordinary kernels.

Statistics are smoothquant.collect_channel_absmax's (one pass, per channel of the last axis).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressq.errors import DataError, UsageError
from compressq.graph.edit import NameGenerator, toposort
from compressq.graph.index import GraphIndex, node_attributes
from compressq.quantize.smoothquant import weight_consumers

OUTLIER_RATIO = 2.0  # a channel is an outlier when its absmax exceeds this multiple of the median channel's


@dataclass(frozen=True)
class SplitActivation:
    activation: str                # the tensor whose outlier channels go around the int8 layers
    consumers: tuple[str, ...]     # the MatMul/Gemm nodes that now read it with those channels zeroed
    channels: tuple[int, ...]      # the outlier channels, largest first
    range_before: float            # absmax over every channel
    range_after: float             # absmax over the channels the int8 layers still see

    def to_dict(self) -> dict:
        return {"activation": self.activation, "consumers": list(self.consumers), "channels": list(self.channels),
                "range_before": round(self.range_before, 4), "range_after": round(self.range_after, 4)}


@dataclass
class SplitSummary:
    channels: int
    activations: list[SplitActivation] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)   # mask Mul, Gather, side MatMul and Add: keep float
    skipped: dict[str, str] = field(default_factory=dict)   # activation -> why it was not split

    def to_dict(self) -> dict:
        return {"how": f"at most {self.channels} outlier channels per activation (absmax > {OUTLIER_RATIO:g} x "
                       f"the median channel) read by a float MatMul beside the int8 layer",
                "split": [entry.to_dict() for entry in self.activations], "skipped": dict(self.skipped)}


def outlier_channels(absmax: np.ndarray, limit: int, ratio: float = OUTLIER_RATIO) -> np.ndarray:
    """The channels whose absmax exceeds `ratio` x the median channel's, at most `limit`, largest first."""
    absmax = np.asarray(absmax, np.float64).reshape(-1)
    order = np.argsort(-absmax, kind="stable")[:limit]
    return order[absmax[order] > ratio * np.median(absmax)]


def split_outliers(model: onnx.ModelProto, activation_absmax: Mapping[str, np.ndarray], channels: int
                   ) -> tuple[onnx.ModelProto, SplitSummary]:
    """Route the outlier channels of every activation in `activation_absmax` around its MatMul/Gemm
    consumers (module docstring); a copy, fp32 outputs unchanged up to float rounding."""
    if not isinstance(channels, int) or channels < 1:
        raise UsageError(f"outlier channels must be a whole number >= 1, got {channels!r}")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    index = GraphIndex(graph)
    names = NameGenerator(graph)
    summary = SplitSummary(channels)
    for activation, absmax in activation_absmax.items():
        consumers = [c for c in weight_consumers(index, activation) if node_attributes(c.node).get("alpha", 1.0) == 1.0]
        if not consumers:
            summary.skipped[activation] = "feeds no MatMul/Gemm with a constant weight"
            continue
        _check_width(activation, absmax, consumers)
        chosen = outlier_channels(absmax, channels)
        if chosen.size == 0:
            summary.skipped[activation] = f"no channel above {OUTLIER_RATIO:g} x the median"
            continue
        summary.activations.append(_split(graph, names, activation, consumers, np.asarray(absmax), chosen, summary))
    toposort(graph)
    return result, summary


def _check_width(activation: str, absmax: np.ndarray, consumers) -> None:
    widths = {c.weight.shape[c.input_axis] for c in consumers}
    if len(widths) != 1 or np.size(absmax) not in widths:
        raise DataError(f"channel ranges for '{activation}' have {np.size(absmax)} channels; its MatMul/Gemm "
                        f"weights expect {sorted(widths)}", hint="collect them with collect_channel_absmax on "
                                                                 "the same model")


def _split(graph: onnx.GraphProto, names: NameGenerator, activation: str, consumers, absmax: np.ndarray,
           chosen: np.ndarray, summary: SplitSummary) -> SplitActivation:
    mask = np.ones(absmax.size, np.float32)
    mask[chosen] = 0.0
    mask_name = _initializer(graph, names, f"{activation}_outlier_mask_values", mask)
    index_name = _initializer(graph, names, f"{activation}_outlier_channels", chosen.astype(np.int64))
    masked, gathered = names(f"{activation}_without_outliers"), names(f"{activation}_outliers")
    added = [helper.make_node("Mul", [activation, mask_name], [masked], name=names(f"{activation}_outlier_mask")),
             helper.make_node("Gather", [activation, index_name], [gathered], axis=-1,
                              name=names(f"{activation}_outlier_gather"))]
    for consumer in consumers:
        node = consumer.node
        rows = consumer.weight[chosen, :] if consumer.input_axis == 0 else consumer.weight[:, chosen].T
        side_weight = _initializer(graph, names, f"{node.input[1]}_outlier_rows", np.ascontiguousarray(rows))
        main, side = names(f"{node.output[0]}_int8_part"), names(f"{node.output[0]}_outlier_part")
        added += [helper.make_node("MatMul", [gathered, side_weight], [side],
                                   name=names(f"{node.name}_outlier_matmul")),
                  helper.make_node("Add", [main, side], [node.output[0]], name=names(f"{node.name}_outlier_add"))]
        node.input[0], node.output[0] = masked, main
    graph.node.extend(added)
    summary.float_nodes += [node.name for node in added]
    rest = np.delete(absmax, chosen)
    return SplitActivation(activation, tuple(c.node.name for c in consumers), tuple(int(c) for c in chosen),
                           float(absmax.max()), float(rest.max()) if rest.size else 0.0)


def _initializer(graph: onnx.GraphProto, names: NameGenerator, base: str, value: np.ndarray) -> str:
    name = names(base)
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name
