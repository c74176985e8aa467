"""Memory Module (Kaiser, Nachum, Roy & Bengio, "Learning to Remember Rare Events", ICLR 2017),
batched over queries and tasks.

A memory of ``memory_size`` slots holds keys ``K`` (unit vectors), values ``V`` (class ids) and
ages ``A`` (section 3). A query ``q`` is the L2-normalised, linearly projected embedding of a CNN;
its ``choose_k`` nearest keys by cosine similarity give the prediction ``V[n_1]`` and the memory
loss, the margin ranking loss between the most similar key of the correct value (positive
``n_p``) and the most similar key of another value (negative ``n_b``)::

    loss(q, v) = [q . K[n_b] - q . K[n_p] + margin]_+

After each query the memory is updated: if ``V[n_1] = v`` then ``K[n_1] <- (q + K[n_1]) /
||q + K[n_1]||`` and ``A[n_1] <- 0``; otherwise ``(q, v)`` is written into the oldest slot
``n' = argmax(A + noise)`` with age 0. Every other age grows by one. Gradients reach the query
(the CNN and the projection) and never the keys: the keys are not parameters, only the update
rule changes them (section 3; the authors' code keeps them in non-trainable variables and reads
them under ``stop_gradient``).

As in the authors' code (tensorflow/models, research/learning_to_remember_rare_events):

* no positive among the ``choose_k`` neighbours: the most recently written slot of value ``v``
  stands in (the paper lets any slot of value ``v`` stand in; the code's ``recent_idx``); with
  no slot of value ``v`` at all the positive similarity is 0, and so is the negative one when
  none of the ``choose_k`` neighbours has another value (the code's empty slots are zero keys);
* a batch of queries reads the memory as it was before the batch, and all their writes then
  land at once (the code's ``scatter_update``): hits update their own slot, misses take the
  oldest slots in query order, never a slot a hit of the same batch updates. The values of
  one batch must be distinct (a batch is one example per class, per episode), so no two writes
  meet. :func:`update_memory` states it exactly and ``tests/test_memory.py`` checks it against
  one-by-one updates;
* training clears the memory at the start of each meta-batch (``train.py`` clears it for every
  batch of episodes) and the tasks of the batch share it, each task's labels offset by
  ``ways * task`` (``train.py``'s ``b * episode_width``), so another task's keys are negatives.

Training (one meta-step): each task's support and query examples form one sequence per class
(support first); round ``r`` presents the ``r``-th example of every class of every task as one
batch: each is looked up (prediction and loss), then all are written. The loss is the mean over
all examples. Round 0 (every class's first showing) meets the empty memory, so its loss is the
margin and its gradient zero: the mean carries a constant ``margin / rounds``, and first showings
are trained only as later rounds' negatives (in the authors' one-at-a-time loop a first showing
after others of the batch does see their keys). One optimiser step per meta-batch (the authors
take one per position of the episode).

Evaluation (a), :meth:`MemoryModule.predict`: each test episode starts from an empty memory, its
support set is written round by round with the update rule, and each query is classified by its
nearest key's value. The logits are, per class, the largest similarity among that class's keys
times the code's softmax temperature ``max(1, log(0.2 choose_k) / margin)``: their argmax is the
nearest key's value and their softmax a probability (for the NLL of ``metalearn compare``). (b) :func:`lifelong_accuracy`:
the paper's own protocol, episodes of ``episode_width`` classes and ``episode_length`` examples
shown one at a time, each predicted then written; accuracy on a class's ``k``-th showing.

Distributed training: every rank holds the whole memory. After each round the ranks gather the
round's writes (queries, values) in rank order and apply them in rank, then task, then class
order, which is one process's order; so every rank's memory, and every loss, equals one process's.

Example::

    >>> memory = MemoryModule.build(MemoryModule.Config(), problem)     # problem: 28x28 Omniglot
    >>> loss, metrics = memory.meta_loss(batch)                         # batch: a TaskBatch
    >>> loss.backward()
    >>> logits = memory.predict(batch)                                  # (tasks, n_query, ways)
    >>> lifelong_accuracy(memory, source, episodes=100)["k_shot"]       # [0-shot, ..., 5-shot]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.base import (MetaLearner, Problem, check_embedding_fits, embed_episodes, evaluating,
                                      require_functional_model)
from metalearn.errors import ConfigError, MetalearnError, check_count, require_number
from metalearn.models import build_model, check_network_name, network_help, output_size
from metalearn.models.norm import first_order_batch_norm
from metalearn.options import option, options
from metalearn.tasks.batch import TaskBatch

OWNER = "MemoryModule.Config"
EMPTY = -1  # the value of a slot never written


@options
class MemoryConfig:
    """The memory's shape and rules, and the network that makes the queries."""

    memory_size: int = option(8192, "slots in the memory (the authors' Omniglot runs: 8192)", memory="a smaller")
    key_dim: int = option(128, "size of the keys: the embedding is projected to it (train.py's rep_dim)")
    choose_k: int = option(256, "nearest neighbours that the loss looks at (the paper's k)")
    margin: float = option(0.1, "margin of the memory loss (the paper's alpha); it also sets the logits' "
                                "temperature")
    age_noise: float = option(8.0, "ages get uniform noise in [-age_noise, age_noise] when the oldest slot is chosen")
    dropout: float = option(0.7, "dropout rate on the embedding during training (the authors keep 0.3 of it)",
                            training_only=True)
    model: str = option("lenet", "the embedding network: lenet (the authors' Omniglot CNN), "
                                 + network_help("embedding", "image") + "; one with an output layer is used without it")

    def __post_init__(self):
        if self.memory_size < 1:
            raise ConfigError(OWNER, "memory_size", f"must be at least 1, got {self.memory_size}")
        if self.key_dim < 1:
            raise ConfigError(OWNER, "key_dim", f"must be at least 1, got {self.key_dim}")
        if self.choose_k < 1:
            raise ConfigError(OWNER, "choose_k", f"must be at least 1, got {self.choose_k}")
        if self.choose_k > self.memory_size:
            raise ConfigError(OWNER, "choose_k", f"must be at most `memory_size` ({self.memory_size}), "
                                                 f"got {self.choose_k}")
        require_number(self.margin, OWNER, "margin")
        if not (math.isfinite(self.age_noise) and self.age_noise >= 0):
            raise ConfigError(OWNER, "age_noise", f"must be a finite number >= 0, got {self.age_noise}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(OWNER, "dropout", f"must lie in [0, 1), got {self.dropout}")
        check_network_name(OWNER, self.model, "embedding", "image", also={"lenet": "the authors' Omniglot CNN"})

    @property
    def temperature(self) -> float:
        """The authors' softmax temperature over the ``choose_k`` similarities, used to turn the
        per-class similarities of :meth:`MemoryModule.predict` into logits."""
        return max(1.0, math.log(0.2 * self.choose_k) / self.margin)


class LeNet(nn.Module):
    """The authors' Omniglot embedder (``model.py``): two blocks of two 3x3 convolutions (64, then
    128 channels, ReLU, 'same' padding) each followed by a 2x2 max-pool, then a linear layer to
    ``out_features``. No normalisation layer. x: (batch, C, H, W) -> (batch, out_features).

    Initialised as the authors': weights truncated normal with standard deviation 0.1, biases 0.
    Without a normalisation layer this matters: with PyTorch's default initialisation all
    Omniglot images embed nearly parallel (mean cosine 0.94 between queries) and training makes
    them collapse to one point (the loss stays at the margin); from the authors' the keys start
    apart (``tests/test_memory.py`` checks the initialisation)."""

    def __init__(self, input_shape: tuple[int, ...], out_features: int = 128):
        super().__init__()
        channels, height, width = input_shape
        if min(height, width) < 4:
            raise MetalearnError(f"lenet halves the image twice and needs at least 4x4 inputs, got {height}x{width}")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),  # TensorFlow's 'SAME' pooling keeps a last odd row
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.head = nn.Linear(128 * math.ceil(math.ceil(height / 2) / 2) * math.ceil(math.ceil(width / 2) / 2),
                              out_features)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.1, a=-0.2, b=0.2)  # TensorFlow's: cut at 2 sigma
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


