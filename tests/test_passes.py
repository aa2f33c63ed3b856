"""The pass contract (graph/passes.py): a pass that changes the model's interface or leaves an invalid graph
is caught; every pipeline keeps the interface of tricky graphs (checks are on in all tests: conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import Dataset, load_dataset
from compressq.graph import passes
from compressq.graph.passes import InterfaceChanged, PassResult, interface, run_pass
from compressq.prune import prune_model
from compressq.prune.config import PruneConfig
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig

RNG = np.random.default_rng(0)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_checks_are_on_in_the_tests():
    assert passes.checks_enabled()


def test_a_pass_that_renames_an_output_is_caught(tiny_model):
    def rename_output(model):
        changed = _copy(model)
        changed.graph.node[-1].output[0] = "z"
        changed.graph.output[0].name = "z"
        return PassResult(changed, ["relu"])

    with pytest.raises(InterfaceChanged, match="output 0: y FLOAT"):
        run_pass("renaming", rename_output, tiny_model())


def test_a_pass_that_changes_an_input_type_is_caught(tiny_model):
    def retype_input(model):
        changed = _copy(model)
        changed.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
        return PassResult(changed)

    with pytest.raises(InterfaceChanged, match="input 0"):
        run_pass("retyping", retype_input, tiny_model())


def test_a_pass_that_leaves_a_dangling_input_is_caught(tiny_model):
    def dangle(model):
        changed = _copy(model)
        changed.graph.node[0].input[1] = "no_such_tensor"
        return PassResult(changed)

    with pytest.raises(InterfaceChanged, match="ONNX checker"):
        run_pass("dangling", dangle, tiny_model())


def test_a_pass_that_keeps_the_contract_returns_its_result(tiny_model):
    model = tiny_model()
    result = run_pass("identity", lambda m: PassResult(_copy(m), [], []), model)
    assert interface(result.model) == interface(model)


def test_checks_off_run_the_pass_unchecked(tiny_model):
    passes.enable_checks(False)
    try:
        broken = run_pass("dangling", lambda m: PassResult(onnx.ModelProto()), tiny_model())
    finally:
        passes.enable_checks()
    assert not broken.model.graph.node


# ---------------------------------------------------------------------------------------------------
# Tricky graphs through every pipeline: the postcondition inside quantize_model/prune_model must hold.


def _tricky_model() -> onnx.ModelProto:
    """Two outputs (one also consumed inside), a pass-through output, symbolic batch, Conv + MatMul + Gemm."""
    conv_w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
    mat_w = RNG.standard_normal((8, 16)).astype(np.float32)
    gemm_w = RNG.standard_normal((16, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"], name="relu"),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "mat_w"], ["hidden"], name="matmul"),
        helper.make_node("Gemm", ["hidden", "gemm_w"], ["logits"], name="gemm"),
        helper.make_node("Identity", ["mask"], ["mask_out"], name="pass_mask"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]),
               helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", 16]),
               helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["batch", "seq"])]
    weights = [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(mat_w, "mat_w"),
               numpy_helper.from_array(gemm_w, "gemm_w")]
    graph = helper.make_graph(nodes, "tricky", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _data(model: onnx.ModelProto, folder: Path, samples: int = 16) -> Dataset:
    path = folder / "data.npz"
    np.savez(path, x=RNG.standard_normal((samples, 3, 8, 8)).astype(np.float32), mask=np.ones((samples, 5), np.int64))
    return load_dataset(path, model)


@pytest.mark.parametrize("settings", [
    dict(mode="static", speed_check=False),
    dict(mode="dynamic", speed_check=False),
    dict(mode="weight-only", bits=4, block_size=16, speed_check=False),
])
def test_quantize_keeps_the_interface_of_a_tricky_graph(settings, tmp_path):
    model = _tricky_model()
    result = quantize_model(model, _data(model, tmp_path), QuantizeConfig(**settings))
    assert interface(result.model) == interface(model)


@pytest.mark.parametrize("pattern,data", [("unstructured", None), ("unstructured", "refit"), ("channel", None)])
def test_prune_keeps_the_interface_of_a_tricky_graph(pattern, data, tmp_path):
    model = _tricky_model()
    config = PruneConfig.from_options(0.5, pattern, keep_first=False, keep_last=False, min_parameters=1,
                                      channel_multiple=1)
    result = prune_model(model, config, _data(model, tmp_path) if data else None)
    assert interface(result.model) == interface(model)


def test_as_pass_reads_what_changed_off_the_graphs_and_the_reasons_off_the_report(tiny_model):
    """A `model -> (model, report)` algorithm as a pass: rewritten and added nodes are `modified`; reasons by
    node or by tensor name become Skip entries naming the node; the report is the pass's details."""
    model = tiny_model()

    def rewrite(m):
        changed = _copy(m)
        changed.graph.node[0].name = changed.graph.node[0].name  # untouched
        changed.graph.node[-1].op_type = "Sigmoid"
        changed.graph.node.append(helper.make_node("Identity", [changed.graph.output[0].name], ["extra"],
                                                   name="added"))
        return changed, {"first": model.graph.node[0].name, "tensor": model.graph.node[0].output[0]}

    result = passes.as_pass(rewrite, lambda report: {report["first"]: "too small",
                                                     report["tensor"]: "not finite"})(model)
    assert result.modified == [model.graph.node[-1].name, "added"]
    first = model.graph.node[0]
    assert result.skipped == [passes.Skip(first.name, first.op_type, "too small"),
                              passes.Skip(first.name, first.op_type, f"{first.output[0]}: not finite")]
    assert result.details == {"first": first.name, "tensor": first.output[0]}


