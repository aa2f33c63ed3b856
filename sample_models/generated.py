"""Random-weight ONNX models for latency benchmarks and tests, built with onnx.helper + numpy.

Every generator is deterministic in ``seed`` and returns an opset-17 ``onnx.ModelProto``
(IR version 8, so onnxruntime 1.18 and later load it). The weights are random, so the
outputs mean nothing; they are only scaled so activations stay finite and non-trivial.

CLI: ``python -m sample_models.generated resnet|bert OUT.onnx [--seed N]``
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np
import onnx
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


GENERATORS = {"resnet": resnet_model, "bert": bert_model}


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
