"""Terminal view of `compressq inspect`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from compressq.cli.views.console import human_bytes, printable, shape_text, stdout, styled
from compressq.evaluate.summary import ModelSummary

SPARSE_ROWS_SHOWN = 15


def render_summary(summary: ModelSummary, console: Console = stdout) -> None:
    console.print(styled((str(summary.path), "bold"), f"  {human_bytes(summary.file_bytes)} on disk, "
                         f"IR v{summary.ir_version}, opset {summary.opset}"
                         + (f", produced by {summary.producer}" if summary.producer else "")))
    console.print(_io_table(summary))
    console.print(_ops_table(summary))
    console.print(_parameters_table(summary))
    if summary.graphs:
        console.print(_graphs_table(summary))
    sparse = [i for i in summary.initializers if i.parameters >= 16]
    if sparse:
        console.print(_sparsity_table(sparse))
    console.print(_quantization_line(summary))
    if summary.compressq:
        console.print(printable(f"written by compressq {summary.compressq.get('version', '?')}: "
                                f"{summary.compressq.get('command', '?')} {summary.compressq.get('settings', '')}"))


def _io_table(summary: ModelSummary) -> Table:
    table = Table(title="Inputs and outputs", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        table.add_column(column)
    for kind, tensors in (("input", summary.inputs), ("output", summary.outputs)):
        for tensor in tensors:
            table.add_row(kind, printable(tensor.name), printable(tensor.dtype), shape_text(tensor.shape))
    return table


def _ops_table(summary: ModelSummary) -> Table:
    table = Table(title=f"Operators ({summary.node_count} nodes)", title_justify="left")
    table.add_column("op type")
    table.add_column("count", justify="right")
    for op, count in summary.op_histogram.items():
        table.add_row(printable(op), str(count))
    return table


def _parameters_table(summary: ModelSummary) -> Table:
    table = Table(title=f"Parameters: {summary.parameters:,} in {human_bytes(summary.parameter_bytes)}, "
                        f"{summary.zero_fraction:.1%} exact zeros", title_justify="left")
    for column in ("dtype", "parameters", "bytes"):
        table.add_column(column, justify="right" if column != "dtype" else "left")
    for dtype, totals in summary.by_dtype.items():
        table.add_row(printable(dtype), f"{totals.parameters:,}", human_bytes(totals.bytes))
    return table


def _graphs_table(summary: ModelSummary) -> Table:
    """Where the weights live when the model has If/Loop/Scan bodies: the main graph, then every body that
    holds weights (bodies without any are counted in the last row)."""
    shown = [g for position, g in enumerate(summary.graphs) if position == 0 or g.parameters]
    table = Table(title=f"Weights per graph ({len(summary.graphs) - 1} If/Loop/Scan bodies)", title_justify="left")
    for column in ("graph", "nodes", "parameters", "bytes"):
        table.add_column(column, justify="left" if column == "graph" else "right")
    for graph in shown:
        table.add_row(printable(graph.graph), str(graph.nodes), f"{graph.parameters:,}", human_bytes(graph.bytes))
    empty = len(summary.graphs) - len(shown)
    if empty:
        table.add_row(f"{empty} more bodies without weights", "", "0", "")
    return table


def _sparsity_table(initializers) -> Table:
    ranked = sorted(initializers, key=lambda i: (-i.zero_fraction, -i.parameters))
    top = ranked[:SPARSE_ROWS_SHOWN]
    more = len(ranked) - len(top)
    title = "Initializers by sparsity" + (f" (top {len(top)}; {more} more in --json)" if more else "")
    table = Table(title=title, title_justify="left")
    for column in ("name", "dtype", "shape", "parameters", "zeros"):
        table.add_column(column, justify="right" if column in ("parameters", "zeros") else "left")
    for info in top:
        table.add_row(printable(info.name), printable(info.dtype), shape_text(info.shape), f"{info.parameters:,}",
                      f"{info.zero_fraction:.1%}")
    return table


def _quantization_line(summary: ModelSummary) -> str:
    state = summary.quantization
    if not state.is_quantized:
        return "Quantization: none (all weights and activations in float)"
    parts = [f"{state.quantize_linear} QuantizeLinear", f"{state.dequantize_linear} DequantizeLinear"]
    parts += [f"{n} {dtype} initializers" for dtype, n in state.low_bit_initializers.items()]
    parts += [f"{n} {op}" for op, n in state.quantized_ops.items()]
    return "Quantization: " + printable(", ".join(parts))
