"""Process-wide settings, each applied only when asked for.

- :func:`tune_allocator`: glibc keeps freed memory for reuse. The ``metalearn`` command applies
  it (``metalearn --allocator default ...`` does not); a Python program calls it once at start-up
  if it wants it. What it gains is measured in the performance docs (``benchmarks/methods.py``
  with and without ``--default-allocator``).
- :func:`configure_gpu_kernels`: full-precision, deterministic GPU kernels. ``init_world`` (and
  so ``metalearn.train`` and ``evaluate_run``) applies it for a CUDA device unless given
  ``exact_gpu_kernels=False`` (``--fast-gpu-kernels`` on the command line). It sets torch's
  global backend flags, so it holds for everything else the process runs on the GPU too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import threading
from typing import Any

from metalearn.errors import MetalearnError, is_flag

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Let glibc keep and reuse freed memory for the large activations of a meta-batch.

    Why: glibc serves every block above 32 MiB with a fresh ``mmap`` and returns it to the
    system on ``free``; a Conv4 meta-batch allocates dozens of such blocks per step (a 60-way
    ProtoNet episode's first feature map alone is 72 MiB), so each step page-faults all of them
    in again. Raising the mmap and trim thresholds makes the heap reuse those pages. The cost is
    that the process keeps its peak memory until it exits.

    Applies only to Linux with glibc, once per process, before large allocations matter;
    returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    # blocks up to 1 GiB come from the heap; the heap is never trimmed (2**31 - 1: C int's largest)
    return bool(mallopt(_M_MMAP_THRESHOLD, 2**30) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def configure_gpu_kernels() -> None:
    """Full-precision float32 and deterministic cuDNN algorithms for the GPU, process-wide.

    Why: torch's defaults let cuDNN convolutions round their inputs to TF32 (10-bit mantissa)
    and pick non-deterministic kernels. MAML's meta-gradient through batch norm over a handful
    of images is ill-conditioned and amplifies both: the float32 meta-gradient then differs from
    float64 by tens of percent in its worst entry, and a resumed run no longer equals the
    uninterrupted one (``tests/test_gpu.py`` checks both; the performance docs give the
    measurements and the cost in speed).
    """
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def process_age_s() -> float:
    """Seconds since this process started, from the kernel's record (Linux ``/proc``), so that a
    command's ``--time-limit`` counts its interpreter start and imports as well (seconds on a busy
    machine, which a scheduler's hard limit counts too); 0 where the record cannot be read."""
    import os

    try:
        with open("/proc/self/stat") as f:
            started_ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command's name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def processor_name() -> str:
    """The CPU's model name as the operating system gives it ("AMD EPYC 7B13", "Apple M2"), or
    the architecture where it gives none ("x86_64"). Read from ``/proc/cpuinfo`` on Linux (where
    ``platform.processor()`` is empty or the architecture), ``sysctl`` on macOS."""
    import platform
    import subprocess

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def machine(device=None, processes: int = 1) -> dict:
    """What a figure's reader needs to know of the computer a run trained on: the processor,
    the vector instructions torch's CPU kernels use there (``cpu_capability``: "AVX512", "AVX2",
    "DEFAULT"; they round differently, so a run's later digits, and after many steps its model,
    depend on them), its cores (``cores``: the machine's; ``usable_cores``: those this process may run on), the
    threads torch computes with, the GPU (``device``, where the run trains on one), the number of
    training ``processes`` (torchrun ranks), and the torch, Python and metalearn versions. The
    trainer keeps one such record per stretch of training in its checkpoint, ``metalearn export`` writes them
    to ``summary.json`` (``machines``). Plain ``str`` and ``int`` values only: the checkpoint is
    read with ``weights_only=True``, which refuses torch's ``TorchVersion`` string subclass."""
    import os
    import platform

    import torch

    from metalearn import __version__

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        usable = os.cpu_count()
    record = {"processor": processor_name(), "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
              "cores": os.cpu_count(), "usable_cores": usable,
              "torch_threads": torch.get_num_threads(), "processes": processes,
              "system": f"{platform.system()} {platform.machine()}", "torch": str(torch.__version__),
              "python": platform.python_version(), "metalearn": __version__}
    if device is not None and torch.device(device).type == "cuda":
        record["device"] = str(torch.cuda.get_device_name(torch.device(device)))
    return record


