"""The process group a run belongs to: one process, or one rank of a ``torchrun`` job.

Every rank draws the same task indices from the shared per-step seed and keeps its own
contiguous share of the meta-batch; gradients are summed with an all-reduce after each rank
scaled its loss by its share, so the update equals that of one process taking the whole batch.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from metalearn.errors import MetalearnError, OptionError
from metalearn.runtime import configure_gpu_kernels


class RankLost(MetalearnError):
    """A collective failed: another process of the job died or stopped answering."""


def _collective(operation, *args, **kwargs):
    try:
        return operation(*args, **kwargs)
    except RuntimeError as err:  # gloo reports a dead peer as a RuntimeError
        raise RankLost(str(err).splitlines()[0][:200]) from None


@dataclass(frozen=True)
class World:
    """This process's place in the job (rank of size) and the device it computes on."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, num_items: int) -> slice:
        """This rank's contiguous share of ``num_items`` (sizes differ by at most one)."""
        base, extra = divmod(num_items, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sum_gradients(self, parameters) -> None:
        self.sum_in_place([p.grad for p in parameters if p.grad is not None])

    def sum_in_place(self, tensors: list[Tensor]) -> None:
        """Replace each tensor (one dtype and device) by its sum over ranks, in one collective."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        _collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        for t, summed in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(summed.view_as(t))

    def sum(self, value: Tensor) -> Tensor:
        """The sum of ``value`` over the ranks, on ``value``'s device (the collective runs on
        this rank's device: NCCL reduces only GPU tensors)."""
        if self.distributed:
            summed = value.to(self.device, copy=True)
            _collective(dist.all_reduce, summed, op=dist.ReduceOp.SUM)
            value = summed.to(value.device)
        return value

    def gather(self, values: Tensor) -> Tensor:
        """Concatenate every rank's ``values`` (first axis) in rank order, on the CPU.

        Every rank passes a tensor of the same dtype and number of axes; a rank with no rows
        may give any size on the other axes (it need not know them: an evaluator rank that
        scored no episode does not know how many steps the others scored)."""
        if not self.distributed:
            return values.cpu()
        device = self.device  # NCCL collectives take tensors on the rank's GPU
        shapes = [torch.zeros(values.dim(), dtype=torch.long, device=device) for _ in range(self.size)]
        _collective(dist.all_gather, shapes, torch.tensor(values.shape, dtype=torch.long, device=device))
        filled = [shape[1:].tolist() for shape in shapes if shape[0] > 0]
        if not filled:
            return values.cpu()
        if any(shape != filled[0] for shape in filled):  # every rank sees it, so all stop here
            raise MetalearnError(f"World.gather: the ranks' rows differ in shape ({filled})")
        rows = [int(shape[0]) for shape in shapes]
        padded = torch.zeros((max(rows), *filled[0]), dtype=values.dtype, device=device)
        if values.shape[0]:
            padded[: values.shape[0]] = values
        parts = [torch.zeros_like(padded) for _ in range(self.size)]
        _collective(dist.all_gather, parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, rows)]).cpu()

    def barrier(self) -> None:
        if self.distributed:
            _collective(dist.barrier)


def current_world(device: torch.device | str = "cpu") -> World:
    """This process's ``World`` when it is one rank of an initialised process group (training
    under torchrun), else one process: for a method whose meta-loss itself needs collectives
    (maml-rl's TRPO step is global over the ranks' tasks)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), torch.device(device))
    return World(device=torch.device(device))


def device_name(device: Any) -> str:
    """``device`` as text: a ``torch.device`` (``torch.device("cuda", 1)``) as torch writes it
    (``"cuda:1"``); anything but text refused in one line, not by a ``str`` method deep in the
    device's resolution."""
    if isinstance(device, torch.device):
        return str(device)
    if not isinstance(device, str):
        raise OptionError(f"{{device}} must be cpu, cuda, cuda:N or auto (text or a torch.device), got {device!r} "
                          f"({type(device).__name__})", device="device")
    return device


