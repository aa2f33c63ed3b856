from __future__ import annotations

from pathlib import Path

import typer

from compressq.cli.views import console as render
from compressq.cli.views.data import render_built_dataset
from compressq.data_build import BuildRequest, ImageOptions, build_dataset, write_npz
from compressq.errors import UsageError
from compressq.io import check_output_path, load_model


def data(
    model: Path = typer.Argument(..., help="ONNX model the data is for (input names, shapes, dtypes; never modified)."),
    source: Path = typer.Argument(..., help="Folder of images, .npy or .npz files (one sample each), "
                                            "or one .npy of stacked samples."),
    output: Path = typer.Option(..., "--output", "-o", help="The .npz to write, e.g. calib.npz."),
    samples: int | None = typer.Option(None, "--samples", "-n",
                                       help="At most N samples (a seeded random subset, in file order) "
                                            "(default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --samples."),
    labels: str | None = typer.Option(None, "--labels",
                                      help="'folders' (class subfolders, sorted -> 0, 1, ...) or a text file of "
                                           "'file,label' lines; written as the 'labels' array."),
    size: str | None = typer.Option(None, "--size", help="Images: HEIGHTxWIDTH (default: the model's input size)."),
    resize: str = typer.Option("crop", "--resize",
                               help="Images: crop (keep aspect ratio, centre crop) | stretch."),
    scale: float | None = typer.Option(None, "--scale",
                                       help="Images: pixels 0..255 are divided by this (default: 255 for float "
                                            "inputs, 1 for integer inputs)."),
    mean: str = typer.Option("0", "--mean", help="Images: subtracted after scaling, 1 or 3 values in the model's "
                                                 "channel order, e.g. 0.485,0.456,0.406."),
    std: str = typer.Option("1", "--std", help="Images: divided by after the mean, 1 or 3 values, "
                                               "e.g. 0.229,0.224,0.225."),
    channels: str = typer.Option("rgb", "--channels", help="Images: rgb | bgr (3-channel inputs)."),
    data_layout: str = typer.Option("batch", "--data-layout", help="batch: each file holds samples without the "
                                    "model's batch axis (or stacks with it) | stack: each file holds complete "
                                    "inputs as fed (scalars, state tensors), stacked on a new first axis; pass "
                                    "the same --data-layout to the commands that read the result."),
    layout: str | None = typer.Option(None, "--layout",
                                      help="Images: nchw | nhwc (default: guessed from the model's input shape)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON on stdout, nothing else."),
) -> None:
    """Build the .npz for --calibration-data / --data from a folder of images, .npy or .npz files."""
    options = ImageOptions(size=_size(size), resize=resize, scale=scale, mean=_floats(mean, "--mean"),
                           std=_floats(std, "--std"), channels=channels, layout=layout)
    check_output_path(output, protect=[model, source])  # before the work: never an input, always writable
    onnx_model = load_model(model)
    built = build_dataset(onnx_model, BuildRequest(source, samples=samples, seed=seed, labels=labels, image=options,
                                                   data_layout=data_layout))
    write_npz(built, output, onnx_model, protect=[model])
    report = {"model": str(model), "source": str(source), "output": str(output), "kind": built.kind,
              "data_layout": built.data_layout,
              "samples": built.num_samples, "files": len(built.files),
              "image": None if built.geometry is None else vars(built.geometry), "arrays": built.describe()}
    if as_json:
        render.print_json(report)
    else:
        render_built_dataset(built, report)


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        height, width = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise UsageError(f"--size '{text}' is not HEIGHTxWIDTH", hint="e.g. --size 224x224") from None
    return height, width


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{option} '{text}' is not a comma-separated list of numbers",
                         hint=f"e.g. {option} 0.5 or {option} 0.485,0.456,0.406") from None
