"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017), batched over tasks.

Each class of a task is represented by its prototype, the mean embedding of its support
examples (eq. 1); a query is classified by a softmax over negative squared Euclidean distances
to the prototypes (eq. 2), and the meta-loss is the query cross-entropy. No inner loop: the
embedding network is the only thing learned.

Batch norm (``BatchStatNorm``, batch statistics at train and test time) sees one task at a
time: the support and query images of each task are embedded together in one pass, one task
per call, so normalisation statistics never mix tasks. An
episode's predictions therefore do not depend on which other episodes share its batch (the
evaluator's chunking, the meta-batch size, the number of distributed ranks), and training and
testing normalise alike. Like MAML's batch statistics, this is mildly transductive: the query
images of a task take part in its statistics.

Example::

    >>> from metalearn.models import Conv4
    >>> protonet = ProtoNet(Conv4(1, None, pooling="max"))      # 64-d embedding on 28x28
    >>> loss, metrics = protonet.meta_loss(batch)                # batch: a TaskBatch of episodes
    >>> loss.backward()
    >>> logits = protonet.predict(batch)                         # (tasks, n_query, ways)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# embed_episodes and num_ways are every embedding method's (base.py); importable from here too, as
# ProtoNets' own steps
from metalearn.algorithms.base import (MetaLearner, check_embedding_fits, class_without_support, embed_episodes,
                                      num_ways, require_functional_model, Problem, accuracy)
from metalearn.datasets import of_photographs
from metalearn.errors import ConfigError, MetalearnError
from metalearn.options import option, options
from metalearn.models import build_model, check_network_name, network_help
from metalearn.models.norm import first_order_batch_norm
from metalearn.tasks.batch import TaskBatch

DISTANCES = ("euclidean", "cosine")


