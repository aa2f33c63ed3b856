from __future__ import annotations

from pathlib import Path

import typer

from compressq.cli.views import console as render
from compressq.cli.views.progress import stage_progress
from compressq.cli.views.prune import render_prune_summary
from compressq.data import DATA_LAYOUT_HELP, load_dataset
from compressq.io import (
    check_output_path,
    default_output_path,
    file_size,
    load_model,
    refuse_non_finite_weights,
    save_model,
    stamp,
)
from compressq.prune import PruneConfig, prune_model
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
    target = output or default_output_path(model, "pruned")
    read_paths = [p for p in (model, calibration_data) if p is not None]
    check_output_path(target, protect=read_paths)
    source = load_model(model, read_weights=False)  # weights stay in their files until a step needs them
    refuse_non_finite_weights(source, str(model))
    dataset = load_dataset(calibration_data, source, layout=data_layout) if calibration_data else None
    if dataset is not None:
        for note in dataset.notes:
            render.stderr.print(render.styled((f"note: {note}", "dim")))
    with stage_progress(quiet=as_json) as advance:
        result = prune_model(source, config, dataset, progress=advance)
    if dataset is None:
        render.stderr.print(render.styled(("warning:", "yellow"), " no --calibration-data: weights are not refit and "
                                          "the accuracy cost is unmeasured; pass --calibration-data DATA to refit, "
                                          "then check with compressq report --data DATA"))
    stamp(result.model, "prune", config.settings())
    save_model(result.model, target, protect=read_paths)
    report = {"input": str(model), "output": str(target), "input_bytes": file_size(model, loaded=source),
              "output_bytes": file_size(target), **result.summary.to_dict()}
    if as_json:
        render.print_json(report)
    else:
        render_prune_summary(result.summary, report)