# torch's random state and default dtype belong to the process, not to a thread: every call of
# metalearn's that forks the one (own_random_state) or sets the other (float32_default) holds
# this lock while it does, so that calls from several threads (a sweep's trials in a thread
# pool) take those parts one at a time, each drawing what it would alone, and leave the
# caller's state as it was. A training holds it through its fit: trainings in threads run one
# after another, with the results they have one after another.
PROCESS_STATE = threading.RLock()


def show_progress(given: Any, owner: str = "") -> bool:
    """Whether to draw progress bars: ``given`` where True or False, else (None: the default of
    ``train``, ``evaluate_run``, ``compare_learners``, ``build_task_source``, ``build_trainer``
    and ``Trainer.fit``, and the commands' without ``--progress/--no-progress``) only when the
    error output is a terminal or a Jupyter notebook's cell output (which redraws a bar in
    place): a bar redrawn into a log file (nohup, a scheduler's output, a script's output piped
    to a file) writes a line per redraw. Anything else ("yes", which would read as true) is
    refused in one line naming ``owner``'s keyword."""
    if given is None:
        if type(sys.stderr).__module__.startswith("ipykernel"):  # a notebook: no terminal, but bars show
            return True
        try:  # stderr may be closed (2>&-: None) or replaced by an object without isatty
            return bool(sys.stderr.isatty())
        except (AttributeError, ValueError, OSError):
            return False
    if not is_flag(given):
        named = f"{owner}'s progress" if owner else "progress"
        raise MetalearnError(f"{named} is True, False or None (bars when the error output is a terminal), "
                             f"got {given!r}")
    return bool(given)


class DroppingStream:
    """A text stream whose output is dropped, not raised, from the first write or flush that
    fails on (a full disk or a file-size limit under ``2> log``, a reader gone from a pipe), so
    that what prints stops nothing: a failure raised inside training would end the run and lose
    the steps since its last checkpoint. ``stream``: the stream written to; None for the one
    ``sys.stderr`` names at each write (a notebook's, the command line's). :attr:`write_error`
    keeps the failure, unless it was a closed pipe, for the caller to report when the work is
    done. A non-blocking stream that is full for now (``BlockingIOError``) is no failure: the
    error is raised as it is, unless ``drop_when_busy`` (a progress bar's stream), where that
    one write is dropped and the next is tried."""

    def __init__(self, stream=None, drop_when_busy: bool = False):
        self._fixed = stream
        self._drop_when_busy = drop_when_busy
        self.dropped = False
        self.write_error: OSError | None = None

    @property
    def _stream(self):
        return sys.stderr if self._fixed is None else self._fixed

    def write(self, text):
        if self.dropped and isinstance(text, str):  # bytes still meet the stream's TypeError
            return len(text)
        try:
            return self._stream.write(text)
        except BlockingIOError:
            if self._drop_when_busy:
                return len(text)
            raise
        except OSError as err:
            self._drop(err)
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.dropped:
            return
        try:
            self._stream.flush()
        except BlockingIOError:
            if not self._drop_when_busy:
                raise
        except OSError as err:
            self._drop(err)

    def _drop(self, err: OSError) -> None:
        self.dropped = True
        if not isinstance(err, BrokenPipeError):
            self.write_error = err

    def __getattr__(self, name):  # isatty, encoding, fileno: the stream's own
        return getattr(self._stream, name)


@contextlib.contextmanager
def own_random_state(devices: list[int] | None = None):
    """``torch.random.fork_rng(devices)`` while holding :data:`PROCESS_STATE`: the caller's
    random state (the CPU's, and that of ``devices``: every CUDA device's where None, which
    starts CUDA) is restored after the block, whatever another thread does meanwhile."""
    import torch

    with PROCESS_STATE, torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def float32_default():
    """torch's default dtype float32 within the block, the caller's restored after: metalearn's
    weights, tasks and random draws are float32, and a draw without a dtype (``torch.rand(n,
    generator=g)``) takes other numbers from the same seed under a notebook's float64 default,
    so that training and evaluation would see other episodes and write other scores. Holds
    :data:`PROCESS_STATE`, as the dtype is the process's."""
    import torch

    with PROCESS_STATE:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def cuda_devices() -> list[int]:
    """The CUDA devices whose random state a fork of it must keep (``torch.random.fork_rng``'s
    ``devices``): every one, where CUDA is in use, since ``torch.manual_seed`` reseeds them all."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
