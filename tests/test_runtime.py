"""The process-wide settings: the allocator the ``metalearn`` command applies, and the GPU
kernels every CUDA device gets."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import torch

from metalearn.runtime import FAST_GPU_VARIABLE, OPT_OUT_VARIABLE, configure_gpu_kernels, tune_allocator


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(OPT_OUT_VARIABLE, "1")
    assert tune_allocator() is False


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


def test_gpu_kernels_are_full_float32_and_deterministic(monkeypatch, restore_backend_flags):
    monkeypatch.delenv(FAST_GPU_VARIABLE, raising=False)
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = True, False
    torch.backends.cudnn.benchmark = True
    assert configure_gpu_kernels() is True
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_fast_gpu_kernels_opt_out_keeps_torchs_defaults(monkeypatch, restore_backend_flags):
    monkeypatch.setenv(FAST_GPU_VARIABLE, "1")
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = True, False
    assert configure_gpu_kernels() is False
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cudnn.deterministic