@options
class ProtoNetConfig:
    """distance: ``euclidean`` (squared Euclidean, the paper's choice) or ``cosine`` (the
    paper's comparison, section 3.1); model: the embedding network, a network of
    ``metalearn.models.NETWORKS`` that serves as an embedding (one with an output layer is used
    without it)."""

    distance: str = option("euclidean", "euclidean (squared, the paper's choice) or cosine")
    model: str = option("conv4-embedding", "the embedding network: " + network_help("embedding")
                                           + "; one with an output layer is used without it")

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ConfigError("ProtoNet.Config", "distance",
                              f"must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        check_network_name("ProtoNet.Config", self.model, "embedding")


def class_prototypes(support: Tensor, support_y: Tensor, ways: int, method: str = "protonet",
                     ways_given: bool = True) -> Tensor:
    """Mean support embedding of each class (Snell et al. eq. 1), any number of shots per class.

    support: (tasks, n_support, dim), support_y: (tasks, n_support) in [0, ways)
    -> (tasks, ways, dim)

    A class without support examples (its prototype 0/0) is refused, naming the task and class
    (:func:`~metalearn.algorithms.base.class_without_support`; ``method`` starts the message,
    ``ways_given``: whether ``ways`` is the batch's, not implied by the largest label).
    """
    one_hot = F.one_hot(support_y, ways).to(support.dtype)  # (tasks, n_support, ways)
    sums = torch.einsum("tsw,tsd->twd", one_hot, support)
    counts = one_hot.sum(dim=1).unsqueeze(-1)  # (tasks, ways, 1)
    if bool((counts == 0).any()):
        raise class_without_support(method, support_y, counts.squeeze(-1) == 0, ways_given)
    return sums / counts


def squared_distances(query: Tensor, prototypes: Tensor) -> Tensor:
    """Squared Euclidean distance of every query to every prototype, computed from the
    differences (not ``|q|^2 - 2 q.c + |c|^2``, which cancels badly when q is near c).

    query: (tasks, n_query, dim), prototypes: (tasks, ways, dim) -> (tasks, n_query, ways)
    """
    return (query.unsqueeze(2) - prototypes.unsqueeze(1)).square().sum(dim=-1)


def similarities(query: Tensor, keys: Tensor, distance: str = "euclidean") -> Tensor:
    """Similarity of every query to every key: ``-||q - k||^2`` (``euclidean``), or the cosine
    ``q.k / (|q| |k|)`` (``cosine``). With class prototypes as keys these are ProtoNets'
    logits (Snell et al. eq. 2); with support embeddings, Matching Networks' attention scores.

    query: (tasks, n_query, dim), keys: (tasks, n_keys, dim) -> (tasks, n_query, n_keys)
    """
    if distance == "euclidean":
        return -squared_distances(query, keys)
    if distance == "cosine":
        return torch.einsum("tqd,tkd->tqk", F.normalize(query, dim=-1), F.normalize(keys, dim=-1))
    raise MetalearnError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")


class ProtoNet(MetaLearner):
    """Prototypical Networks (Snell et al. 2017): nearest class mean in a learned embedding."""

    name = "protonet"
    classification_only = True
    Config = ProtoNetConfig

    def __init__(self, model: nn.Module, config: ProtoNetConfig = ProtoNetConfig()):
        super().__init__()
        require_functional_model(model, "protonet", False)
        self.model = model
        self.config = config

    @classmethod
    def build(cls, config: ProtoNetConfig, problem: Problem) -> "ProtoNet":
        """Prototypical Networks on the embedding network ``config.model`` for ``problem``'s
        images (any number of ways). Refuses a regression problem."""
        cls.require_classification(problem)
        return cls(build_model(config.model, problem.input_shape, None), config)

    @classmethod
    def paper_defaults(cls, task, given: dict | None = None) -> tuple[dict, dict]:
        # Snell et al. 2017, section 3.1: Conv4 with max-pooling, squared Euclidean distance, one
        # episode per Adam step at 1e-3 halved every 2000 episodes, 1000 test episodes. The
        # paper trains until the validation loss stops improving; after 20,000 episodes the step
        # size has been halved nine times (to about 2e-6), so little changes beyond. The paper's
        # 60-way / 5-query training episodes and 5- or 20-way test episodes are task options:
        # --ways 60 --query 5 --test-ways 5 --test-query 15.
        # The embedding is the flattened final map: the authors' code (jakesnell/prototypical-
        # networks, protonets/models/few_shot.py) ends the encoder with Flatten(). On 28x28
        # Omniglot that map is 1x1, so conv4-embedding (which averages it) is the same 64-d
        # network, and Omniglot keeps it; on 84x84 photographs (mini-ImageNet, a folder of
        # images) the map is 5x5, the paper's 1600-d embedding: conv4-flat.
        model = "conv4-flat" if of_photographs(task.dataset) else "conv4-embedding"
        return ({"model": model, "distance": "euclidean"},
                {"meta_batch_size": 1, "meta_lr": 1e-3, "lr_halve_every": 2000, "steps": 20000,
                 "eval_episodes": 1000, "val_every": 1000, "val_episodes": 200, "checkpoint_every": 1000})

    def logits(self, batch: TaskBatch, training: bool = False) -> Tensor:
        """Query logits (tasks, n_query, ways) from the prototypes of each task's support set.
        A malformed batch (labels outside 0..ways-1, uint8 images, support and query of other
        shapes; see :func:`~metalearn.algorithms.base.check_task_batch`) or a network that
        cannot embed it is refused with a :class:`~metalearn.errors.MetalearnError`;
        ``training``: the query labels are read, so -1 (unknown) is refused too."""
        check_embedding_fits(self, batch, training=training, network=self.model)
        with first_order_batch_norm():  # differentiated once: the native kernel is right
            support, query = embed_episodes(self.model, batch)
        prototypes = class_prototypes(support, batch.support_y, num_ways(batch), self.name, bool(batch.ways))
        return similarities(query, prototypes, self.config.distance)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The query cross-entropy over the batch's tasks, and its ``loss`` and ``accuracy``.
        The batch must be as :class:`~metalearn.tasks.batch.TaskBatch` describes it (float
        images, class ids 0..ways-1, support and query alike); one that is not is refused with a
        one-line :class:`~metalearn.errors.MetalearnError` before anything is computed."""
        logits = self.logits(batch, training=True)  # the loss reads the query labels: no -1
        # Every task has the same number of queries, so the mean over all queries is the mean
        # over tasks of each task's mean query loss.
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return loss, {"loss": loss.detach(), "accuracy": accuracy(logits.detach(), batch.query_y)}

    def predict(self, batch: TaskBatch) -> Tensor:
        """Query logits (tasks, n_query, ways), without gradients; checked as :meth:`meta_loss`
        checks, except that query labels may be -1 (unknown)."""
        with torch.no_grad():
            return self.logits(batch)