def resolve_device(name: str = "cpu", local_rank: int = 0) -> torch.device:
    """The device a process computes on: ``cpu``, ``cuda`` (the process's GPU: ``cuda:LOCAL_RANK``
    under torchrun), ``cuda:N``, or ``auto`` (a GPU when torch sees one, else the CPU); a
    ``torch.device`` as its text."""
    name = device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise OptionError(f"{{device}} must be cpu, cuda, cuda:N or auto, got {name!r}", device="device")
    if not torch.cuda.is_available():
        raise OptionError("{device}: this torch build sees no GPU (torch.cuda.is_available() is False); use {cpu}, "
                          "or install a CUDA build of torch", device=(f"device={name!r}", f"--device {name}"),
                          cpu=("device='cpu'", "--device cpu"))
    try:
        device = torch.device(name if ":" in name else f"cuda:{local_rank}")
    except RuntimeError:
        raise OptionError("{device} is not a device name (cuda or cuda:N)",
                          device=(f"device={name!r}", f"--device {name!r}")) from None
    if device.index >= torch.cuda.device_count():
        raise OptionError(f"{{device}}: only {torch.cuda.device_count()} GPU(s) visible",
                          device=(f"device={str(device)!r}", f"--device {device}"))
    return device


MAX_DIST_TIMEOUT_S = 365 * 86400.0


def dist_timeout_s() -> float:
    """``$METALEARN_DIST_TIMEOUT`` (seconds a collective may wait), default 300."""
    text = os.environ.get("METALEARN_DIST_TIMEOUT", "300")
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_DIST_TIMEOUT_S:  # inf, or beyond what a timedelta holds, overflows in torch's group
        raise MetalearnError(f"METALEARN_DIST_TIMEOUT must be a positive number of seconds, at most "
                             f"{MAX_DIST_TIMEOUT_S:.0f} (a year), got {text!r}")
    return value


def environment_count(name: str, default: int) -> int:
    """A whole number >= 0 that torchrun (or a scheduler) sets in the environment variable
    ``name``; ``default`` where it is unset; anything else is refused in one line."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise MetalearnError(f"{name}={text!r} in the environment is not a whole number >= 0: launch with torchrun, "
                             f"or unset {name}")
    return value


def reports() -> bool:
    """Whether this process is the one that reports (prints results and warnings): the only
    process, or rank 0 of a torchrun group (a stray RANK without WORLD_SIZE > 1 is ignored, as
    :func:`init_world` ignores it)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return environment_count("WORLD_SIZE", 1) <= 1 or environment_count("RANK", 0) == 0


