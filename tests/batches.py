"""Random image task batches for the tests: the shape of Omniglot episodes, without Omniglot."""

from __future__ import annotations

import torch

from metalearn.tasks.batch import TaskBatch


def image_batch(tasks=3, ways=3, shots=2, query=2, size=16, seed=0, dtype=torch.float64) -> TaskBatch:
    """``tasks`` episodes of ``ways`` classes: uniform random 1-channel ``size`` x ``size``
    images, labels 0..ways-1 grouped by class, ``shots`` support and ``query`` query images each."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return TaskBatch(
        torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=dtype),
        labels.repeat_interleave(shots).repeat(tasks, 1),
        torch.rand(tasks, ways * query, 1, size, size, generator=g, dtype=dtype),
        labels.repeat_interleave(query).repeat(tasks, 1),
        ways,
    )
