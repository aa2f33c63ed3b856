"""A generated LLaMA-style decoder with a KV cache, written the way exporters write one (issue 12).

    python -m bench.decoder_model SIZE OUT.onnx        SIZE: tiny | half-gb | over-2gb

RMSNorm, rotary position embeddings, grouped-query attention, a SwiGLU MLP, tied or untied embeddings.
Inputs and outputs carry the names optimum's exports use: input_ids, attention_mask, position_ids and
past_key_values.N.key/value in; logits and present.N.key/value out; batch, sequence and past length are
dynamic axes. Weights are random (normal, deterministic per tensor and seed), so the network computes
nothing meaningful, but every shape and op is the real one.

How the weights are drawn (the scale decides how a rounding error travels through the network):
  - projections (q, k, v, o, gate, up, down, lm_head): N(0, 1 / fan_in), fan_in the input width, as PaLM
    initializes its kernels ("W ~ N(0, 1/sqrt(n_in))", PaLM, Chowdhery et al. 2022, section 2) and torchtitan's
    Llama 3 its output layer (std dim ** -0.5): every projection of a normalized input has unit variance;
  - token embeddings: N(0, 1), as PaLM ("since layer normalization is not applied to the embeddings") and
    torchtitan's Llama 3 (nn.init.normal_) initialize them: the residual stream starts at the scale the
    RMSNorms hand to the layers;
  - RMSNorm gains: 1 + N(0, 0.1^2) (init is 1; trained gains spread around it).
Before (HF's LlamaConfig initializer_range: N(0, 0.02^2) for every weight, embeddings too) the embeddings were
0.02 rms against 0.15-0.4 rms written by each layer: after layer 0 the stream was 90 % layer 0's output, and
rounding layer 0's v_proj or o_proj alone cost 0.013 logits cosine each (int4 block-32 rounding of all
weights: 0.917, numpy reference, 2 x 64 Zipf tokens). With the scale above: 0.949, while the layers still
decide the output (logits cosine against the same network with every layer skipped: 0.34).
Not chosen: scaling o/down (and up) by 1 / sqrt(2 * layers) as GPT-2 and torchtitan do at init. It makes
each layer's update 1-5 % of the stream, so the network is nearly the identity (logits cosine 0.97-0.99
against the network with every layer skipped) and int4 rounding looks harmless (0.995) for a reason no trained
model shares: their layers rewrite the stream.

The weights go to OUT.onnx.data tensor by tensor while the graph is assembled, each at an offset aligned for
memory-mapping: building a > 2 GB model needs one tensor in memory at a time, never the whole model.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
ALIGNMENT = 4096          # tensor offsets in the .data file: onnxruntime can memory-map page-aligned tensors
CHUNK_VALUES = 1 << 24    # random values generated per step (64 MB of float32)


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = False              # lm_head reads the embedding table through a Transpose (one stored copy)
    rope_theta: float = 10000.0
    eps: float = 1e-6
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def parameter_count(self) -> int:
        return sum(int(np.prod(shape)) for _, shape, _ in weight_specs(self))

    def weight_bytes(self) -> int:
        return 4 * self.parameter_count()


# Proportions follow small LLaMA-family models (head_dim 64/128, kv heads a quarter of the heads, MLP ~2.75x).
# half-gb: 128 M parameters, 0.51 GB; over-2gb: 582 M parameters, 2.33 GB (both untied, as most exports are).
CONFIGS = {
    "tiny": DecoderConfig(vocab=96, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
    "tiny-tied": DecoderConfig(vocab=96, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, tied=True),
    "half-gb": DecoderConfig(vocab=8192, hidden=1024, layers=10, heads=16, kv_heads=4, intermediate=2816),
    "over-2gb": DecoderConfig(vocab=32000, hidden=2048, layers=10, heads=16, kv_heads=4, intermediate=5632),
}


def layer_weight_names(layer: int) -> dict[str, str]:
    prefix = f"model.layers.{layer}"
    return {"input_norm": f"{prefix}.input_layernorm.weight", "q": f"{prefix}.self_attn.q_proj.weight",
            "k": f"{prefix}.self_attn.k_proj.weight", "v": f"{prefix}.self_attn.v_proj.weight",
            "o": f"{prefix}.self_attn.o_proj.weight", "post_norm": f"{prefix}.post_attention_layernorm.weight",
            "gate": f"{prefix}.mlp.gate_proj.weight", "up": f"{prefix}.mlp.up_proj.weight",
            "down": f"{prefix}.mlp.down_proj.weight"}


EMBEDDING, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def weight_specs(config: DecoderConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every weight in storage order; MatMul weights are stored [in, out] as
    exporters constant-fold the Transpose of a torch Linear. kind: embedding | projection | norm."""
    h, kv, d, f = config.hidden, config.kv_heads * config.head_dim, config.heads * config.head_dim, config.intermediate
    specs: list[tuple[str, tuple[int, ...], str]] = [(EMBEDDING, (config.vocab, h), "embedding")]
    for layer in range(config.layers):
        names = layer_weight_names(layer)
        specs += [(names["input_norm"], (h,), "norm"), (names["q"], (h, d), "projection"),
                  (names["k"], (h, kv), "projection"), (names["v"], (h, kv), "projection"),
                  (names["o"], (d, h), "projection"),
                  (names["post_norm"], (h,), "norm"), (names["gate"], (h, f), "projection"),
                  (names["up"], (h, f), "projection"), (names["down"], (f, h), "projection")]
    specs.append((FINAL_NORM, (h,), "norm"))
    if not config.tied:
        specs.append((LM_HEAD, (h, config.vocab), "projection"))
    return specs


