"""A meta-learning method of your own, as a metalearn plugin: each class's mean under a learned
linear embedding of the flattened inputs; a query goes to the nearest mean (ProtoNets with the
smallest possible network). Name this file in METALEARN_PLUGINS and every metalearn process knows
the method ``nearest-mean``:

    METALEARN_PLUGINS=examples/nearest_mean.py metalearn train nearest-mean --steps 200 --run-dir runs/mean
    METALEARN_PLUGINS=examples/nearest_mean.py metalearn eval runs/mean
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from metalearn import MetaLearner, register_method
from metalearn.algorithms import accuracy
from metalearn.options import option, options


@options
class NearestMeanConfig:
    width: int = option(64, "size of the learned embedding")


class NearestMean(MetaLearner):
    """Nearest class mean under a learned linear embedding: a query's logits are minus its squared
    distances to the means of the support classes (ProtoNets with the smallest network)."""

    name = "nearest-mean"
    Config = NearestMeanConfig
    classification_only = True  # it compares examples of classes

    def __init__(self, inputs: int, config: NearestMeanConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(inputs, config.width)

    @classmethod
    def build(cls, config, problem):
        cls.require_classification(problem)
        return cls(math.prod(problem.input_shape), config)

    def predict(self, batch):
        support, query = self.embed(batch.support_x.flatten(2)), self.embed(batch.query_x.flatten(2))
        onehot = F.one_hot(batch.support_y, batch.ways).to(support.dtype)            # (tasks, support, ways)
        means = onehot.transpose(1, 2) @ support / onehot.sum(1)[..., None]          # (tasks, ways, width)
        return -torch.cdist(query, means).square()

    def meta_loss(self, batch):
        logits = self.predict(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return loss, {"accuracy": accuracy(logits, batch.query_y)}


register_method(NearestMean)