def _recorded_passes(monkeypatch) -> list[str]:
    names: list[str] = []
    real = passes.run_pass

    def recording(what, transform, model):
        names.append(what)
        return real(what, transform, model)

    import compressq.prune as prune_module
    import compressq.quantize.api as api_module
    import compressq.quantize.static as static_module
    for module in (static_module, api_module, prune_module):
        monkeypatch.setattr(module, "run_pass", recording)
    return names


@pytest.mark.parametrize(("settings", "expected"), [
    (dict(mode="static", speed_check=False, equalize=True, smoothquant=0.5, outlier_channels=2),
     ["opset conversion", "clean-up", "cross-layer equalization", "SmoothQuant", "outlier channels",
      "embedding tables to uint8", "QDQ rewrite"]),
    (dict(mode="dynamic", speed_check=False), ["dynamic int8", "embedding tables to uint8"]),
    (dict(mode="weight-only", bits=4, block_size=16, speed_check=False), ["int4 weight-only"]),
])
def test_every_transformation_of_a_quantize_runs_as_a_checked_pass(settings, expected, monkeypatch, tmp_path):
    model = _tricky_model()
    ran = _recorded_passes(monkeypatch)
    quantize_model(model, _data(model, tmp_path), QuantizeConfig(**settings))
    assert list(dict.fromkeys(ran)) == expected


def test_a_transformation_that_breaks_the_interface_is_named_by_its_own_pass(monkeypatch, tmp_path):
    """The check runs after each pass, not only at the end: the pass that broke the model is the one named."""
    import compressq.quantize.static as static_module

    real = static_module.smooth

    def renaming(model, *args, **kwargs):
        result, report = real(model, *args, **kwargs)
        result.graph.output[0].name = "renamed"
        return result, report

    monkeypatch.setattr(static_module, "smooth", renaming)
    model = _tricky_model()
    with pytest.raises(InterfaceChanged, match="SmoothQuant changed model output 0"):
        quantize_model(model, _data(model, tmp_path), QuantizeConfig(speed_check=False, smoothquant=0.5))


def test_prune_runs_as_a_checked_pass(monkeypatch, tmp_path):
    model = _tricky_model()
    ran = _recorded_passes(monkeypatch)
    config = PruneConfig.from_options(0.5, "channel", keep_first=False, keep_last=False, min_parameters=1,
                                      channel_multiple=1)
    prune_model(model, config)
    assert ran == ["pruning"]


def test_a_dim_of_minus_one_is_unknown_not_a_size(tiny_model):
    """Paddle exports write -1 for an unknown batch; shape inference turns it into an unnamed dim."""
    model = tiny_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    rewritten = _copy(model)
    rewritten.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    assert interface(rewritten) == interface(model)
    run_pass("shape inference", lambda m: PassResult(rewritten), model)


def test_inspect_a_model_loaded_without_its_weights_that_normalization_touched(run_cli, tmp_path, monkeypatch):
    """inspect reads weights lazily (they still point at m.data); normalizing its unnamed node must not make
    the in-memory checker look for m.data relative to the current directory (exit 3 before the fix)."""
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    result = run_cli("inspect", folder / "m.onnx")
    assert result.exit_code == 0, result.stderr
    assert "Parameters: 4,096" in result.stdout
