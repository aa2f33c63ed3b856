"""Handing freed memory back to the operating system between the steps of a command.

onnxruntime sessions and parsed protos allocate in many small blocks; once freed, glibc keeps them in its
heap, where they still count as resident memory. Measured on MiniLM (86 MB): a session opened and closed
left +52 MB resident, `malloc_trim` gave 44 MB of it back; after load_model 42 MB came back. Peak RSS is a
bar of ours (issue 11), so the steps that drop a session or a model copy call this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the OS (a no-op where libc has no malloc_trim). Models and sessions
    are freed by reference counting as they are dropped; gc.collect() would cost ~30 ms a call for nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim, nothing to hand back this way
        return None
