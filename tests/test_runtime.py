"""The process-wide settings, each applied only when asked for: the allocator (the ``metalearn``
command's default, ``--allocator default`` leaves it), and the GPU kernels (``init_world``'s
default for a CUDA device, ``exact_gpu_kernels=False`` leaves them)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import torch

from metalearn.runtime import configure_gpu_kernels


@pytest.mark.parametrize("args, tuned", [([], True), (["--allocator", "tuned"], True), (["--allocator", "default"], False)])
def test_the_command_tunes_the_allocator_unless_told_not_to(monkeypatch, capsys, args, tuned):
    import metalearn.cli

    calls = []
    monkeypatch.setattr(metalearn.cli, "tune_allocator", lambda: calls.append(1) or True)
    metalearn.cli.main([*args, "data", "info", "--help"])
    assert bool(calls) == tuned


def test_importing_the_library_changes_no_process_setting():
    """A Python program that imports metalearn and trains on the CPU keeps glibc's allocator
    (mallopt is never called) unless it calls tune_allocator itself."""
    script = (
        "import ctypes, ctypes.util\n"
        "import metalearn.runtime as r\n"
        "called = []\n"
        "r.tune_allocator = lambda: called.append(1)\n"
        "import metalearn, metalearn.api, metalearn.cli\n"
        "from metalearn.distributed import init_world\n"
        "init_world('cpu')\n"
        "print(len(called))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="glibc only")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    """After tuning, a freed 100 MB block is reused: allocating it again costs no page faults
    (without tuning glibc unmaps it on free and every page faults in again)."""
    script = (
        "import resource, torch\n"
        "from metalearn.runtime import tune_allocator\n"
        "assert tune_allocator()\n"
        "faults = []\n"
        "for _ in range(7):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    x = torch.ones(25_000_000); del x\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(min(faults[1:]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 1000  # 100 MB is 24,000 pages of 4 KiB


@pytest.fixture
def restore_backend_flags():
    flags = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32"),
             (torch.backends.cudnn, "deterministic"), (torch.backends.cudnn, "benchmark")]
    saved = [getattr(module, name) for module, name in flags]
    yield
    for (module, name), value in zip(flags, saved):
        setattr(module, name, value)


def test_gpu_kernels_are_full_float32_and_deterministic(restore_backend_flags):
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = True, False
    torch.backends.cudnn.benchmark = True
    configure_gpu_kernels()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_init_world_applies_the_gpu_kernels_only_when_asked(monkeypatch):
    """exact_gpu_kernels=False (--fast-gpu-kernels) keeps torch's flags; True sets them. The
    CUDA calls are stood in for: no GPU is needed to check which path is taken."""
    import metalearn.distributed as distributed

    calls = []
    monkeypatch.setattr(distributed, "configure_gpu_kernels", lambda: calls.append("exact"))
    monkeypatch.setattr(distributed, "resolve_device", lambda name, rank=0: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    distributed.init_world("cuda", exact_gpu_kernels=False)
    assert calls == []
    distributed.init_world("cuda")
    assert calls == ["exact"]


def test_importing_on_windows_says_in_one_line_what_runs_and_where():
    """Run folders are locked with fcntl, which Windows lacks: the import says so, and names WSL,
    instead of failing on the first POSIX-only module."""
    done = subprocess.run([sys.executable, "-c", "import sys; sys.platform = 'win32'; import metalearn"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: metalearn runs on Linux and macOS: its run folders are locked with POSIX file locks (fcntl) "
        "and training handles POSIX signals. On Windows, use WSL 2 (https://learn.microsoft.com/windows/wsl/install).")


def test_the_command_on_windows_says_it_in_one_line_and_exits_2():
    done = subprocess.run([sys.executable, "-c", "import sys; sys.platform = 'win32'; sys.argv = ['metalearn']; "
                           "import metalearn_launcher; metalearn_launcher.main()"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: metalearn runs on Linux and macOS: ") and "use WSL 2" in done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="an address-space limit that fails the import: Linux's")
def test_a_process_too_small_for_torch_says_so_in_one_line_and_exits_2():
    """Under ``ulimit -v`` too low to load torch's libraries (the loader's ImportError, or a
    MemoryError, depending on the limit) the command names the limit, with no traceback."""
    limit = 300 * 2**20  # set in the child before the import: enough for Python, not for torch
    program = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
               "sys.argv = ['metalearn', '--help']; import metalearn_launcher; metalearn_launcher.main()")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == (
        "error: not enough memory to load torch: this process's address space is limited to 300 MiB (ulimit -v); "
        "raise the limit\n")


def test_a_dropping_stream_drops_from_its_first_failure_and_keeps_it(monkeypatch):
    """Output after a failed write is dropped, not raised; the failure is kept unless it was a
    closed pipe; a stream full for now (BlockingIOError) raises, but for a progress bar's; None
    follows sys.stderr."""
    import errno
    import io

    from cli_runner import ClosedPipe, FullDisk

    from metalearn.runtime import DroppingStream

    full = DroppingStream(FullDisk())
    assert full.write("a") == 1 and full.dropped and full.write_error.errno == errno.ENOSPC
    full.flush()  # dropped: nothing raised
    pipe = DroppingStream(ClosedPipe())
    pipe.flush()
    assert pipe.dropped and pipe.write_error is None

    class Busy(io.StringIO):
        def write(self, text):
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    with pytest.raises(BlockingIOError):
        DroppingStream(Busy()).write("a")
    bar = DroppingStream(Busy(), drop_when_busy=True)  # a progress bar's: that write is lost, not the run
    assert bar.write("a") == 1 and not bar.dropped
    followed = DroppingStream()
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    followed.write("x")
    monkeypatch.setattr(sys, "stderr", second)
    followed.write("y")
    assert (first.getvalue(), second.getvalue()) == ("x", "y")
