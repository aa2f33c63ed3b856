"""compressq: make ONNX models smaller and faster without breaking them.

The public Python API, for pipelines that prefer a call to a command line::

    import compressq
    model = compressq.load_model("model.onnx")
    data = compressq.load_dataset("calib.npz", model)
    result = compressq.quantize_model(model, data, compressq.QuantizeConfig())
    compressq.save_model(result.model, "model.int8.onnx")
    print(result.summary.speedup, result.summary.accuracy)

Every name below is imported on first use, so `import compressq` (and the command line's start) stays fast.
"""

from __future__ import annotations

import os as _os
import signal as _signal
import sys as _sys


def _leave_quietly(signum, frame) -> None:  # pragma: no cover - runs in a starting command line only
    _os.write(2, b"interrupted\n")
    _os._exit(143 if signum == _signal.SIGTERM else 130)


# The command line starting (`compressq ...` or `python -m compressq`): Ctrl-C before compressq.cli.app has
# installed its own handlers ends quietly, not in a KeyboardInterrupt traceback. Importers keep theirs.
if _sys.argv and (_sys.argv[0] == "-m" or _os.path.basename(_sys.argv[0]) == "compressq"):
    for _signum in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(_signum, _leave_quietly)

import importlib  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

__version__ = "0.1.0"

_PUBLIC = {
    "quantize_model": "compressq.quantize.api",
    "QuantizeConfig": "compressq.quantize.config",
    "QuantizeResult": "compressq.quantize.api",
    "QuantizationPlan": "compressq.quantize.plan_file",
    "read_plan": "compressq.quantize.plan_file",
    "prune_model": "compressq.prune",
    "PruneConfig": "compressq.prune.config",
    "PruneResult": "compressq.prune",
    "build_report": "compressq.evaluate.report",
    "ReportConfig": "compressq.evaluate.report",
    "Report": "compressq.evaluate.report",
    "inspect_model": "compressq.evaluate.summary",
    "load_model": "compressq.io",
    "save_model": "compressq.io",
    "load_dataset": "compressq.data",
    "CompressqError": "compressq.errors",
}
_RENAMED = {"inspect_model": "summarize"}

__all__ = [
    "__version__", "quantize_model", "QuantizeConfig", "QuantizeResult", "QuantizationPlan", "read_plan",
    "prune_model", "PruneConfig", "PruneResult", "build_report", "ReportConfig", "Report", "inspect_model",
    "load_model", "save_model", "load_dataset", "CompressqError",
]

if TYPE_CHECKING:
    from compressq.data import load_dataset
    from compressq.errors import CompressqError
    from compressq.evaluate.report import Report, ReportConfig, build_report  # noqa: TID251 (the public API re-exports the siblings)
    from compressq.evaluate.summary import summarize as inspect_model  # noqa: TID251 (the public API re-exports the siblings)
    from compressq.io import load_model, save_model
    from compressq.prune import PruneResult, prune_model  # noqa: TID251 (the public API re-exports the siblings)
    from compressq.prune.config import PruneConfig  # noqa: TID251 (the public API re-exports the siblings)
    from compressq.quantize.api import QuantizeResult, quantize_model  # noqa: TID251 (the public API re-exports the siblings)
    from compressq.quantize.config import QuantizeConfig  # noqa: TID251 (the public API re-exports the siblings)
    from compressq.quantize.plan_file import QuantizationPlan, read_plan  # noqa: TID251 (the public API re-exports the siblings)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'compressq' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
