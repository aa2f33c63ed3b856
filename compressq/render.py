"""Rich terminal views of command results (the data comes from the algorithms, untouched)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compressq.summary import ModelSummary

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)
SPARSE_ROWS_SHOWN = 15


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def print_json(data) -> None:
    """Machine-readable output: JSON on stdout and nothing else."""
    if is_dataclass(data):
        data = data.to_dict() if hasattr(data, "to_dict") else asdict(data)
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def shape_text(shape: list) -> str:
    return escape("[" + ", ".join(str(d) for d in shape) + "]")


def render_summary(summary: ModelSummary, console: Console = stdout) -> None:
    console.print(f"[bold]{summary.path}[/]  {human_bytes(summary.file_bytes)} on disk, IR v{summary.ir_version}, "
                  f"opset {summary.opset}" + (f", produced by {summary.producer}" if summary.producer else ""))
    console.print(_io_table(summary))
    console.print(_ops_table(summary))
    console.print(_parameters_table(summary))
    sparse = [i for i in summary.initializers if i.parameters >= 16]
    if sparse:
        console.print(_sparsity_table(sparse))
    console.print(_quantization_line(summary))
    if summary.compressq:
        console.print(f"written by compressq {summary.compressq.get('version', '?')}: "
                      f"{summary.compressq.get('command', '?')} {summary.compressq.get('settings', '')}")


def _io_table(summary: ModelSummary) -> Table:
    table = Table(title="Inputs and outputs", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        table.add_column(column)
    for kind, tensors in (("input", summary.inputs), ("output", summary.outputs)):
        for tensor in tensors:
            table.add_row(kind, escape(tensor.name), tensor.dtype, shape_text(tensor.shape))
    return table


def _ops_table(summary: ModelSummary) -> Table:
    table = Table(title=f"Operators ({summary.node_count} nodes)", title_justify="left")
    table.add_column("op type")
    table.add_column("count", justify="right")
    for op, count in summary.op_histogram.items():
        table.add_row(op, str(count))
    return table


def _parameters_table(summary: ModelSummary) -> Table:
    table = Table(title=f"Parameters: {summary.parameters:,} in {human_bytes(summary.parameter_bytes)}, "
                        f"{summary.zero_fraction:.1%} exact zeros", title_justify="left")
    for column in ("dtype", "parameters", "bytes"):
        table.add_column(column, justify="right" if column != "dtype" else "left")
    for dtype, totals in summary.by_dtype.items():
        table.add_row(dtype, f"{totals.parameters:,}", human_bytes(totals.bytes))
    return table


def _sparsity_table(initializers) -> Table:
    ranked = sorted(initializers, key=lambda i: (-i.zero_fraction, -i.parameters))
    shown = ranked[:SPARSE_ROWS_SHOWN]
    more = len(ranked) - len(shown)
    title = "Initializers by sparsity" + (f" (top {len(shown)}; {more} more in --json)" if more else "")
    table = Table(title=title, title_justify="left")
    for column in ("name", "dtype", "shape", "parameters", "zeros"):
        table.add_column(column, justify="right" if column in ("parameters", "zeros") else "left")
    for info in shown:
        table.add_row(escape(info.name), info.dtype, shape_text(info.shape), f"{info.parameters:,}",
                      f"{info.zero_fraction:.1%}")
    return table


def _quantization_line(summary: ModelSummary) -> str:
    state = summary.quantization
    if not state.is_quantized:
        return "Quantization: none (all weights and activations in float)"
    parts = [f"{state.quantize_linear} QuantizeLinear", f"{state.dequantize_linear} DequantizeLinear"]
    parts += [f"{n} {dtype} initializers" for dtype, n in state.low_bit_initializers.items()]
    parts += [f"{n} {op}" for op, n in state.quantized_ops.items()]
    return "Quantization: " + ", ".join(parts)
