"""Random image task batches for the tests: the shape of Omniglot episodes, without Omniglot;
and the seeding, float64 cast and comparison of batches that several test files share."""

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


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def double(batch: TaskBatch) -> TaskBatch:
    """``batch`` in float64: its floating-point inputs, targets and task parameters."""
    cast = lambda t: t.double() if torch.is_floating_point(t) else t  # noqa: E731
    return TaskBatch(cast(batch.support_x), cast(batch.support_y), cast(batch.query_x), cast(batch.query_y),
                     batch.ways, {k: cast(v) for k, v in batch.task_params.items()})


def assert_batches_equal(a: TaskBatch, b: TaskBatch) -> None:
    """The same examples, labels, ways and task parameters, bit for bit."""
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.ways == b.ways
    assert a.task_params.keys() == b.task_params.keys()
    for key in a.task_params:
        assert torch.equal(a.task_params[key], b.task_params[key]), key
