"""Terminal view of what `compressq data` wrote."""

from __future__ import annotations

from rich.table import Table

from compressq.cli.views import console as render
from compressq.data_build import BuiltDataset


def render_built_dataset(built: BuiltDataset, report: dict) -> None:
    console = render.stdout
    what = {"images": "images", "npy": ".npy files", "npz": ".npz files"}[built.kind]
    console.print(render.styled((report["output"], "bold"), f": {report['samples']} samples from "
                                f"{report['files']} {what} in {report['source']}"))
    if built.geometry is not None:
        g = built.geometry
        console.print(f"images: {g.height}x{g.width}, {g.channels} channel(s), layout {g.layout}")
    table = Table(title="Arrays written", title_justify="left")
    for column in ("array", "shape", "dtype", "min", "max", "mean"):
        table.add_column(column, justify="left" if column in ("array", "shape", "dtype") else "right")
    for row in report["arrays"]:
        table.add_row(render.printable(row["name"]), render.shape_text(row["shape"]), row["dtype"],
                      f"{row['min']:.4g}", f"{row['max']:.4g}", f"{row['mean']:.4g}")
    console.print(table)
    for note in built.notes:
        console.print(render.styled((f"note: {note}", "dim")))
    layout = " --data-layout stack" if report.get("data_layout") == "stack" else ""
    console.print(render.printable(f"use it: compressq quantize {report['model']} "
                                   f"--calibration-data {report['output']}{layout}"))