def weight_values(config: DecoderConfig, position: int, shape: tuple[int, ...], kind: str) -> Iterator[np.ndarray]:
    """The values of weight number `position`, flat, in chunks (the same bytes on every machine and run)."""
    rng = np.random.default_rng([config.seed, position])
    total = int(np.prod(shape))
    for start in range(0, total, CHUNK_VALUES):
        count = min(CHUNK_VALUES, total - start)
        values = rng.standard_normal(count, dtype=np.float32)
        if kind == "norm":  # trained RMSNorm gains sit near 1
            values = 1.0 + np.float32(0.1) * values
        elif kind == "projection":  # stored [in, out]: unit variance out of a unit-variance input
            values *= np.float32(shape[0] ** -0.5)
        yield values.astype("<f4", copy=False)


def build_decoder(config: DecoderConfig, path: str | Path) -> Path:
    """Write the decoder to `path` with its weights in `path.name + '.data'` next to it."""
    path = Path(path)
    data_name = path.name + ".data"
    initializers = []
    with open(path.parent / data_name, "wb") as data_file:
        for position, (name, shape, kind) in enumerate(weight_specs(config)):
            offset = -data_file.tell() % ALIGNMENT
            data_file.write(b"\0" * offset)
            start = data_file.tell()
            for chunk in weight_values(config, position, shape, kind):
                data_file.write(chunk.tobytes())
            initializers.append(_external_tensor(name, shape, data_name, start, data_file.tell() - start))
    model = _decoder_graph(config, initializers)
    onnx.save_model(model, str(path))
    return path


def _external_tensor(name: str, shape: tuple[int, ...], location: str, offset: int, length: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


# ---------------------------------------------------------------------------------------------------
# The graph


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[TensorProto] = []
        self._count = 0

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, **attributes) -> str | list[str]:
        names = [f"/{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"/{name}/{op_type}", **attributes))
        return names[0] if outputs == 1 else names

    def const(self, name: str, values, dtype=np.int64) -> str:
        self.constants.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name


def _decoder_graph(config: DecoderConfig, initializers: list[TensorProto]) -> onnx.ModelProto:
    b = _Builder()
    _shared_constants(b, config)
    hidden = b.op("Gather", [EMBEDDING, "input_ids"], "model/embed_tokens", axis=0)
    mask_bias = _attention_bias(b)
    cos, sin = _rotary_tables(b, config)
    outputs = []
    for layer in range(config.layers):
        hidden, presents = _layer(b, config, layer, hidden, mask_bias, cos, sin)
        outputs += presents
    normed = _rms_norm(b, config, hidden, FINAL_NORM, "model/norm")
    if config.tied:
        head = b.op("Transpose", [EMBEDDING], "lm_head/transpose", perm=[1, 0])
        b.nodes.append(helper.make_node("MatMul", [normed, head], ["logits"], name="/lm_head/MatMul"))
    else:
        b.nodes.append(helper.make_node("MatMul", [normed, LM_HEAD], ["logits"], name="/lm_head/MatMul"))
    graph = helper.make_graph(b.nodes, "llama_decoder", _graph_inputs(config),
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                             ["batch_size", "sequence_length", config.vocab])]
                              + _present_outputs(config, outputs), initializer=[*initializers, *b.constants])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="compressq-bench-decoder")
    model.ir_version = 8
    return model


