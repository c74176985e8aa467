"""How much memory a training step may use, and how much one task of it takes: what
``TrainConfig.task_chunk="auto"`` chooses the chunk size from.

- :func:`available_memory`: on a GPU what ``torch.cuda.mem_get_info`` reports free plus what
  torch's caching allocator holds unused; on the CPU Linux's ``MemAvailable``, lowered to what
  the limits of the process's control groups leave (cgroup v1 or v2; its own group and those
  above it, such as a batch job's).
- :func:`peak_memory_of`: the peak memory a call adds above what was in use before it. On a GPU
  ``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident set (``VmHWM``),
  reset through ``/proc/self/clear_refs`` after glibc has returned its free memory
  (``malloc_trim``), so that memory the call reuses from earlier steps still counts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import re
import time
from pathlib import Path
from typing import Callable

import torch

from metalearn.errors import OptionError


AUTO = ('task_chunk="auto"', "--task-chunk auto")  # the option that measures memory, as each caller spells it


def available_memory(device: torch.device) -> int:
    """Bytes a step on ``device`` could still use."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        raise OptionError(f"{{auto}} knows the memory of CPUs and CUDA GPUs only, not {device.type}; give "
                          "{task_chunk} a number", auto=AUTO, task_chunk="task_chunk")
    available = _meminfo_bytes("MemAvailable")
    for limit, used in _limits():
        available = min(available, max(limit - used, 0))
    return available


def _limits() -> list[tuple[int, int]]:
    """(limit, usage) in bytes of everything that bounds this process's memory besides the
    machine's: its control groups (:func:`_cgroup_limits`) and its address space
    (:func:`_address_space_limit`)."""
    return _cgroup_limits() + _address_space_limit()


def _address_space_limit() -> list[tuple[int, int]]:
    """[(limit, usage)] of this process's address space where it is limited (``ulimit -v``,
    ``RLIMIT_AS``, which some batch schedulers set per job): an allocation beyond it fails
    whatever the machine has free, and a process reserves address space well beyond its
    resident memory (thread stacks, allocator arenas), so its usage is ``VmSize``; [] where
    there is no limit or it cannot be read."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return []
        return [(limit, _status_bytes("VmSize"))]
    except (ImportError, OSError, ValueError, AttributeError):  # not Unix, or no /proc/self/status
        return []


def _cgroup_limits(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> list[tuple[int, int]]:
    """(limit, usage) in bytes of every memory control group this process is in that sets a
    limit: its own group and each group above it (a job's slice under a user's), under cgroup v2
    (``memory.max``, ``memory.current``: ``0::/path`` in ``/proc/self/cgroup``) and under v1's
    memory controller (``memory.limit_in_bytes``, ``memory.usage_in_bytes``: ``N:memory:/path``).
    A group seen from inside a container whose own view of ``/sys/fs/cgroup`` starts at it is
    found at the root. v1's "no limit" is a huge number, larger than any memory: it never binds.
    The usage leaves out the group's inactive file pages (``memory.stat``'s ``inactive_file``,
    v1's ``total_inactive_file``): page cache the kernel reclaims before it fails an allocation
    (a job that copied its dataset to local disk holds gigabytes of it), as the working set
    that container schedulers judge by does."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    found: list[tuple[int, int]] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2, one hierarchy (under unified/ where v1 controllers are mounted beside it)
            hybrid = (Path(root) / "unified").is_dir() and not (Path(root) / "cgroup.controllers").is_file()
            base, names = Path(root) / "unified" if hybrid else Path(root), ("memory.max", "memory.current")
            inactive = "inactive_file"
        elif "memory" in controllers.split(","):
            base = Path(root) / "memory" if (Path(root) / "memory").is_dir() else Path(root)
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            inactive = "total_inactive_file"
        else:
            continue
        parts = [part for part in path.strip("/").split("/") if part]
        for depth in range(len(parts), -1, -1):  # the process's own group first, then its parents
            folder = base.joinpath(*parts[:depth])
            limit, used = _read_int(folder / names[0]), _read_int(folder / names[1])
            if limit is not None and used is not None:
                used = max(used - _stat_field(folder / "memory.stat", inactive), 0)
                if (limit, used) not in found:
                    found.append((limit, used))
    return found


