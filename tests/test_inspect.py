"""`compressq inspect`: every figure checked against counts computed here with numpy and onnx."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.io import save_model, stamp

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
SAMPLE_MODELS = ("digits_cnn", "digits_mobilenet", "digits_transformer")


def inspect_json(run_cli, path: Path) -> dict:
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def dtype_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def shape_of(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_sample_model_figures(run_cli, name):
    path = SAMPLES / f"{name}.onnx"
    summary = inspect_json(run_cli, path)
    model = onnx.load(str(path))
    arrays = {t.name: (t.data_type, numpy_helper.to_array(t)) for t in model.graph.initializer}

    assert summary["parameters"] == sum(a.size for _, a in arrays.values())
    assert summary["parameter_bytes"] == sum(a.nbytes for _, a in arrays.values())
    by_dtype: dict[str, list[int]] = {}
    for elem_type, array in arrays.values():
        totals = by_dtype.setdefault(dtype_name(elem_type), [0, 0])
        totals[0] += array.size
        totals[1] += array.nbytes
    assert {k: [v["parameters"], v["bytes"]] for k, v in summary["by_dtype"].items()} == by_dtype

    assert summary["op_histogram"] == dict(Counter(n.op_type for n in model.graph.node))
    assert summary["node_count"] == len(model.graph.node)

    initializer_names = set(arrays)
    expected_inputs = [(v.name, shape_of(v)) for v in model.graph.input if v.name not in initializer_names]
    assert [(i["name"], i["shape"]) for i in summary["inputs"]] == expected_inputs
    assert [(o["name"], o["shape"]) for o in summary["outputs"]] == [(v.name, shape_of(v))
                                                                     for v in model.graph.output]
    assert summary["inputs"][0]["shape"][0] == "batch"
    assert all(i["dtype"] == "float" for i in summary["inputs"])

    for info in summary["initializers"]:
        _, array = arrays[info["name"]]
        assert info["parameters"] == array.size
        assert info["shape"] == list(array.shape)
        assert info["zero_fraction"] == pytest.approx(np.count_nonzero(array == 0) / array.size)
    total_zeros = sum(np.count_nonzero(a == 0) for _, a in arrays.values())
    assert summary["zero_fraction"] == pytest.approx(total_zeros / summary["parameters"])

    assert summary["file_bytes"] == os.path.getsize(path)
    assert summary["opset"] == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert summary["quantization"]["is_quantized"] is False


def test_transformer_lists_both_inputs(run_cli, transformer_path):
    summary = inspect_json(run_cli, transformer_path)
    assert [(i["name"], i["shape"]) for i in summary["inputs"]] == [("input", ["batch", 8, 8]),
                                                                     ("mask", ["batch", 8])]


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_human_output(run_cli, name):
    path = SAMPLES / f"{name}.onnx"
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.stderr
    parameters = sum(numpy_helper.to_array(t).size for t in onnx.load(str(path)).graph.initializer)
    assert f"Parameters: {parameters:,}" in result.stdout
    assert "Quantization: none" in result.stdout
    assert "batch" in result.stdout
    assert result.stderr == ""


def test_known_zero_fraction(run_cli, tmp_path, tiny_model):
    weight = np.arange(1, 33, dtype=np.float32).reshape(4, 8)
    weight.flat[[0, 3, 5, 10, 11, 20, 30, 31]] = 0.0  # 8 of 32: a quarter
    path = tmp_path / "sparse.onnx"
    onnx.save_model(tiny_model(weight=weight), str(path))
    summary = inspect_json(run_cli, path)
    fractions = {i["name"]: i["zero_fraction"] for i in summary["initializers"]}
    assert fractions["W"] == 0.25
    assert fractions["B"] == 0.0
    assert summary["zero_fraction"] == pytest.approx(8 / (32 + 8))
    assert "25.0%" in run_cli("inspect", path).stdout


def test_file_size_includes_external_data(run_cli, tmp_path, tiny_model):
    path = tmp_path / "ext.onnx"
    onnx.save_model(tiny_model(weight=np.ones((4, 64), np.float32)), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.weights", size_threshold=0)
    summary = inspect_json(run_cli, path)
    assert summary["file_bytes"] == path.stat().st_size + (tmp_path / "ext.weights").stat().st_size
    assert summary["parameter_bytes"] == (4 * 64 + 64) * 4


def test_json_is_the_only_stdout(run_cli, cnn_path):
    result = run_cli("inspect", "--json", cnn_path)
    assert result.exit_code == 0
    assert isinstance(json.loads(result.stdout), dict)
    assert result.stdout.lstrip().startswith("{") and result.stdout.rstrip().endswith("}")
    assert "{" not in result.stderr


def test_stamp_is_reported(run_cli, tmp_path, tiny_model):
    model = tiny_model()
    stamp(model, "quantize", {"bits": 8})
    path = save_model(model, tmp_path / "stamped.onnx")
    summary = inspect_json(run_cli, path)
    assert summary["compressq"]["command"] == "quantize"
    assert json.loads(summary["compressq"]["settings"]) == {"bits": 8}


# ---------------------------------------------------------------------------------------------------
# Quantization state


def qdq_model(build_model) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul(., DequantizeLinear(int8 W)) -> y."""
    w_q = np.array([[1, -2, 3], [0, 5, -6], [7, 0, 9], [-10, 11, 0]], dtype=np.int8)
    initializers = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(np.array(0.1, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"]),
        helper.make_node("MatMul", ["x_dq", "w"], ["y"]),
    ]
    return build_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], initializers)


