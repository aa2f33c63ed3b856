"""Decode-step timing feeds (compressq/measure/decode.py): which models are KV-cache decoders, and the feed of
one new token after a prompt, checked against the same model run on the whole sequence without a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bench.decoder_model import CONFIGS, build_decoder, empty_cache, step_feed, token_ids
from compressq.errors import DataError
from compressq.measure.decode import (
    decode_step_feeds,
    empty_cache_feed,
    find_kv_cache,
    next_token_feed,
    token_ids_prompt,
)
from compressq.runtime import create_session

CONFIG = CONFIGS["tiny"]
PROMPT = 6


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return build_decoder(CONFIG, tmp_path_factory.mktemp("decoder") / "decoder.onnx")


def _cache_model(inputs: list[tuple[str, list]], outputs: list[tuple[str, list]]) -> onnx.ModelProto:
    """Each output is the Concat of 'x' with the input of the same position (enough to name a cache)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, "seq", 4])
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs]
    results = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs]
    nodes = [helper.make_node("Concat", [inp, "x"], [out], axis=-2, name=f"concat_{i}")
             for i, ((inp, _), (out, _)) in enumerate(zip(inputs, outputs))]
    graph = helper.make_graph(nodes, "cache", [x, *values], results)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ------------------------------------------------------------------------------------------- detection


def test_bench_decoder_pairs_every_layer(decoder):
    cache = find_kv_cache(onnx.load(str(decoder), load_external_data=False))
    assert cache is not None
    expected = [(f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}")
                for layer in range(CONFIG.layers) for kind in ("key", "value")]
    assert list(cache.pairs) == expected


@pytest.mark.parametrize("past, present", [
    ("past_key_values.0.key", "present.0.key"),                      # optimum decoder
    ("past_key_values.0.decoder.value", "present.0.decoder.value"),  # optimum seq2seq
    ("past_0", "present_0"),                                         # onnxruntime's GPT-2
    ("past.3.key", "present.3.key"),
    ("past_key_1", "present_key_1"),
    ("Past_Key_Values.0.Key", "present.0.key"),                      # case does not matter
])
def test_exporter_namings_pair(past, present):
    model = _cache_model([(past, ["batch", 2, "past", 4])], [(present, ["batch", 2, "total", 4])])
    cache = find_kv_cache(model)
    assert cache is not None and cache.pairs == ((past, present),)


@pytest.mark.parametrize("inputs, outputs", [
    ([("state", ["batch", 2, "past", 4])], [("state_out", ["batch", 2, "total", 4])]),   # no cache name
    ([("pastry", ["batch", 2, "past", 4])], [("presentry", ["batch", 2, "total", 4])]),  # prefix inside a word
    ([("past_key_values.0.key", ["batch", 2, "past", 4])], [("present.1.key", ["batch", 2, "total", 4])]),
])
def test_non_decoders_are_none(inputs, outputs):
    assert find_kv_cache(_cache_model(inputs, outputs)) is None


def test_a_past_input_nothing_refills_is_no_cache_to_drive():
    model = _cache_model([("past_key_values.0.key", ["b", 2, "p", 4]), ("past_key_values.0.value", ["b", 2, "p", 4])],
                         [("present.0.key", ["b", 2, "t", 4]), ("other", ["b", 2, "t", 4])])
    assert find_kv_cache(model) is None


