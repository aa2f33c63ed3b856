"""compressq.graph: safe loading and saving, stamps, and the graph helpers."""

from __future__ import annotations

import builtins
import os
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import compressq.io as io_module
from compressq.errors import ModelError, OutputError
from compressq.graph.edit import remove_unused, toposort
from compressq.graph.index import GraphIndex, tensor_types
from compressq.io import default_output_path, file_size, load_model, read_stamp, save_model, stamp


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------------------------------------------
# load_model: bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="not found") as info:
        load_model(tmp_path / "absent.onnx")
    assert "absent.onnx" in info.value.message


def test_directory_names_a_model_inside(tmp_path, tiny_model):
    onnx.save_model(tiny_model(), str(tmp_path / "inside.onnx"))
    with pytest.raises(ModelError, match="is a directory") as info:
        load_model(tmp_path)
    assert "inside.onnx" in info.value.one_line()


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        load_model(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model\n" * 20)
    with pytest.raises(ModelError, match="not (a readable )?(an )?ONNX model") as info:
        load_model(path)
    assert "notes.onnx" in info.value.message


def test_truncated_protobuf(tmp_path, cnn_path):
    data = cnn_path.read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="half.onnx") as info:
        load_model(path)
    assert "truncated" in info.value.one_line()


def test_checker_failure(tmp_path, build_model):
    model = build_model(
        [helper.make_node("Relu", ["undefined_tensor"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelError, match="fails the ONNX checker") as info:
        load_model(path)
    assert "undefined_tensor" in info.value.message


def test_sample_models_load(cnn_path, mobilenet_path, transformer_path):
    for path in (cnn_path, mobilenet_path, transformer_path):
        model = load_model(path)
        assert len(model.graph.node) > 0


# ---------------------------------------------------------------------------------------------------
# load_model: external data


def save_external(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    """Save with every initializer in `w.data` (on a copy: onnx.save_model strips the weights it moves)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=0)
    return path


def set_location(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))


def test_external_data_loads(tmp_path, tiny_model):
    original = tiny_model()
    path = save_external(original, tmp_path / "model")
    assert (tmp_path / "model" / "w.data").exists()
    loaded = load_model(path)
    assert_same_weights(loaded, original)
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)


@pytest.fixture
def opened_files(monkeypatch) -> list[str]:
    """Absolute paths of every file opened through open() or onnx's external-data opener from now on."""
    opened: list[str] = []
    real_open = builtins.open
    real_open_fd = external_data_helper._open_external_data_fd

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.abspath(file))
        return real_open(file, *args, **kwargs)

    def spy_open_fd(base_dir, location, *args, **kwargs):
        opened.append(os.path.abspath(os.path.join(base_dir, location)))
        return real_open_fd(base_dir, location, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(external_data_helper, "_open_external_data_fd", spy_open_fd)
    return opened


def test_open_spy_sees_external_data(tmp_path, tiny_model, opened_files):
    # Positive control for the refusal tests below: a legitimate load is seen opening its data file.
    path = save_external(tiny_model(), tmp_path)
    load_model(path)
    assert str(tmp_path / "w.data") in opened_files


@pytest.fixture
def escaping_model(tmp_path, tiny_model, opened_files):
    """A model in tmp/model/ whose real weights were moved to tmp/outside.data."""
    path = save_external(tiny_model(), tmp_path / "model")
    outside = tmp_path / "outside.data"
    shutil.move(tmp_path / "model" / "w.data", outside)
    return path, outside, opened_files


def test_external_data_relative_escape_is_refused(escaping_model):
    path, outside, opened = escaping_model
    set_location(path, "../outside.data")
    opened.clear()
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)
    assert str(outside) not in opened


def test_external_data_absolute_path_is_refused(escaping_model):
    path, outside, opened = escaping_model
    set_location(path, str(outside))
    opened.clear()
    with pytest.raises(ModelError, match="absolute"):
        load_model(path)
    assert str(outside) not in opened


def test_external_data_symlink_escape_is_refused(escaping_model):
    path, outside, opened = escaping_model
    (path.parent / "w.data").symlink_to(outside)
    opened.clear()
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)
    assert str(path.parent / "w.data") not in opened


def test_missing_external_data_file(tmp_path, tiny_model):
    path = save_external(tiny_model(), tmp_path)
    (tmp_path / "w.data").unlink()
    with pytest.raises(ModelError, match="external data"):
        load_model(path)


# ---------------------------------------------------------------------------------------------------
# save_model


def test_save_is_atomic_and_clean(tmp_path, tiny_model):
    model = tiny_model()
    target = save_model(model, tmp_path / "out.onnx")
    assert files_in(tmp_path) == {"out.onnx"}
    assert_same_weights(load_model(target), model)


def test_failed_save_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OutputError, match="No space left"):
        save_model(tiny_model(), tmp_path / "out.onnx")
    assert files_in(tmp_path) == set()


def test_failed_save_keeps_existing_target(tmp_path, tiny_model, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def broken_save(*args, **kwargs):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OutputError):
        save_model(tiny_model(), target)
    assert target.read_bytes() == b"previous"
    assert files_in(tmp_path) == {"out.onnx"}


def test_refuses_to_overwrite_protected_input(tmp_path, tiny_model):
    source = tmp_path / "in.onnx"
    onnx.save_model(tiny_model(seed=1), str(source))
    before = source.read_bytes()
    with pytest.raises(OutputError, match="overwrite the input"):
        save_model(tiny_model(), source, protect=[source])
    with pytest.raises(OutputError, match="overwrite the input"):
        save_model(tiny_model(), tmp_path / "in.onnx.data", protect=[source])
    # The same file by another spelling.
    with pytest.raises(OutputError, match="overwrite the input"):
        save_model(tiny_model(), tmp_path / "sub" / ".." / "in.onnx", protect=[str(source)])
    assert source.read_bytes() == before
    assert files_in(tmp_path) == {"in.onnx"}


def test_overwrite_false(tmp_path, tiny_model):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists"):
        save_model(tiny_model(), target, overwrite=False)
    assert target.read_bytes() == b"keep"


def test_large_model_written_with_external_data(tmp_path, tiny_model, monkeypatch):
    weight = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)  # 4 KiB
    model = tiny_model(weight=weight)
    before = model.SerializeToString()
    monkeypatch.setattr(io_module, "EXTERNAL_DATA_THRESHOLD", 1000)
    target = save_model(model, tmp_path / "big.onnx")
    data_file = tmp_path / "big.onnx.data"
    assert files_in(tmp_path) == {"big.onnx", "big.onnx.data"}
    assert data_file.stat().st_size >= weight.nbytes
    assert target.stat().st_size < weight.nbytes
    assert model.SerializeToString() == before, "save_model must not change the caller's model"
    loaded = load_model(target)
    assert_same_weights(loaded, model)
    assert file_size(target) == target.stat().st_size + data_file.stat().st_size


