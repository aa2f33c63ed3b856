"""The generated LLaMA-style decoder (bench/decoder_model.py): numpy reference, KV-cache consistency, exporter
names and external data written tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bench.decoder_model import (
    CONFIGS,
    EMBEDDING,
    FINAL_NORM,
    LM_HEAD,
    DecoderConfig,
    build_decoder,
    cache_from_outputs,
    empty_cache,
    layer_weight_names,
    step_feed,
    token_ids,
    weight_specs,
)
from compressq.runtime import create_session


@pytest.fixture(scope="module", params=["tiny", "tiny-tied"])
def decoder(request, tmp_path_factory) -> tuple[DecoderConfig, Path]:
    config = CONFIGS[request.param]
    return config, build_decoder(config, tmp_path_factory.mktemp(request.param) / "decoder.onnx")


def reference_logits(config: DecoderConfig, weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The decoder in float64 numpy, the whole sequence at once (no cache)."""
    def rms_norm(x, gain):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.eps) * gain

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    batch, seq = ids.shape
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d // 2) * 2 / d)
    angles = np.arange(seq)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    causal = np.tril(np.ones((seq, seq), bool))
    x = weights[EMBEDDING][ids].astype(np.float64)
    for layer in range(config.layers):
        w = {key: weights[name].astype(np.float64) for key, name in layer_weight_names(layer).items()}
        h = rms_norm(x, w["input_norm"])
        q = (h @ w["q"]).reshape(batch, seq, config.heads, d).transpose(0, 2, 1, 3)
        k = (h @ w["k"]).reshape(batch, seq, config.kv_heads, d).transpose(0, 2, 1, 3)
        v = (h @ w["v"]).reshape(batch, seq, config.kv_heads, d).transpose(0, 2, 1, 3)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = np.repeat(k, config.groups, axis=1), np.repeat(v, config.groups, axis=1)
        scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, config.heads * d)
        x = x + context @ w["o"]
        h = rms_norm(x, w["post_norm"])
        gate, up = h @ w["gate"], h @ w["up"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["down"]
    head = weights[EMBEDDING].T if config.tied else weights[LM_HEAD]
    return rms_norm(x, weights[FINAL_NORM]) @ head.astype(np.float64)


def test_full_sequence_matches_numpy(decoder):
    config, path = decoder
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ids = token_ids(config, batch=2, length=7, seed=3)
    session = create_session(path)
    logits = session.run(["logits"], step_feed(ids, empty_cache(config, 2)))[0]
    expected = reference_logits(config, weights, ids)
    assert logits.shape == (2, 7, config.vocab)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_decode_steps_with_the_cache_match_the_full_run(decoder):
    config, path = decoder
    session = create_session(path)
    names = [o.name for o in session.get_outputs()]
    ids = token_ids(config, batch=2, length=9, seed=5)
    full = dict(zip(names, session.run(None, step_feed(ids, empty_cache(config, 2)))))
    # prefill 6 tokens, then one token at a time with the cache fed back
    outputs = session.run(None, step_feed(ids[:, :6], empty_cache(config, 2)))
    for position in range(6, 9):
        cache = cache_from_outputs(names, outputs)
        assert cache["past_key_values.0.key"].shape == (2, config.kv_heads, position, config.head_dim)
        outputs = session.run(None, step_feed(ids[:, position:position + 1], cache))
        step_logits = outputs[names.index("logits")]
        np.testing.assert_allclose(step_logits[:, 0], full["logits"][:, position], rtol=1e-4, atol=1e-4)
    for name, value in zip(names, outputs):
        if name.startswith("present."):
            np.testing.assert_allclose(value, full[name], rtol=1e-4, atol=1e-5)


def test_padding_is_masked(decoder):
    """A left-padded row gives the same last logits as the unpadded row (attention_mask is honoured)."""
    config, path = decoder
    session = create_session(path)
    ids = token_ids(config, batch=1, length=5, seed=7)
    plain = session.run(["logits"], step_feed(ids, empty_cache(config, 1)))[0]
    padded_ids = np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1)
    feed = step_feed(padded_ids, empty_cache(config, 1))
    feed["attention_mask"][:, :3] = 0
    feed["position_ids"] = np.array([[0, 0, 0, 0, 1, 2, 3, 4]], np.int64)
    padded = session.run(["logits"], feed)[0]
    np.testing.assert_allclose(padded[:, 3:], plain, rtol=1e-4, atol=1e-4)


def test_exporter_interface_and_external_data(decoder):
    config, path = decoder
    model = onnx.load(str(path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    assert len(inputs) == 3 + 2 * config.layers and len(outputs) == 1 + 2 * config.layers
    past_dims = [d.dim_param or d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert past_dims == ["batch_size", config.kv_heads, "past_sequence_length", config.head_dim]
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in weights]
    assert all(offset % 4096 == 0 for offset in offsets)
    assert (LM_HEAD in {t.name for t in weights}) == (not config.tied)
    stored = {n for n, *_ in weight_specs(config)}
    assert sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name in stored) == config.parameter_count()


def test_builds_are_byte_identical(tmp_path):
    config = CONFIGS["tiny"]
    first = build_decoder(config, tmp_path / "a.onnx")
    second = build_decoder(config, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
    assert first.read_bytes().replace(b"a.onnx.data", b"b.onnx.data") == second.read_bytes()


def test_sizes_of_the_bench_configs():
    assert 0.45e9 < CONFIGS["half-gb"].weight_bytes() < 0.6e9
    assert CONFIGS["over-2gb"].weight_bytes() > 2**31
