from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from compressq import render
from compressq.commands.progress import stage_progress
from compressq.data import load_dataset
from compressq.graph import load_model
from compressq.quantize.api import METHODS, analyze_sensitivity
from compressq.quantize.config import QuantizeConfig


def sensitivity(
    model: Path = typer.Argument(..., help="ONNX model to analyse (never modified)."),
    calibration_data: Path = typer.Option(..., "--calibration-data", "-d", help="Calibration data (.npz or folder)."),
    data: Path = typer.Option(None, "--data", help="Evaluation data [default: the calibration data]."),
    method: str = typer.Option("minmax", "--method", help=f"Calibration: {' | '.join(METHODS)}."),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="Weight scales per output channel."),
    activations: str = typer.Option("uint8", "--activations", help="uint8 (asymmetric) | int8 (symmetric)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Calibration batch size."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON on stdout, nothing else."),
) -> None:
    """Quantize each node alone and rank them by the error they cause against fp32, worst first."""
    source = load_model(model)
    calibration = load_dataset(calibration_data, source)
    evaluation = load_dataset(data, source) if data else calibration
    config = QuantizeConfig(method=method, per_channel=per_channel, activations=activations, batch_size=batch_size,
                            speed_check=False)
    with stage_progress() as progress:
        ranking = analyze_sensitivity(source, calibration, evaluation, config, progress)
    rows = [{"node": r.node, "op_type": r.op_type, **r.figures.to_dict()} for r in ranking]
    if as_json:
        render.print_json({"evaluation_data": str(data or calibration_data), "nodes": rows})
        return
    if data is None:
        render.stderr.print("note: measured on the calibration data; pass --data for held-out samples")
    table = Table(title="Sensitivity: each node quantized alone, worst first", title_justify="left")
    for column in ("node", "op", "agreement", "top-1 drop", "min cosine", "min SQNR dB"):
        table.add_column(column, justify="left" if column in ("node", "op") else "right", overflow="fold",
                         min_width=30 if column == "node" else None)
    for row in rows:
        agreement = "n/a" if row["agreement"] is None else f"{row['agreement']:.2%}"
        drop = "n/a" if row["drop_points"] is None else f"{row['drop_points']:.2f}"
        table.add_row(escape(row["node"]), row["op_type"], agreement, drop, f"{row['min_cosine']:.6f}",
                      f"{row['min_sqnr_db']:.1f}")
    render.stdout.print(table)