# -- the memory: pure functions on (keys, values, ages) with a leading axis of memories --------


class Memory(NamedTuple):
    """A batch of independent memories: keys (memories, slots, key_dim) unit rows (zero when
    empty), values (memories, slots) long (``EMPTY`` when never written), ages (memories, slots)."""

    keys: Tensor
    values: Tensor
    ages: Tensor


def empty_memory(memories: int, slots: int, key_dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Memory:
    return Memory(torch.zeros(memories, slots, key_dim, device=device, dtype=dtype),
                  torch.full((memories, slots), EMPTY, dtype=torch.long, device=device),
                  torch.zeros(memories, slots, device=device, dtype=dtype))


class Lookup(NamedTuple):
    """What a batch of queries reads from the memory (section 3), all (memories, queries):
    ``prediction`` the nearest key's value (``EMPTY`` with an empty memory), ``nearest`` its
    slot, ``loss`` the memory loss (differentiable in the queries), ``positive``/``negative``
    the similarities that entered it."""

    prediction: Tensor
    nearest: Tensor
    loss: Tensor
    positive: Tensor
    negative: Tensor
    similarity: Tensor  # (memories, queries, slots), detached: for update_memory


def look_up(memory: Memory, queries: Tensor, values: Tensor, choose_k: int, margin: float) -> Lookup:
    """Nearest neighbours and the memory loss of a batch of queries.

    queries: (memories, queries, key_dim) unit vectors; values: (memories, queries) their correct
    values. The ``choose_k`` nearest filled slots by cosine similarity (empty slots are never
    neighbours); positive: the most similar of them with the query's value, else the most
    recently written slot with that value (least age), else similarity 0; negative: the most
    similar with another value, else 0. Gradients flow into ``queries`` only.

    Both similarities are the raw cosines, as the paper's loss writes them, and may be negative:
    the authors' code takes ``top_k(sims * hints)`` (and ``sims * (1 - hints)``), whose masked
    entries make both at least 0 wherever its pool holds both kinds of slot, so a negative cosine
    there gets no gradient (docs/methods/memory.md, "Differences from the paper and the authors'
    code").
    """
    keys = memory.keys.detach()
    similarity = torch.einsum("mqd,msd->mqs", queries, keys)  # (memories, queries, slots)
    filled = (memory.values != EMPTY).unsqueeze(1)  # (memories, 1, slots)
    searched = similarity.detach().masked_fill(~filled, -math.inf)
    k = min(choose_k, keys.shape[1])
    top_similarity, top_slots = searched.topk(k, dim=-1)  # sorted, most similar first
    valid = torch.isfinite(top_similarity)
    top_values = memory.values.unsqueeze(1).expand(-1, queries.shape[1], -1).gather(-1, top_slots)
    same = top_values == values.unsqueeze(-1)
    chosen = similarity.gather(-1, top_slots)  # with gradients
    low = torch.finfo(chosen.dtype).min
    positive_in_top = (valid & same).any(-1)
    positive_top = chosen.masked_fill(~(valid & same), low).amax(-1)
    negative_any = (valid & ~same).any(-1)
    negative = torch.where(negative_any, chosen.masked_fill(~(valid & ~same), low).amax(-1), 0.0 * chosen[..., 0])
    # the most recently written slot of the query's value, for queries with no positive in the top k
    holds_value = memory.values.unsqueeze(1) == values.unsqueeze(-1)  # (memories, queries, slots)
    recent_age = memory.ages.unsqueeze(1).masked_fill(~holds_value, math.inf)
    recent_slot = recent_age.argmin(-1, keepdim=True)
    has_value = holds_value.any(-1)
    recent = similarity.gather(-1, recent_slot).squeeze(-1)
    zero = 0.0 * chosen[..., 0]
    positive = torch.where(positive_in_top, positive_top, torch.where(has_value, recent, zero))
    loss = F.relu(negative - positive + margin)
    nearest = top_slots[..., 0]
    prediction = torch.where(valid[..., 0], top_values[..., 0], torch.full_like(nearest, EMPTY))
    return Lookup(prediction, nearest, loss, positive, negative, similarity.detach())


def update_memory(memory: Memory, queries: Tensor, values: Tensor, noise: Tensor,
                  active: Tensor | None = None, similarity: Tensor | None = None) -> Memory:
    """The memory after a batch of queries is written with the update rule (section 3).

    queries: (memories, queries, key_dim) unit vectors (not differentiated); values: (memories,
    queries), distinct within each memory; noise: (memories, slots) uniform age noise; active:
    (memories, queries) bool, the queries that write (default all); similarity: the queries'
    cosines with the keys, (memories, queries, slots), when :func:`look_up` computed them already.

    Every query reads the memory as it was before the batch. A hit (the nearest filled slot
    holds the query's value) sets that slot's key to the normalised sum of key and query and its
    age to 0. The misses, in query order, take the slots of greatest ``age + noise`` that no hit
    of the batch updates, never-written slots first and the lower slot first among equal
    scores; each gets the query, its value and age 0.
    Every other age grows by one: a batch is one step of the memory's clock (the authors'
    ``make_update_op``). The keys and values equal those of writing the queries one at a time
    whenever no query's nearest slot would change by an earlier write of the batch (with
    distinct values, two writes never meet in one slot); one at a time, the ages would instead
    count every query as a step.
    """
    keys, stored, ages = memory
    memories, slots = stored.shape
    count = queries.shape[1]
    if count > slots:
        raise MetalearnError(f"a batch of {count} writes does not fit a memory of {slots} slots")
    queries = queries.detach()
    active = torch.ones_like(values, dtype=torch.bool) if active is None else active
    if similarity is None:
        similarity = torch.einsum("mqd,msd->mqs", queries, keys)
    similarity = similarity.masked_fill((stored == EMPTY).unsqueeze(1), -math.inf)
    best, nearest = similarity.max(-1)
    nearest_value = stored.gather(1, nearest)
    hit = active & torch.isfinite(best) & (nearest_value == values)
    miss = active & ~hit
    # oldest first: never-written slots above every written one, then age + noise
    score = ages + noise
    ceiling = score.amax(-1, keepdim=True) + 1
    score = torch.where(stored == EMPTY, ceiling + noise - noise.amin(-1, keepdim=True), score)
    updated = _scatter_flags(stored, nearest, hit)
    score = score.masked_fill(updated, -math.inf)
    # oldest first, the lower slot first among equals (a stable sort): the same choice one by one
    oldest = score.sort(dim=-1, descending=True, stable=True).indices[:, :count]
    rank = (miss.long().cumsum(-1) - 1).clamp(min=0)
    slot = torch.where(hit, nearest, oldest.gather(1, rank))
    dim = keys.shape[-1]
    merged = F.normalize(queries + keys.gather(1, nearest.unsqueeze(-1).expand(-1, -1, dim)), dim=-1)
    new_keys = torch.where(hit.unsqueeze(-1), merged, queries)
    if bool(active.all()):
        keys = keys.scatter(1, slot.unsqueeze(-1).expand(-1, -1, dim), new_keys)
        stored = stored.scatter(1, slot, values)
        written = _scatter_flags(ages, slot, active)
    else:  # inactive queries write into one extra slot, dropped afterwards
        slot = torch.where(active, slot, slots)
        pad = torch.zeros(memories, 1, dim, dtype=keys.dtype, device=keys.device)
        keys = torch.cat([keys, pad], 1).scatter(1, slot.unsqueeze(-1).expand(-1, -1, dim), new_keys)[:, :slots]
        stored = torch.cat([stored, stored[:, :1]], 1).scatter(1, slot, values)[:, :slots]
        written = _scatter_flags(torch.cat([ages, ages[:, :1]], 1), slot, active)[:, :slots]
    ages = torch.where(written, torch.zeros_like(ages), ages + 1)
    return Memory(keys, stored, ages)


def _scatter_flags(like: Tensor, index: Tensor, flags: Tensor) -> Tensor:
    """(memories, slots) bool: True at ``index[m, q]`` wherever ``flags[m, q]``."""
    marks = torch.zeros(like.shape, dtype=torch.long, device=like.device)
    marks.scatter_add_(1, index, flags.long())
    return marks > 0


def class_rounds(labels: Tensor, ways: int) -> Tensor:
    """The order in which examples are shown: (tasks, rounds, ways) example indices, round ``r``
    holding the ``r``-th example (in the given order) of every class, ``-1`` where a class has
    fewer. labels: (tasks, n) in [0, ways)."""
    tasks, n = labels.shape
    one_hot = F.one_hot(labels, ways)
    occurrence = (one_hot.cumsum(1) * one_hot).sum(-1) - 1  # (tasks, n): the example's showing of its class
    rounds = int(occurrence.max()) + 1 if n else 0
    order = torch.full((tasks, rounds, ways), -1, dtype=torch.long, device=labels.device)
    task = torch.arange(tasks, device=labels.device).unsqueeze(1).expand(-1, n)
    order[task, occurrence, labels] = torch.arange(n, device=labels.device).expand(tasks, -1)
    return order


# -- the method ---------------------------------------------------------------------------------


class MemoryModule(MetaLearner):
    """A CNN whose L2-normalised, projected embedding queries a key-value memory (Kaiser et al. 2017).

    Buffers: ``memory_keys`` (memory_size, key_dim), ``memory_values`` (memory_size,),
    ``memory_ages`` (memory_size,): the training memory after the last meta-step, and
    ``age_noise_state``, the state of the generator of the age noise; all in ``state_dict``, so
    a checkpoint holds them and a resumed run draws the same noise."""

    name = "memory"
    classification_only = True
    Config = MemoryConfig

    @classmethod
    def dataset_task_defaults(cls, dataset: str) -> dict:
        # on Omniglot, the authors' episodes (train.py: --episode_width 5, --episode_length 30),
        # each of 5 classes shown 6 times: as 1 + 5 rounds, so that 5 of 6 showings meet a key of
        # their class (the first round's loss has no gradient); on the vinyals split, the table
        # every method shares. Other datasets keep their own episode shapes (an image folder of
        # fewer than 6 images a class would be refused).
        return {"split": "vinyals", "shots": 1, "query": 5} if dataset == "omniglot" else {}

    def __init__(self, model: nn.Module, embedding_dim: int, config: MemoryConfig = MemoryConfig()):
        super().__init__()
        require_functional_model(model, "memory", False)
        self.model = model
        self.config = config
        # the authors' memory_query_proj: key_dim x key_dim, truncated normal (std 0.01)
        self.query_projection = nn.Linear(embedding_dim, config.key_dim, bias=False)
        nn.init.trunc_normal_(self.query_projection.weight, std=0.01, a=-0.02, b=0.02)
        memory = empty_memory(1, config.memory_size, config.key_dim)
        self.register_buffer("memory_keys", memory.keys[0])
        self.register_buffer("memory_values", memory.values[0])
        self.register_buffer("memory_ages", memory.ages[0])
        seed = int(torch.randint(0, 2**62, ()))  # from the global generator: the run's seed
        self.register_buffer("age_noise_state", torch.Generator().manual_seed(seed).get_state())

    @classmethod
    def build(cls, config: MemoryConfig, problem: Problem) -> "MemoryModule":
        """The Memory Module on ``config.model``: the paper's LeNet embedder with ``key_dim``
        outputs (``lenet``), or an image network from :func:`metalearn.models.build_model` whose
        output width the query projection takes. Refuses a regression problem, and LeNet for
        inputs that are not images."""
        cls.require_classification(problem)
        if config.model == "lenet":
            if len(problem.input_shape) != 3:
                raise MetalearnError(f"lenet needs image inputs (C, H, W), got shape {problem.input_shape}")
            return cls(LeNet(problem.input_shape, config.key_dim), config.key_dim, config)
        model = build_model(config.model, problem.input_shape, None)
        dim = output_size(model, problem.input_shape)
        return cls(model, dim, config)

    @classmethod
    def paper_defaults(cls, task, given: dict | None = None) -> tuple[dict, dict]:
        # train.py and model.py: the LeNet embedder (128-d keys), memory 8192, k 256, margin 0.1,
        # age noise 8, dropout keeping 0.3, Adam at 1e-4, 16 episodes per batch, 100,000 batches.
        # Its episodes, 5 classes x 6 examples, are the task defaults (dataset_task_defaults).
        return ({"model": "lenet", "memory_size": 8192, "key_dim": 128, "choose_k": 256, "margin": 0.1,
                 "age_noise": 8.0, "dropout": 0.7},
                {"meta_batch_size": 16, "meta_lr": 1e-4, "steps": 100000, "eval_episodes": 1000,
                 "val_every": 1000, "val_episodes": 200, "checkpoint_every": 500})

    # -- pieces ----------------------------------------------------------------------------------

    def queries(self, batch: TaskBatch, *, training: bool = False) -> tuple[Tensor, Tensor]:
        """Unit query vectors of each task's support and query examples: (tasks, n_support,
        key_dim) and (tasks, n_query, key_dim); dropout on the embedding while training. A
        malformed batch, or a network whose embedding is not the width the projection was built
        for, is refused in one line (:func:`check_embedding_fits`; ``training``: the query
        labels are read, so -1, unknown, is refused too)."""
        check_embedding_fits(self, batch, training=training, width=self.query_projection.in_features,
                             network=self.model)
        with first_order_batch_norm():  # differentiated once: torch's native kernel is right, and faster
            support, query = embed_episodes(self.model, batch)
        embeddings = torch.cat([support, query], dim=1)
        if self.training and self.config.dropout > 0:
            embeddings = F.dropout(embeddings, self.config.dropout)
        keys = F.normalize(self.query_projection(embeddings), dim=-1)
        return keys[:, : support.shape[1]], keys[:, support.shape[1]:]

    def _age_noise(self, memories: int, slots: int, device: torch.device) -> Tensor:
        """(memories, slots) uniform in [-age_noise, age_noise] from the stored generator state."""
        generator = torch.Generator()
        generator.set_state(self.age_noise_state.cpu())
        # float32 whatever torch's default dtype: a float64 default would draw other numbers from the state
        noise = (torch.rand(memories, slots, generator=generator, dtype=torch.float32) * 2 - 1) * self.config.age_noise
        self.age_noise_state.copy_(generator.get_state())
        return noise.to(device)

    def check_fits(self, batch: TaskBatch, n_support: int) -> None:
        if self.config.memory_size < n_support:
            raise ConfigError(OWNER, "memory_size", f"must hold one episode's support set ({n_support} examples), "
                                                    f"got {self.config.memory_size}")

    def check_run(self, config: Any) -> None:
        """Training writes one round of every task of the meta-batch at once and needs a
        training episode's support set in memory; evaluation writes a round of one episode's
        classes at once (a larger support set then replaces the oldest keys)."""
        task, size = config.task, self.config.memory_size
        needs = [(config.train.meta_batch_size * task.ways, f"one round of the meta-batch's writes "
                  f"({config.train.meta_batch_size} tasks x {task.ways} classes)"),
                 (task.ways * task.shots, f"one training episode's support set ({task.ways} x {task.shots})"),
                 (task.for_testing().ways, f"one round of a test episode ({task.for_testing().ways} classes)")]
        for need, what in needs:
            if size < need:
                raise ConfigError(OWNER, "memory_size", f"must hold {what} = {need} slots, got {size}")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Refuse, in one line, a checkpoint whose memory has another number of slots."""
        saved = state_dict.get("memory_values")
        if saved is not None and saved.shape[0] != self.config.memory_size:
            raise ConfigError(OWNER, "memory_size", f"is {self.config.memory_size} but the checkpoint's memory has "
                                                    f"{saved.shape[0]} slots, which it keeps: leave `memory_size` at "
                                                    f"the run's {saved.shape[0]}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- the interface -----------------------------------------------------------------------

    def chunking_refused(self) -> str | None:
        # the tasks are not independent: every task's examples are looked up in, and written to,
        # one memory that the whole meta-batch shares (over the ranks too, by gathers inside
        # meta_loss, which chunks of unequal count on the ranks would also mismatch)
        return ("the Memory Module (all tasks of a meta-batch read and write one shared memory, so a chunk of "
                "tasks would see another memory than the whole batch)")

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean memory loss of every example of the batch's tasks, shown round by round (see the
        module docstring) to one memory that all tasks (of all ranks) share, cleared first.

        Metrics: ``accuracy`` of the predictions on the query examples (each class's examples
        after its support examples), ``one_shot_accuracy`` on the examples of round 1 (a class's
        second showing)."""
        support, query = self.queries(batch, training=True)
        self.check_fits(batch, support.shape[1])
        examples = torch.cat([support, query], dim=1)  # (tasks, n, key_dim)
        labels = torch.cat([batch.support_y, batch.query_y], dim=1)
        return self.sequence_loss(examples, labels, support.shape[1], _ways(batch))

    def sequence_loss(self, examples: Tensor, labels: Tensor, n_support: int,
                      ways: int) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`meta_loss` from the query vectors on: examples (tasks, n, key_dim) unit vectors,
        the first ``n_support`` of each task its support set; labels (tasks, n) in [0, ways).
        Leaves the final memory in the ``memory_*`` buffers."""
        config = self.config
        is_query = torch.zeros_like(labels, dtype=torch.bool)
        is_query[:, n_support:] = True
        order = class_rounds(labels, ways)  # (tasks, rounds, ways)
        tasks = examples.shape[0]
        world = _world(examples.device)
        counts = world.gather(torch.tensor([tasks])) if world.distributed else torch.tensor([tasks])
        offset, all_tasks = int(counts[: world.rank].sum()), int(counts.sum())
        task_values = (torch.arange(tasks, device=labels.device) + offset).unsqueeze(1) * ways
        values = labels + task_values  # distinct across tasks (and ranks)
        if config.memory_size < all_tasks * ways:
            raise ConfigError(OWNER, "memory_size", f"must hold one round of the meta-batch's writes ({all_tasks} "
                                                    f"tasks x {ways} classes = {all_tasks * ways}), got {config.memory_size}")
        device = examples.device
        memory = empty_memory(1, config.memory_size, config.key_dim, device, examples.dtype)
        losses, correct, counted, first_correct, first_counted = [], [], [], [], []
        rows = torch.arange(tasks, device=device).unsqueeze(1)
        for r in range(order.shape[1]):
            index = order[:, r]  # (tasks, ways)
            present = index >= 0
            safe = index.clamp(min=0)
            q = examples[rows, safe]  # (tasks, ways, key_dim)
            v = values[rows, safe]
            found = look_up(memory, q.reshape(1, -1, config.key_dim), v.reshape(1, -1), config.choose_k, config.margin)
            present_flat = present.reshape(1, -1)
            losses.append((found.loss * present_flat).sum())
            right = (found.prediction == v.reshape(1, -1)) & present_flat
            queried = is_query[rows, safe].reshape(1, -1) & present_flat
            correct.append((right & queried).sum())
            counted.append(queried.sum())
            if r == 1:
                first_correct.append(right.sum())
                first_counted.append(present_flat.sum())
            q_all, v_all, p_all, known = q.detach(), v, present, found.similarity
            if world.distributed:  # every rank's writes, in rank order; their similarities anew
                known = None
                q_all = world.gather(q_all).to(device)
                v_all = world.gather(v_all).to(device)
                p_all = world.gather(p_all).to(device)
            noise = self._age_noise(1, config.memory_size, device)
            memory = update_memory(memory, q_all.reshape(1, -1, config.key_dim), v_all.reshape(1, -1), noise,
                                   p_all.reshape(1, -1), known)
        with torch.no_grad():
            self.memory_keys.copy_(memory.keys[0])
            self.memory_values.copy_(memory.values[0])
            self.memory_ages.copy_(memory.ages[0])
        loss = torch.stack(losses).sum() / (labels.numel())
        metrics = {"loss": loss.detach(),
                   "accuracy": torch.stack(correct).sum().float() / torch.stack(counted).sum().clamp(min=1)}
        if first_counted:
            metrics["one_shot_accuracy"] = first_correct[0].float() / first_counted[0].clamp(min=1)
        return loss, metrics

    def predict(self, batch: TaskBatch) -> Tensor:
        """Per-class logits (tasks, n_query, ways): each task's support set written round by round
        into an empty memory of its own, then each query scored by the largest similarity among
        each class's keys, times the temperature (see the module docstring). A memory of
        ``memory_size`` slots only ever fills as many as the support set has examples, so the
        memory used here has min(memory_size, support examples) slots: the same result at a
        fraction of the cost. A support set larger than the memory (a test shape wider than
        training's) replaces the oldest keys as the writes go on, as in training and the
        lifelong protocol."""
        with torch.no_grad():
            support, query = self.queries(batch)  # checks the batch first
            ways = _ways(batch)
            if self.config.memory_size < ways:  # a round writes one key per class at once
                raise MetalearnError(f"memory: its {self.config.memory_size} slots cannot take one round of a "
                                     f"{ways}-way episode (one key per class at once); test with at most "
                                     f"{self.config.memory_size} ways")
            return self.predict_from_queries(support, query, batch.support_y, ways)

    def predict_from_queries(self, support: Tensor, query: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """:meth:`predict` from the query vectors on: support (tasks, n_support, key_dim), query
        (tasks, n_query, key_dim), support_y (tasks, n_support) -> logits (tasks, n_query, ways)."""
        memory = write_support(support, support_y, ways, min(self.config.memory_size, support.shape[1]))
        similarity = torch.einsum("tqd,tsd->tqs", query, memory.keys)
        holds = F.one_hot(memory.values.clamp(min=0), ways).bool() & (memory.values != EMPTY).unsqueeze(-1)
        per_class = similarity.unsqueeze(-1).masked_fill(~holds.unsqueeze(1), -math.inf).amax(2)
        return per_class * self.config.temperature


def write_support(support: Tensor, labels: Tensor, ways: int, slots: int | None = None) -> Memory:
    """Each task's own memory of ``slots`` slots (default: one per support example), after its
    support examples (tasks, n_support, key_dim) are written with the update rule, round ``r``
    being the ``r``-th example of every class. With a slot per example none is short, so which
    slot a write takes changes nothing; with fewer, a miss replaces the oldest key (the lowest
    slot among equally old ones). The age noise is left at 0: the result is deterministic."""
    tasks, n_support, key_dim = support.shape
    slots = n_support if slots is None else slots
    memory = empty_memory(tasks, slots, key_dim, support.device, support.dtype)
    order = class_rounds(labels, ways)
    rows = torch.arange(tasks, device=support.device).unsqueeze(1)
    noise = torch.zeros(tasks, slots, device=support.device, dtype=support.dtype)
    for r in range(order.shape[1]):
        index = order[:, r]
        safe = index.clamp(min=0)
        memory = update_memory(memory, support[rows, safe], labels[rows, safe], noise, index >= 0)
    return memory


def lifelong_accuracy(learner: MemoryModule, source: Any, episodes: int = 1000, seed: int = 0,
                      chunk: int = 100, max_shot: int = 5) -> dict[str, Any]:
    """The paper's lifelong protocol as the authors' ``train.py`` reports it: episodes whose
    examples are shown one at a time to an empty memory, each first predicted then written; the
    accuracy on the examples that are a class's ``k``-th showing (k = 0 .. max_shot).

    source: a task source whose tasks are one episode each, ``ways = episode_width`` classes and
    ``shots + query`` examples per class (``episode_length = ways * (shots + query)``), e.g.
    ``metalearn.tasks.build_task_source(TaskConfig(split="vinyals", ways=5, shots=1, query=5),
    "test")``. The examples are shown round by round, every class once per round in a fresh
    random order (``train.py``: each label is seen before any second showing). Episodes are drawn
    from ``seed``, ``chunk`` at a time, each with its own memory of ``min(memory_size,
    episode_length)`` slots (the same predictions as ``memory_size``: no slot is ever reused).

    ``episodes`` and ``chunk`` must be whole numbers of at least 1, ``max_shot`` one of at least
    0: anything else is refused in one line, as :func:`~metalearn.evaluation.evaluate` refuses
    its counts (no episode would leave nothing to score, a chunk of 0 nothing to draw).

    Returns ``k_shot``: accuracies in percent, k = 0 .. max_shot (None for a k the episodes lack),
    ``k_shot_ci95``: their 95% confidence intervals (1.96 standard errors of the per-episode
    accuracies, as the standard evaluation's), ``overall``: accuracy over all examples,
    ``episodes``, and the episodes' ``episode_width`` (classes) and ``episode_length``
    (examples).
    """
    episodes = check_count(episodes, "lifelong_accuracy: episodes")
    chunk = check_count(chunk, "lifelong_accuracy: chunk")
    max_shot = check_count(max_shot, "lifelong_accuracy: max_shot", 0)
    config = learner.config
    generator = torch.Generator().manual_seed(seed)
    correct, shown = [], []  # per chunk: (episodes, max_shot + 1) counts on each k-th showing
    total_correct, total = 0.0, 0.0
    width = length = 0
    device = next(learner.parameters()).device
    with evaluating(learner):
        done = 0
        while done < episodes:
            count = min(chunk, episodes - done)
            batch = source.sample(count, generator).to(device)
            ways = _ways(batch)
            with torch.no_grad():
                support, query = learner.queries(batch, training=True)  # the query labels are read
            examples = torch.cat([support, query], dim=1)
            labels = torch.cat([batch.support_y, batch.query_y], dim=1)
            width, length = ways, labels.shape[1]
            order = class_rounds(labels, ways)  # (tasks, rounds, ways)
            # a fresh class order in every round of every episode; the draws (here and the age noise
            # below) are float32 whatever torch's default dtype, which would change the numbers drawn
            shuffle = torch.rand(order.shape, generator=generator, dtype=torch.float32).argsort(-1).to(device)
            sequence = order.gather(-1, shuffle).flatten(1)  # (tasks, positions)
            slots = min(config.memory_size, labels.shape[1])
            memory = empty_memory(count, slots, config.key_dim, device, examples.dtype)
            rows = torch.arange(count, device=device)
            chunk_correct = torch.zeros(count, max_shot + 1, dtype=torch.float64)
            chunk_shown = torch.zeros(count, max_shot + 1, dtype=torch.float64)
            for p in range(sequence.shape[1]):
                index = sequence[:, p]
                present = index >= 0
                safe = index.clamp(min=0)
                q = examples[rows, safe].unsqueeze(1)
                v = labels[rows, safe].unsqueeze(1)
                with torch.no_grad():
                    found = look_up(memory, q, v, config.choose_k, config.margin)
                    noise = (torch.rand(count, slots, generator=generator, dtype=torch.float32) * 2 - 1).to(
                        device) * config.age_noise
                    memory = update_memory(memory, q, v, noise, present.unsqueeze(1), found.similarity)
                right = (found.prediction[:, 0] == v[:, 0]) & present
                shot = p // ways
                if shot <= max_shot:
                    chunk_correct[:, shot] += right.cpu()
                    chunk_shown[:, shot] += present.cpu()
                total_correct += float(right.sum())
                total += float(present.sum())
            correct.append(chunk_correct)
            shown.append(chunk_shown)
            done += count
    correct, shown = torch.cat(correct), torch.cat(shown)
    k_shot, k_shot_ci95 = [], []
    for k in range(max_shot + 1):
        has = shown[:, k] > 0
        if not bool(has.any()):  # no episode shows a class k+1 times: null in the JSON files
            k_shot.append(None)
            k_shot_ci95.append(None)
            continue
        k_shot.append(float(100 * correct[has, k].sum() / shown[has, k].sum()))
        per_episode = 100 * correct[has, k] / shown[has, k]
        n = per_episode.numel()
        k_shot_ci95.append(1.96 * float(per_episode.std()) / math.sqrt(n) if n > 1 else 0.0)
    return {"k_shot": k_shot, "k_shot_ci95": k_shot_ci95, "overall": 100 * total_correct / max(total, 1),
            "episodes": episodes, "episode_width": width, "episode_length": length}


def _ways(batch: TaskBatch) -> int:
    return batch.ways or int(batch.support_y.max()) + 1


def _world(device: torch.device):
    """This process's ``World`` when it is one rank of a process group (training under torchrun),
    so that every rank applies every rank's writes; else one process."""
    from metalearn.distributed import World

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), device)
    return World(device=device)


# `metalearn eval RUN --protocol lifelong`: the paper's own protocol beside the standard episodes
MemoryModule.protocols = {"lifelong": lifelong_accuracy}