def _stat_field(path: Path, field: str) -> int:
    """A ``memory.stat`` line's number (bytes); 0 where the file or the line is missing."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field} (\d+)$", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def peak_memory_of(call: Callable[[], None], device: torch.device) -> int:
    """Bytes of memory that ``call()`` needs at its peak beyond what was in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _return_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
    except OSError as err:
        raise OptionError(f"{{auto}} measures a step's memory through /proc/self/clear_refs, which this system "
                          f"does not allow ({err.strerror}); give {{task_chunk}} a number", auto=AUTO,
                          task_chunk="task_chunk") from None
    before = _status_bytes("VmRSS")
    call()
    return max(_status_bytes("VmHWM") - before, 0)


def largest_chunk(tasks: int, per_task: int, budget: int) -> int:
    """The most tasks, up to ``tasks``, whose footprint of ``per_task`` bytes each fits in
    ``budget`` (at least 1), then lowered to the smallest size that needs no more chunks: 16
    tasks of which 7 fit take chunks of 6 (6, 6, 4: :func:`chunk_sizes`), three chunks as 7, 7,
    2 would be, with a lower peak."""
    most = max(1, min(tasks, budget // max(per_task, 1)))
    chunks = math.ceil(tasks / most)
    return math.ceil(tasks / chunks)


def seconds_of(call: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of ``call()``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def chunk_candidates(tasks: int, most: int) -> list[int]:
    """The chunk sizes ``--task-chunk auto`` times, smallest first: the powers of two below
    ``most`` (the largest that fits the memory budget) and ``most`` itself."""
    most = max(1, min(tasks, most))
    sizes, size = [], 1
    while size < most:
        sizes.append(size)
        size *= 2
    return sizes + [most]


def fastest_chunk(seconds_per_task: dict[int, float], tolerance: float = 0.05) -> int:
    """The chunk size to train with, from the measured seconds per task of each size that fits:
    the fastest, except that a larger size within ``tolerance`` (5%) of the fastest is
    preferred (fewer, larger chunks: less per-chunk overhead that a short probe does not see,
    and the whole batch at once when it is as fast)."""
    if not seconds_per_task:
        raise ValueError("fastest_chunk needs at least one measured chunk size")
    best = min(seconds_per_task.values())
    return max(size for size, seconds in seconds_per_task.items() if seconds <= best * (1 + tolerance))


def chunk_sizes(tasks: int, chunk: int) -> list[int]:
    """Sizes of the chunks of ``tasks`` tasks taken ``chunk`` at a time (0: all at once)."""
    if chunk <= 0 or chunk >= tasks:
        return [tasks]
    return [chunk] * (tasks // chunk) + ([tasks % chunk] if tasks % chunk else [])


def _return_free_memory() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may be reused unseen (an underestimate)
        pass


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def check_array_fits(nbytes: int, what: str, advice: str, **options) -> None:
    """Refuse, in one line, an array of ``nbytes`` that is larger than the memory this process
    can still use (MemAvailable, and what its control groups' limits and its address-space
    limit leave, :func:`_limits`), before it is allocated: filling it would end in the kernel's
    out-of-memory kill, without a word. Only
    where ``/proc/meminfo`` tells (Linux); elsewhere nothing is checked. ``advice`` may name
    options as :class:`~metalearn.errors.OptionError` does (``{image_size}``, given in ``options``)."""
    try:
        available = _meminfo_bytes("MemAvailable")
    except (OptionError, AttributeError, ValueError):  # no /proc, or a meminfo without the field
        return
    for limit, used in _limits():
        available = min(available, max(limit - used, 0))
    if nbytes > available:
        raise OptionError(f"{what} takes {nbytes / 1e9:.3g} GB of memory, more than the {available / 1e9:.3g} GB "
                          f"available; {advice}", **options)


def allocate_images(shape: tuple[int, ...], what: str, advice: str, zeros: bool = False, **options):
    """A uint8 array of ``shape`` for a dataset's images, after :func:`check_array_fits`; an
    allocation that fails all the same (where the memory is not known, or was taken meanwhile)
    is the same one line, not a MemoryError that reads as the run's options' doing."""
    import numpy as np

    nbytes = math.prod(shape)
    check_array_fits(nbytes, what, advice, **options)
    try:
        return np.zeros(shape, np.uint8) if zeros else np.empty(shape, np.uint8)
    except MemoryError:
        raise OptionError(f"{what} takes {nbytes / 1e9:.3g} GB of memory, more than this process could allocate; "
                          f"{advice}", **options) from None


def _meminfo_bytes(field: str) -> int:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        raise OptionError("{auto} reads the available memory from /proc/meminfo, which this system lacks; give "
                          "{task_chunk} a number", auto=AUTO, task_chunk="task_chunk") from None
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def _read_int(path: str | Path) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):  # no such file, or "max" (no limit)
        return None
