"""Process-wide settings that make CPU meta-training faster; the ``metalearn`` command applies
them, a Python user calls ``tune_allocator()`` once at start-up."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

OPT_OUT_VARIABLE = "METALEARN_DEFAULT_ALLOCATOR"


def tune_allocator() -> bool:
    """Let glibc keep and reuse freed memory for the large activations of a meta-batch.

    Why: glibc serves every block above 32 MiB with a fresh ``mmap`` and returns it to the
    system on ``free``; a Conv4 meta-batch allocates dozens of such blocks per step (a 60-way
    ProtoNet episode's first feature map alone is 72 MiB), so each step page-faults all of them
    in again, and on this machine half the step time was kernel time. Raising the mmap and trim
    thresholds makes the heap reuse those pages: a 60-way ProtoNet training step 681 -> 466 ms
    (one thread, this project's machine; ``benchmarks/methods.py`` with and without
    ``--default-allocator``). The cost is that the process keeps its peak memory until it exits.

    Applies only to Linux with glibc, once per process, before large allocations matter;
    returns whether it applied. ``METALEARN_DEFAULT_ALLOCATOR=1`` in the environment opts out.
    """
    if os.environ.get(OPT_OUT_VARIABLE) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    # blocks up to 1 GiB come from the heap; the heap is never trimmed (2**31 - 1: C int's largest)
    return bool(mallopt(_M_MMAP_THRESHOLD, 2**30) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
