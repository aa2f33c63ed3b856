"""prune/structured.py: channel groups, and surgery whose output matches references.

The reference for a pruned model is the *dense* model with the removed channels' weights zeroed in every
consumer: removed channels then contribute nothing downstream (whatever BatchNorm's beta or a ReLU does
to them upstream), which is exactly what deleting them computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.graph.index import GraphIndex
from compressq.prune import PruneConfig, prune_model
from compressq.prune.plan import plan_pruning
from compressq.prune.structured import (
    ChannelGroup,
    block_indices,
    choose_channels,
    remove_channels,
    trace_channel_groups,
)
from compressq.runtime import create_session
from sample_models.generated import make_inputs, resnet_model, tiny_conv
from tests.conftest import SAMPLES, make_model

EVERYTHING = dict(min_parameters=0, keep_first=False, channel_multiple=1)


def groups_of(model: onnx.ModelProto, config: PruneConfig) -> list[ChannelGroup]:
    plan = plan_pruning(model, config)
    return trace_channel_groups(model, {layer.node: None for layer in plan.layers}
                                | {d.node: d.reason for d in plan.dense})


def surgery(model: onnx.ModelProto, config: PruneConfig):
    groups = groups_of(model, config)
    kept = choose_channels(model, groups, config.sparsity, config.criterion, config.seed, config.channel_multiple)
    return groups, kept, remove_channels(model, groups, kept)


def zeroed_reference(model: onnx.ModelProto, groups: list[ChannelGroup], kept: dict) -> onnx.ModelProto:
    """The dense model, with every consumer's weights for removed input channels set to zero."""
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    index = GraphIndex(reference.graph)
    nodes = {node.name: node for node in reference.graph.node}
    for position, keep in kept.items():
        group = groups[position]
        for cut in group.slices:
            if cut.node not in group.consumers or cut.input_index != 1:
                continue
            tensor = index.initializers[nodes[cut.node].input[1]]
            weight = numpy_helper.to_array(tensor).copy()
            removed = np.setdiff1d(np.arange(weight.shape[cut.axis]), block_indices(keep, cut.block))
            index_tuple = [slice(None)] * weight.ndim
            index_tuple[cut.axis] = removed
            weight[tuple(index_tuple)] = 0
            tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
    return reference


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return create_session(model).run(None, feeds)


