"""Embedding tables to uint8: Gather from a large constant table becomes onnxruntime's GatherBlockQuantized.

A transformer's word-embedding table is often a third of its file, and no Conv/MatMul rule touches it.
GatherBlockQuantized (com.microsoft) reads uint8 rows and dequantizes only the gathered ones, with one
scale and zero point per block of `block_size` values along the hidden axis, so the table shrinks 4x
without dequantizing it whole on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressq.graph.edit import NameGenerator, copy_model, remove_unused
from compressq.graph.index import GraphIndex, node_attributes

MICROSOFT_DOMAIN = "com.microsoft"
MIN_TABLE_ELEMENTS = 65536  # below this the table is too small to matter for size
BLOCK_SIZE = 32


@dataclass
class EmbeddingSummary:
    tables: list[str] = field(default_factory=list)
    float_bytes: int = 0
    quantized_bytes: int = 0


def quantize_embeddings(model: onnx.ModelProto, block_size: int = BLOCK_SIZE,
                        min_elements: int = MIN_TABLE_ELEMENTS) -> tuple[onnx.ModelProto, EmbeddingSummary]:
    """A copy of `model` whose large constant Gather tables are uint8 GatherBlockQuantized lookups (the float
    tables are never copied: the copy is made without them)."""
    index = GraphIndex(model.graph)
    tables = {position: node.input[0] for position, node in enumerate(model.graph.node)
              if _table_tensor(node, index, block_size, min_elements) is not None}
    summary = EmbeddingSummary()
    if not tables:
        result = onnx.ModelProto()
        result.CopyFrom(model)
        return result, summary
    # Every table is read and coded before the model is copied: the float table and the copy are never held at
    # once (BERT-6's whole static quantize peaked here, at 1.13 GB, with both alive).
    coded: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for position in sorted(tables):
        table = _table(model.graph.node[position], index, block_size, min_elements)
        assert table is not None  # found above, on the same node of the caller's graph
        coded[position] = quantize_rows(table, block_size)
        summary.tables.append(tables[position])
        summary.float_bytes += table.nbytes
        summary.quantized_bytes += sum(part.nbytes for part in coded[position])
        del table
    result = copy_model(model, drop_initializers=set(tables.values()))
    graph = result.graph
    names = NameGenerator(graph)
    for position in sorted(tables):
        node = graph.node[position]
        codes, scales, zero_points = coded.pop(position)
        table_name = node.input[0]
        inputs = [names(f"{table_name}_uint8"), node.input[1], names(f"{table_name}_scales"),
                  names(f"{table_name}_zero_points")]
        graph.initializer.extend([numpy_helper.from_array(codes, inputs[0]),
                                  numpy_helper.from_array(scales, inputs[2]),
                                  numpy_helper.from_array(zero_points, inputs[3])])
        node.CopyFrom(helper.make_node(
            "GatherBlockQuantized", inputs, list(node.output), name=node.name, domain=MICROSOFT_DOMAIN,
            gather_axis=0, quantize_axis=1, block_size=block_size, bits=8))
        del codes, scales, zero_points
    if not any(o.domain == MICROSOFT_DOMAIN for o in result.opset_import):
        result.opset_import.append(helper.make_opsetid(MICROSOFT_DOMAIN, 1))
    remove_unused(graph)
    return result, summary


def _table(node: onnx.NodeProto, index: GraphIndex, block_size: int, min_elements: int) -> np.ndarray | None:
    """The table of a plain row lookup that only this Gather reads (tied weights stay float)."""
    tensor = _table_tensor(node, index, block_size, min_elements)
    return numpy_helper.to_array(tensor) if tensor is not None else None


def _table_tensor(node: onnx.NodeProto, index: GraphIndex, block_size: int, min_elements: int,
                  ) -> onnx.TensorProto | None:
    """The same test on the stored tensor's type and dims: no table is read to find out (BERT's word table is
    94 MB, and reading it costs twice that)."""
    if node.op_type != "Gather" or node_attributes(node).get("axis", 0) != 0:
        return None
    if node.input[0] not in index.initializers or len(index.consumers.get(node.input[0], [])) != 1:
        return None
    tensor = index.initializers[node.input[0]]
    dims = tuple(tensor.dims)
    if tensor.data_type != onnx.TensorProto.FLOAT or len(dims) != 2 or dims[0] * dims[1] < min_elements \
            or dims[1] % block_size:
        return None
    return tensor


def quantize_rows(table: np.ndarray, block_size: int, rows_per_chunk: int = 4096,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 codes [V, H], scales and zero points [V, H / block_size]; each block's range includes 0.
    Rows are done a chunk at a time: the float temporaries stay a few MB whatever the vocabulary."""
    rows, width = table.shape
    codes = np.empty((rows, width), np.uint8)
    scales = np.empty((rows, width // block_size), np.float32)
    zero_points = np.empty((rows, width // block_size), np.uint8)
    for start in range(0, rows, rows_per_chunk):
        part = slice(start, min(start + rows_per_chunk, rows))
        codes[part], scales[part], zero_points[part] = _quantize_row_blocks(table[part], block_size)
    return codes, scales, zero_points


def _quantize_row_blocks(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, width = table.shape
    blocks = table.reshape(rows, width // block_size, block_size)
    low = np.minimum(blocks.min(axis=-1), 0.0)
    high = np.maximum(blocks.max(axis=-1), 0.0)
    scales = np.maximum((high - low) / 255.0, 1e-12).astype(np.float32)
    zero_points = np.clip(np.rint(-low / scales), 0, 255).astype(np.uint8)
    codes = np.clip(np.rint(blocks / scales[..., None]) + zero_points[..., None], 0, 255).astype(np.uint8)
    return codes.reshape(rows, width), scales, zero_points


def dequantize_rows(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int) -> np.ndarray:
    rows, width = codes.shape
    blocks = codes.reshape(rows, width // block_size, block_size).astype(np.float32)
    return ((blocks - zero_points[..., None]) * scales[..., None]).reshape(rows, width)
