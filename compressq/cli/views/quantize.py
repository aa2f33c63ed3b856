"""Terminal view of a quantization summary."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from compressq.cli.views.console import human_bytes, printable, stderr, stdout, styled
from compressq.quantize.api import QuantizeSummary
from compressq.quantize.plan import ALREADY_INT8

FLOAT_ROWS_SHOWN = 20
ACCURACY_WARNING_AGREEMENT = 0.99
ACCURACY_WARNING_COSINE = 0.99


def render_quantize_summary(summary: QuantizeSummary, output: Path, input_bytes: int, output_bytes: int) -> None:
    ratio = output_bytes / input_bytes if input_bytes else 1.0
    already = [n for n in summary.float_nodes if n["reason"].startswith(ALREADY_INT8)]
    float_nodes = [n for n in summary.float_nodes if not n["reason"].startswith(ALREADY_INT8)]
    method = f", {summary.method} calibration on {summary.calibration_samples} samples" if summary.method else ""
    stdout.print(styled((str(output), "bold"), f": {summary.mode} int{summary.weight_bits}{method}, "
                        f"{len(summary.quantized_nodes)} nodes quantized, {len(float_nodes)} kept float, "
                        + (f"{len(already)} already int8, " if already else "") + f"{summary.seconds:.1f} s"))
    stdout.print(f"size: {human_bytes(input_bytes)} -> {human_bytes(output_bytes)} ({ratio:.2f}x)")
    if summary.integer_kernels:
        kernels = ", ".join(f"{n} {op}" for op, n in summary.integer_kernels.items())
        stdout.print(f"onnxruntime runs: {kernels}")
    if summary.speedup is not None:
        how = summary.speed_measured_with or f"batch {summary.latency_batch}, {summary.threads} thread(s)"
        stdout.print(f"measured speedup vs input: {summary.speedup:.2f}x ({printable(how)})")
    if summary.accuracy:
        stdout.print(f"vs fp32 on {printable(summary.accuracy_data or 'data')}: {_accuracy_text(summary.accuracy)}")
    for step in summary.speed_steps:
        stdout.print(f"  speed fallback: {printable(step)}")
    for tensor, why in summary.non_finite_tensors.items():
        stdout.print(f"  kept float: tensor '{printable(tensor)}' has {why}")
    if float_nodes:
        stdout.print(_float_table(float_nodes))
    if already:
        stdout.print(f"already int8, kept as is: {printable(', '.join(n['node'] for n in already))}")
    for note in summary.notes:
        stdout.print(f"note: {printable(note)}")
    _warn(summary, ratio, output_bytes - input_bytes)


def _accuracy_text(figures: dict) -> str:
    """Figures of the outputs that carry the task (compressq.measure.task), each naming its output."""
    if figures.get("non_finite"):
        return f"{figures['non_finite']} NaN or infinite values in {', '.join(figures.get('task_outputs') or [])}"
    parts = []
    if figures.get("agreement") is not None:
        where = figures.get("agreement_output") or ""
        kind = "top-1 agreement" if where.endswith("(class scores)") else "label exact match"
        parts.append(f"{kind} {figures['agreement']:.2%} on {where}")
    if figures.get("drop_points") is not None:
        parts.append(f"top-1 drop {figures['drop_points']:.2f} points")
    if figures.get("min_cosine") is not None:
        parts.append(f"min cosine {figures['min_cosine']:.5f} on {figures.get('cosine_output')}")
        parts.append(f"min SQNR {figures['min_sqnr_db']:.1f} dB")
    return printable(", ".join(parts))


def _float_table(float_nodes: list[dict]) -> Table:
    shown = float_nodes[:FLOAT_ROWS_SHOWN]
    more = len(float_nodes) - len(shown)
    table = Table(title="Kept in float" + (f" (first {len(shown)}; {more} more in --json)" if more else ""),
                  title_justify="left")
    for column in ("node", "op", "why"):
        table.add_column(column, overflow="fold")
    for entry in shown:
        table.add_row(printable(entry["node"]), entry["op_type"], printable(entry["reason"]))
    return table


def _warn(summary: QuantizeSummary, size_ratio: float, growth: int) -> None:
    if summary.speedup is not None and summary.speedup < 1.0:
        after = " even after returning the costly parts to float" if summary.mode == "static" else ""
        _warning(f"the output runs slower than the input ({summary.speedup:.2f}x){after}")
    if summary.speedup is not None and summary.speedup < 1.0 and summary.mode != "static":
        stderr.print("  (dynamic and weight-only outputs are not returned to float automatically; "
                     "try static quantization with --calibration-data, or keep the input)")
    if summary.mode != "weight-only" and not summary.quantized_nodes:
        _warning("nothing was quantized: int8 made no part of this model faster "
                 "on this machine; the output is the input model")
    figures = summary.accuracy
    if figures and not summary.returned_to_float and (
            figures.get("non_finite")
            or (figures.get("agreement") is not None and figures["agreement"] < ACCURACY_WARNING_AGREEMENT)
            or (figures.get("min_cosine") is not None and figures["min_cosine"] < ACCURACY_WARNING_COSINE)):
        _warning(f"int8 changed this model's outputs ({_accuracy_text(figures)}); "
                 "pass --min-agreement or --max-drop (with --eval-data) to return the most sensitive "
                 "nodes to float")
    if size_ratio > 1.0:
        _warning(f"the output is larger than the input by {growth} bytes ({size_ratio:.3f}x)")


def _warning(text: str) -> None:
    stderr.print(styled(("WARNING:", "bold yellow"), " ", text))
