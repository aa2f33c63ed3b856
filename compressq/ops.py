"""The facts about ONNX and onnxruntime operators that compressq decides on, written once.

Quantize (what is already integer, what onnxruntime fuses), evaluate (what a report counts as an integer
layer) and inspect (what makes a model "quantized") all read these tables, so they cannot disagree.
"""

from __future__ import annotations

# Float layers that carry a weight: what quantize and prune work on.
FLOAT_WEIGHTED_OPS = frozenset({"Conv", "MatMul", "Gemm"})
# The same after onnxruntime's optimizer fused an activation into them (the graph it really runs).
FLOAT_COMPUTE_OPS = FLOAT_WEIGHTED_OPS | {"FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose"}

# Integer layers with a weight, from onnxruntime's static (QOperator), dynamic and weight-only kernels.
INTEGER_WEIGHTED_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "QOrderedMatMul",
})
# Integer element-wise and pooling kernels that keep activations in int8 between layers.
INTEGER_ACTIVATION_OPS = frozenset({
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearGlobalAveragePool", "QLinearAveragePool",
})
# Every kernel that runs integer arithmetic: what `quantize` reports onnxruntime actually ran.
INTEGER_KERNELS = INTEGER_WEIGHTED_OPS | INTEGER_ACTIVATION_OPS
# Ops whose presence means a model is already quantized (inspect), lookups and activation quantizers included.
QUANTIZED_OPS = INTEGER_KERNELS | {"GatherBlockQuantized", "DynamicQuantizeLinear"}

# Inputs that hold a layer's learned parameters (by position), for the rule that no command reads or writes a
# NaN or infinite weight. Constants elsewhere may legitimately be infinite (-inf attention masks, Max bounds).
WEIGHT_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "PRelu": (1,),
    "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3),
    "BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "QuantizeLinear": (1,), "DequantizeLinear": (0, 1), "MatMulNBits": (1, 2, 3), "GatherBlockQuantized": (0, 2),
}
