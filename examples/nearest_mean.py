"""A meta-learning method of your own, as a metalearn plugin: each class's mean under a learned
linear embedding of the flattened inputs; a query goes to the nearest mean (ProtoNets with the
smallest possible network). Name this file in METALEARN_PLUGINS and every metalearn process knows
the method ``nearest-mean``:

    METALEARN_PLUGINS=examples/nearest_mean.py metalearn train nearest-mean --steps 200 --run-dir runs/mean
    METALEARN_PLUGINS=examples/nearest_mean.py metalearn eval runs/mean

It uses only the helpers the built-in methods use (``metalearn.algorithms``): the batch and network
checks, whose one-line refusals are ProtoNets' own, the per-task embedding and the number of ways.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from metalearn import MetaLearner, register_method
from metalearn.algorithms import accuracy, check_embedding_fits, embed_episodes, num_ways
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
        # self.model: where --init-from and the checks find the network (MetaLearner.network_attribute)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(inputs, config.width))

    @classmethod
    def build(cls, config, problem):
        cls.require_classification(problem)
        return cls(math.prod(problem.input_shape), config)

    def logits(self, batch, training=False):                          # (tasks, n_query, ways)
        check_embedding_fits(self, batch, training=training)           # uint8 images, labels outside 0..ways-1
        support, query = embed_episodes(self.model, batch)            # (tasks, n, width), one task per call
        onehot = F.one_hot(batch.support_y, num_ways(batch)).to(support.dtype)   # (tasks, support, ways)
        means = onehot.transpose(1, 2) @ support / onehot.sum(1)[..., None]       # (tasks, ways, width)
        return -torch.cdist(query, means).square()

    def predict(self, batch):
        return self.logits(batch)

    def meta_loss(self, batch):
        logits = self.logits(batch, training=True)  # the loss reads the query labels: -1 is refused
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return loss, {"accuracy": accuracy(logits, batch.query_y)}


register_method(NearestMean)
