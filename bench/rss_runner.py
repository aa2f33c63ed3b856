"""Run one function in this fresh process and report its wall time and the process's peak RSS.

    python -m bench.rss_runner MODULE:FUNCTION '{"keyword": "arguments as JSON"}'

The last line on stdout is JSON: {"seconds": ..., "peak_rss_bytes": ..., "result": ...} (or {"error": ...,
"peak_rss_bytes": ...} and exit status 1 when the function raised). The time covers
the call only (not the interpreter start or the imports); the peak RSS (VmHWM) covers the whole process,
imports included, so compare it only with another measurement taken the same way.
"""

from __future__ import annotations

import importlib
import json
import sys
import time


def peak_rss_bytes() -> int:
    """VmHWM of this process from /proc; resource's ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main(argv: list[str]) -> int:
    target, arguments = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    started = time.perf_counter()
    try:
        result = function(**arguments)
    except Exception as exc:  # still report the memory it reached, then fail
        import traceback

        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(json.dumps({"error": error, "peak_rss_bytes": peak_rss_bytes()}))
        return 1
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "result": result}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
