"""The committed sample models/data sets and the random-weight generators behave as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import sample_models
from sample_models import generated

SAMPLE_DIR = Path(sample_models.__file__).resolve().parent

TRAINED_MODELS = {
    # file: (eval data set, inputs fed from it, accuracy bar)
    "digits_cnn.onnx": ("digits_eval.npz", ("input",), 0.97),
    "digits_mobilenet.onnx": ("digits_eval.npz", ("input",), 0.96),
    "digits_transformer.onnx": ("digits_seq_eval.npz", ("input", "mask"), 0.96),
}
DATASETS = ["digits_calib.npz", "digits_eval.npz", "digits_seq_calib.npz", "digits_seq_eval.npz"]

SMALL_GENERATORS = {
    "tiny_mlp": lambda seed: generated.tiny_mlp(seed=seed),
    "tiny_conv": lambda seed: generated.tiny_conv(seed=seed),
    "resnet": lambda seed: generated.resnet_model(image_size=64, widths=(8, 16, 32, 64), num_classes=10, seed=seed),
    "bert": lambda seed: generated.bert_model(layers=1, hidden=64, heads=4, intermediate=128, seed=seed),
    "bert_vocab": lambda seed: generated.bert_model(
        layers=1, hidden=64, heads=4, intermediate=128, seq_len=32, vocab=50, seed=seed
    ),
}


def load_model(filename: str) -> onnx.ModelProto:
    return onnx.load(str(SAMPLE_DIR / filename))


def load_npz(filename: str) -> dict[str, np.ndarray]:
    with np.load(SAMPLE_DIR / filename) as data:
        return {key: data[key] for key in data.files}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def nodes_fed_by(model: onnx.ModelProto, value: str, hops: int) -> list[onnx.NodeProto]:
    """Nodes within `hops` steps downstream of `value`."""
    frontier, found = {value}, []
    for _ in range(hops):
        consumers = [n for n in model.graph.node if frontier & set(n.input) and n not in found]
        found += consumers
        frontier = {out for n in consumers for out in n.output}
    return found


# --------------------------------------------------------------------------- trained models


@pytest.mark.parametrize("filename", [*TRAINED_MODELS, *DATASETS])
def test_committed_file_exists(filename):
    assert (SAMPLE_DIR / filename).is_file()


@pytest.mark.parametrize("filename", TRAINED_MODELS)
def test_trained_model_passes_checker(filename):
    onnx.checker.check_model(load_model(filename), full_check=True)


@pytest.mark.parametrize("filename", TRAINED_MODELS)
def test_trained_model_has_dynamic_batch_io(filename):
    model = load_model(filename)
    _, input_names, _ = TRAINED_MODELS[filename]
    assert [value.name for value in model.graph.input] == list(input_names)
    assert all(dims(value)[0] == "batch" for value in model.graph.input)
    assert [(value.name, dims(value)) for value in model.graph.output] == [("logits", ["batch", 10])]
    assert model.opset_import[0].version == 17


@pytest.mark.parametrize("filename", TRAINED_MODELS)
def test_trained_model_reaches_accuracy_bar(filename):
    dataset, input_names, bar = TRAINED_MODELS[filename]
    data = load_npz(dataset)
    (logits,) = run(load_model(filename), {name: data[name] for name in input_names})
    accuracy = float((np.argmax(logits, axis=1) == data["labels"]).mean())
    assert accuracy >= bar


@pytest.mark.parametrize("filename", TRAINED_MODELS)
@pytest.mark.parametrize("batch", [1, 3])
def test_trained_model_runs_at_other_batch_sizes(filename, batch):
    dataset, input_names, _ = TRAINED_MODELS[filename]
    data = load_npz(dataset)
    (logits,) = run(load_model(filename), {name: data[name][:batch] for name in input_names})
    assert logits.shape == (batch, 10)
    assert np.isfinite(logits).all()


def test_image_datasets_have_documented_shapes():
    calib, evaluation = load_npz("digits_calib.npz"), load_npz("digits_eval.npz")
    assert calib["input"].shape == (256, 1, 8, 8) and calib["input"].dtype == np.float32
    images, labels = evaluation["input"], evaluation["labels"]
    assert images.shape[1:] == (1, 8, 8) and images.dtype == np.float32
    assert labels.shape == (len(images),) and labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_sequence_datasets_match_image_datasets():
    seq_calib, seq_eval = load_npz("digits_seq_calib.npz"), load_npz("digits_seq_eval.npz")
    assert seq_calib["input"].shape == (256, 8, 8) and seq_calib["mask"].shape == (256, 8)
    assert (seq_calib["mask"] == 1).all() and (seq_eval["mask"] == 1).all()
    evaluation = load_npz("digits_eval.npz")
    np.testing.assert_array_equal(seq_eval["input"], evaluation["input"][:, 0])
    np.testing.assert_array_equal(seq_eval["labels"], evaluation["labels"])


def test_cnn_has_two_convs_and_two_gemms():
    ops = op_types(load_model("digits_cnn.onnx"))
    assert ops.count("Conv") >= 2 and ops.count("Gemm") >= 2


def test_mobilenet_keeps_batchnorm_and_depthwise_conv():
    model = load_model("digits_mobilenet.onnx")
    assert "BatchNormalization" in op_types(model)
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    depthwise = [
        node
        for node in model.graph.node
        if node.op_type == "Conv"
        and (group := onnx.helper.get_node_attr_value(node, "group")) > 1
        and weights[node.input[1]].dims[0] == group
        and weights[node.input[1]].dims[1] == 1
    ]
    assert depthwise


def test_mobilenet_has_residual_add():
    assert "Add" in op_types(load_model("digits_mobilenet.onnx"))


def test_transformer_has_attention_building_blocks():
    ops = op_types(load_model("digits_transformer.onnx"))
    assert {"LayerNormalization", "Erf", "Softmax", "MatMul"} <= set(ops)


def test_transformer_turns_mask_into_additive_bias():
    model = load_model("digits_transformer.onnx")
    assert {"Mul", "Div"} & {node.op_type for node in nodes_fed_by(model, "mask", hops=4)}


def test_transformer_mask_changes_prediction_inputs():
    data = load_npz("digits_seq_eval.npz")
    rows, mask = data["input"][:8], data["mask"][:8].copy()
    model = load_model("digits_transformer.onnx")
    (full,) = run(model, {"input": rows, "mask": mask})
    mask[:, -2:] = 0.0
    (padded,) = run(model, {"input": rows, "mask": mask})
    assert np.isfinite(padded).all()
    assert not np.allclose(full, padded)


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name", SMALL_GENERATORS)
def test_generator_is_deterministic_in_seed(name):
    make = SMALL_GENERATORS[name]
    first, again, other = (initializer_arrays(make(seed)) for seed in (0, 0, 1))
    assert first.keys() == again.keys() == other.keys()
    for key, array in first.items():
        np.testing.assert_array_equal(array, again[key])
    assert any(not np.array_equal(array, other[key]) for key, array in first.items())


@pytest.mark.parametrize("name", SMALL_GENERATORS)
def test_generated_model_passes_checker_and_runs_finite(name):
    model = SMALL_GENERATORS[name](0)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 9 and model.opset_import[0].version == 17
    outputs = run(model, generated.make_inputs(model, batch=2, seq_len=16))
    for output in outputs:
        assert output.shape[0] == 2
        assert np.isfinite(output).all()
        assert np.abs(output).max() > 0


def test_resnet_keeps_batchnorm_and_projection_shortcuts():
    model = SMALL_GENERATORS["resnet"](0)
    ops = op_types(model)
    # 1 stem + 2 per basic block (8 blocks) + 3 projection shortcuts
    assert ops.count("BatchNormalization") == 1 + 2 * 8 + 3
    assert ops.count("Add") == 8
    assert {"MaxPool", "GlobalAveragePool", "Flatten", "Gemm"} <= set(ops)


def test_resnet_batch_can_be_fixed():
    model = generated.resnet_model(image_size=32, widths=(4, 8, 8, 8), blocks_per_stage=(1, 1, 1, 1), batch=3)
    assert dims(model.graph.input[0]) == [3, 3, 32, 32]
    (logits,) = run(model, generated.make_inputs(model))
    assert logits.shape == (3, 1000)


def test_bert_has_documented_interface_and_ops():
    model = generated.bert_model(layers=2, hidden=64, heads=4, intermediate=128)
    assert [(value.name, dims(value)) for value in model.graph.input] == [
        ("input", ["batch", "seq", 64]),
        ("attention_mask", ["batch", "seq"]),
    ]
    assert [(value.name, dims(value)) for value in model.graph.output] == [("output", ["batch", "seq", 64])]
    ops = op_types(model)
    assert ops.count("LayerNormalization") == 4
    assert ops.count("Softmax") == 2 and ops.count("Erf") == 2


def test_bert_attention_mask_hides_padded_positions():
    model = generated.bert_model(layers=1, hidden=64, heads=4, intermediate=128)
    feeds = generated.make_inputs(model, batch=1, seq_len=8)
    (full,) = run(model, feeds)
    feeds["input"][:, -1] = 100.0  # a padded position's content must not leak into the others
    feeds["attention_mask"][:, -1] = 0.0
    (masked,) = run(model, feeds)
    np.testing.assert_allclose(
        masked[:, :-1],
        run(model, {"input": feeds["input"][:, :-1], "attention_mask": feeds["attention_mask"][:, :-1]})[0],
        rtol=1e-4,
        atol=1e-4,
    )
    assert not np.allclose(full[:, :-1], masked[:, :-1], atol=1e-6)


def test_make_inputs_follows_model_signature():
    model = generated.bert_model(layers=1, hidden=64, heads=4, intermediate=128, seq_len=32, vocab=50)
    feeds = generated.make_inputs(model, batch=3, seq_len=16)
    assert feeds["input_ids"].shape == (3, 16) and feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 50
    assert (feeds["attention_mask"] == 1).all() and feeds["attention_mask"].shape == (3, 16)
    np.testing.assert_array_equal(feeds["input_ids"], generated.make_inputs(model, batch=3, seq_len=16)["input_ids"])


def test_make_inputs_default_symbolic_dim_is_128():
    model = generated.bert_model(layers=1, hidden=64, heads=4, intermediate=128)
    assert generated.make_inputs(model)["input"].shape == (1, 128, 64)


def test_cli_writes_a_loadable_model(tmp_path):
    out = tmp_path / "bert.onnx"
    generated.main(["bert", str(out), "--seed", "3"])
    model = onnx.load(str(out))
    assert [value.name for value in model.graph.output] == ["output"]
