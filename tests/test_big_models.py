"""Past 2 GB (issue 12): the mechanisms, tested with the thresholds lowered so that a tiny decoder counts as big.

protobuf cannot hold a model above 2 GB: ByteSize() and SerializeToString() raise EncodeError there, and the
checker and shape inference take the serialized model. So a big model's size is summed from its tensors' shapes,
it is checked from its path (or as a skeleton whose weights point at an empty file), sessions read it from disk,
outputs keep their weights in external data, and `inspect` reads weights a chunk at a time, never whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import compressq.io as model_io
from bench.decoder_model import CONFIGS, build_decoder, empty_cache, step_feed, token_ids
from compressq.errors import ModelError
from compressq.evaluate.summary import summarize
from compressq.runtime import create_session
from tests.conftest import BIG_THRESHOLD
from tests.helpers import BIG_MODEL_COMMANDS, cosine


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return build_decoder(CONFIGS["tiny"], tmp_path_factory.mktemp("decoder") / "decoder.onnx")


def logits(path_or_model, ids: np.ndarray) -> np.ndarray:
    config = CONFIGS["tiny"]
    return create_session(path_or_model).run(["logits"], step_feed(ids, empty_cache(config, len(ids))))[0]


def test_model_bytes_is_byte_size_below_the_threshold_and_the_tensor_sum_above(decoder, monkeypatch):
    model = model_io.load_model(decoder)
    assert model_io.model_bytes(model) == model.ByteSize()
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", BIG_THRESHOLD)
    payload = sum(t.ByteSize() - 16 for t in model.graph.initializer if t.HasField("raw_data"))  # roughly the bytes
    measured = model_io.model_bytes(model)
    assert measured > BIG_THRESHOLD
    assert measured == sum(len(t.raw_data) for t in model.graph.initializer if t.HasField("raw_data"))
    assert abs(measured - payload) < 0.05 * payload


def test_a_big_model_in_memory_is_checked_as_a_skeleton(decoder, big_threshold, monkeypatch):
    model = model_io.load_model(decoder)
    checked = []
    real_check = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: (checked.append(m), real_check(m, *a, **k)))
    model_io.check_model(model)
    assert len(checked) == 1 and isinstance(checked[0], str), "a big proto is checked from a file, not in memory"
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "no_such_tensor"
    with pytest.raises(ModelError, match="fails the ONNX checker"):
        model_io.check_model(broken)


def test_weights_stay_on_disk_and_are_read_in_chunks(decoder):
    lazy = model_io.load_model(decoder, read_weights=False)
    full = model_io.load_model(decoder)
    external = [t for t in lazy.graph.initializer if model_io.is_external(t)]
    assert external and lazy.ByteSize() < 0.3 * full.ByteSize()  # the tiny graph is a fifth of its bytes
    loaded = {t.name: numpy_helper.to_array(t).reshape(-1) for t in full.graph.initializer}
    for tensor in lazy.graph.initializer:
        chunks = list(model_io.tensor_chunks(tensor, decoder, chunk_bytes=1000))
        if model_io.is_external(tensor) and tensor.dims[0] * 4 > 1000:
            assert len(chunks) > 1
        np.testing.assert_array_equal(np.concatenate(chunks), loaded[tensor.name])


def test_inspect_reads_no_weights_whole(decoder, run_cli, monkeypatch):
    lazy = model_io.load_model(decoder, read_weights=False)
    full = model_io.load_model(decoder)
    expected = summarize(full, decoder).to_dict()
    assert summarize(lazy, decoder).to_dict() == expected
    assert expected["parameters"] >= CONFIGS["tiny"].parameter_count()
    monkeypatch.setattr(model_io, "_read_external_data", lambda pieces: pytest.fail("inspect read the weights whole"))
    result = run_cli("inspect", decoder, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == expected


@pytest.mark.parametrize("command", list(BIG_MODEL_COMMANDS))
def test_every_command_on_a_big_decoder(command, decoder, big_threshold, run_cli, tmp_path):
    out = tmp_path / "out.onnx"
    result = run_cli(*[a.format(model=decoder, out=out) for a in BIG_MODEL_COMMANDS[command]])
    assert result.exit_code == 0, result.stderr
    written = onnx.load(str(out), load_external_data=False)
    if model_io.model_bytes(model_io.load_model(out)) > BIG_THRESHOLD:
        assert (tmp_path / "out.onnx.data").exists(), "an output above the threshold keeps its weights aside"
        assert any(model_io.is_external(t) for t in written.graph.initializer)
    ids = token_ids(CONFIGS["tiny"], 2, 6, seed=1)
    reference, quantized = logits(decoder, ids), logits(out, ids)
    assert cosine(reference, quantized) > 0.9, f"{command}: logits cosine {cosine(reference, quantized):.3f}"
    np.testing.assert_array_equal(logits(model_io.load_model(out), ids), quantized)
