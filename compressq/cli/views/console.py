"""The consoles every view prints on, and the small text helpers they share.

Consoles are made here only, all with markup off: a string is printed as it is, so `cnn[int8].onnx` or
`d[/x].onnx` can never be read as a style. Styles are given as data (`styled`), never spelled inside text.
Every string that comes from a user or a model also goes through `printable` (control characters shown as
visible escapes), so a name cannot drive the terminal.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass

from rich.console import Console
from rich.text import Text


def make_console(**options) -> Console:
    """The one way a view gets a console: markup, highlighting and emoji codes off."""
    return Console(markup=False, highlight=False, emoji=False, **options)


stdout = make_console(soft_wrap=True)
stderr = make_console(stderr=True, soft_wrap=True)


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """`text` with every non-printable character (ESC, BEL, newlines, bidi overrides, ...) written as a
    visible escape such as `\\x1b`: what a model names its tensors can never move the cursor, clear the
    screen or set the terminal title."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _visible_escape(char) for char in text)


def _visible_escape(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line from plain parts and (text, style) pairs; every part is made printable first."""
    return Text.assemble(*((printable(p[0]), p[1]) if isinstance(p, tuple) else printable(p) for p in parts))


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def print_json(data) -> None:
    """Machine-readable output: JSON on stdout and nothing else."""
    if is_dataclass(data) and not isinstance(data, type):  # an instance: a dataclass type is not data
        data = data.to_dict() if hasattr(data, "to_dict") else asdict(data)
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def shape_text(shape: list) -> str:
    return printable("[" + ", ".join(str(d) for d in shape) + "]")
