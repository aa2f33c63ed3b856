"""The one table every benchmark section writes into, printed at the end of `make bench`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table as RichTable


def log(message: str) -> None:
    """A progress line of a section, on stderr (the table goes to stdout at the end)."""
    print(f"  {message}", file=sys.stderr, flush=True)


def mb(value: float) -> int:
    return round(value / 2**20)


@dataclass
class Row:
    section: str
    metric: str
    compressq: str
    reference: str
    bar: str
    verdict: str


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)

    def add(self, section: str, metric: str, compressq_value, reference_value=None, bar: str | None = None,
            passed: bool | None = None) -> None:
        verdict = "" if passed is None else ("PASS" if passed else "FAIL")
        self.rows.append(Row(section, metric, _fmt(compressq_value), _fmt(reference_value), bar or "", verdict))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "FAIL"]

    def render(self, console: Console) -> None:
        table = RichTable(title="compressq benchmarks (measured side by side in this run)", title_justify="left")
        for column in ("section", "metric", "compressq", "reference", "bar", "verdict"):
            table.add_column(column)
        for row in self.rows:
            style = "red" if row.verdict == "FAIL" else None
            table.add_row(row.section, row.metric, row.compressq, row.reference, row.bar, row.verdict, style=style)
        console.print(table)

    def markdown(self) -> str:
        lines = ["| section | metric | compressq | reference | bar | verdict |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_cell(v) for v in (r.section, r.metric, r.compressq, r.reference, r.bar,
                                                      r.verdict)) + " |" for r in self.rows]
        return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
