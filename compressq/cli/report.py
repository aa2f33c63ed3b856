from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from compressq.cli.views import console as render
from compressq.cli.views.progress import stage_progress
from compressq.cli.views.report import print_table, render_text, table_console
from compressq.data import DATA_LAYOUT_HELP
from compressq.errors import EXIT_GATE_FAILED, UsageError
from compressq.evaluate.report import GateLimits, Report, ReportConfig, build_report, verdict
from compressq.io import check_output_path, write_text_atomically


class ReportFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    html = "html"


def report(
    baseline: Path = typer.Argument(..., help="The reference ONNX model (usually the float original)."),
    candidates: list[Path] = typer.Argument(None, help="Compressed models to compare with the baseline."),
    data: Path = typer.Option(None, "--data", help="Evaluation data: .npz or folder keyed by input name. "
                              "Without it, inputs are synthetic and the report says so next to every figure."),
    data_layout: str = typer.Option("batch", "--data-layout", help=DATA_LAYOUT_HELP),
    labels: str = typer.Option(None, "--labels", help="Array in --data with the true class labels "
                               "[default: 'labels' when present]."),
    provider: list[str] = typer.Option(["cpu"], "--provider", help="Execution provider to time on: cpu or "
                                       "cuda; repeat to time on several. Accuracy runs on the first."),
    threads: int = typer.Option(1, "--threads", min=0, help="Intra-op threads per session; 1 gives stable, "
                                "comparable numbers, 0 lets onnxruntime use every core."),
    runs: int = typer.Option(20, "--runs", min=1, help="Timed runs per model (interleaved A B A B)."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed runs per model before timing."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Batch that latency and throughput are "
                                   "measured at."),
    samples: int = typer.Option(None, "--samples", min=1, help="Evaluate on at most this many samples "
                                "[default: all of --data, 64 synthetic]."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also compare every intermediate tensor the "
                                   "models share by name, worst first."),
    output_format: ReportFormat = typer.Option(ReportFormat.table, "--format", help="table, json, markdown or html."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    task_outputs: list[str] = typer.Option([], "--task-output", help="Output that carries the task; gates and "
                                           "verdicts score it (repeatable) [default: class scores, labels, boxes "
                                           "and detector heads, else the other outputs; see docs/report.md]."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the report to this file (atomically) "
                                "instead of stdout ('-': stdout)."),
    max_accuracy_drop: float = typer.Option(None, "--max-accuracy-drop", help="Gate: top-1 accuracy may drop by "
                                            "at most this many points (needs labels)."),
    min_agreement: float = typer.Option(None, "--min-agreement", help="Gate: share of samples (0-1) whose "
                                        "top-1 class (or integer label) matches the baseline's, on every "
                                        "output that carries the task."),
    min_cosine: float = typer.Option(None, "--min-cosine", help="Gate: cosine similarity with the baseline's "
                                     "of every float output that carries the task (detector heads: every "
                                     "slice)."),
    min_speedup: float = typer.Option(None, "--min-speedup", help="Gate: baseline median / candidate median, "
                                      "on every provider."),
    max_size_ratio: float = typer.Option(None, "--max-size-ratio", help="Gate: candidate file bytes / "
                                         "baseline file bytes."),
) -> None:
    """Measure size, accuracy and latency of compressed models against a baseline; fail CI on a gate."""
    if as_json:
        if output_format not in (ReportFormat.table, ReportFormat.json):
            raise UsageError(f"--json and --format {output_format.value} ask for two formats", hint="pass one")
        output_format = ReportFormat.json
    config = ReportConfig(
        baseline=baseline, candidates=tuple(candidates or ()), data=data, labels_key=labels or "labels",
        require_labels=labels is not None, providers=tuple(provider), threads=threads or None, runs=runs,
        warmup=warmup, batch_size=batch_size, samples=samples, per_layer=per_layer,
        gates=GateLimits(max_accuracy_drop, min_agreement, min_cosine, min_speedup, max_size_ratio),
        task_outputs=tuple(task_outputs), data_layout=data_layout,
    )
    if output is not None and str(output) == "-":
        output = None
    if output is not None:  # devices, pipes and directories are refused; a symlink is written through
        output = check_output_path(output, protect=[p for p in (baseline, *config.candidates, data) if p is not None])
    with stage_progress() as progress:
        result = build_report(config, progress)
    _emit(result, output_format.value, output)
    if output is not None or output_format != ReportFormat.table:  # the table shows the verdict itself
        typer.echo(verdict(result), err=True)
    for gate in result.failed_gates:
        typer.echo(gate.failure_line(), err=True)
    if not result.passed:
        raise typer.Exit(EXIT_GATE_FAILED)


def _emit(result: Report, output_format: str, output: Path | None) -> None:
    if output is not None:
        write_text_atomically(output, render_text(result, output_format))
        render.stderr.print(f"wrote {output_format} report to {output}")
    elif output_format == "table":
        print_table(result, table_console(render.stdout))
    else:
        typer.echo(render_text(result, output_format), nl=False)