def test_small_model_has_no_side_file(tmp_path, tiny_model):
    save_model(tiny_model(), tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()


# ---------------------------------------------------------------------------------------------------
# Paths and stamps


def test_default_output_path():
    assert default_output_path("models/net.onnx", "int8") == Path("models/net.int8.onnx")
    assert default_output_path(Path("a.b.onnx"), "pruned") == Path("a.b.pruned.onnx")
    assert default_output_path("net", "int8") == Path("net.int8.onnx")


def test_stamp_round_trip_and_replace(tiny_model):
    model = tiny_model()
    model.metadata_props.add(key="author", value="someone")
    stamp(model, "quantize", {"bits": 8, "per_channel": True})
    first = read_stamp(model)
    assert first["command"] == "quantize"
    assert first["settings"] == '{"bits": 8, "per_channel": true}'
    assert first["version"]
    stamp(model, "prune", {"sparsity": 0.5})
    second = read_stamp(model)
    assert second["command"] == "prune"
    assert second["settings"] == '{"sparsity": 0.5}'
    keys = [p.key for p in model.metadata_props]
    assert len(keys) == len(set(keys)) == 4  # author + version, command, settings once each
    assert {p.key: p.value for p in model.metadata_props}["author"] == "someone"


def test_stamp_survives_save(tmp_path, tiny_model):
    model = tiny_model()
    stamp(model, "quantize", {"bits": 8})
    loaded = load_model(save_model(model, tmp_path / "s.onnx"))
    assert read_stamp(loaded) == read_stamp(model)


# ---------------------------------------------------------------------------------------------------
# GraphIndex, toposort, remove_unused, tensor_types


@pytest.fixture
def three_node_model(build_model):
    """x -> Relu -> a; Constant -> c; Mul(a, W) -> b; Add(b, c) -> y. W is also listed as a graph input."""
    w = numpy_helper.from_array(np.full((2,), 3.0, dtype=np.float32), "W")
    c = numpy_helper.from_array(np.array([1.0, -1.0], dtype=np.float32))
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Constant", [], ["c"], name="const", value=c),
        helper.make_node("Mul", ["a", "W"], ["b"], name="mul"),
        helper.make_node("Add", ["b", "c"], ["y"], name="add"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2]),
              helper.make_tensor_value_info("W", TensorProto.FLOAT, [2])]
    return build_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
                       [w])


