from __future__ import annotations

from pathlib import Path

import typer

from compressq.cli.views import console as render
from compressq.cli.views.inspect import render_summary
from compressq.evaluate.summary import summarize
from compressq.io import load_model


def inspect(
    model: Path = typer.Argument(..., help="ONNX model file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout, nothing else."),
) -> None:
    """Summarise a model: inputs/outputs, operators, parameters, sparsity and quantization state."""
    summary = summarize(load_model(model, read_weights=False), model)  # weights read a chunk at a time
    if as_json:
        render.print_json(summary)
    else:
        render_summary(summary)