def _graph_inputs(config: DecoderConfig) -> list[onnx.ValueInfoProto]:
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    for layer in range(config.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{layer}.{kind}", TensorProto.FLOAT,
                ["batch_size", config.kv_heads, "past_sequence_length", config.head_dim]))
    return inputs


def _present_outputs(config: DecoderConfig, names: list[str]) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                          ["batch_size", config.kv_heads, "total_sequence_length", config.head_dim])
            for name in names]


def _shared_constants(b: _Builder, config: DecoderConfig) -> None:
    b.const("const_axis_0", [0])
    b.const("const_axis_1", [1])
    b.const("const_axis_2", [2])
    b.const("const_axis_1_2", [1, 2])
    b.const("const_axis_neg1", [-1])
    b.const("const_one", 1)
    b.const("const_zero_scalar", 0)
    b.const("const_eps", config.eps, np.float32)
    b.const("const_zero_f", 0.0, np.float32)
    b.const("const_masked_f", np.finfo(np.float32).min, np.float32)
    b.const("const_scale", 1.0 / np.sqrt(config.head_dim), np.float32)
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2 / config.head_dim))
    b.const("const_inv_freq", inv_freq, np.float32)
    b.const("const_half_split", [half, half])
    b.const("const_q_shape", [0, 0, config.heads, config.head_dim])
    b.const("const_kv_shape", [0, 0, config.kv_heads, config.head_dim])
    b.const("const_repeat", [1, 1, config.groups, 1, 1])
    b.const("const_grouped_shape", [0, config.heads, -1, config.head_dim])
    b.const("const_merge_shape", [0, 0, config.heads * config.head_dim])


def _attention_bias(b: _Builder) -> str:
    """[batch, 1, seq, total]: 0 where a query may attend (causal and not padding), float32 min elsewhere."""
    total = b.op("Shape", ["attention_mask"], "mask/total_shape", start=1, end=2)
    seq = b.op("Shape", ["input_ids"], "mask/seq_shape", start=1, end=2)
    past = b.op("Sub", [total, seq], "mask/past")
    total_s = b.op("Squeeze", [total, "const_axis_0"], "mask/total_scalar")
    past_s = b.op("Squeeze", [past, "const_axis_0"], "mask/past_scalar")
    query_pos = b.op("Range", [past_s, total_s, "const_one"], "mask/query_positions")
    key_pos = b.op("Range", ["const_zero_scalar", total_s, "const_one"], "mask/key_positions")
    keys = b.op("Unsqueeze", [key_pos, "const_axis_0"], "mask/keys_row")
    queries = b.op("Unsqueeze", [query_pos, "const_axis_1"], "mask/queries_column")
    causal = b.op("LessOrEqual", [keys, queries], "mask/causal")                       # [seq, total]
    padding = b.op("Cast", ["attention_mask"], "mask/padding", to=TensorProto.BOOL)    # [batch, total]
    padding = b.op("Unsqueeze", [padding, "const_axis_1_2"], "mask/padding_4d")        # [batch, 1, 1, total]
    allowed = b.op("And", [causal, padding], "mask/allowed")                          # [batch, 1, seq, total]
    return b.op("Where", [allowed, "const_zero_f", "const_masked_f"], "mask/bias")


def _rotary_tables(b: _Builder, config: DecoderConfig) -> tuple[str, str]:
    """cos and sin of position * inv_freq, [batch, 1, seq, head_dim / 2] (broadcast over heads)."""
    positions = b.op("Cast", ["position_ids"], "rotary/positions", to=TensorProto.FLOAT)
    positions = b.op("Unsqueeze", [positions, "const_axis_neg1"], "rotary/positions_column")
    angles = b.op("Mul", [positions, "const_inv_freq"], "rotary/angles")
    angles = b.op("Unsqueeze", [angles, "const_axis_1"], "rotary/angles_4d")
    return b.op("Cos", [angles], "rotary/cos"), b.op("Sin", [angles], "rotary/sin")


