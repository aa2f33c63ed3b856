"""Random-weight ONNX models for latency benchmarks and tests, built with onnx.helper + numpy.

Every generator is deterministic in ``seed`` and returns an opset-17 ``onnx.ModelProto``
(IR version 8, so onnxruntime 1.18 and later load it). The weights are random, so the
outputs mean nothing; they are only scaled so activations stay finite and non-trivial.

CLI: ``python -m sample_models.generated resnet|bert|yolov8n OUT.onnx [--seed N]``
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
BATCH_DIM = "batch"
SEQ_DIM = "seq"
DEFAULT_SYMBOLIC_DIM = 128
BERT_MASK_FILL = -10000.0
LAYER_NORM_EPSILON = 1e-12


class GraphBuilder:
    """Collects nodes and initializers; every node has one output named after the node."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}

    def tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def constant(self, name: str, value: float | Sequence[int]) -> str:
        """Shared scalar/shape constants, stored once however often they are used."""
        if name not in self.initializers:
            dtype = np.float32 if isinstance(value, float) else np.int64
            self.tensor(name, np.array(value, dtype=dtype))
        return name

    def normal(self, name: str, shape: Sequence[int], std: float, mean: float = 0.0) -> str:
        values = mean + std * self.rng.standard_normal(shape, dtype=np.float32)
        return self.tensor(name, values.astype(np.float32))

    def uniform(self, name: str, shape: Sequence[int], low: float, high: float) -> str:
        return self.tensor(name, self.rng.uniform(low, high, shape).astype(np.float32))

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attributes) -> str:
        output = f"{name}_output"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attributes))
        return output

    def rename_output(self, value: str, new_name: str) -> str:
        """Give the graph output a stable public name instead of '<node>_output'."""
        producer = next(node for node in self.nodes if value in node.output)
        producer.output[list(producer.output).index(value)] = new_name
        return new_name

    def build(
        self,
        graph_name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        properties: dict[str, object],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, list(inputs), list(outputs), list(self.initializers.values()))
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="compressq.sample_models.generated",
        )
        helper.set_model_props(model, {key: str(value) for key, value in properties.items()})
        return model


def float_input(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


# --------------------------------------------------------------------------- ResNet


def conv(
    g: GraphBuilder,
    x: str,
    name: str,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    bias: bool = False,
) -> str:
    fan_in = in_channels * kernel * kernel
    weight = g.normal(f"{name}.weight", (out_channels, in_channels, kernel, kernel), math.sqrt(2.0 / fan_in))
    inputs = [x, weight]
    if bias:
        inputs.append(g.normal(f"{name}.bias", (out_channels,), 0.01))
    pad = kernel // 2
    return g.op(
        "Conv",
        inputs,
        name,
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pad] * 4,
    )


def batch_norm(g: GraphBuilder, x: str, name: str, channels: int, expected_variance: float = 1.0) -> str:
    # Random weights have no real batch statistics, so running_var is set to the variance
    # the preceding conv is expected to produce: otherwise every block would amplify its
    # input and ResNet-18 logits would reach the hundreds. Noise keeps BN folding non-trivial.
    scale = g.normal(f"{name}.weight", (channels,), 0.1, mean=1.0)
    shift = g.normal(f"{name}.bias", (channels,), 0.1)
    mean = g.normal(f"{name}.running_mean", (channels,), 0.1 * math.sqrt(expected_variance))
    var = g.uniform(f"{name}.running_var", (channels,), 0.75 * expected_variance, 1.25 * expected_variance)
    return g.op("BatchNormalization", [x, scale, shift, mean, var], name, epsilon=1e-5)


# Approximate second moments E[x^2] of tensors feeding a conv, tracked through the ResNet
# so each BatchNormalization gets matching running statistics (see batch_norm).
UNIT_NORMAL_MOMENT = 1.0
POST_RELU_MOMENT = 0.5
POST_MAXPOOL_MOMENT = 2.5  # measured: max of 9 correlated post-ReLU values
HE_CONV_GAIN = 2.0  # He init: Var(conv(x)) = 2 * E[x^2]


