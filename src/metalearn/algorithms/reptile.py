"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms",
arXiv:1803.02999), batched over tasks.

Each task of a meta-batch trains its own copy ``phi`` of the weights ``theta`` with SGD or Adam
for ``inner_steps`` mini-batches of its support set; the initialization then moves towards the
tasks' adapted weights, ``theta <- theta + epsilon * (mean_tasks(phi) - theta)`` (Algorithm 2,
the batched version). Nothing is differentiated through the inner loop.

The inner loop is a pure function ``params -> adapted params`` (``torch.func.grad`` plus a
functional SGD/Adam on the parameter dict), run for the whole meta-batch with ``vmap``. The
trainer only knows losses and optimisers, so :meth:`Reptile.meta_loss` returns a loss whose
gradient is the Reptile direction ``theta - mean(phi)``: one plain SGD step at learning rate
``epsilon`` is then exactly the update above, and the paper's linear annealing of epsilon to 0
is ``lr_anneal="linear"`` (both set by :meth:`Reptile.paper_defaults`). Gradient all-reduce
over ranks averages the directions of all tasks, as the update needs.

Evaluation (the paper's Tables 1 and 2 report both): with ``transductive=True`` the adapted network
classifies the whole query set in one batch, so batch norm takes its statistics from the query
examples together; with ``transductive=False`` each query example is classified on its own, in a
batch made of the support set plus that one example (as ``_test_predictions`` of
openai/supervised-reptile), so no information passes between query examples. Both are
vectorised (``vmap`` over tasks and over query examples).

The inner Adam's state: by default each task's Adam starts afresh (zero moments, step 1). The
reference code's TensorFlow Adam keeps its moment estimates, which are not trainable variables,
from task to task and on into evaluation; ``inner_adam_state="carried"`` does that (see
:class:`CarriedAdamState`), and the paper's Omniglot settings use it. Where this still differs
from openai/supervised-reptile: the tasks of a meta-batch run side by side from the same state,
not one after another; the mini-batch order at test time is a fixed function of the batch, so an
evaluation is repeatable.

Example::

    >>> from metalearn.models import Conv4
    >>> reptile = Reptile(Conv4(1, 5), Reptile.Config(inner_lr=1e-3, inner_steps=5))
    >>> loss, metrics = reptile.meta_loss(batch)   # batch: a TaskBatch of 5-way tasks
    >>> loss.backward()                            # p.grad == theta - mean(phi)
    >>> torch.optim.SGD(reptile.parameters(), lr=1.0).step()   # theta <- mean(phi)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalearn.algorithms.base import MetaLearner, check_network_fits, require_functional_model, Problem, accuracy, task_loss
from metalearn.algorithms.inner_loop import Params, check_inner_loop_options, loss_gradient, sgd_step
from metalearn.datasets import of_photographs
from metalearn.errors import ConfigError, MetalearnError
from metalearn.options import option, options
from metalearn.models import build_model, check_network_name, network_help
from metalearn.models.norm import first_order_batch_norm
from metalearn.tasks.batch import TaskBatch

AdamState = tuple[Params, Params, int]  # first moments, second moments, steps taken

ADAM_EPS = 1e-8
PREDICT_ORDER_SEED = 0  # the test-time mini-batch order, one for every task: a task's predictions are its own
NON_TRANSDUCTIVE_IMAGES = 4096  # images per forward pass when query examples are classified singly


@options
class ReptileConfig:
    """inner_optimizer: ``adam`` or ``sgd`` for the task-specific training, at ``inner_lr``;
    inner_beta1 / inner_beta2: Adam's moment decay rates (the reference code uses beta1 = 0,
    no momentum); inner_steps / test_inner_steps: mini-batch updates per task during
    meta-training / at test time, on mini-batches of inner_batch_size / test_inner_batch_size
    support examples (drawn without replacement, epoch after epoch); transductive: classify the
    query set in one batch (batch-norm statistics shared by the query examples) or each query
    example alone with the support set, at evaluation (meta-training never uses the query set
    for the update); inner_adam_state: ``fresh`` starts every task's Adam from zero moments at
    step 0; ``carried`` keeps the moments and step count from task to task through training
    and starts every test task from them, as the reference code's TensorFlow optimiser does
    (its slots are not trainable variables, so neither the meta-update nor the end of a task
    resets them); with ``inner_optimizer="sgd"`` there is no Adam state, and inner_adam_state
    is always ``fresh`` (a ``carried`` given here becomes ``fresh``); model: network name (see
    ``metalearn.models``)."""

    inner_optimizer: str = option("adam", "the task-specific optimiser: adam or sgd")
    inner_lr: float = option(0.001, "the task-specific optimiser's learning rate")
    inner_beta1: float = option(0.0, "Adam's first-moment decay in the inner loop (the reference code: 0, "
                                     "no momentum)")
    inner_beta2: float = option(0.999, "Adam's second-moment decay in the inner loop")
    inner_steps: int = option(5, "mini-batch updates per task during meta-training", training_only=True, memory="fewer")
    inner_batch_size: int = option(10, "support examples per inner mini-batch during meta-training",
                                   training_only=True)
    test_inner_steps: int = option(50, "mini-batch updates per task at validation and test time")
    test_inner_batch_size: int = option(5, "support examples per inner mini-batch at validation and test time")
    transductive: bool = option(True, "classify a task's query examples in one batch (sharing batch-norm "
                                      "statistics), or each with the support set alone")
    inner_adam_state: str = option("fresh", "fresh: every task's Adam starts from zero moments; carried: the "
                                            "moments pass from task to task and on into evaluation, as in the "
                                            "reference code")
    model: str = option("conv4", "the network: " + network_help("classifier"))

    def __post_init__(self):
        owner = "Reptile.Config"
        check_network_name(owner, self.model, "classifier")
        if self.inner_optimizer not in ("adam", "sgd"):
            raise ConfigError(owner, "inner_optimizer", f"must be adam or sgd, got {self.inner_optimizer!r}")
        if self.inner_adam_state not in ("fresh", "carried"):
            raise ConfigError(owner, "inner_adam_state", f"must be fresh or carried, got {self.inner_adam_state!r}")
        check_inner_loop_options(owner, self.inner_lr, self.inner_steps, self.test_inner_steps)
        for name in ("inner_batch_size", "test_inner_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(owner, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("inner_beta1", "inner_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(owner, name, f"must lie in [0, 1), got {getattr(self, name)}")
        if self.inner_optimizer == "sgd" and self.inner_adam_state != "fresh":
            # SGD has no Adam state to carry: stored as "fresh", so that a run's configuration says
            # what it trained (paper_defaults set "carried" for images, whatever --inner-optimizer
            # the user gave; a carried state given with sgd is refused by resolve_config)
            object.__setattr__(self, "inner_adam_state", "fresh")


# -- pure pieces: optimiser steps and mini-batch order ------------------------------------------


def adam_init(params: Params) -> AdamState:
    """Adam's state before its first step: zero moments, zero steps."""
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    return zeros, dict(zeros), 0


def adam_step(params: Params, grads: Params, state: AdamState, lr: float, beta1: float = 0.9,
              beta2: float = 0.999, eps: float = ADAM_EPS) -> tuple[Params, AdamState]:
    """One Adam update (Kingma & Ba 2015, Algorithm 1) of a parameter dict, with the arithmetic
    of ``torch.optim.Adam`` (no weight decay, no amsgrad): pure, so it runs under ``vmap`` and
    ``grad``. Returns the new parameters and state."""
    first, second, steps = state
    steps += 1
    # the fused forms torch.optim.Adam uses: each op reads and writes every parameter of every
    # task, so their number sets the cost (13 unfused, 6 here with the reference's beta1 = 0)
    if beta1 == 0:
        first = dict(grads)
    else:
        first = {name: torch.lerp(first[name], g, 1 - beta1) for name, g in grads.items()}
    second = {name: torch.addcmul(second[name] * beta2, g, g, value=1 - beta2) for name, g in grads.items()}
    step_size = lr / (1 - beta1**steps)
    root_correction = math.sqrt(1 - beta2**steps)
    new = {name: torch.addcdiv(p, first[name], (second[name].sqrt() / root_correction).add_(eps), value=-step_size)
           for name, p in params.items()}
    return new, (first, second, steps)


def minibatch_indices(n_examples: int, batch_size: int, steps: int, tasks: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """Positions of each task's mini-batches in its support set: (tasks, steps, batch_size).

    Each task walks through fresh random permutations of its ``n_examples`` examples,
    ``batch_size`` at a time, a batch running on into the next permutation when
    ``n_examples`` is not a multiple of it: mini-batches without replacement, as
    ``_mini_batches`` of openai/supervised-reptile draws them.
    """
    epochs = math.ceil(steps * batch_size / n_examples)
    # float32 draws whatever torch's default dtype: a float64 default draws other numbers from the
    # same generator, and so other mini-batches (predict's answers would depend on the notebook's dtype)
    order = torch.rand(tasks, epochs, n_examples, generator=generator, dtype=torch.float32).argsort(dim=-1)
    return order.reshape(tasks, -1)[:, : steps * batch_size].reshape(tasks, steps, batch_size)


class CarriedAdamState(nn.Module):
    """The inner Adam's moments and step count, carried from task to task
    (``inner_adam_state="carried"``). Buffers, so a checkpoint holds them and a resumed run
    continues exactly.

    The reference code trains a meta-batch's tasks one after another with one optimiser. Here
    they train side by side from the same state, and the state then advances as if they had
    run in sequence, each task contributing the change of its own moments: with decay ``b``,
    ``K`` steps per task and ``T`` tasks, ``m <- b^(KT) m + (1 - b^(KT)) / (1 - b^K) *
    mean_tasks(m_task - b^K m)``. This is the sequential result when the tasks contribute
    equally, and independent of task order otherwise, so it does not depend on how a
    meta-batch is split over ranks.
    """

    def __init__(self, params: Params):
        super().__init__()
        self.names = list(params)
        for i, p in enumerate(params.values()):
            self.register_buffer(f"first_{i}", torch.zeros_like(p))
            self.register_buffer(f"second_{i}", torch.zeros_like(p))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def state(self) -> AdamState:
        first = {name: getattr(self, f"first_{i}") for i, name in enumerate(self.names)}
        second = {name: getattr(self, f"second_{i}") for i, name in enumerate(self.names)}
        return first, second, int(self.steps)

    def advance(self, start: AdamState, changes: tuple[Params, Params], tasks: int, steps_per_task: int,
                beta1: float, beta2: float) -> None:
        """Set the state to ``start`` advanced by ``tasks`` tasks of ``steps_per_task`` steps whose
        moments changed by ``changes`` in all (sums over tasks of ``m_task - b^K m_start``)."""
        for i, name in enumerate(self.names):
            for kind, beta, moments, change in (("first", beta1, start[0], changes[0]),
                                                ("second", beta2, start[1], changes[1])):
                per_task, total = beta**steps_per_task, beta ** (steps_per_task * tasks)
                spread = tasks if per_task == 1 else (1 - total) / (1 - per_task)
                getattr(self, f"{kind}_{i}").copy_(total * moments[name] + spread / tasks * change[name])
        self.steps.fill_(start[2] + steps_per_task * tasks)


class Reptile(MetaLearner):
    """Reptile around any ``nn.Module`` without running-statistics buffers."""

    name = "reptile"
    Config = ReptileConfig
    fixed_ways = True
    option_requires = {"inner_beta1": ("inner_optimizer", "adam"), "inner_beta2": ("inner_optimizer", "adam"),
                       "inner_adam_state": ("inner_optimizer", "adam")}
    # the reference code tests on one query image per class (its transduction classifies those
    # together); training uses the support images alone, the query only for the logged accuracy
    task_defaults = {"query": 1}

    def __init__(self, model: nn.Module, config: ReptileConfig = ReptileConfig()):
        super().__init__()
        require_functional_model(model, "Reptile", False)
        self.model = model
        self.config = config
        carried = config.inner_adam_state == "carried" and config.inner_optimizer == "adam"
        self.carried_adam = CarriedAdamState(dict(model.named_parameters())) if carried else None
        self._pending: tuple | None = None  # this meta-step's state change, until end_step

    @classmethod
    def build(cls, config: ReptileConfig, problem: Problem) -> "Reptile":
        """Reptile on the network ``config.model`` (:func:`metalearn.models.build_model`), with one
        output per class of ``problem`` (or its regression output size)."""
        return cls(build_model(config.model, problem.input_shape, problem.output_dim), config)

    @classmethod
    def paper_defaults(cls, task, given: dict | None = None) -> tuple[dict, dict]:
        # Outer step size 1 annealed linearly to 0, as plain SGD steps on theta - mean(phi).
        outer = {"meta_optimizer": "sgd", "meta_lr": 1.0, "lr_anneal": "linear", "meta_batch_size": 5}
        if not task.classification:
            # Not in the paper's tables: after the sinusoid demo published with it (joschu's
            # reptile-sinewaves-demo gist): SGD 0.02 on mini-batches of 10, one task per
            # meta-step, outer step 0.1 -> 0 over 30k steps, 32 steps at test time. Unlike the
            # demo, the network is metalearn's 40-40 ReLU MLP and a task has --shots points (5
            # by default, so a "mini-batch of 10" is all of them, twice); the demo samples 50
            # points per task.
            return ({"model": "mlp", "inner_optimizer": "sgd", "inner_lr": 0.02, "inner_steps": 5,
                     "inner_batch_size": 10, "test_inner_steps": 32, "test_inner_batch_size": 10},
                    {**outer, "meta_lr": 0.1, "meta_batch_size": 1, "steps": 30000, "val_every": 5000,
                     "checkpoint_every": 5000})
        if of_photographs(task.dataset):
            # Appendix A, Mini-ImageNet table: 32-filter max-pool Conv4 (as MAML's), Adam 0.001,
            # 8 inner steps on mini-batches of 10, 15 training shots (``--shots 15 --test-shots
            # K --query 1``), 50 test steps on mini-batches of 5 (1-shot) or 15 (5-shot)
            return ({"model": "conv4-maxpool-32", "inner_optimizer": "adam", "inner_lr": 0.001, "inner_steps": 8,
                     "inner_batch_size": 10, "test_inner_steps": 50,
                     "test_inner_batch_size": 5 if (task.test_shots or task.shots) == 1 else 15,
                     "inner_adam_state": "carried"},
                    {**outer, "steps": 100000})
        # Appendix A, Omniglot table (= the archived supervised-reptile README commands). Both
        # train on 10 shots per class (``--shots 10 --test-shots K --query 1``), and the code's
        # Adam carries its state across tasks.
        if task.ways >= 20:
            return ({"model": "conv4", "inner_optimizer": "adam", "inner_lr": 0.0005, "inner_steps": 10,
                     "inner_batch_size": 20, "test_inner_steps": 50, "test_inner_batch_size": 10,
                     "inner_adam_state": "carried"},
                    {**outer, "steps": 200000})
        return ({"model": "conv4", "inner_optimizer": "adam", "inner_lr": 0.001, "inner_steps": 5,
                 "inner_batch_size": 10, "test_inner_steps": 50, "test_inner_batch_size": 5,
                 "inner_adam_state": "carried"},
                {**outer, "steps": 100000})

    # -- the pure functions ------------------------------------------------------------------

    def _forward(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

    def adapt(self, params: Params, batches_x: Tensor, batches_y: Tensor,
              observe: Callable[[Params], Tensor] | None = None,
              adam_state: AdamState | None = None) -> tuple[Params, list[Tensor], AdamState | None]:
        """Train on one task's mini-batches, one optimiser step each, from a fresh optimiser or,
        for Adam, from ``adam_state`` when given.

        batches_x: (steps, batch_size, *input_shape), batches_y: (steps, batch_size, ...), no
        task axis (batch over tasks with ``vmap``). Returns the adapted parameters, when
        ``observe`` is given its value on the parameters after 0..steps steps, and the final
        Adam state (None for SGD).
        """
        config = self.config
        state = None
        if config.inner_optimizer == "adam":
            state = adam_state if adam_state is not None else adam_init(params)
        seen = [observe(params)] if observe is not None else []
        for step in range(batches_x.shape[0]):
            grads = loss_gradient(self.model, params, batches_x[step], batches_y[step])
            if state is None:
                params = sgd_step(params, grads, config.inner_lr)
            else:
                params, state = adam_step(params, grads, state, config.inner_lr, config.inner_beta1,
                                          config.inner_beta2)
            if observe is not None:
                seen.append(observe(params))
        return params, seen, state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint with a carried Adam state also loads into a ``fresh`` Reptile, to test a
        carried run with fresh test-time Adam (``--set inner_adam_state=fresh``); the reverse
        has no state to carry and is refused."""
        carried = [name for name in state_dict if name.startswith("carried_adam.")]
        if self.carried_adam is None and carried:
            kept = OrderedDict((k, v) for k, v in state_dict.items() if k not in carried)
            if hasattr(state_dict, "_metadata"):
                kept._metadata = state_dict._metadata
            state_dict = kept
        elif self.carried_adam is not None and not carried:
            raise MetalearnError("this checkpoint has no carried inner Adam state (it was trained with "
                                 "inner_adam_state=fresh or inner_optimizer=sgd), so it can only be tested with "
                                 "inner_adam_state=fresh")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _adam_start(self) -> AdamState | None:
        return self.carried_adam.state() if self.carried_adam is not None else None

    @staticmethod
    def minibatches(support_x: Tensor, support_y: Tensor, steps: int, batch_size: int,
                    generator: torch.Generator | None = None,
                    one_order: bool = False) -> tuple[Tensor, Tensor]:
        """Every task's mini-batches, (tasks, steps, batch_size, ...), from its support set
        (tasks, n_support, ...) in the order of :func:`minibatch_indices`: a fresh order per
        task, or with ``one_order`` the first task's order for all of them, so that what a task
        gets does not depend on where it sits in the batch."""
        tasks, n_support = support_x.shape[:2]
        index = minibatch_indices(n_support, batch_size, steps, 1 if one_order else tasks, generator)
        index = index.expand(tasks, -1, -1).to(support_x.device)
        rows = torch.arange(tasks, device=support_x.device)[:, None, None]
        return support_x[rows, index], support_y[rows, index]

    def _classify_singly(self, adapted: Params, support_x: Tensor, query_x: Tensor) -> Tensor:
        """Non-transductive predictions (tasks, n_query, ...): each query example in a batch of
        the support set plus itself, its own row of the output kept."""
        tasks, n_support = support_x.shape[:2]
        n_query = query_x.shape[1]
        # about NON_TRANSDUCTIVE_IMAGES images per forward pass: chunks of query examples, and
        # of tasks too when one query example of every task is already more
        task_chunk = min(tasks, max(1, NON_TRANSDUCTIVE_IMAGES // (n_support + 1)))
        query_chunk = min(n_query, max(1, NON_TRANSDUCTIVE_IMAGES // (task_chunk * (n_support + 1))))

        def one_task(params, support_x, query_x):
            def one_query(x):
                return self._forward(params, torch.cat([support_x, x.unsqueeze(0)]))[-1]

            return vmap(one_query, chunk_size=query_chunk, randomness="different")(query_x)

        return vmap(one_task, chunk_size=task_chunk, randomness="different")(adapted, support_x, query_x)

    # -- the interface -----------------------------------------------------------------------

    def chunking_refused(self) -> str | None:
        if self.carried_adam is not None:
            return ("Reptile with --inner-adam-state carried: every meta_loss call advances the carried inner "
                    "Adam state, so a second chunk of tasks would start from another state than the first")
        return None

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Adapt to each task's support set; the returned loss has gradient ``theta - mean(phi)``
        and the value of the tasks' mean query loss after adaptation (what the trainer logs).

        The gradient comes from ``0.5 * ||theta - sg(mean phi)||^2``, added with its value
        subtracted; the query set only serves the logged loss and ``accuracy`` (query set in one
        batch), as Reptile itself trains on the support set alone. Mini-batch order is drawn
        from torch's global generator, which the trainer seeds every step. With
        ``inner_adam_state="carried"`` every call advances the carried inner Adam state by the
        batch's tasks, as a training step must: to score tasks without training, use
        :meth:`predict` (or :func:`metalearn.evaluate`), not this."""
        check_network_fits(self, batch, training=True, network=self.model)
        self._refuse_float16_adam()
        theta = dict(self.model.named_parameters())
        start = {name: p.detach() for name, p in theta.items()}
        batches_x, batches_y = self.minibatches(batch.support_x, batch.support_y, self.config.inner_steps,
                                                self.config.inner_batch_size)
        classification = batch.is_classification

        adam_start = self._adam_start()

        def one_task(batches_x, batches_y, query_x, query_y):
            adapted, _, adam_end = self.adapt(start, batches_x, batches_y, adam_state=adam_start)
            prediction = self._forward(adapted, query_x)
            score = accuracy(prediction, query_y) if classification else torch.zeros((), device=query_x.device)
            moments = adam_end[:2] if adam_start is not None else ()
            return adapted, task_loss(prediction, query_y), score, moments

        # torch.func.grad still differentiates each inner step, once: the native batch norm is right
        with torch.no_grad(), first_order_batch_norm():
            adapted, losses, scores, moments = vmap(one_task, randomness="different")(batches_x, batches_y, batch.query_x, batch.query_y)
            if adam_start is not None:
                self._carry_adam_state(adam_start, moments, batch.num_tasks)
        target = {name: p.mean(dim=0) for name, p in adapted.items()}
        surrogate = 0.5 * sum((theta[name] - target[name]).square().sum() for name in theta)
        query_loss = losses.mean()
        loss = query_loss + (surrogate - surrogate.detach())
        metrics = {"loss": query_loss, "update_norm": (2 * surrogate.detach()).sqrt()}
        if classification:
            metrics["accuracy"] = scores.mean()
        return loss, metrics

    def _carry_adam_state(self, start: AdamState, moments: tuple[Params, Params], tasks: int) -> None:
        """Advance the carried Adam state by this meta-batch's tasks (``moments``: their final
        first and second moments, task axis first); :meth:`end_step` redoes it over every rank's
        tasks when training is distributed."""
        config, k = self.config, self.config.inner_steps
        start = ({n: m.clone() for n, m in start[0].items()}, {n: v.clone() for n, v in start[1].items()}, start[2])
        changes = tuple({n: (task[n] - beta**k * start[j][n]).sum(dim=0) for n in task}
                        for j, (task, beta) in enumerate(zip(moments, (config.inner_beta1, config.inner_beta2))))
        self.carried_adam.advance(start, changes, tasks, k, config.inner_beta1, config.inner_beta2)
        self._pending = (start, changes, tasks)

    def end_step(self, world) -> None:
        """Over several ranks, the carried Adam state advances by the tasks of all of them, so
        every rank keeps the same state."""
        pending, self._pending = self._pending, None
        if pending is None or not world.distributed:
            return
        start, changes, tasks = pending
        some = next(iter(changes[0].values()))
        count = torch.tensor([float(tasks)], dtype=some.dtype, device=some.device)
        world.sum_in_place([*changes[0].values(), *changes[1].values(), count])  # this step's own tensors
        config = self.config
        self.carried_adam.advance(start, changes, int(round(float(count))), config.inner_steps,
                                  config.inner_beta1, config.inner_beta2)

    def predict(self, batch: TaskBatch) -> Tensor:
        """Adapt with ``test_inner_steps`` mini-batches of ``test_inner_batch_size``, then
        classify the query set transductively or example by example (``transductive``)."""
        params, batches_x, batches_y = self._test_setup(batch)
        with torch.no_grad(), first_order_batch_norm():
            adam_start = self._adam_start()
            adapted = vmap(lambda bx, by: self.adapt(params, bx, by, adam_state=adam_start)[0], randomness="different")(batches_x, batches_y)
            if self.config.transductive:
                return vmap(self._forward, randomness="different")(adapted, batch.query_x)
            return self._classify_singly(adapted, batch.support_x, batch.query_x)

    def predict_per_step(self, batch: TaskBatch) -> Tensor:
        """(test_inner_steps + 1, tasks, n_query, ...) when transductive. Non-transductive
        predictions cost (n_support + 1) forward passes per query example, so only the final
        ones are made: (1, tasks, n_query, ...)."""
        if not self.config.transductive:
            return self.predict(batch).unsqueeze(0)
        params, batches_x, batches_y = self._test_setup(batch)

        adam_start = self._adam_start()

        def one_task(batches_x, batches_y, query_x):
            _, seen, _ = self.adapt(params, batches_x, batches_y, observe=lambda p: self._forward(p, query_x),
                                    adam_state=adam_start)
            return torch.stack(seen)

        with torch.no_grad(), first_order_batch_norm():
            return vmap(one_task, randomness="different")(batches_x, batches_y, batch.query_x).transpose(0, 1)

    def _refuse_float16_adam(self) -> None:
        """The inner Adam's eps (1e-8) is 0 in float16 (whose smallest value is 6e-8): a gradient
        of 0 then takes 0 / 0, and the adapted weights turn NaN. Refused in one line, as the
        Trainer refuses it before training (training.refuse_float16_adam); bfloat16 has
        float32's range and adapts."""
        if self.config.inner_optimizer == "adam" and any(p.dtype == torch.float16 for p in self.model.parameters()):
            raise MetalearnError(f"{self.name}: the network's weights are torch.float16, in which the inner Adam's eps "
                                 "(1e-8) rounds to 0 and a step divides 0 by 0: use bfloat16 or float32 "
                                 "(learner.to(torch.bfloat16)), or inner_optimizer sgd")

    def _test_setup(self, batch: TaskBatch) -> tuple[Params, Tensor, Tensor]:
        check_network_fits(self, batch, network=self.model)
        self._refuse_float16_adam()
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        generator = torch.Generator().manual_seed(PREDICT_ORDER_SEED)
        # one order for every task: a task scores the same wherever it sits in the batch, so the
        # ranks of a distributed evaluation, each given a slice, score what one process would
        batches_x, batches_y = self.minibatches(batch.support_x, batch.support_y, self.config.test_inner_steps,
                                                self.config.test_inner_batch_size, generator, one_order=True)
        return params, batches_x, batches_y
