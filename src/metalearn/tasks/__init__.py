"""Task sources: objects with ``sample(num_tasks, generator, tasks=None) -> TaskBatch``."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from metalearn.config import TaskConfig
from metalearn.errors import MetalearnError
from metalearn.tasks.batch import Problem, TaskBatch
from metalearn.tasks.episodes import EpisodeSampler
from metalearn.tasks.sinusoid import SineOrLineTasks, SinusoidTasks


class TaskSource(Protocol):
    def sample(self, num_tasks: int, generator: torch.Generator, tasks: slice | None = None) -> TaskBatch: ...


def problem_of(task: TaskConfig) -> Problem:
    """The input shape and output size a network needs for these tasks."""
    if task.classification:
        return Problem((1, task.image_size, task.image_size), task.ways, True)
    return Problem((1,), 1, False)


def build_task_source(task: TaskConfig, part: str, data_dir: Path | str | None = None,
                      progress: bool = True) -> TaskSource:
    """The sampler of ``part`` (train/val/test) for ``task``; test uses the ``test_*`` shape.
    ``progress``: show a bar while Omniglot is preprocessed (first use only)."""
    shape = task.for_testing() if part in ("val", "test") else task
    if task.dataset == "sinusoid":
        return SinusoidTasks(shots=shape.shots, query=shape.query, noise_std=task.noise_std or 0.0)
    if task.dataset == "sine-or-line":
        noise = 0.3 if task.noise_std is None else task.noise_std
        return SineOrLineTasks(shots=shape.shots, query=shape.query, noise_std=noise)
    from metalearn.data.omniglot import load_omniglot
    from metalearn.data.splits import omniglot_split

    omniglot = load_omniglot(data_dir, task.image_size, progress=progress)
    pool = omniglot_split(omniglot, task.split, part)
    return EpisodeSampler(torch.from_numpy(omniglot.images), pool, shape.ways, shape.shots, shape.query,
                          test=part != "train")


def has_validation(task: TaskConfig) -> bool:
    if task.dataset != "omniglot":
        return True
    from metalearn.data.splits import has_part

    return has_part(task.split, "val")


__all__ = ["TaskBatch", "TaskSource", "EpisodeSampler", "SinusoidTasks", "SineOrLineTasks",
           "build_task_source", "problem_of", "has_validation", "MetalearnError"]