def test_graph_index(three_node_model):
    index = GraphIndex(three_node_model.graph)
    assert index.producer["a"].name == "relu"
    assert index.producer["y"].name == "add"
    assert "x" not in index.producer
    assert [n.name for n in index.consumers["a"]] == ["mul"]
    assert [n.name for n in index.consumers["x"]] == ["relu"]
    assert index.consumers["y"] == []
    np.testing.assert_array_equal(index.constant("W"), [3.0, 3.0])
    np.testing.assert_array_equal(index.constant("c"), [1.0, -1.0])
    assert index.constant("a") is None
    assert index.is_constant("W") and index.is_constant("c") and not index.is_constant("b")
    assert index.single_consumer("b").name == "add"
    assert index.single_consumer("y") is None
    assert index.graph_inputs == ["x"]
    assert index.graph_outputs == ["y"]


def test_toposort_fixes_shuffled_graph(three_node_model):
    model = three_node_model
    nodes = list(model.graph.node)
    shuffled = [nodes[3], nodes[2], nodes[0], nodes[1]]
    random.Random(0).shuffle(shuffled)
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    toposort(model.graph)
    onnx.checker.check_model(model)
    assert sorted(n.name for n in model.graph.node) == ["add", "const", "mul", "relu"]


def test_toposort_reports_dangling_input(three_node_model):
    three_node_model.graph.node.append(helper.make_node("Neg", ["nowhere"], ["z"], name="neg"))
    with pytest.raises(ModelError, match="nowhere"):
        toposort(three_node_model.graph)


def test_remove_unused_drops_dangling_branch(three_node_model):
    model = three_node_model
    model.graph.initializer.append(numpy_helper.from_array(np.ones(2, dtype=np.float32), "only_for_branch"))
    model.graph.node.extend([
        helper.make_node("Sub", ["a", "only_for_branch"], ["dangling1"], name="dead_sub"),
        helper.make_node("Neg", ["dangling1"], ["dangling2"], name="dead_neg"),
    ])
    model.graph.value_info.append(helper.make_tensor_value_info("dangling2", TensorProto.FLOAT, ["batch", 2]))
    remove_unused(model.graph)
    assert [n.name for n in model.graph.node] == ["relu", "const", "mul", "add"]
    assert [t.name for t in model.graph.initializer] == ["W"]
    assert [v.name for v in model.graph.value_info] == []
    onnx.checker.check_model(model)


def test_tensor_types_keep_symbolic_dim(three_node_model):
    types = tensor_types(three_node_model)
    assert types["x"].shape == ("batch", 2)
    assert types["y"].shape == ("batch", 2)
    assert types["a"].shape == ("batch", 2)  # inferred intermediate keeps the name
    assert types["W"].shape == (2,)
    assert types["x"].elem_type == TensorProto.FLOAT
    assert types["x"].dtype == np.float32