def _rotate(b: _Builder, x: str, cos: str, sin: str, name: str) -> str:
    """Rotate-half rotary: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]."""
    x1, x2 = b.op("Split", [x, "const_half_split"], f"{name}/split", outputs=2, axis=-1)
    first = b.op("Sub", [b.op("Mul", [x1, cos], f"{name}/x1_cos"), b.op("Mul", [x2, sin], f"{name}/x2_sin")],
                 f"{name}/first")
    second = b.op("Add", [b.op("Mul", [x2, cos], f"{name}/x2_cos"), b.op("Mul", [x1, sin], f"{name}/x1_sin")],
                  f"{name}/second")
    return b.op("Concat", [first, second], f"{name}/concat", axis=-1)


def _rms_norm(b: _Builder, config: DecoderConfig, x: str, weight: str, name: str) -> str:
    squared = b.op("Mul", [x, x], f"{name}/square")
    mean = b.op("ReduceMean", [squared], f"{name}/mean", axes=[-1], keepdims=1)
    root = b.op("Sqrt", [b.op("Add", [mean, "const_eps"], f"{name}/add_eps")], f"{name}/sqrt")
    normed = b.op("Div", [x, root], f"{name}/normalize")
    return b.op("Mul", [normed, weight], f"{name}/scale")


def _heads(b: _Builder, x: str, shape: str, name: str) -> str:
    """[batch, seq, heads * dim] -> [batch, heads, seq, dim]."""
    return b.op("Transpose", [b.op("Reshape", [x, shape], f"{name}/reshape")], f"{name}/transpose",
                perm=[0, 2, 1, 3])


def _layer(b: _Builder, config: DecoderConfig, layer: int, x: str, mask_bias: str, cos: str, sin: str,
           ) -> tuple[str, list[str]]:
    w = layer_weight_names(layer)
    p = f"model/layers.{layer}"
    h = _rms_norm(b, config, x, w["input_norm"], f"{p}/input_layernorm")
    q = _heads(b, b.op("MatMul", [h, w["q"]], f"{p}/self_attn/q_proj"), "const_q_shape", f"{p}/self_attn/q")
    k = _heads(b, b.op("MatMul", [h, w["k"]], f"{p}/self_attn/k_proj"), "const_kv_shape", f"{p}/self_attn/k")
    v = _heads(b, b.op("MatMul", [h, w["v"]], f"{p}/self_attn/v_proj"), "const_kv_shape", f"{p}/self_attn/v")
    q = _rotate(b, q, cos, sin, f"{p}/self_attn/q_rotary")
    k = _rotate(b, k, cos, sin, f"{p}/self_attn/k_rotary")
    present_key, present_value = f"present.{layer}.key", f"present.{layer}.value"
    b.nodes.append(helper.make_node("Concat", [f"past_key_values.{layer}.key", k], [present_key], axis=2,
                                    name=f"/{p}/self_attn/key_cache/Concat"))
    b.nodes.append(helper.make_node("Concat", [f"past_key_values.{layer}.value", v], [present_value], axis=2,
                                    name=f"/{p}/self_attn/value_cache/Concat"))
    keys = _repeat_kv(b, present_key, f"{p}/self_attn/repeat_key")
    values = _repeat_kv(b, present_value, f"{p}/self_attn/repeat_value")
    keys_t = b.op("Transpose", [keys], f"{p}/self_attn/key_transpose", perm=[0, 1, 3, 2])
    scores = b.op("Mul", [b.op("MatMul", [q, keys_t], f"{p}/self_attn/scores"), "const_scale"], f"{p}/self_attn/scale")
    scores = b.op("Add", [scores, mask_bias], f"{p}/self_attn/mask")
    probs = b.op("Softmax", [scores], f"{p}/self_attn/softmax", axis=-1)
    context = b.op("MatMul", [probs, values], f"{p}/self_attn/context")
    context = b.op("Transpose", [context], f"{p}/self_attn/context_transpose", perm=[0, 2, 1, 3])
    context = b.op("Reshape", [context, "const_merge_shape"], f"{p}/self_attn/merge_heads")
    attended = b.op("MatMul", [context, w["o"]], f"{p}/self_attn/o_proj")
    x = b.op("Add", [x, attended], f"{p}/attention_residual")
    h = _rms_norm(b, config, x, w["post_norm"], f"{p}/post_attention_layernorm")
    gate = b.op("MatMul", [h, w["gate"]], f"{p}/mlp/gate_proj")
    up = b.op("MatMul", [h, w["up"]], f"{p}/mlp/up_proj")
    silu = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}/mlp/act_fn/sigmoid")], f"{p}/mlp/act_fn/silu")
    down = b.op("MatMul", [b.op("Mul", [silu, up], f"{p}/mlp/gated"), w["down"]], f"{p}/mlp/down_proj")
    return b.op("Add", [x, down], f"{p}/mlp_residual"), [present_key, present_value]


