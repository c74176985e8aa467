"""A toy method and a toy dataset, defined in the tests and nowhere in the library: a nearest
class mean of a learned linear embedding, and N-way tasks of Gaussian blobs (test_registry.py
and test_plugins.py register them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms import MetaLearner, accuracy
from metalearn.options import option
from metalearn.tasks.batch import Problem, TaskBatch


@dataclass(frozen=True)
class NearestMeanConfig:
    temperature: float = option(1.0, "divides the negative squared distances before the softmax")
    width: int = option(8, "size of the learned embedding")


class NearestMean(MetaLearner):
    """Prototypes (class means) of a learned linear embedding; a query goes to the nearest."""

    name = "toy-nearest-mean"
    Config = NearestMeanConfig

    def __init__(self, problem: Problem, config: NearestMeanConfig):
        super().__init__()
        self.config = config
        self.model = nn.Linear(problem.input_shape[0], config.width)

    @classmethod
    def build(cls, config, problem):
        return cls(problem, config)

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        support, query = self.model(batch.support_x), self.model(batch.query_x)
        onehot = F.one_hot(batch.support_y, batch.ways).float()                  # (tasks, n_support, ways)
        prototypes = onehot.transpose(1, 2) @ support / onehot.sum(1)[..., None]  # (tasks, ways, width)
        return -torch.cdist(query, prototypes).square() / self.config.temperature

    def meta_loss(self, batch: TaskBatch):
        logits = self.predict(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return loss, {"accuracy": accuracy(logits, batch.query_y)}


@dataclass(frozen=True)
class Blobs:
    """N-way tasks of Gaussian blobs in 6 dimensions: each class a random centre, its examples
    the centre plus noise; only the first two coordinates carry the centre, the rest is noise
    (an embedding that learns to drop them classifies better)."""

    ways: int
    shots: int
    query: int

    def sample(self, num_tasks: int, generator: torch.Generator, tasks: slice | None = None) -> TaskBatch:
        centres = torch.zeros(num_tasks, self.ways, 1, 6)
        centres[..., :2] = torch.randn(num_tasks, self.ways, 1, 2, generator=generator) * 2
        per_class = self.shots + self.query
        noise = torch.randn(num_tasks, self.ways, per_class, 6, generator=generator)
        noise[..., 2:] *= 3
        points = centres + noise
        labels = torch.arange(self.ways).repeat_interleave(per_class).reshape(self.ways, per_class)
        labels = labels.expand(num_tasks, -1, -1)
        support_x, query_x = points[:, :, :self.shots].flatten(1, 2), points[:, :, self.shots:].flatten(1, 2)
        support_y, query_y = labels[:, :, :self.shots].flatten(1), labels[:, :, self.shots:].flatten(1)
        batch = TaskBatch(support_x, support_y, query_x, query_y, self.ways)
        return batch if tasks is None else batch.select(tasks)
