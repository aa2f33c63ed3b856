"""What onnxruntime's graph optimizer actually made of a QDQ graph, for the provider in use.

A quantized Conv/MatMul/Gemm only pays off when onnxruntime fuses its DequantizeLinear inputs (and
QuantizeLinear output) into an integer kernel. Left unfused, the pairs are pure overhead, so the
quantizer asks the optimizer, and returns such nodes to float.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

from compressq.graph.index import GraphIndex, all_nodes, scopes
from compressq.ops import FLOAT_COMPUTE_OPS, INTEGER_KERNELS
from compressq.runtime import optimized_graph


@dataclass(frozen=True)
class FusionReport:
    integer_kernels: dict[str, int]
    unfused_compute: tuple[str, ...]   # names of float compute nodes still reading DequantizeLinear outputs
    leftover_quantize: int             # QuantizeLinear nodes onnxruntime could not fold into a kernel
    leftover_dequantize: int           # DequantizeLinear nodes left (weights of unfused nodes included)


def inspect_fusion(model: onnx.ModelProto, provider: str = "cpu") -> FusionReport:
    optimized = optimized_graph(model, provider, weights=False)
    ops = Counter(node.op_type for node in all_nodes(optimized.graph))
    # onnxruntime names a Gemm+activation fusion "fused <gemm name>": the plan knows the Gemm's name.
    unfused = tuple(node.name.removeprefix("fused ") for scope in scopes(optimized.graph)
                    for index in [GraphIndex(scope.graph)]
                    for node in scope.graph.node  # If/Loop/Scan bodies too: onnxruntime fuses inside them
                    if node.op_type in FLOAT_COMPUTE_OPS and _reads_dequantized(node, index))
    return FusionReport(
        integer_kernels={op: n for op, n in sorted(ops.items()) if op in INTEGER_KERNELS},
        unfused_compute=unfused,
        leftover_quantize=ops.get("QuantizeLinear", 0),
        leftover_dequantize=ops.get("DequantizeLinear", 0),
    )


def _reads_dequantized(node: onnx.NodeProto, index: GraphIndex) -> bool:
    producers = (index.producer.get(name) for name in node.input if name)
    return any(p is not None and p.op_type == "DequantizeLinear" for p in producers)
