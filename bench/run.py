"""`make bench`: run every section, print one table, exit 1 if a bar failed.

    python -m bench.run [SECTION ...]     sections: the bench/*_bench.py module names without _bench
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path

from rich.console import Console

from bench.table import Table

console = Console(stderr=True)


def discover_sections() -> list[str]:
    folder = Path(__file__).parent
    return sorted(m.name[: -len("_bench")] for m in pkgutil.iter_modules([str(folder)]) if m.name.endswith("_bench"))


def main(argv: list[str]) -> int:
    wanted = argv or discover_sections()
    table = Table()
    for section in wanted:
        module = importlib.import_module(f"bench.{section}_bench")
        started = time.perf_counter()
        console.rule(f"bench: {section}")
        module.run(table)
        console.print(f"{section} took {time.perf_counter() - started:.0f} s")
    table.render(Console(width=220))
    markdown_path = Path(".bench/results.md")
    markdown_path.parent.mkdir(exist_ok=True)
    markdown_path.write_text(table.markdown() + "\n")
    console.print(f"markdown copy: {markdown_path}")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