def conv_bn(
    g: GraphBuilder,
    x: str,
    name: str,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    input_moment: float = POST_RELU_MOMENT,
) -> str:
    y = conv(g, x, f"{name}.conv", in_channels, out_channels, kernel, stride)
    return batch_norm(g, y, f"{name}.bn", out_channels, HE_CONV_GAIN * input_moment)


def basic_block(
    g: GraphBuilder, x: str, name: str, in_channels: int, out_channels: int, stride: int, input_moment: float
) -> tuple[str, float]:
    """Returns the block output and its approximate second moment."""
    y = conv_bn(g, x, f"{name}.0", in_channels, out_channels, 3, stride, input_moment)
    y = g.op("Relu", [y], f"{name}.0.relu")
    y = conv_bn(g, y, f"{name}.1", out_channels, out_channels, 3)
    if stride != 1 or in_channels != out_channels:
        shortcut = conv_bn(g, x, f"{name}.downsample", in_channels, out_channels, 1, stride, input_moment)
        # Both summands are roughly zero-mean unit normals, so the ReLU keeps about half.
        output_moment = 0.5 * (UNIT_NORMAL_MOMENT + UNIT_NORMAL_MOMENT)
    else:
        # An identity shortcut is non-negative (post-ReLU), so the ReLU removes little.
        shortcut, output_moment = x, UNIT_NORMAL_MOMENT + input_moment
    output = g.op("Relu", [g.op("Add", [y, shortcut], f"{name}.add")], f"{name}.relu")
    return output, output_moment