def assert_valid_and_equivalent(dense: onnx.ModelProto, config: PruneConfig, feeds: dict) -> onnx.ModelProto:
    groups, kept, pruned = surgery(dense, config)
    assert kept, "expected some channels to go"
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, strict_mode=True)  # every tensor's shape is consistent
    assert sum(t.ByteSize() for t in pruned.graph.initializer) < sum(t.ByteSize() for t in dense.graph.initializer)
    outputs = run(pruned, feeds)
    for got, expected in zip(outputs, run(zeroed_reference(dense, groups, kept), feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(outputs[0], run(dense, feeds)[0], atol=1e-4)  # the comparison has teeth
    return pruned


def test_two_gemms_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((16, 6)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    w2, b2 = rng.standard_normal((3, 16)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                       [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    _, kept, pruned = surgery(model, PruneConfig(sparsity=0.5, **EVERYTHING))
    keep = kept[0]
    expected_kept = np.sort(np.argsort(np.linalg.norm(w1, axis=1))[8:])
    np.testing.assert_array_equal(keep, expected_kept)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    expected = np.maximum(x @ w1[keep].T + b1[keep], 0) @ w2[:, keep].T + b2
    np.testing.assert_allclose(run(pruned, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_tiny_conv_chain_shrinks_and_matches_the_reference():
    model = tiny_conv(hidden=8)
    pruned = assert_valid_and_equivalent(model, PruneConfig(sparsity=0.5, **EVERYTHING), make_inputs(model, 2))
    weights = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert weights["conv1.weight"] == (4, 3, 3, 3) and weights["conv2.weight"] == (4, 4, 3, 3)


@pytest.mark.parametrize("options", [dict(EVERYTHING), dict(channel_multiple=8)], ids=["all-layers", "defaults"])
def test_resnet_with_residual_adds_matches_the_reference(options):
    model = resnet_model(image_size=32, widths=(8, 16, 32, 64), num_classes=10)
    pruned = assert_valid_and_equivalent(model, PruneConfig(sparsity=0.3, **options), make_inputs(model, 2))
    assert len(pruned.graph.node) == len(model.graph.node)


def test_residual_groups_are_pruned_together_or_not_at_all():
    model = resnet_model(image_size=32, widths=(8, 16, 32, 64), num_classes=10)
    groups = groups_of(model, PruneConfig(sparsity=0.3, channel_multiple=1, min_parameters=0))
    by_producer = {name: group for group in groups for name in group.producer_nodes}
    stage2 = by_producer["layer2.0.downsample.conv"]
    assert {"layer2.0.1.conv", "layer2.1.1.conv"} <= set(stage2.producer_nodes) and stage2.prunable
    stage1 = by_producer["stem.conv"]  # the stem is the first layer, left dense: its whole residual group too
    assert {"layer1.0.1.conv", "layer1.1.1.conv"} <= set(stage1.producer_nodes)
    assert not stage1.prunable and "stem.conv" in stage1.blocked[0]
    assert by_producer["layer1.0.0.conv"].prunable  # inside a block: its own group


def test_mobilenet_depthwise_convs_follow_their_channels_and_outputs_match():
    model = onnx.load(str(SAMPLES / "digits_mobilenet.onnx"))
    data = dict(np.load(SAMPLES / "digits_calib.npz"))
    pruned = assert_valid_and_equivalent(model, PruneConfig(sparsity=0.3, **EVERYTHING), {"input": data["input"][:8]})
    for node in pruned.graph.node:
        if node.op_type == "Conv" and "depthwise" in node.name:
            group = next(a.i for a in node.attribute if a.name == "group")
            weight = next(t for t in pruned.graph.initializer if t.name == node.input[1])
            assert group == weight.dims[0] < 64


def test_flatten_maps_each_channel_to_its_block_of_features():
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    data = dict(np.load(SAMPLES / "digits_calib.npz"))
    pruned = assert_valid_and_equivalent(model, PruneConfig(sparsity=0.3, **EVERYTHING), {"input": data["input"][:8]})
    fc1 = next(n for n in pruned.graph.node if n.name == "/classifier/classifier.1/Gemm")
    conv2 = next(n for n in pruned.graph.node if n.name == "/features/features.1/features.1.0/Conv")
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert shapes[fc1.input[1]][1] == shapes[conv2.input[1]][0] * 16  # channels x 4x4 positions


def conv_reshape_gemm_model(target: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    arrays = {"w": rng.standard_normal((8, 2, 3, 3)), "fc": rng.standard_normal((8 * 16, 5)),
              "shape": np.array(target, dtype=np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape"),
             helper.make_node("MatMul", ["flat", "fc"], ["y"], name="fc")]
    initializers = [numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k)
                    for k, v in arrays.items()]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])], initializers)


@pytest.mark.parametrize("target", [[3, 128], [-1, 128], [0, -1]])
def test_reshape_to_features_is_rewritten_when_it_names_the_width(target):
    model = conv_reshape_gemm_model(target)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 2, 4, 4)).astype(np.float32)}
    pruned = assert_valid_and_equivalent(model, PruneConfig(sparsity=0.5, **EVERYTHING), feeds)
    shape = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name.startswith("shape")))
    assert shape[1] == (64 if target[1] == 128 else -1)


def two_branch_model(join: str) -> onnx.ModelProto:
    """x -> conv_a, conv_b -> (Concat | Add) -> conv_c -> y."""
    rng = np.random.default_rng(3)
    mid = 16 if join == "Concat" else 8
    weights = {"wa": (8, 2, 1, 1), "wb": (8, 2, 1, 1), "wc": (4, mid, 1, 1)}
    initializers = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()]
    attributes = {"axis": 1} if join == "Concat" else {}
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
             helper.make_node(join, ["a", "b"], ["j"], name="join", **attributes),
             helper.make_node("Conv", ["j", "wc"], ["y"], name="conv_c")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], initializers)