def init_world(device: str = "cpu", timeout_s: float | None = None, exact_gpu_kernels: bool = True) -> World:
    """Join the ``torchrun`` process group when launched by it (WORLD_SIZE > 1), else one
    process. The backend follows the device: NCCL for GPUs (each rank on the GPU of its
    LOCAL_RANK), gloo for the CPU. A collective that waits longer than ``timeout_s``
    (default ``$METALEARN_DIST_TIMEOUT`` or 300 s) fails instead of hanging, so a rank that
    dies makes the others stop. On a CUDA device, ``exact_gpu_kernels`` applies
    :func:`metalearn.runtime.configure_gpu_kernels` (process-wide torch flags)."""
    device = device_name(device)
    size = environment_count("WORLD_SIZE", 1)
    if size > 1 and device.startswith("cuda:"):
        raise OptionError(
            f"{{device}} under torchrun would put all {size} ranks on one GPU; use {{cuda}} (each rank takes the GPU "
            "of its LOCAL_RANK)", device=(f"device={device!r}", f"--device {device}"),
            cuda=("device='cuda'", "--device cuda"))
    resolved = resolve_device(device, environment_count("LOCAL_RANK", 0))
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        if exact_gpu_kernels:
            configure_gpu_kernels()
    if size <= 1:
        return World(device=resolved)
    if not dist.is_initialized():
        rank = environment_count("RANK", 0)  # torch's own reading of a bad RANK fails past a page of C++ stack
        timeout_s = timeout_s or dist_timeout_s()
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        # torch._dynamo, which the first torch.optim optimiser imports, takes references to the
        # default process group when it is imported after the group exists (torch 2.13); then
        # destroy_process_group cannot free the group, its gloo threads outlive leave_world, and
        # the interpreter's teardown can abort ("terminate called without an active
        # exception"). Imported first, it takes none (tests/test_distributed.py).
        importlib.import_module("torch._dynamo")
        try:
            master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            waiting = (f"rank {rank} of {size}: waiting for the process group at {master} "
                       f"(up to {timeout_s:g} s; METALEARN_DIST_TIMEOUT sets it)")
            with _native_stack_dumps_dropped(waiting):
                dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (ValueError, RuntimeError) as err:  # RANK or MASTER_ADDR unset, peers that never came
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MetalearnError(
                f"could not join the process group of WORLD_SIZE={size} ({first}): launch with torchrun, "
                "or unset WORLD_SIZE to run one process") from None
        atexit.register(leave_world, orderly=False)
    return World(dist.get_rank(), dist.get_world_size(), resolved)


# the lines of a C++ exception's stack as torch's c10d logging prints them with each failed try
_STACK_LINE_STARTS = ("Exception raised from ", "frame #", "<omitting python frames>")


WAITING_NOTE_AFTER_S = 10.0  # a group that forms sooner (the usual case) prints nothing


@contextlib.contextmanager
def _native_stack_dumps_dropped(waiting: str | None = None):
    """While the process group forms, torch's C++ code (torch 2.13) logs every failed try to
    reach the master (a rank started before it, or a master that never comes) with the C++
    exception's whole stack, straight to file descriptor 2. The block's native output goes to a
    temporary file and comes back to stderr afterwards without those stack lines; when the
    block fails, also without c10d's log lines, which the one-line error that follows repeats.
    ``waiting``: a line written to the real stderr if the block still runs after
    :data:`WAITING_NOTE_AFTER_S` seconds, so that a rank waiting for its group says so."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (closed, an embedding host): no capture
        yield
        return
    try:
        captured = tempfile.TemporaryFile()
    except OSError:  # a read-only TMPDIR: no capture, the group forms all the same
        os.close(saved)
        yield
        return
    failed = True
    note = None
    if waiting:
        def say() -> None:
            try:
                os.write(saved, (waiting + "\n").encode(errors="replace"))
            except OSError:
                pass

        note = threading.Timer(WAITING_NOTE_AFTER_S, say)
        note.daemon = True
    with captured:
        os.dup2(captured.fileno(), 2)
        try:
            if note is not None:
                note.start()
            yield
            failed = False
        finally:
            if note is not None:  # stopped (or finished) before `saved` is closed under it
                note.cancel()
                if note.is_alive():
                    note.join()
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if line.strip() and not line.startswith(_STACK_LINE_STARTS)
                    and not (failed and "[c10d]" in line)]
            if kept and sys.stderr is not None:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def leave_world(orderly: bool = True) -> None:
    """Leave the process group, if this process joined one, before the interpreter exits.

    A gloo rank that exits with its group still open can abort in its C++ teardown ("terminate
    called without an active exception") and so fail a job whose work had all succeeded.
    ``orderly`` first waits at a barrier for the other ranks, so that no rank closes its
    connections while another still reads from them; the CLI leaves this way after a command
    succeeded. ``init_world`` registers a plain leave at exit for every other ending (an error,
    or a Python program that never calls this), where a barrier could wait on a dead rank.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    if orderly:
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer is gone: leave all the same
    dist.destroy_process_group()
