"""Process-wide settings: an allocator that makes CPU meta-training faster (the ``metalearn``
command applies it; a Python user calls ``tune_allocator()`` once at start-up), and GPU kernels
that keep float32 results accurate and reproducible (applied for every CUDA device)."""

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


FAST_GPU_VARIABLE = "METALEARN_FAST_GPU_KERNELS"


def configure_gpu_kernels() -> bool:
    """Full-precision float32 and deterministic cuDNN algorithms for the GPU; returns whether
    it applied (``METALEARN_FAST_GPU_KERNELS=1`` in the environment keeps torch's defaults).

    Why: torch's defaults let cuDNN convolutions round their inputs to TF32 (10-bit mantissa)
    and pick non-deterministic kernels. MAML's meta-gradient through batch norm over a handful
    of images is ill-conditioned and amplifies both. Measured on an H200 (torch 2.11): with
    torch's defaults the float32 meta-gradient was off by 19% (5-way) to 28% (20-way) in its
    worst entry against float64, and a run resumed after 2 of 4 steps ended 6e-4 away from the
    uninterrupted one in the first layer's weights; with this setting the error is 1.5e-6 and
    the resumed run equals the uninterrupted one to 1e-6 (``tests/test_gpu.py``), for a
    meta-step 17% slower (5-way 1-shot, 28.3 vs 24.2 ms). Called by ``init_world`` for every
    CUDA device.
    """
    import torch

    if os.environ.get(FAST_GPU_VARIABLE):
        return False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return True