def test_concat_leaves_its_producers_unpruned_and_says_why():
    groups = groups_of(two_branch_model("Concat"), PruneConfig(sparsity=0.5, **EVERYTHING))
    for group in groups:
        if {"conv_a", "conv_b"} & set(group.producer_nodes):
            assert not group.prunable and "Concat 'join'" in group.blocked[0]


def test_add_joins_both_branches_into_one_group():
    model = two_branch_model("Add")
    config = PruneConfig(sparsity=0.5, **EVERYTHING)
    joined = next(g for g in groups_of(model, config) if "conv_a" in g.producer_nodes)
    assert set(joined.producer_nodes) == {"conv_a", "conv_b"} and joined.prunable
    assert_valid_and_equivalent(model, config, {"x": np.ones((1, 2, 4, 4), np.float32)})


def test_graph_outputs_and_untracked_operands_block_a_group():
    model = two_branch_model("Add")
    model.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 8, 4, 4]))
    group = next(g for g in groups_of(model, PruneConfig(sparsity=0.5, **EVERYTHING)) if "conv_a" in g.producer_nodes)
    assert not group.prunable and "graph output 'a'" in " ".join(group.blocked)


def test_prune_model_channel_reports_layers_dense_reasons_and_a_smaller_model():
    model = resnet_model(image_size=32, widths=(8, 16, 32, 64), num_classes=10)
    result = prune_model(model, PruneConfig(sparsity=0.3, pattern="channel", channel_multiple=1, min_parameters=0))
    summary = result.summary
    assert abs(summary.achieved_sparsity - 0.3) <= 0.02
    assert summary.parameters_after < 0.75 * summary.parameters_before
    reasons = {d.node: d.reason for d in summary.dense_layers}
    assert "first weighted layer" in reasons["stem.conv"] and "stem.conv" in reasons["layer1.0.1.conv"]
    assert "last weighted layer" in reasons["fc"]
    feeds = make_inputs(model, 2)
    assert run(result.model, feeds)[0].shape == (2, 10)


def test_channel_pruning_never_modifies_the_input_model():
    model = tiny_conv(hidden=8)
    before = model.SerializeToString()
    prune_model(model, PruneConfig(sparsity=0.5, pattern="channel", **EVERYTHING))
    assert model.SerializeToString() == before


def test_convtranspose_gemm_without_transb_and_batchnorm_on_features_match_the_reference():
    """Conv -> ConvTranspose -> Relu -> Flatten -> Gemm(transB=0) -> BatchNorm -> Relu -> MatMul."""
    rng = np.random.default_rng(4)
    arrays = {"wc": (6, 2, 3, 3), "wt": (6, 8, 2, 2), "bt": (8,), "wg": (8 * 64, 12), "bg": (12,),
              "scale": (12,), "shift": (12,), "mean": (12,), "wm": (12, 3)}
    initializers = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in arrays.items()]
    initializers.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, 12).astype(np.float32), "var"))
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["c", "wt", "bt"], ["t"], name="deconv", strides=[2, 2]),
             helper.make_node("Relu", ["t"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="gemm"),
             helper.make_node("BatchNormalization", ["g", "scale", "shift", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["h"], name="relu2"),
             helper.make_node("MatMul", ["h", "wm"], ["y"], name="head")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], initializers)
    feeds = {"x": rng.standard_normal((3, 2, 4, 4)).astype(np.float32)}
    pruned = assert_valid_and_equivalent(model, PruneConfig(sparsity=0.5, **EVERYTHING), feeds)
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert shapes["wc"] == (3, 2, 3, 3) and shapes["wt"] == (3, 4, 2, 2) and shapes["wg"] == (4 * 64, 6)
    assert shapes["var"] == (6,) and shapes["wm"] == (6, 3)


@pytest.mark.parametrize("pattern", ["unstructured", "channel"])
def test_every_weighted_layer_is_reported_once_as_pruned_or_dense(pattern):
    model = onnx.load(str(SAMPLES / "digits_mobilenet.onnx"))
    summary = prune_model(model, PruneConfig(sparsity=0.3, pattern=pattern, min_parameters=0)).summary
    reported = [layer.node for layer in summary.layers] + [d.node for d in summary.dense_layers]
    weighted = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert sorted(reported) == sorted(weighted)