def _repeat_kv(b: _Builder, cache: str, name: str) -> str:
    """[batch, kv_heads, total, dim] -> [batch, heads, total, dim]: each kv head serves `groups` query heads."""
    expanded = b.op("Unsqueeze", [cache, "const_axis_2"], f"{name}/unsqueeze")
    tiled = b.op("Tile", [expanded, "const_repeat"], f"{name}/tile")
    return b.op("Reshape", [tiled, "const_grouped_shape"], f"{name}/reshape")


# ---------------------------------------------------------------------------------------------------
# Inputs


def token_ids(config: DecoderConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Real-looking token ids: Zipf-distributed ranks (a few ids very common, a long tail), as text has."""
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.2, size=(batch, length)) - 1
    permutation = np.random.default_rng(config.seed + 1).permutation(config.vocab)  # common ids spread over the table
    return permutation[np.minimum(ranks, config.vocab - 1)].astype(np.int64)


def empty_cache(config: DecoderConfig, batch: int) -> dict[str, np.ndarray]:
    return {f"past_key_values.{layer}.{kind}": np.zeros((batch, config.kv_heads, 0, config.head_dim), np.float32)
            for layer in range(config.layers) for kind in ("key", "value")}


def step_feed(ids: np.ndarray, cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed for `ids` [batch, seq] after the cached positions (no padding)."""
    batch, seq = ids.shape
    past = next(iter(cache.values())).shape[2]
    positions = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq))
    return {"input_ids": ids, "attention_mask": np.ones((batch, past + seq), np.int64),
            "position_ids": np.ascontiguousarray(positions), **cache}


def weight_array(config: DecoderConfig, name: str) -> np.ndarray:
    """The values of one weight as build_decoder writes them, without reading a file."""
    for position, (spec_name, shape, kind) in enumerate(weight_specs(config)):
        if spec_name == name:
            return np.concatenate(list(weight_values(config, position, shape, kind))).reshape(shape)
    raise KeyError(name)


def layers_skipped_logits(config: DecoderConfig, ids: np.ndarray) -> np.ndarray:
    """Logits of the same network with every layer skipped (embedding, final norm, lm_head), [batch, seq, vocab]:
    a decoder whose logits match these is a bigram table, whose layers a rounding error cannot disturb."""
    embedding = weight_array(config, EMBEDDING)
    x = embedding[ids].astype(np.float64)
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.eps) * weight_array(config, FINAL_NORM)
    head = embedding.T if config.tied else weight_array(config, LM_HEAD)
    return (normed @ head).astype(np.float32)


def cache_from_outputs(names: list[str], outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """present.N.* outputs of one run as the past_key_values.N.* inputs of the next."""
    return {name.replace("present.", "past_key_values.", 1): value
            for name, value in zip(names, outputs) if name.startswith("present.")}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in CONFIGS:
        print(f"usage: python -m bench.decoder_model {{{'|'.join(CONFIGS)}}} OUT.onnx", file=sys.stderr)
        return 2
    config = CONFIGS[argv[0]]
    path = build_decoder(config, argv[1])
    print(f"{path}: {config.parameter_count() / 1e6:.1f} M parameters, {config.weight_bytes() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