def resnet_model(
    image_size: int = 224,
    widths: Sequence[int] = (64, 128, 256, 512),
    blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
    num_classes: int = 1000,
    seed: int = 0,
    batch: int | None = None,
) -> onnx.ModelProto:
    """ResNet-18-style classifier: input `input` [batch, 3, H, W] -> `logits` [batch, classes]."""
    g = GraphBuilder(seed)
    batch_dim = BATCH_DIM if batch is None else batch
    x = conv_bn(g, "input", "stem", 3, widths[0], 7, stride=2, input_moment=UNIT_NORMAL_MOMENT)
    x = g.op("Relu", [x], "stem.relu")
    x = g.op("MaxPool", [x], "stem.maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels, moment = widths[0], POST_MAXPOOL_MOMENT
    for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x, moment = basic_block(g, x, f"layer{stage + 1}.{block}", channels, width, stride, moment)
            channels = width
    x = g.op("GlobalAveragePool", [x], "avgpool")
    x = g.op("Flatten", [x], "flatten", axis=1)
    weight = g.normal("fc.weight", (num_classes, channels), 1.0 / math.sqrt(channels))
    bias = g.normal("fc.bias", (num_classes,), 0.01)
    logits = g.rename_output(g.op("Gemm", [x, weight, bias], "fc", transB=1), "logits")
    return g.build(
        "resnet",
        [float_input("input", [batch_dim, 3, image_size, image_size])],
        [float_input(logits, [batch_dim, num_classes])],
        {
            "generator": "resnet_model",
            "image_size": image_size,
            "widths": list(widths),
            "blocks_per_stage": list(blocks_per_stage),
            "num_classes": num_classes,
            "seed": seed,
        },
    )


# --------------------------------------------------------------------------- BERT


BERT_INIT_STD = 0.02


def linear(g: GraphBuilder, x: str, name: str, in_features: int, out_features: int) -> str:
    weight = g.normal(f"{name}.weight", (in_features, out_features), BERT_INIT_STD)
    bias = g.normal(f"{name}.bias", (out_features,), BERT_INIT_STD)
    return g.op("Add", [g.op("MatMul", [x, weight], f"{name}.matmul"), bias], f"{name}.add")


def layer_norm(g: GraphBuilder, x: str, name: str, hidden: int) -> str:
    scale = g.normal(f"{name}.weight", (hidden,), BERT_INIT_STD, mean=1.0)
    bias = g.normal(f"{name}.bias", (hidden,), BERT_INIT_STD)
    return g.op("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=LAYER_NORM_EPSILON)


def erf_gelu(g: GraphBuilder, x: str, name: str) -> str:
    """x * 0.5 * (1 + erf(x / sqrt(2))), in the op order Hugging Face exports produce."""
    scaled = g.op("Div", [x, g.constant("const.sqrt2", math.sqrt(2.0))], f"{name}.div")
    shifted = g.op("Add", [g.op("Erf", [scaled], f"{name}.erf"), g.constant("const.one", 1.0)], f"{name}.add")
    return g.op("Mul", [g.op("Mul", [x, shifted], f"{name}.mul"), g.constant("const.half", 0.5)], f"{name}.mul_half")


def additive_attention_mask(g: GraphBuilder, mask: str) -> str:
    """[batch, seq] of 1/0 -> [batch, 1, 1, seq] of 0/-10000, added to attention scores."""
    expanded = g.op("Unsqueeze", [mask, g.constant("const.axes_1_2", [1, 2])], "mask.unsqueeze")
    inverted = g.op("Sub", [g.constant("const.one", 1.0), expanded], "mask.sub")
    return g.op("Mul", [inverted, g.constant("const.mask_fill", BERT_MASK_FILL)], "mask.mul")


def self_attention(g: GraphBuilder, x: str, mask: str, name: str, hidden: int, heads: int) -> str:
    head_dim = hidden // heads
    to_heads = g.constant(f"const.heads_shape_{heads}_{head_dim}", [0, 0, heads, head_dim])

    def project(part: str, perm: list[int]) -> str:
        y = linear(g, x, f"{name}.{part}", hidden, hidden)
        y = g.op("Reshape", [y, to_heads], f"{name}.{part}.reshape")
        return g.op("Transpose", [y], f"{name}.{part}.transpose", perm=perm)

    query = project("query", [0, 2, 1, 3])
    key_t = project("key", [0, 2, 3, 1])
    value = project("value", [0, 2, 1, 3])
    scores = g.op("MatMul", [query, key_t], f"{name}.scores")
    scores = g.op("Div", [scores, g.constant(f"const.sqrt_head_dim_{head_dim}", math.sqrt(head_dim))], f"{name}.scale")
    scores = g.op("Add", [scores, mask], f"{name}.mask_add")
    probs = g.op("Softmax", [scores], f"{name}.softmax", axis=-1)
    context = g.op("MatMul", [probs, value], f"{name}.context")
    context = g.op("Transpose", [context], f"{name}.context.transpose", perm=[0, 2, 1, 3])
    context = g.op(
        "Reshape", [context, g.constant("const.merge_heads_shape", [0, 0, hidden])], f"{name}.context.reshape"
    )
    return linear(g, context, f"{name}.output", hidden, hidden)


def encoder_layer(g: GraphBuilder, x: str, mask: str, name: str, hidden: int, heads: int, intermediate: int) -> str:
    attention = self_attention(g, x, mask, f"{name}.attention", hidden, heads)
    x = layer_norm(g, g.op("Add", [attention, x], f"{name}.attention.residual"), f"{name}.attention.layernorm", hidden)
    h = erf_gelu(g, linear(g, x, f"{name}.intermediate", hidden, intermediate), f"{name}.gelu")
    h = linear(g, h, f"{name}.ffn_output", intermediate, hidden)
    return layer_norm(g, g.op("Add", [h, x], f"{name}.ffn.residual"), f"{name}.ffn.layernorm", hidden)


def token_embeddings(g: GraphBuilder, input_ids: str, vocab: int, max_positions: int, hidden: int) -> str:
    words = g.op(
        "Gather", [g.normal("embeddings.word", (vocab, hidden), BERT_INIT_STD), input_ids], "embeddings.word_lookup"
    )
    seq_length = g.op("Shape", [input_ids], "embeddings.seq_length", start=1, end=2)
    positions = g.op(
        "Slice",
        [
            g.normal("embeddings.position", (max_positions, hidden), BERT_INIT_STD),
            g.constant("const.zero_1d", [0]),
            seq_length,
        ],
        "embeddings.position_slice",
    )
    summed = g.op("Add", [words, positions], "embeddings.add")
    return layer_norm(g, summed, "embeddings.layernorm", hidden)


def bert_model(
    layers: int = 2,
    hidden: int = 768,
    heads: int = 12,
    intermediate: int = 3072,
    seq_len: int = 128,
    vocab: int | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """BERT-base-style encoder stack with symbolic 'batch' and 'seq' dims.

    With ``vocab=None`` the inputs are float embeddings `input` [batch, seq, hidden] and
    `attention_mask` [batch, seq], and `seq_len` is only recorded in the metadata. With an
    int ``vocab`` the first input becomes int64 `input_ids` [batch, seq], looked up in a word
    table and a `seq_len`-row position table (so seq must not exceed `seq_len`).
    Output: `output` [batch, seq, hidden].
    """
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    g = GraphBuilder(seed)
    if vocab is None:
        first_input = float_input("input", [BATCH_DIM, SEQ_DIM, hidden])
        x = "input"
    else:
        first_input = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH_DIM, SEQ_DIM])
        x = token_embeddings(g, "input_ids", vocab, seq_len, hidden)
    mask = additive_attention_mask(g, "attention_mask")
    for layer in range(layers):
        x = encoder_layer(g, x, mask, f"encoder.layer{layer}", hidden, heads, intermediate)
    output = g.rename_output(x, "output")
    return g.build(
        "bert",
        [first_input, float_input("attention_mask", [BATCH_DIM, SEQ_DIM])],
        [float_input(output, [BATCH_DIM, SEQ_DIM, hidden])],
        {
            "generator": "bert_model",
            "layers": layers,
            "hidden": hidden,
            "heads": heads,
            "intermediate": intermediate,
            "seq_len": seq_len,
            "vocab": vocab,
            "seed": seed,
        },
    )


# --------------------------------------------------------------------------- tiny models


def tiny_mlp(seed: int = 0, in_features: int = 16, hidden: int = 32, out_features: int = 4) -> onnx.ModelProto:
    """input [batch, 16] -> MatMul -> Add -> Relu -> MatMul -> output [batch, 4]."""
    g = GraphBuilder(seed)
    w1 = g.normal("fc1.weight", (in_features, hidden), math.sqrt(2.0 / in_features))
    b1 = g.normal("fc1.bias", (hidden,), 0.1)
    w2 = g.normal("fc2.weight", (hidden, out_features), math.sqrt(1.0 / hidden))
    x = g.op("Add", [g.op("MatMul", ["input", w1], "fc1.matmul"), b1], "fc1.add")
    x = g.op("Relu", [x], "relu")
    output = g.rename_output(g.op("MatMul", [x, w2], "fc2.matmul"), "output")
    return g.build(
        "tiny_mlp",
        [float_input("input", [BATCH_DIM, in_features])],
        [float_input(output, [BATCH_DIM, out_features])],
        {"generator": "tiny_mlp", "seed": seed},
    )


def tiny_conv(
    seed: int = 0, channels: int = 3, hidden: int = 8, out_channels: int = 4, size: int = 16
) -> onnx.ModelProto:
    """input [batch, 3, 16, 16] -> Conv 3x3 -> Relu -> Conv 3x3 -> output [batch, 4, 16, 16]."""
    g = GraphBuilder(seed)
    x = conv(g, "input", "conv1", channels, hidden, 3, bias=True)
    x = g.op("Relu", [x], "relu")
    output = g.rename_output(conv(g, x, "conv2", hidden, out_channels, 3, bias=True), "output")
    return g.build(
        "tiny_conv",
        [float_input("input", [BATCH_DIM, channels, size, size])],
        [float_input(output, [BATCH_DIM, out_channels, size, size])],
        {"generator": "tiny_conv", "seed": seed},
    )


# --------------------------------------------------------------------------- YOLOv8n-style detector


PROBE_IMAGES = 8  # images the BatchNorm statistics are taken on when the weights are built


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _conv2d(x: np.ndarray, weight: np.ndarray, stride: int) -> np.ndarray:
    pad = weight.shape[2] // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(padded, weight.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", windows, weight, optimize=True)


class _Detector:
    """YOLOv8n layer by layer, as exported for inference: every Conv carries its BatchNorm folded into weight
    and bias, followed by SiLU written as x * Sigmoid(x).

    The weights are He-initialised, and each BatchNorm gets real running statistics: the builder runs the
    network in numpy on a few probe images as it goes, so every folded Conv normalises its channels
    (gain ~ N(1, 0.1), shift ~ N(0, 0.5)) as a trained network's does, instead of letting random weights
    drift towards constant feature maps."""

    def __init__(self, seed: int, image_size: int):
        self.g = GraphBuilder(seed)
        self.values = {"images": scene_images(PROBE_IMAGES, image_size, seed + 1)}

    def conv(self, x: str, name: str, cin: int, cout: int, kernel: int, stride: int = 1, act: bool = True) -> str:
        rng = self.g.rng
        weight = rng.normal(0, math.sqrt(2.0 / (cin * kernel * kernel)), (cout, cin, kernel, kernel))
        bias = np.zeros(cout)
        if act:  # fold BatchNorm(gain, shift, running mean and variance measured on the probe images)
            z = _conv2d(self.values[x], weight, stride)
            gain = rng.normal(1.0, 0.1, cout) / np.sqrt(z.var(axis=(0, 2, 3)) + 1e-3)
            bias = rng.normal(0.0, 0.5, cout) - z.mean(axis=(0, 2, 3)) * gain
            weight = weight * gain[:, None, None, None]
        weight, bias = weight.astype(np.float32), bias.astype(np.float32)
        y = self.g.op("Conv", [x, self.g.tensor(f"{name}.weight", weight), self.g.tensor(f"{name}.bias", bias)],
                      name, kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[kernel // 2] * 4)
        value = _conv2d(self.values[x], weight, stride) + bias[None, :, None, None]
        if act:
            y = self.g.op("Mul", [y, self.g.op("Sigmoid", [y], f"{name}.sigmoid")], f"{name}.silu")
            value = _silu(value)
        self.values[y] = value
        return y

    def concat(self, parts: list[str], name: str) -> str:
        y = self.g.op("Concat", parts, name, axis=1)
        self.values[y] = np.concatenate([self.values[p] for p in parts], axis=1)
        return y

    def c2f(self, x: str, name: str, cin: int, cout: int, blocks: int, shortcut: bool) -> str:
        hidden = cout // 2
        y = self.conv(x, f"{name}.cv1", cin, 2 * hidden, 1)
        first, second = f"{name}.split_0", f"{name}.split_1"
        sizes = self.g.constant(f"split_{hidden}", [hidden, hidden])
        self.g.nodes.append(helper.make_node("Split", [y, sizes], [first, second], name=f"{name}.split", axis=1))
        self.values[first], self.values[second] = self.values[y][:, :hidden], self.values[y][:, hidden:]
        parts, last = [first, second], second
        for block in range(blocks):
            z = self.conv(last, f"{name}.m.{block}.cv1", hidden, hidden, 3)
            z = self.conv(z, f"{name}.m.{block}.cv2", hidden, hidden, 3)
            if shortcut:
                added = self.g.op("Add", [last, z], f"{name}.m.{block}.add")
                self.values[added] = self.values[last] + self.values[z]
                z = added
            parts.append(z)
            last = z
        return self.conv(self.concat(parts, f"{name}.cat"), f"{name}.cv2", hidden * len(parts), cout, 1)

    def sppf(self, x: str, name: str, channels: int) -> str:
        hidden = channels // 2
        y = self.conv(x, f"{name}.cv1", channels, hidden, 1)
        parts = [y]
        for i in range(3):
            y = self.g.op("MaxPool", [y], f"{name}.m.{i}", kernel_shape=[5, 5], strides=[1, 1], pads=[2] * 4)
            padded = np.pad(self.values[parts[-1]], ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-np.inf)
            self.values[y] = sliding_window_view(padded, (5, 5), axis=(2, 3)).max(axis=(4, 5))
            parts.append(y)
        return self.conv(self.concat(parts, f"{name}.cat"), f"{name}.cv2", 4 * hidden, channels, 1)

    def upsample(self, x: str, name: str) -> str:
        scales = "upsample_scales"
        if scales not in self.g.initializers:
            self.g.tensor(scales, np.array([1, 1, 2, 2], np.float32))
        y = self.g.op("Resize", [x, "", scales], name, mode="nearest")
        self.values[y] = self.values[x].repeat(2, axis=2).repeat(2, axis=3)
        return y


def yolov8n_model(image_size: int = 640, num_classes: int = 80, seed: int = 0,
                  batch: int | None = None) -> onnx.ModelProto:
    """YOLOv8n-style detector (width 0.25, depth 0.33; 3.2 M parameters at 80 classes), folded BN, SiLU.

    input `images` [batch, 3, S, S] in [0, 1] -> `output0` [batch, 64 + classes, anchors]: per anchor the
    16-bin distance distributions of the 4 box sides (before DFL) and the class logits, over strides 8/16/32.
    """
    d = _Detector(seed, image_size)
    x = d.conv("images", "model.0", 3, 16, 3, 2)
    x = d.conv(x, "model.1", 16, 32, 3, 2)
    x = d.c2f(x, "model.2", 32, 32, 1, True)
    x = d.conv(x, "model.3", 32, 64, 3, 2)
    p3 = d.c2f(x, "model.4", 64, 64, 2, True)
    x = d.conv(p3, "model.5", 64, 128, 3, 2)
    p4 = d.c2f(x, "model.6", 128, 128, 2, True)
    x = d.conv(p4, "model.7", 128, 256, 3, 2)
    x = d.c2f(x, "model.8", 256, 256, 1, True)
    p5 = d.sppf(x, "model.9", 256)
    x = d.concat([d.upsample(p5, "model.10"), p4], "model.11")
    h4 = d.c2f(x, "model.12", 384, 128, 1, False)
    x = d.concat([d.upsample(h4, "model.13"), p3], "model.14")
    out3 = d.c2f(x, "model.15", 192, 64, 1, False)
    x = d.concat([d.conv(out3, "model.16", 64, 64, 3, 2), h4], "model.17")
    out4 = d.c2f(x, "model.18", 192, 128, 1, False)
    x = d.concat([d.conv(out4, "model.19", 128, 128, 3, 2), p5], "model.20")
    out5 = d.c2f(x, "model.21", 384, 256, 1, False)
    box_channels, class_channels = 64, max(64, min(num_classes, 100))
    levels = []
    for level, (feature, channels) in enumerate(((out3, 64), (out4, 128), (out5, 256))):
        name = f"model.22.{level}"
        box = d.conv(d.conv(feature, f"{name}.box.0", channels, box_channels, 3), f"{name}.box.1",
                     box_channels, box_channels, 3)
        box = d.conv(box, f"{name}.box.2", box_channels, 64, 1, act=False)
        cls = d.conv(d.conv(feature, f"{name}.cls.0", channels, class_channels, 3), f"{name}.cls.1",
                     class_channels, class_channels, 3)
        cls = d.conv(cls, f"{name}.cls.2", class_channels, num_classes, 1, act=False)
        joined = d.g.op("Concat", [box, cls], f"{name}.cat", axis=1)
        shape = d.g.constant(f"flat_shape_{64 + num_classes}", [0, 64 + num_classes, -1])
        levels.append(d.g.op("Reshape", [joined, shape], f"{name}.flatten"))
    output = d.g.rename_output(d.g.op("Concat", levels, "model.22.cat", axis=2), "output0")
    anchors = sum((image_size // stride) ** 2 for stride in (8, 16, 32))
    batch_dim = BATCH_DIM if batch is None else batch
    return d.g.build(
        "yolov8n",
        [float_input("images", [batch_dim, 3, image_size, image_size])],
        [float_input(output, [batch_dim, 64 + num_classes, anchors])],
        {"generator": "yolov8n_model", "image_size": image_size, "num_classes": num_classes, "seed": seed},
    )


def scene_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """[count, 3, size, size] float32 in [0, 1]: smooth coloured backgrounds with rectangles and discs on them,
    a stand-in for photos (spatially correlated, edges, flat regions) that is deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    images = np.empty((count, 3, size, size), np.float32)
    for n in range(count):
        image = np.stack([rng.uniform(0.2, 0.8) + rng.uniform(-0.3, 0.3) * rows + rng.uniform(-0.3, 0.3) * cols
                          for _ in range(3)])
        for _ in range(rng.integers(3, 9)):
            colour = rng.uniform(0, 1, (3, 1))
            top, left = rng.uniform(0, 0.9, 2)
            height, width = rng.uniform(0.05, 0.5, 2)
            if rng.random() < 0.5:
                inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
            else:
                inside = (rows - top) ** 2 + (cols - left) ** 2 < (height / 2) ** 2
            image[:, inside] = colour
        image += rng.normal(0, 0.02, image.shape)
        images[n] = np.clip(image, 0, 1)
    return images


# --------------------------------------------------------------------------- inputs


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs only: older IRs may also list initializers as graph inputs."""
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializer_names]


def concrete_shape(value: onnx.ValueInfoProto, batch: int, seq_len: int) -> tuple[int, ...]:
    dims = value.type.tensor_type.shape.dim
    return tuple(
        dim.dim_value if dim.HasField("dim_value") else (batch if axis == 0 else seq_len)
        for axis, dim in enumerate(dims)
    )


def embedding_rows(model: onnx.ModelProto, ids_name: str) -> int | None:
    """Vocabulary size of the table an integer input indexes, so sampled ids stay in range."""
    tables = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == ids_name and node.input[0] in tables:
            return tables[node.input[0]].dims[0]
    return None


def make_inputs(
    model: onnx.ModelProto, batch: int = 1, seed: int = 0, seq_len: int = DEFAULT_SYMBOLIC_DIM
) -> dict[str, np.ndarray]:
    """Random feeds for `model`: symbolic dims become `batch` (first axis) or `seq_len`.

    Inputs whose name contains 'mask' get all ones; integer inputs get ids valid for the
    embedding table they index; float inputs get standard-normal values.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        shape = concrete_shape(value, batch, seq_len)
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if "mask" in value.name.lower():
            feeds[value.name] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            high = embedding_rows(model, value.name) or 2
            feeds[value.name] = rng.integers(0, high, shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


# --------------------------------------------------------------------------- CLI


GENERATORS = {"resnet": resnet_model, "bert": bert_model, "yolov8n": yolov8n_model}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight sample ONNX model.")
    parser.add_argument("kind", choices=sorted(GENERATORS))
    parser.add_argument("output", help="path of the .onnx file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inputs", metavar="NPZ", help="also write random inputs (random weights, random data: "
                        "for latency work only)")
    parser.add_argument("--samples", type=int, default=16, help="samples in --inputs")
    args = parser.parse_args(argv)
    model = GENERATORS[args.kind](seed=args.seed)
    onnx.checker.check_model(model)
    onnx.save(model, args.output)
    print(f"wrote {args.output}")
    if args.inputs:
        np.savez(args.inputs, **make_inputs(model, batch=args.samples, seed=args.seed))
        print(f"wrote {args.inputs}")


if __name__ == "__main__":
    main()
