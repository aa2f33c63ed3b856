"""Table / JSON / Markdown / HTML views of a report.

Every view is built from the same `Section`s (a title, a note, a grid of already formatted cells), so
the four formats cannot disagree about what a figure is or how it is worded. HTML adds inline SVG
charts; it carries no script, no stylesheet link and no remote asset.
"""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import dataclass, field
from typing import TypeGuard

from rich.console import Console
from rich.table import Table

from compressq.cli.views.console import human_bytes, make_console, printable, styled
from compressq.evaluate.report import SYNTHETIC, CandidateReport, ModelReport, OutputComparison, Report, verdict

FORMATS = ("table", "json", "markdown", "html")
LAYER_ROWS_SHOWN = 15
LAYER_BARS_SHOWN = 30
FILE_WIDTH = 160  # table text written with --output: wide enough that rows do not wrap


@dataclass
class Section:
    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


# ---------------------------------------------------------------------------------------------------
# Formatting of single figures


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def points(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def milliseconds(value: float) -> str:
    return f"{value:.3g}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def cosine_text(value: float | None) -> str:
    return _figure(value, "{:.6f}")


def _figure(value: float | None, template: str) -> str:
    if value is None:
        return "-"
    return "not finite" if math.isnan(value) else template.format(value)


# One sentence per figure, with the range that is good: shown under the tables in Markdown and HTML.
METRIC_GUIDE = [
    ("verdict", "the first line: which gates failed (each with the output and slice it measured) or passed, "
                "and the headline deltas; 'no gates set' when no --min-*/--max-* option was given."),
    ("cosine", "cosine of the angle between candidate and baseline outputs (1 = same direction); above "
               "0.999 is close, below 0.99 usually changes predictions. Detector heads are scored per slice "
               "(boxes 0:4, class scores 4:) because the whole output's cosine hides damaged class scores."),
    ("SQNR dB", "signal-to-quantization-noise ratio, 10 log10(|baseline|^2 / |baseline - candidate|^2); "
                "higher is closer: above 30 dB is good for int8, below 20 dB is visible damage."),
    ("top-1 agreement", "share of samples whose arg-max class matches the baseline's; only for class-score "
                        "outputs; 99 % or more is good. Integer label outputs are scored by exact match instead."),
    ("max abs error", "the largest element-wise difference, in the output's own units; judge it against the "
                      "output's range (0-1 for probabilities, pixels for boxes)."),
    ("speedup", "baseline median latency / candidate median latency on the same machine, interleaved runs; "
                "above 1.0x is faster, and the IQR shows how much the turns disagreed."),
    ("scored", "'task' marks the outputs that carry the model's task: gates, warnings and the verdict score only "
               "those (choose them with --task-output NAME)."),
]


def data_kind_note(report: Report) -> str:
    data = report.data
    if data.synthetic:
        return (f"Data: {SYNTHETIC} ({data.samples} random samples). Agreement figures below are measured on "
                f"{SYNTHETIC}: they show how far outputs moved on random inputs, not accuracy. "
                "Pass --data with your evaluation set to measure accuracy.")
    labels = f", labels '{data.labels}'" if data.labels else ", no labels (accuracy not measured)"
    return f"Data: {data.source}, {data.samples} samples{labels} (real data)."


# ---------------------------------------------------------------------------------------------------
# Sections


def sections(report: Report) -> list[Section]:
    parts = [_verdict_section(report), _size_section(report), _accuracy_section(report)]
    if report.candidates:
        parts.append(_agreement_section(report))
    parts += [_layer_section(report, c) for c in report.candidates if c.per_layer is not None]
    parts.append(_latency_section(report))
    if report.gates:
        parts.append(_gates_section(report))
    return parts


def _models(report: Report) -> list[ModelReport]:
    return [report.baseline, *report.candidates]


def _verdict_section(report: Report) -> Section:
    return Section("Verdict", note=verdict(report))


def _size_section(report: Report) -> Section:
    rows = []
    for model in _models(report):
        facts = model.facts
        size_ratio = ratio(model.size_ratio) if isinstance(model, CandidateReport) else "baseline"
        rows.append([model.name, human_bytes(facts.file_bytes), human_bytes(facts.gzip_bytes), size_ratio,
                     f"{facts.parameters:,}", percent(facts.zero_fraction),
                     f"{facts.quantized_nodes}/{facts.weighted_nodes} ({percent(facts.quantized_share)})"])
    return Section("Size", ["model", "file", "gzip", "size ratio", "parameters", "zero weights",
                            "quantized Conv/MatMul/Gemm"], rows)


def _accuracy_section(report: Report) -> Section:
    if report.baseline.accuracy is None:
        reason = (f"{SYNTHETIC} carry no labels" if report.data.synthetic
                  else "the data has no labels array; name it with --labels")
        return Section("Accuracy", note=f"not measured ({reason}).")
    accuracy = report.baseline.accuracy
    rows = []
    for model in _models(report):
        drop = points(model.accuracy_drop_points) if isinstance(model, CandidateReport) and \
            model.accuracy_drop_points is not None else "baseline"
        top5 = percent(model.accuracy.top5) if model.accuracy and model.accuracy.top5 is not None else "-"
        rows.append([model.name, percent(model.accuracy.top1) if model.accuracy else "-", top5, drop,
                     model.accuracy.data if model.accuracy else "-"])
    return Section(f"Accuracy on real data ({accuracy.samples} labelled samples, output '{accuracy.output}')",
                   ["model", "top-1", "top-5", "drop (points)", "data"], rows)


def _agreement_section(report: Report) -> Section:
    rows = []
    for candidate in report.candidates:
        for output in candidate.outputs:
            rows += _output_rows(candidate.name, output)
    notes = ["'task' marks the outputs that carry the task: gates and the verdict score only those"]
    if any(o.slices for c in report.candidates for o in c.outputs):
        notes.append("a detector head is also scored per slice along axis 1 (boxes, class scores), "
                     "its worst slice named in the verdict")
    if report.data.synthetic:
        notes.append(f"measured on {SYNTHETIC}: not evidence of accuracy")
    return Section(f"Agreement with the baseline ({report.data.kind}, {report.data.samples} samples)",
                   ["candidate", "output", "role", "scored", "top-1 agreement", "exact match", "cosine", "SQNR dB",
                    "max abs error", "data"], rows, "; ".join(notes).capitalize() + ".")


def _output_rows(candidate: str, output: OutputComparison) -> list[list[str]]:
    scored = "task" if output.task else "-"
    if output.non_finite:
        broken = f"not finite ({output.non_finite} values)"
        return [[candidate, output.output, output.role, scored, percent(output.top1_agreement),
                 percent(output.exact_match), broken, broken, broken, output.data]]
    rows = [[candidate, output.output, output.role, scored, percent(output.top1_agreement),
             percent(output.exact_match), cosine_text(output.cosine), _figure(output.sqnr_db, "{:.1f}"),
             _figure(output.max_abs_error, "{:.4g}"), output.data]]
    for part in output.slices:
        rows.append([candidate, part.label, part.role, scored, "-", "-", cosine_text(part.cosine),
                     _figure(part.sqnr_db, "{:.1f}"), _figure(part.max_abs_error, "{:.4g}"), output.data])
    return rows


def _layer_section(report: Report, candidate: CandidateReport) -> Section:
    layers = candidate.per_layer or []
    shown = layers[:LAYER_ROWS_SHOWN]
    rows = [[layer.tensor, layer.op_type, f"{layer.sqnr_db:.1f}", cosine_text(layer.cosine),
             number(layer.max_abs_error), report.data.kind] for layer in shown]
    notes = [f"{len(layers)} tensors matched by name, worst first"
             + (f"; top {len(shown)} shown, all in --format json" if len(layers) > len(shown) else "")]
    if candidate.per_layer_skipped:
        notes.append(f"{len(candidate.per_layer_skipped)} matched tensors changed shape and were skipped")
    if not layers:
        notes = ["no intermediate tensor has the same name in both models"]
    return Section(f"Per-layer error: {candidate.name} vs {report.baseline.name} ({report.data.kind})",
                   ["tensor", "op", "SQNR dB", "cosine", "max abs error", "data"], rows, "; ".join(notes) + ".")


def _latency_section(report: Report) -> Section:
    speedups = {(c.name, s.provider): s for c in report.candidates for s in c.speedup}
    rows = []
    for provider in report.settings["providers"]:
        for model in _models(report):
            result = next(r for r in model.latency if r.provider == provider)
            gain = speedups.get((model.name, provider))
            gain_text = f"{ratio(gain.ratio)} (IQR {gain.ratio_q1:.2f}-{gain.ratio_q3:.2f})" if gain else "baseline"
            work_text = ratio(gain.work_ratio) if gain and gain.work_ratio is not None else "baseline" if not gain \
                else "n/a"
            rows.append([provider, model.name, str(result.batch_size), milliseconds(result.median_ms),
                         milliseconds(result.p90_ms), f"{result.throughput_per_s:,.0f}", gain_text, work_text])
    settings = report.settings
    how = next((s.work_measured_with for s in speedups.values() if s.work_measured_with), None)
    note = (f"{settings['runs']} interleaved runs after {settings['warmup']} warm-up runs, "
            f"{settings['threads'] or 'default'} thread(s)"
            + ("; speedup = baseline median / candidate median (wall clock), IQR of the per-turn ratios"
               if speedups else "")
            + (f"; work speedup ({how}) is what --min-speedup decides on: the neighbours cannot change it."
               if how else "."))
    return Section("Latency", ["provider", "model", "batch", "median ms", "p90 ms", "samples/s", "speedup",
                               "work speedup"], rows, note)


def _gates_section(report: Report) -> Section:
    rows = [[gate.gate, gate.candidate, gate.on, number(gate.measured, 6), number(gate.limit, 6),
             "passed" if gate.passed else "FAILED"] for gate in report.gates]
    outcome = "all gates passed" if report.passed else f"{len(report.failed_gates)} gate(s) failed"
    return Section("Gates", ["gate", "candidate", "measured on", "measured", "limit", "verdict"], rows,
                   outcome + ".")


def _heading(report: Report) -> str:
    others = ", ".join(c.name for c in report.candidates)
    return f"compressq report: {report.baseline.name}" + (f" vs {others}" if others else "")


# ---------------------------------------------------------------------------------------------------
# Table (rich)


def print_table(report: Report, console: Console) -> None:
    console.print(styled((_heading(report), "bold")))
    console.print(printable(data_kind_note(report)))
    for section in sections(report):
        if section.rows:
            console.print(_rich_table(section))
        if section.note:
            console.print(printable(section.note) if section.rows
                          else styled((section.title, "bold"), f": {section.note}"))


def _rich_table(section: Section) -> Table:
    table = Table(title=printable(section.title), title_justify="left")
    for index, column in enumerate(section.columns):
        # fold, never truncate: a cut model or tensor name is worse than a taller table
        table.add_column(column, justify="left" if index == 0 or not _numeric(section, index) else "right",
                         overflow="fold")
    for row in section.rows:
        table.add_row(*(printable(cell) for cell in row))
    return table


def _numeric(section: Section, column: int) -> bool:
    """Right-align a column whose cells are all figures (a 'baseline' or '-' placeholder included)."""
    cells = [row[column] for row in section.rows if row[column] not in ("baseline", "-")]
    return bool(cells) and all(cell[:1].isdigit() or cell[:1] in "+-" for cell in cells)


def table_text(report: Report) -> str:
    buffer = io.StringIO()
    print_table(report, make_console(file=buffer, width=FILE_WIDTH, color_system=None, force_terminal=False))
    return buffer.getvalue()


def table_console(terminal: Console) -> Console:
    """The terminal's console, or a wide plain one for pipes and CI logs (rich assumes 80 columns there)."""
    return terminal if terminal.is_terminal else make_console(width=FILE_WIDTH, color_system=None, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------
# JSON and Markdown


def json_text(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def markdown_text(report: Report) -> str:
    lines = [f"### {_md(_heading(report))}", "", f"**Verdict:** {_md(verdict(report))}", "",
             _md(data_kind_note(report)), ""]
    for section in sections(report):
        if section.title == "Verdict":
            continue
        lines += [f"#### {_md(section.title)}", ""]
        if section.rows:
            lines += _markdown_table(section) + [""]
        if section.note:
            lines += [_md(section.note), ""]
    lines += ["#### How to read these figures", ""]
    lines += [f"- **{name}**: {_md(text)}" for name, text in METRIC_GUIDE] + [""]
    return "\n".join(lines)


def _md(text: str) -> str:
    """Model, node and file names are the user's: escape what Markdown renderers would read as HTML or
    markup (`<script>` stays text, a `|` cannot split a table cell)."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("`", "\\`")


def _markdown_table(section: Section) -> list[str]:
    def cells(values: list[str]) -> str:
        return "| " + " | ".join(_md(value) for value in values) + " |"

    aligns = ["---" if i == 0 or not _numeric(section, i) else "---:" for i in range(len(section.columns))]
    return [cells(section.columns), "| " + " | ".join(aligns) + " |"] + [cells(row) for row in section.rows]


# ---------------------------------------------------------------------------------------------------
# HTML with inline SVG charts

_STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3}td.n{text-align:right}
.note{color:#555}.failed{color:#b00;font-weight:bold}.passed{color:#070}svg text{font:11px sans-serif}
.verdict{font-size:16px;padding:.5em;border-left:4px solid #4a7ab5;background:#f5f8fc}
.verdict.bad{border-color:#b00;background:#fdf3f3}dt{font-weight:bold}dd{margin:0 0 .4em 1em}"""


def html_text(report: Report) -> str:
    css = "verdict bad" if report.failed_gates else "verdict"
    body = [f"<h1>{html.escape(_heading(report))}</h1>",
            f"<p class='{css}'><b>Verdict:</b> {html.escape(verdict(report))}</p>",
            f"<p class='note'>{html.escape(data_kind_note(report))}</p>"]
    for section in sections(report):
        if section.title == "Verdict":
            continue
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.rows:
            body.append(_html_table(section))
        if section.note:
            body.append(f"<p class='note'>{html.escape(section.note)}</p>")
    body += _charts(report)
    body.append("<h2>How to read these figures</h2><dl>" + "".join(
        f"<dt>{html.escape(name)}</dt><dd>{html.escape(text)}</dd>" for name, text in METRIC_GUIDE) + "</dl>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(_heading(report))}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _html_table(section: Section) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in section.columns)
    rows = []
    for row in section.rows:
        cells = []
        for index, cell in enumerate(row):
            css = "n" if index and _numeric(section, index) else ("failed" if cell == "FAILED" else
                                                                   "passed" if cell == "passed" else "")
            cells.append(f"<td class='{css}'>{html.escape(cell)}</td>" if css else f"<td>{html.escape(cell)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _charts(report: Report) -> list[str]:
    charts = []
    output_bars = [(f"{c.name}: {label}", sqnr) for c in report.candidates for o in c.outputs
                   for label, sqnr in [(o.output, o.sqnr_db), *((p.label, p.sqnr_db) for p in o.slices)]
                   if _drawable(sqnr)]
    if output_bars:
        charts.append(_chart_block(f"Per-output SQNR vs the baseline, dB (higher is closer; {report.data.kind})",
                                   bar_chart(output_bars, "dB", "SQNR vs the baseline (dB)")))
    for candidate in report.candidates:
        if candidate.per_layer:
            bars = [(layer.tensor, layer.sqnr_db) for layer in candidate.per_layer[:LAYER_BARS_SHOWN]
                    if _drawable(layer.sqnr_db)]
            charts.append(_chart_block(f"Per-layer SQNR, {candidate.name}, worst first, dB ({report.data.kind})",
                                       bar_chart(bars, "dB", "SQNR vs the baseline (dB)")))
    for provider in report.settings["providers"]:
        series = [(m.name, next(r for r in m.latency if r.provider == provider).samples_ms) for m in _models(report)]
        charts.append(_chart_block(f"Latency distribution on {provider}, ms per run (tick = one run, bar = median)",
                                   latency_chart(series)))
    return charts


def _drawable(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def _chart_block(title: str, svg: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{svg}"


def _short(label: str, limit: int = 48) -> str:
    return label if len(label) <= limit else "..." + label[-(limit - 3):]


def bar_chart(bars: list[tuple[str, float]], unit: str, axis: str = "") -> str:
    """Horizontal bars with an x axis (0 to the largest value, in `unit`, captioned `axis`); negative
    values are drawn as zero length, their number still printed."""
    label_width, bar_width, row = 330, 380, 18
    top = max([value for _, value in bars] + [1e-9])
    plot_height = row * len(bars) + 6
    height = plot_height + 34
    parts = [f"<svg width='{label_width + bar_width + 80}' height='{height}' role='img'>"]
    for index, (label, value) in enumerate(bars):
        y = index * row + 3
        width = max(0.0, value) / top * bar_width
        parts.append(f"<g><title>{html.escape(label)}: {value:.2f} {unit}</title>"
                     f"<text x='{label_width - 6}' y='{y + 12}' text-anchor='end'>{html.escape(_short(label))}</text>"
                     f"<rect x='{label_width}' y='{y}' width='{width:.1f}' height='{row - 4}' fill='#4a7ab5'/>"
                     f"<text x='{label_width + width + 4:.1f}' y='{y + 12}'>{value:.1f}</text></g>")
    parts.append(f"<line x1='{label_width}' x2='{label_width + bar_width}' y1='{plot_height}' y2='{plot_height}' "
                 f"stroke='#333'/><text x='{label_width}' y='{plot_height + 13}' text-anchor='middle'>0 {unit}</text>"
                 f"<text x='{label_width + bar_width}' y='{plot_height + 13}' text-anchor='middle'>{top:.3g} {unit}"
                 f"</text><text x='{label_width + bar_width / 2}' y='{plot_height + 28}' text-anchor='middle'>"
                 f"{html.escape(axis or unit)}</text></svg>")
    return "".join(parts)


def latency_chart(series: list[tuple[str, list[float]]]) -> str:
    """One strip per model: a tick for every timed run and a thick bar at the median."""
    label_width, plot_width, row = 200, 480, 26
    values = [v for _, samples in series for v in samples] or [0.0, 1.0]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    height = row * len(series) + 40

    def x(value: float) -> float:
        return label_width + (value - low) / span * plot_width

    parts = [f"<svg width='{label_width + plot_width + 20}' height='{height}' role='img'>"]
    for index, (name, samples) in enumerate(series):
        y = index * row + 4
        parts.append(f"<text x='{label_width - 6}' y='{y + 14}' text-anchor='end'>"
                     f"{html.escape(_short(name, 30))}</text>")
        parts += [f"<line x1='{x(v):.1f}' x2='{x(v):.1f}' y1='{y + 3}' y2='{y + 17}' stroke='#999'/>" for v in samples]
        if samples:
            median = sorted(samples)[len(samples) // 2]
            parts.append(f"<rect x='{x(median) - 1.5:.1f}' y='{y}' width='3' height='20' fill='#c33'>"
                         f"<title>median {median:.3g} ms</title></rect>")
    axis_y = row * len(series) + 18
    parts.append(f"<line x1='{label_width}' x2='{label_width + plot_width}' y1='{axis_y - 12}' y2='{axis_y - 12}' "
                 f"stroke='#333'/><text x='{label_width}' y='{axis_y}'>{low:.3g} ms</text>"
                 f"<text x='{label_width + plot_width}' y='{axis_y}' text-anchor='end'>{high:.3g} ms</text>"
                 f"<text x='{label_width + plot_width / 2}' y='{axis_y + 16}' text-anchor='middle'>"
                 "latency per run (ms); one row per model</text></svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------
# Writing


def render_text(report: Report, output_format: str) -> str:
    views = {"table": table_text, "json": json_text, "markdown": markdown_text, "html": html_text}
    return views[output_format](report)
