from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from compressq.cli.views import console as render
from compressq.cli.views.progress import stage_progress
from compressq.data import DATA_LAYOUT_HELP, load_dataset
from compressq.io import load_model
from compressq.quantize.api import METHODS, analyze_sensitivity
from compressq.quantize.config import QuantizeConfig


def sensitivity(
    model: Path = typer.Argument(..., help="ONNX model to analyse (never modified)."),
    calibration_data: Path = typer.Option(..., "--calibration-data", "-d", help="Calibration data (.npz or folder)."),
    data: Path = typer.Option(None, "--data", help="Evaluation data [default: the calibration data]."),
    data_layout: str = typer.Option("batch", "--data-layout", help=DATA_LAYOUT_HELP),
    method: str = typer.Option("minmax", "--method", help=f"Calibration: {' | '.join(METHODS)}."),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="Weight scales per output channel."),
    activations: str = typer.Option("uint8", "--activations", help="uint8 (asymmetric) | int8 (symmetric)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Calibration batch size."),
    task_outputs: list[str] = typer.Option([], "--task-output", help="Output that carries the task; the ranking "
                                           "scores it (repeatable) [default: chosen by the rule in docs/report.md]."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON on stdout, nothing else."),
) -> None:
    """Quantize each node alone and rank them by the error they cause against fp32, worst first."""
    source = load_model(model)
    calibration = load_dataset(calibration_data, source, layout=data_layout)
    evaluation = load_dataset(data, source, layout=data_layout) if data else calibration
    config = QuantizeConfig(method=method, per_channel=per_channel, activations=activations, batch_size=batch_size,
                            speed_check=False, task_outputs=tuple(task_outputs))
    with stage_progress() as progress:
        ranking = analyze_sensitivity(source, calibration, evaluation, config, progress)
    rows = [{"node": r.node, "op_type": r.op_type, **r.figures.to_dict()} for r in ranking]
    if as_json:
        render.print_json({"evaluation_data": str(data or calibration_data), "nodes": rows})
        return
    if data is None:
        render.stderr.print("note: measured on the calibration data; pass --data for held-out samples")
    scored = ", ".join(rows[0]["task_outputs"]) if rows else ""
    table = Table(title="Sensitivity: each node quantized alone, worst first", title_justify="left",
                  caption=f"scored outputs (those that carry the task): {render.printable(scored)}" if scored else None,
                  caption_justify="left")
    # Name the worst output per row only where there is a choice (several task outputs, or detector slices).
    several = len({row["cosine_output"] for row in rows}) > 1 or bool(rows and len(rows[0]["task_outputs"]) > 1)
    columns = ("node", "op", "agreement", "top-1 drop", "min cosine", "min SQNR dB") + (("worst output",) * several)
    for column in columns:
        table.add_column(column, justify="left" if column in ("node", "op", "worst output") else "right",
                         overflow="fold", min_width=30 if column == "node" else None)
    for row in rows:
        table.add_row(render.printable(row["node"]), row["op_type"], _figure(row["agreement"], "{:.2%}"),
                      _figure(row["drop_points"], "{:.2f}"), _figure(row["min_cosine"], "{:.6f}"),
                      _figure(row["min_sqnr_db"], "{:.1f}"), *[render.printable(row["cosine_output"] or "-")] * several)
    render.stdout.print(table)


def _figure(value: float | None, template: str) -> str:
    if value is None:
        return "n/a"
    return "not finite" if math.isnan(value) else template.format(value)
