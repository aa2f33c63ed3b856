"""Terminal view of a prune summary."""

from __future__ import annotations

from rich.table import Table

from compressq.cli.views import console as render
from compressq.cli.views.console import printable
from compressq.prune import PruneSummary


def render_prune_summary(summary: PruneSummary, report: dict) -> None:
    console = render.stdout
    unit = "output channels" if summary.pattern == "channel" else "weights"
    console.print(render.styled((report["input"], "bold"), " -> ", (report["output"], "bold"),
                                f"  pattern {summary.pattern}, criterion {summary.criterion}, scope {summary.scope}"))
    console.print(_layers_table(summary))
    if summary.dense_layers:
        console.print(_dense_table(summary))
    console.print(f"Sparsity: {summary.achieved_sparsity:.1%} of the pruned layers' {unit} removed "
                  f"(requested {summary.requested_sparsity:.1%}); nonzero parameters "
                  f"{summary.nonzero_before:,} -> {summary.nonzero_after:,} "
                  f"({1 - summary.nonzero_after / max(summary.nonzero_before, 1):.1%} fewer)")
    if summary.calibration:
        console.print(printable(f"Refit against the dense model on {summary.calibration}"))
    for note in summary.notes:
        console.print(render.styled((f"note: {note}", "dim")))
    console.print(f"Size: {render.human_bytes(report['input_bytes'])} -> {render.human_bytes(report['output_bytes'])}"
                  + ("" if summary.pattern == "channel" else " (zeros compress: gzip it or quantize to see the gain)"))


def _layers_table(summary: PruneSummary) -> Table:
    refit = {record.node: record for record in summary.refit}
    table = Table(title=f"Pruned layers ({len(summary.layers)})", title_justify="left")
    for column in ("layer", "op", "weight shape", "sparsity", "refit error (before -> after)", "note"):
        table.add_column(column, justify="right" if column == "sparsity" else "left", overflow="fold")
    for layer in summary.layers:
        shape = render.shape_text(list(layer.shape_after))
        if layer.shape_after != layer.shape_before:
            shape = render.shape_text(list(layer.shape_before)) + " -> " + shape
        record = refit.get(layer.node)
        fit = f"{record.error_before:.3f} -> {record.error_after:.3f}" if record and not record.note else ""
        table.add_row(printable(layer.node), layer.op_type, shape, f"{layer.sparsity:.1%}", fit, printable(layer.note))
    return table


def _dense_table(summary: PruneSummary) -> Table:
    table = Table(title=f"Left dense ({len(summary.dense_layers)})", title_justify="left")
    for column in ("layer", "op", "parameters", "why"):
        table.add_column(column, justify="right" if column == "parameters" else "left", overflow="fold")
    for layer in summary.dense_layers:
        table.add_row(printable(layer.node), layer.op_type, f"{layer.parameters:,}", printable(layer.reason))
    return table