def test_decode_step_feeds_is_none_for_a_model_without_cache(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    assert decode_step_feeds(model, {"x": np.ones((2, 4), np.float32)}) is None


# ------------------------------------------------------------------------------------------- the feed


def _full_sequence_last_logits(decoder: Path, ids: np.ndarray) -> np.ndarray:
    session = create_session(decoder)
    return session.run(["logits"], step_feed(ids, empty_cache(CONFIG, ids.shape[0])))[0][:, -1]


def test_step_feed_continues_the_prompt(decoder):
    """The step's logits are those of the prompt + its last token run whole: the cache is the prompt's."""
    ids = token_ids(CONFIG, 3, PROMPT, seed=5)
    calibration_batch = step_feed(ids, empty_cache(CONFIG, 3))
    feeds = decode_step_feeds(decoder, calibration_batch)
    assert feeds is not None and len(feeds) == 1
    feed = feeds[0]
    assert feed["input_ids"].tolist() == [[ids[0, -1]]]        # batch 1, the first sample's last token again
    assert feed["attention_mask"].shape == (1, PROMPT + 1)
    assert feed["position_ids"].tolist() == [[PROMPT]]
    assert feed["past_key_values.0.key"].shape == (1, CONFIG.kv_heads, PROMPT, CONFIG.head_dim)
    step_logits = create_session(decoder).run(["logits"], feed)[0][:, -1]
    whole = np.concatenate([ids[:1], ids[:1, -1:]], axis=1)
    np.testing.assert_allclose(step_logits, _full_sequence_last_logits(decoder, whole), rtol=1e-4, atol=1e-4)


def test_cache_inputs_missing_from_the_prompt_start_empty(decoder):
    ids = token_ids(CONFIG, 1, PROMPT, seed=6)
    prompt = {k: v for k, v in step_feed(ids, empty_cache(CONFIG, 1)).items() if not k.startswith("past")}
    feed = decode_step_feeds(decoder, prompt)[0]
    assert feed["past_key_values.1.value"].shape == (1, CONFIG.kv_heads, PROMPT, CONFIG.head_dim)


def test_token_ids_prompt_builds_what_a_generation_loop_feeds(decoder):
    ids = token_ids(CONFIG, 1, PROMPT, seed=7)[0]
    prompt = token_ids_prompt(decoder, ids)
    assert prompt["attention_mask"].tolist() == [[1] * PROMPT]
    assert prompt["position_ids"].tolist() == [list(range(PROMPT))]
    feed = decode_step_feeds(decoder, prompt)[0]
    step_logits = create_session(decoder).run(["logits"], feed)[0][:, -1]
    whole = np.concatenate([ids, ids[-1:]])[None]
    np.testing.assert_allclose(step_logits, _full_sequence_last_logits(decoder, whole), rtol=1e-4, atol=1e-4)


def test_token_ids_prompt_refuses_a_model_with_other_inputs():
    model = _cache_model([("past_key_values.0.key", ["batch", 2, "past", 4])], [("present.0.key", ["b", 2, "t", 4])])
    with pytest.raises(DataError, match="need values"):
        token_ids_prompt(model, np.arange(4))


def test_empty_cache_of_a_gpt2_style_stacked_cache():
    model = _cache_model([("past_0", [2, "batch_size", 2, "past_sequence_length", 4])],
                         [("present_0", [2, "batch_size", 2, "total_sequence_length", 4])])
    cache = find_kv_cache(model)
    assert empty_cache_feed(model, cache)["past_0"].shape == (2, 1, 2, 0, 4)


def test_empty_cache_with_an_unclear_length_axis_says_so():
    model = _cache_model([("past_0", ["a", "b", 2, "c", 4])], [("present_0", ["a", "b", 2, "d", 4])])
    with pytest.raises(DataError, match="length axis"):
        empty_cache_feed(model, find_kv_cache(model))


def test_left_padded_prompt_steps_from_its_last_position():
    cache = find_kv_cache(_cache_model([("past_key_values.0.key", ["b", 2, "p", 4])],
                                       [("present.0.key", ["b", 2, "t", 4])]))
    prompt = {"input_ids": np.array([[0, 0, 5, 9]]), "attention_mask": np.array([[0, 0, 1, 1]]),
              "position_ids": np.array([[0, 0, 0, 1]]), "cache_position": np.arange(4),
              "use_cache_branch": np.array([False]), "past_key_values.0.key": np.zeros((1, 2, 0, 4), np.float32)}
    presents = {"present.0.key": np.ones((1, 2, 4, 4), np.float32)}
    feed = next_token_feed(prompt, cache, presents)
    assert feed["input_ids"].tolist() == [[9]]
    assert feed["attention_mask"].tolist() == [[0, 0, 1, 1, 1]]
    assert feed["position_ids"].tolist() == [[2]]
    assert feed["cache_position"].tolist() == [4]
    assert feed["use_cache_branch"].tolist() == [True]
    assert np.array_equal(feed["past_key_values.0.key"], presents["present.0.key"])