def test_qdq_model_quantization_state(run_cli, tmp_path, build_model):
    path = tmp_path / "qdq.onnx"
    onnx.save_model(qdq_model(build_model), str(path))
    summary = inspect_json(run_cli, path)
    state = summary["quantization"]
    assert state["quantize_linear"] == 1
    assert state["dequantize_linear"] == 2
    assert state["low_bit_initializers"] == {"int8": 3}
    assert state["quantized_ops"] == {}
    assert state["is_quantized"] is True
    assert summary["by_dtype"]["int8"] == {"parameters": 12 + 1 + 1, "bytes": 14}
    assert summary["by_dtype"]["float"] == {"parameters": 2, "bytes": 8}
    fractions = {i["name"]: i["zero_fraction"] for i in summary["initializers"]}
    assert fractions["w_q"] == pytest.approx(3 / 12)
    assert "1 QuantizeLinear, 2 DequantizeLinear, 3 int8 initializers" in run_cli("inspect", path).stdout


@pytest.mark.parametrize("count", [7, 8])
def test_int4_initializer(run_cli, tmp_path, build_model, count):
    values = [(i % 15) - 7 for i in range(count)]
    values[0] = 0
    w4 = helper.make_tensor("w4", TensorProto.INT4, [count], values)
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    model = build_model([helper.make_node("DequantizeLinear", ["w4", "scale"], ["w"]),
                         helper.make_node("Mul", ["x", "w"], ["y"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", count])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", count])],
                        [w4, scale], opset=21)
    model.ir_version = 10
    onnx.checker.check_model(model)
    path = tmp_path / "int4.onnx"
    onnx.save_model(model, str(path))
    summary = inspect_json(run_cli, path)
    assert summary["by_dtype"]["int4"] == {"parameters": count, "bytes": math.ceil(count / 2)}
    assert summary["quantization"]["low_bit_initializers"] == {"int4": 1}
    assert summary["quantization"]["dequantize_linear"] == 1
    info = next(i for i in summary["initializers"] if i["name"] == "w4")
    assert info["dtype"] == "int4"
    assert info["zero_fraction"] == pytest.approx(values.count(0) / count)
    assert summary["parameter_bytes"] == math.ceil(count / 2) + 4


def test_file_size_reads_the_references_of_the_model_already_loaded(tmp_path, monkeypatch):
    """Sizes on disk count the external data a model references; given the model as loaded, the file is not
    parsed again (a model with inline weights would be read whole once more)."""
    from compressq import io as model_io
    from tests.conftest import tiny

    path = tmp_path / "m.onnx"
    onnx.save_model(tiny(), str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    expected = path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert model_io.file_size(path) == expected
    loaded = model_io.load_model(path, read_weights=False)
    inline = tmp_path / "inline.onnx"
    onnx.save_model(tiny(), str(inline))
    monkeypatch.setattr(model_io.onnx, "load", lambda *a, **k: pytest.fail("parsed the file again"))
    assert model_io.file_size(path, loaded=loaded) == expected
    assert model_io.file_size(inline) == inline.stat().st_size  # no "location" in it: nothing to parse for


@pytest.mark.parametrize("chunk", [3, 5, 8, 64])
def test_a_word_is_found_across_chunk_boundaries(tmp_path, chunk):
    from compressq.io import _mentions

    (tmp_path / "yes").write_bytes(b"abcdefg-location-xyz" * 3)
    (tmp_path / "no").write_bytes(b"abcdefg-locatio-n-xyz" * 3)
    assert _mentions(tmp_path / "yes", b"location", chunk) and not _mentions(tmp_path / "no", b"location", chunk)


def test_a_model_with_inline_weights_is_checked_from_its_file_not_from_a_copy(tmp_path, monkeypatch):
    """The checker reads the file before Python parses it: its copy and Python's are never held at once."""
    from compressq import io as model_io
    from tests.conftest import tiny

    path = tmp_path / "m.onnx"
    onnx.save_model(tiny(), str(path))
    checked = []
    real = onnx.checker.check_model
    monkeypatch.setattr(model_io.onnx.checker, "check_model", lambda m, *a, **k: checked.append(type(m)) or real(m))
    model_io.load_model(path)
    assert checked == [str]


def test_a_big_model_made_in_memory_is_checked_as_a_skeleton_and_still_refused_when_broken(monkeypatch):
    from compressq import io as model_io
    from compressq.errors import ModelError
    from tests.conftest import tiny

    monkeypatch.setattr(model_io, "IN_MEMORY_CHECK_LIMIT", 16)
    model = tiny()
    serialized = []
    real = onnx.checker.check_model
    monkeypatch.setattr(model_io.onnx.checker, "check_model",
                        lambda m, *a, **k: serialized.append(not isinstance(m, str)) or real(m, *a, **k))
    model_io.check_model(model)
    assert serialized == [False]  # the skeleton's file, not the proto
    model.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ModelError, match="fails the ONNX checker"):
        model_io.check_model(model)
