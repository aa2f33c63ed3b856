"""Embedding tables as uint8 GatherBlockQuantized: numpy round trip and onnxruntime equivalence."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressq.quantize.embedding import dequantize_rows, quantize_embeddings, quantize_rows
from compressq.runtime import create_session


def _embedding_model(rows: int = 2048, width: int = 64, tied: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = rng.normal(scale=0.05, size=(rows, width)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["embedded"], name="lookup")]
    if tied:  # the same table read again as a weight: must stay float
        nodes.append(helper.make_node("Transpose", ["table"], ["table_t"], name="tie"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", "seq", width])]
        + ([helper.make_tensor_value_info("table_t", TensorProto.FLOAT, [width, rows])] if tied else []),
        [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_round_trip_error_is_at_most_half_a_step_per_block():
    table = np.random.default_rng(1).normal(size=(50, 64)).astype(np.float32)
    codes, scales, zero_points = quantize_rows(table, 32)
    restored = dequantize_rows(codes, scales, zero_points, 32)
    step = np.repeat(scales, 32, axis=1)
    assert np.all(np.abs(restored - table) <= step * 0.5 + 1e-7)


def test_onnxruntime_lookup_matches_numpy_and_the_file_shrinks():
    model = _embedding_model()
    quantized, summary = quantize_embeddings(model)
    assert summary.tables == ["table"]
    assert [n.op_type for n in quantized.graph.node] == ["GatherBlockQuantized"]
    assert quantized.ByteSize() < 0.3 * model.ByteSize()
    ids = np.random.default_rng(2).integers(0, 2048, size=(3, 7)).astype(np.int64)
    table = numpy_helper.to_array(model.graph.initializer[0])
    expected = dequantize_rows(*quantize_rows(table, 32), 32)[ids]
    got = create_session(quantized).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - table[ids]).max() < 1e-3


def test_small_and_tied_tables_stay_float():
    assert not quantize_embeddings(_embedding_model(rows=100))[1].tables
    assert not quantize_embeddings(_embedding_model(tied=True))[1].tables
