"""Mixed precision for 4-bit weight-only: layers widened to 8 bits until an accuracy target is met."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import load_dataset
from compressq.errors import TargetNotMet
from compressq.graph.edit import transplant_nodes
from compressq.graph.index import node_attributes
from compressq.quantize.accuracy import AccuracyProbe, AccuracyTarget, Figures
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.precision import Layer, group_of, widening_order
from compressq.quantize.weight_only import quantize_weights_only
from compressq.runtime import create_session
from tests.conftest import make_model

WIDTH, BLOCKS, CLASSES = 64, 3, 32


def residual_stack(seed: int = 0) -> onnx.ModelProto:
    """x -> BLOCKS x (up -> Relu -> down, added back) -> head: numbered blocks, as exporters name them."""
    rng = np.random.default_rng(seed)
    nodes, weights, current = [], [], "x"
    for block in range(BLOCKS):
        up, down = f"blocks.{block}/up/W", f"blocks.{block}/down/W"
        weights += [numpy_helper.from_array(rng.standard_normal((WIDTH, 2 * WIDTH)).astype(np.float32) / 8, up),
                    numpy_helper.from_array(rng.standard_normal((2 * WIDTH, WIDTH)).astype(np.float32) / 11, down)]
        nodes += [helper.make_node("MatMul", [current, up], [f"b{block}_up"], name=f"/blocks.{block}/up/MatMul"),
                  helper.make_node("Relu", [f"b{block}_up"], [f"b{block}_act"], name=f"/blocks.{block}/act"),
                  helper.make_node("MatMul", [f"b{block}_act", down], [f"b{block}_down"],
                                   name=f"/blocks.{block}/down/MatMul"),
                  helper.make_node("Add", [current, f"b{block}_down"], [f"b{block}_out"], name=f"/blocks.{block}/add")]
        current = f"b{block}_out"
    weights.append(numpy_helper.from_array(rng.standard_normal((WIDTH, CLASSES)).astype(np.float32) / 8, "head/W"))
    nodes.append(helper.make_node("MatMul", [current, "head/W"], ["logits"], name="/head/MatMul"))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], weights)


@pytest.fixture
def stack(tmp_path: Path):
    model = residual_stack()
    path = tmp_path / "stack.onnx"
    onnx.save(model, path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((64, WIDTH)).astype(np.float32))
    return model, path, data, load_dataset(data, model)


def _cosine(stack, candidate: onnx.ModelProto) -> float:
    model, _, _, dataset = stack
    return AccuracyProbe(model, dataset).measure(candidate).min_cosine


def _bits(model: onnx.ModelProto) -> dict[str, int]:
    return {node.output[0]: node_attributes(node)["bits"] for node in model.graph.node if node.op_type == "MatMulNBits"}


def test_group_of_replaces_every_number() -> None:
    assert group_of("/model/layers.12/mlp/up_proj/MatMul") == "/model/layers.#/mlp/up_proj/MatMul"
    assert group_of("/lm_head/MatMul") == "/lm_head/MatMul"


def test_widening_order_ranks_groups_by_gain_per_weight_then_own_error() -> None:
    layers = [Layer("/b.0/big/MatMul", "a", 400, 9.0), Layer("/b.1/big/MatMul", "b", 400, 1.0),
              Layer("/b.0/small/MatMul", "c", 100, 0.5), Layer("/b.1/small/MatMul", "d", 100, 2.0)]
    # base distance 0.10: the big group gains 0.04 over 800 weights, the small group 0.02 over 200 (2x per weight)
    order = widening_order(layers, {"/b.#/big/MatMul": 0.06, "/b.#/small/MatMul": 0.08}, 0.10)
    assert order == ["/b.1/small/MatMul", "/b.0/small/MatMul", "/b.0/big/MatMul", "/b.1/big/MatMul"]
    assert widening_order(layers, {}, 0.10)[0] == "/b.0/big/MatMul"  # nothing measured: own error alone


def test_min_cosine_target_is_met_on_the_data() -> None:
    target = AccuracyTarget(min_cosine=0.99)
    figures = Figures(agreement=None, accuracy=None, reference_accuracy=None, min_cosine=0.995, min_sqnr_db=20.0)
    assert target.met(figures) and target.given
    assert not target.met(Figures(None, None, None, 0.985, 15.0))
    assert not target.met(Figures(None, None, None, None, None))
    assert "cosine 0.9950" in target.describe(figures) and "target >= 0.99" in target.describe(figures)
    assert not AccuracyTarget().given


def test_transplant_moves_nodes_and_their_weights_only(stack) -> None:
    model = stack[0]
    narrow, _ = quantize_weights_only(model, bits=4)
    wide, _ = quantize_weights_only(model, bits=8)
    mixed = transplant_nodes(narrow, wide, ["b1_down", "logits"])
    onnx.checker.check_model(mixed)
    assert _bits(mixed) == {**_bits(narrow), "b1_down": 8, "logits": 8}
    used = {name for node in mixed.graph.node for name in node.input}
    assert {tensor.name for tensor in mixed.graph.initializer} <= used  # the 4-bit codes they replaced are gone
    # the moved nodes compute exactly what they compute in the 8-bit model
    x = {"x": np.random.default_rng(2).standard_normal((4, WIDTH)).astype(np.float32)}
    fetch = ["b1_down"]
    mixed_value = create_session(_with_output(mixed, "b1_down")).run(fetch, {"x": x["x"]})[0]
    narrow_input = create_session(_with_output(narrow, "b1_act")).run(["b1_act"], x)[0]
    down = next(n for n in wide.graph.node if n.output[0] == "b1_down")
    alone = helper.make_model(helper.make_graph(
        [down], "down", [helper.make_tensor_value_info("b1_act", TensorProto.FLOAT, ["batch", 2 * WIDTH])],
        [helper.make_tensor_value_info("b1_down", TensorProto.FLOAT, ["batch", WIDTH])],
        [t for t in wide.graph.initializer if t.name in down.input]), opset_imports=list(wide.opset_import))
    np.testing.assert_allclose(mixed_value, create_session(alone).run(fetch, {"b1_act": narrow_input})[0], rtol=1e-6)
    with pytest.raises(Exception, match="no node of the donor"):
        transplant_nodes(narrow, wide, ["nowhere"])


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def _config(**target) -> QuantizeConfig:
    return QuantizeConfig(mode="weight-only", bits=4, speed_check=False, **target)


def test_layers_go_to_8_bits_until_the_cosine_target_is_met(stack) -> None:
    model, _, _, dataset = stack
    plain = quantize_model(model, dataset, _config())
    all_wide, _ = quantize_weights_only(model, bits=8, block_size=128)
    narrow_cosine, wide_cosine = _cosine(stack, plain.model), _cosine(stack, all_wide)
    assert narrow_cosine < wide_cosine
    goal = narrow_cosine + 0.5 * (wide_cosine - narrow_cosine)

    result = quantize_model(model, dataset, _config(min_cosine=goal))
    bits = _bits(result.model)
    widened = [name for name, b in bits.items() if b == 8]
    assert 0 < len(widened) < len(bits)
    assert _cosine(stack, result.model) >= goal  # measured again here, not read from the report
    report = result.summary.error_correction["precision"]
    assert report["after"]["min_cosine"] >= goal > report["before"]["min_cosine"]
    assert len(report["wide_layers"]) == len(widened)
    assert set(report["groups"]) == {"/blocks.#/up/MatMul", "/blocks.#/down/MatMul", "/head/MatMul"}
    assert any("layers at 8 bits to meet the target" in note for note in result.summary.notes)
    again = quantize_model(model, dataset, _config(min_cosine=goal))
    assert again.model.SerializeToString() == result.model.SerializeToString()  # same decisions, same bytes


def test_a_target_the_4_bit_model_meets_widens_nothing(stack) -> None:
    model, _, _, dataset = stack
    result = quantize_model(model, dataset, _config(min_cosine=0.5))
    assert set(_bits(result.model).values()) == {4}
    assert result.summary.error_correction["precision"]["wide_layers"] == []


def test_a_target_out_of_reach_even_at_8_bits_fails_the_gate(stack) -> None:
    model, _, _, dataset = stack
    with pytest.raises(TargetNotMet, match="every layer at 8 bits"):
        quantize_model(model, dataset, _config(min_cosine=0.9999999))


def test_cli_min_cosine(stack, run_cli, tmp_path: Path) -> None:
    _, path, data, _ = stack
    out = tmp_path / "stack.int4.onnx"
    result = run_cli("quantize", path, "--mode", "weight-only", "-d", data, "--min-cosine", "0.5", "-o", out,
                     "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["error_correction"]["precision"]["after"]["min_cosine"] >= 0.5
    refused = run_cli("quantize", path, "--mode", "dynamic", "--min-cosine", "0.9", "-o", tmp_path / "d.onnx")
    assert refused.exit_code == 2 and "accuracy targets" in refused.stderr
    assert "Traceback" not in refused.stderr
    eight = run_cli("quantize", path, "--mode", "weight-only", "--bits", "8", "-d", data, "--min-cosine", "0.9",
                    "-o", tmp_path / "e.onnx")
    assert eight.exit_code == 2
