"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016),
batched over tasks.

A query ``x`` is labelled by attention over the support set (eq. 1-2):
``P(y | x, S) = sum_i a(x, x_i) y_i`` with ``a(x, x_i) = softmax_i cos(f(x), g(x_i))`` and
``y_i`` one-hot; the loss is the negative log-likelihood of the query labels. Without full
context embeddings, ``f = g`` is the embedding CNN. With them (appendix A: A.1 for f, A.2 for g):

* ``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)``: a bidirectional LSTM over the support
  embeddings ``g'(x_i)`` in the episode's order, plus a skip connection;
* ``f(x, S) = attLSTM(f'(x), g(S), K)``: K processing steps of an LSTM whose input is
  ``f'(x)`` and whose recurrent state is ``[h_{k-1}, r_{k-1}]``, with
  ``h_k = LSTM(...) + f'(x)`` and the read-out ``r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)``;
  ``h_0 = f'(x)``, ``c_0 = 0`` (the paper leaves the start open), ``f(x, S) = h_K``.

The CNN embeds one task per call, so batch norm's statistics are those of the task, its support
and query images together, in training and at test time (as ProtoNets' do, with
:func:`~metalearn.algorithms.base.embed_episodes`, which says why this is a loop and not
``vmap``); the LSTMs take the task axis as their batch and the attention is one ``einsum`` over
all tasks.

Example::

    >>> from metalearn.models import Conv4
    >>> net = MatchingNet(Conv4(1, None, pooling="max"), MatchingNet.Config(full_context_embeddings=True),
    ...                   embedding_dim=64)                  # Conv4's 64-d embedding, for the LSTMs
    >>> loss, metrics = net.meta_loss(batch)        # batch: a TaskBatch of episodes
    >>> log_probs = net.predict(batch)              # (tasks, n_query, ways), logsumexp = 0
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.base import (MetaLearner, check_embedding_fits, class_without_support, embed_episodes,
                                      num_ways, require_functional_model, Problem, accuracy)
from metalearn.algorithms.protonet import DISTANCES, similarities
from metalearn.errors import ConfigError, MetalearnError, check_count, require_number
from metalearn.options import option, options
from metalearn.models import build_model, check_network_name, network_help, output_size
from metalearn.models.norm import first_order_batch_norm
from metalearn.tasks.batch import TaskBatch


# The cosine attention's scale for Omniglot (``paper_defaults``): a measured choice, see there.
OMNIGLOT_ATTENTION_SCALE = 10.0


# the attention LSTM is unrolled K steps, each step's activations kept for the backward pass, so
# memory grows with K (a million steps took all of a machine's memory with no message); the
# paper's process block takes a few steps, and 100 is far beyond any benefit
MAX_PROCESSING_STEPS = 100


@options
class MatchingNetConfig:
    """full_context_embeddings: embed the support set with a bidirectional LSTM and the query
    with an attention LSTM (appendix A) instead of the CNN alone; processing_steps: the
    attention LSTM's K; model: the embedding CNN (used without a classification head).

    distance and scale shape the attention ``softmax_i(scale * sim(f(x), g(x_i)))``: ``cosine``
    (the paper's) or ``euclidean`` (negative squared distance, as ProtoNets). A cosine of
    ReLU features lies in [0, 1], so with scale 1 a 5-way 1-shot query can put at most
    e / (e + 4) = 40% of its attention on the right example; a larger scale (e.g. 10) lets the
    attention become confident."""

    full_context_embeddings: bool = option(False, "embed the support set with a bidirectional LSTM and the query "
                                                  "with an attention LSTM (the paper's appendix A)")
    processing_steps: int = option(5, "steps K of the query's attention LSTM, 1 to 100 (with "
                                         "--full-context-embeddings)")
    model: str = option("conv4-embedding", "the embedding network: " + network_help("embedding")
                                           + "; one with an output layer is used without it")
    distance: str = option("cosine", "cosine (the paper's) or euclidean (negative squared distance)")
    scale: float = option(1.0, "the attention is softmax(scale * similarity); cosine similarities of ReLU "
                               "features lie in [0, 1], so a scale of 1 keeps the attention diffuse")

    def __post_init__(self):
        steps = self.processing_steps
        if not 1 <= steps <= MAX_PROCESSING_STEPS:  # a whole number: checked by @options
            raise ConfigError("MatchingNet.Config", "processing_steps",
                              f"must be a whole number from 1 to {MAX_PROCESSING_STEPS}, got {steps!r}")
        if self.distance not in DISTANCES:
            raise ConfigError("MatchingNet.Config", "distance",
                              f"must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        require_number(self.scale, "MatchingNet.Config", "scale")
        check_network_name("MatchingNet.Config", self.model, "embedding")


def label_log_probs(scores: Tensor, support_y: Tensor, ways: int, method: str = "matchingnet",
                    ways_given: bool = True) -> Tensor:
    """``log P(y = k | x, S) = log sum_{i: y_i = k} softmax_i(scores)``: the log of the
    attention-weighted sum of one-hot support labels, computed with ``logsumexp``.

    scores: (tasks, n_query, n_support), support_y: (tasks, n_support) -> (tasks, n_query, ways)

    ``method`` and ``ways_given`` (whether ``ways`` is the batch's, not implied by the largest
    label) word the refusal of a class without support examples
    (:func:`~metalearn.algorithms.base.class_without_support`).
    """
    one_hot = F.one_hot(support_y, ways).to(scores.dtype)
    # a class without support examples would be a column of -inf, whose logsumexp has a NaN
    # gradient that reaches every parameter even when no query belongs to it
    missing = one_hot.sum(dim=1) == 0  # (tasks, ways)
    if bool(missing.any()):
        raise class_without_support(method, support_y, missing, ways_given)
    log_attention = scores.log_softmax(dim=-1)
    log_one_hot = one_hot.log()  # 0 for its class, -inf else
    return torch.logsumexp(log_attention.unsqueeze(-1) + log_one_hot.unsqueeze(1), dim=2)


class SupportContext(nn.Module):
    """``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)`` (Vinyals et al. appendix A.2): a
    bidirectional LSTM with hidden size ``dim`` over the support embeddings, plus a skip.

    support: (tasks, n_support, dim) -> (tasks, n_support, dim)
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)

    def forward(self, support: Tensor) -> Tensor:
        states, _ = self.lstm(support)  # (tasks, n_support, 2 * dim): forward, backward
        return states[..., : self.dim] + states[..., self.dim :] + support


class QueryAttentionLSTM(nn.Module):
    """``f(x, S) = attLSTM(f'(x), g(S), K)`` (Vinyals et al. appendix A.1, eq. 3-6).

    The LSTM's gates read the input ``f'(x)`` and the recurrent state ``[h_{k-1}, r_{k-1}]``;
    an ``nn.LSTMCell`` fed ``[f'(x), r_{k-1}]`` with hidden state ``h_{k-1}`` computes the same
    affine function of the three (plus one more bias vector).

    query: (tasks, n_query, dim), support: g(S), (tasks, n_support, dim) -> (tasks, n_query, dim)
    """

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.steps = steps
        self.cell = nn.LSTMCell(2 * dim, dim)

    def forward(self, query: Tensor, support: Tensor) -> Tensor:
        tasks, n_query, dim = query.shape
        h, c = query, torch.zeros_like(query)
        for _ in range(self.steps):  # the K processing steps, not tasks: every task at once
            attention = torch.einsum("tqd,tsd->tqs", h, support).softmax(dim=-1)
            readout = torch.einsum("tqs,tsd->tqd", attention, support)
            inputs = torch.cat([query, readout], dim=-1).reshape(tasks * n_query, 2 * dim)
            h_hat, c = self.cell(inputs, (h.reshape(tasks * n_query, dim), c.reshape(tasks * n_query, dim)))
            h, c = h_hat.view(tasks, n_query, dim) + query, c.view(tasks, n_query, dim)
        return h


class MatchingNet(MetaLearner):
    """Matching Networks (Vinyals et al. 2016): attention over the support set's labels."""

    name = "matchingnet"
    classification_only = True
    Config = MatchingNetConfig
    option_requires = {"processing_steps": ("full_context_embeddings", True)}

    def __init__(self, model: nn.Module, config: MatchingNetConfig = MatchingNetConfig(),
                 embedding_dim: int | None = None):
        """``embedding_dim``: the size of ``model``'s output per example, which the context
        LSTMs are built for; needed with full context embeddings only (``build`` measures it).
        It depends on the image size, so a wrong value is refused at the first batch, with the
        right one named (``metalearn.models.output_size(model, input_shape)`` gives it)."""
        super().__init__()
        require_functional_model(model, "matchingnet", False)
        self.model = model
        self.config = config
        self.embedding_dim = embedding_dim if config.full_context_embeddings else None
        if config.full_context_embeddings:
            if embedding_dim is None:
                raise MetalearnError("full context embeddings need the embedding size (embedding_dim)")
            self.embedding_dim = embedding_dim = check_count(
                embedding_dim, "embedding_dim",
                message="{name} must be a whole number of at least {least} (the embedding network's output size), "
                        "got {value!r}")
            self.support_context = SupportContext(embedding_dim)
            self.query_context = QueryAttentionLSTM(embedding_dim, config.processing_steps)

    @classmethod
    def build(cls, config: MatchingNetConfig, problem: Problem) -> "MatchingNet":
        """Matching Networks on the embedding network ``config.model`` for ``problem``'s images
        (any number of ways); with ``full_context_embeddings``, the LSTMs are built for its
        output width. Refuses a regression problem."""
        cls.require_classification(problem)
        model = build_model(config.model, problem.input_shape, None)
        dim = output_size(model, problem.input_shape)
        return cls(model, config, dim)

    @classmethod
    def paper_defaults(cls, task, given: dict | None = None) -> tuple[dict, dict]:
        # Vinyals et al. 2016, section 4.1.1: the Conv4 max-pool CNN (64-d on 28x28), cosine
        # attention, no full context embeddings on Omniglot (FCE is their miniImageNet and
        # language variant), training episodes shaped as the test episodes. The paper gives no
        # optimiser or schedule; Adam 1e-3 over 20,000 meta-batches of 32 episodes is ours.
        # The attention scale is ours too, measured: with the bare cosine (scale 1) 5-way 1-shot
        # validation accuracy levels off at 91%; with scale 10 it is 96.8% after 500 steps.
        return ({"model": "conv4-embedding", "full_context_embeddings": False, "distance": "cosine",
                 "scale": OMNIGLOT_ATTENTION_SCALE},
                {"meta_batch_size": 32, "meta_lr": 1e-3, "steps": 20000, "eval_episodes": 1000,
                 "val_every": 1000, "val_episodes": 200, "checkpoint_every": 1000})

    def embed(self, batch: TaskBatch, training: bool = False) -> tuple[Tensor, Tensor]:
        """f(query) and g(support): (tasks, n_query, dim), (tasks, n_support, dim). A malformed
        batch (see :func:`~metalearn.algorithms.base.check_task_batch`), or a network that cannot
        embed it or whose output size is not ``embedding_dim`` (with full context embeddings), is
        refused with a :class:`~metalearn.errors.MetalearnError`; ``training``: the query labels
        are read, so -1 (unknown) is refused too."""
        check_embedding_fits(self, batch, training=training, width=self.embedding_dim, network=self.model)
        with first_order_batch_norm():  # differentiated once: the native kernel is right
            support, query = embed_episodes(self.model, batch)
        if self.config.full_context_embeddings:
            support = self.support_context(support)
            query = self.query_context(query, support)
        return query, support

    def scores(self, batch: TaskBatch, training: bool = False) -> Tensor:
        """``scale * sim(f(x), g(x_i))``, the attention's logits, (tasks, n_query, n_support)."""
        query, support = self.embed(batch, training)
        return self.config.scale * similarities(query, support, self.config.distance)

    def attention(self, batch: TaskBatch) -> Tensor:
        """a(x, x_i) of every query over its task's support set (Vinyals et al. eq. 2),
        (tasks, n_query, n_support)."""
        return self.scores(batch).softmax(dim=-1)

    def log_probs(self, batch: TaskBatch, training: bool = False) -> Tensor:
        """log P(y | x, S) for every query and class, (tasks, n_query, ways)."""
        return label_log_probs(self.scores(batch, training), batch.support_y, num_ways(batch), self.name,
                               bool(batch.ways))

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The query labels' negative log-likelihood over the batch's tasks, and its ``loss`` and
        ``accuracy``. The batch must be as :class:`~metalearn.tasks.batch.TaskBatch` describes it
        (float images, class ids 0..ways-1, support and query alike), and with full context
        embeddings the network's output ``embedding_dim`` wide; otherwise a one-line
        :class:`~metalearn.errors.MetalearnError` says what is wrong."""
        log_probs = self.log_probs(batch, training=True)  # the loss reads the query labels: no -1
        loss = F.nll_loss(log_probs.flatten(0, 1), batch.query_y.flatten())
        return loss, {"loss": loss.detach(), "accuracy": accuracy(log_probs.detach(), batch.query_y)}

    def predict(self, batch: TaskBatch) -> Tensor:
        """Log-probabilities (tasks, n_query, ways): the logits whose softmax is P(y | x, S).
        Checked as :meth:`meta_loss` checks, except that query labels may be -1 (unknown)."""
        with torch.no_grad():
            return self.log_probs(batch)
