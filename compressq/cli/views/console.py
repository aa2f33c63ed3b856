"""Rich terminal views of command results (the data comes from the algorithms, untouched).

Every string that comes from a user or a model (paths, node and tensor names, messages) goes through
`printable` (control characters shown as visible escapes, so a name cannot drive the terminal) and, on
these markup consoles, through `escape` (so `cnn[int8].onnx` is printed, not read as a style): `shown`
does both.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compressq.evaluate.summary import ModelSummary

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)
SPARSE_ROWS_SHOWN = 15


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """`text` with every non-printable character (ESC, BEL, newlines, bidi overrides, ...) written as a
    visible escape such as `\\x1b`: what a model names its tensors can never move the cursor, clear the
    screen or set the terminal title."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _visible_escape(char) for char in text)


def _visible_escape(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(text: object) -> str:
    """A user or model string ready for a markup console: printable, and never read as markup."""
    return escape(printable(text))


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
    return shown("[" + ", ".join(str(d) for d in shape) + "]")


def render_summary(summary: ModelSummary, console: Console = stdout) -> None:
    console.print(f"[bold]{shown(summary.path)}[/]  {human_bytes(summary.file_bytes)} on disk, "
                  f"IR v{summary.ir_version}, opset {summary.opset}"
                  + (f", produced by {shown(summary.producer)}" if summary.producer else ""), highlight=False)
    console.print(_io_table(summary))
    console.print(_ops_table(summary))
    console.print(_parameters_table(summary))
    sparse = [i for i in summary.initializers if i.parameters >= 16]
    if sparse:
        console.print(_sparsity_table(sparse))
    console.print(_quantization_line(summary))
    if summary.compressq:
        console.print(f"written by compressq {shown(summary.compressq.get('version', '?'))}: "
                      f"{shown(summary.compressq.get('command', '?'))} "
                      f"{shown(summary.compressq.get('settings', ''))}", highlight=False)


def _io_table(summary: ModelSummary) -> Table:
    table = Table(title="Inputs and outputs", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        table.add_column(column)
    for kind, tensors in (("input", summary.inputs), ("output", summary.outputs)):
        for tensor in tensors:
            table.add_row(kind, shown(tensor.name), shown(tensor.dtype), shape_text(tensor.shape))
    return table


def _ops_table(summary: ModelSummary) -> Table:
    table = Table(title=f"Operators ({summary.node_count} nodes)", title_justify="left")
    table.add_column("op type")
    table.add_column("count", justify="right")
    for op, count in summary.op_histogram.items():
        table.add_row(shown(op), str(count))
    return table


def _parameters_table(summary: ModelSummary) -> Table:
    table = Table(title=f"Parameters: {summary.parameters:,} in {human_bytes(summary.parameter_bytes)}, "
                        f"{summary.zero_fraction:.1%} exact zeros", title_justify="left")
    for column in ("dtype", "parameters", "bytes"):
        table.add_column(column, justify="right" if column != "dtype" else "left")
    for dtype, totals in summary.by_dtype.items():
        table.add_row(shown(dtype), f"{totals.parameters:,}", human_bytes(totals.bytes))
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
        table.add_row(shown(info.name), shown(info.dtype), shape_text(info.shape), f"{info.parameters:,}",
                      f"{info.zero_fraction:.1%}")
    return table


def _quantization_line(summary: ModelSummary) -> str:
    state = summary.quantization
    if not state.is_quantized:
        return "Quantization: none (all weights and activations in float)"
    parts = [f"{state.quantize_linear} QuantizeLinear", f"{state.dequantize_linear} DequantizeLinear"]
    parts += [f"{n} {dtype} initializers" for dtype, n in state.low_bit_initializers.items()]
    parts += [f"{n} {op}" for op, n in state.quantized_ops.items()]
    return "Quantization: " + shown(", ".join(parts))
