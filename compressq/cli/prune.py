from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from compressq.cli.views import console as render
from compressq.data import DATA_LAYOUT_HELP, load_dataset
from compressq.io import check_output_path, default_output_path, file_size, load_model, save_model, stamp
from compressq.prune import PruneConfig, PruneSummary, prune_model
from compressq.prune.config import DEFAULT_MIN_PARAMETERS


def prune(
    model: Path = typer.Argument(..., help="ONNX model file (never modified)."),
    sparsity: float | None = typer.Option(None, "--sparsity", "-s",
                                          help="Fraction to remove, e.g. 0.5 (implied by N:M patterns)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output path [default: NAME.pruned.onnx]."),
    pattern: str = typer.Option("unstructured", "--pattern",
                                help="unstructured | N:M (e.g. 2:4, along the input dimension) | channel."),
    scope: str = typer.Option("local", "--scope", help="local (each layer at S) | global (one threshold)."),
    criterion: str = typer.Option("magnitude", "--criterion", help="magnitude | random (a seeded baseline)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --criterion random and for refit sampling."),
    exclude: list[str] = typer.Option([], "--exclude",
                                      help="Keep layers dense whose node name, op type or weight name matches "
                                           "this glob (repeatable), e.g. '/classifier/*' or Gemm."),
    calibration_data: Path | None = typer.Option(
        None, "--calibration-data", help="Inputs (.npz or folder) to refit kept weights against the dense model."),
    data_layout: str = typer.Option("batch", "--data-layout", help=DATA_LAYOUT_HELP),
    calibration_samples: int = typer.Option(256, "--calibration-samples", help="Samples used for refit."),
    min_params: int = typer.Option(DEFAULT_MIN_PARAMETERS, "--min-params",
                                   help="Layers with fewer parameters stay dense."),
    prune_first: bool = typer.Option(False, "--prune-first", help="Also prune the first weighted layer."),
    prune_last: bool = typer.Option(False, "--prune-last", help="Also prune the last weighted layer."),
    channel_multiple: int = typer.Option(8, "--channel-multiple",
                                         help="channel pattern: keep channel counts that are multiples of this "
                                              "(faster CPU kernels); 1 keeps exact counts."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout, nothing else."),
) -> None:
    """Prune weights (unstructured, N:M) or whole channels, optionally refitting against the dense model."""
    config = PruneConfig.from_options(
        sparsity, pattern, scope=scope, criterion=criterion, seed=seed, exclude=tuple(exclude),
        keep_first=not prune_first, keep_last=not prune_last, min_parameters=min_params,
        calibration_samples=calibration_samples, channel_multiple=channel_multiple)
    source = load_model(model)
    target = output or default_output_path(model, "pruned")
    check_output_path(target, protect=[model])
    dataset = load_dataset(calibration_data, source, layout=data_layout) if calibration_data else None
    if dataset is not None:
        for note in dataset.notes:
            render.stderr.print(f"[dim]note: {escape(note)}[/]")
    with _progress_bar(as_json) as advance:
        result = prune_model(source, config, dataset, progress=advance)
    if dataset is None:
        render.stderr.print("[yellow]warning:[/] no --calibration-data: weights are not refit and the accuracy "
                            "cost is unmeasured; pass --calibration-data DATA to refit, then check with "
                            "compressq report --data DATA", highlight=False)
    stamp(result.model, "prune", config.settings())
    save_model(result.model, target, protect=[model])
    report = {"input": str(model), "output": str(target), "input_bytes": file_size(model),
              "output_bytes": file_size(target), **result.summary.to_dict()}
    if as_json:
        render.print_json(report)
    else:
        _render(result.summary, report)


class _progress_bar:
    """Rich progress on stderr, one bar per stage with its total and an ETA; the algorithm calls
    `update(stage, done, total)`."""

    def __init__(self, quiet: bool):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=render.stderr, transient=True, disable=quiet)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self):
        self.progress.start()

        def update(stage: str, done: int, total: int) -> None:
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=total)
            self.progress.update(self.tasks[stage], completed=done, total=total)

        return update

    def __exit__(self, *exc_info):
        self.progress.stop()


def _render(summary: PruneSummary, report: dict) -> None:
    console = render.stdout
    unit = "output channels" if summary.pattern == "channel" else "weights"
    console.print(f"[bold]{escape(report['input'])}[/] -> [bold]{escape(report['output'])}[/]  "
                  f"pattern {summary.pattern}, criterion {summary.criterion}, scope {summary.scope}")
    console.print(_layers_table(summary))
    if summary.dense_layers:
        console.print(_dense_table(summary))
    console.print(f"Sparsity: {summary.achieved_sparsity:.1%} of the pruned layers' {unit} removed "
                  f"(requested {summary.requested_sparsity:.1%}); nonzero parameters "
                  f"{summary.nonzero_before:,} -> {summary.nonzero_after:,} "
                  f"({1 - summary.nonzero_after / max(summary.nonzero_before, 1):.1%} fewer)")
    if summary.calibration:
        console.print(f"Refit against the dense model on {escape(summary.calibration)}")
    for note in summary.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
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
        table.add_row(escape(layer.node), layer.op_type, shape, f"{layer.sparsity:.1%}", fit, escape(layer.note))
    return table


def _dense_table(summary: PruneSummary) -> Table:
    table = Table(title=f"Left dense ({len(summary.dense_layers)})", title_justify="left")
    for column in ("layer", "op", "parameters", "why"):
        table.add_column(column, justify="right" if column == "parameters" else "left", overflow="fold")
    for layer in summary.dense_layers:
        table.add_row(escape(layer.node), layer.op_type, f"{layer.parameters:,}", escape(layer.reason))
    return table
