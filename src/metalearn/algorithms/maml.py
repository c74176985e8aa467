"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), batched over tasks.

The inner loop is a pure function ``params -> adapted params`` built on ``torch.func``
(``functional_call`` + ``grad``); a meta-batch is processed with ``vmap`` over the task axis.
Second-order by default: the meta-gradient flows through the inner gradient steps
(Finn et al. 2017, eq. 1 and Algorithm 2). Options: first-order MAML (section 5.2), inner step
sizes learned per parameter tensor and per step ("LSLR" of MAML++, Antoniou et al. 2019; the
per-tensor form of Meta-SGD, Li et al. 2017), and the rest of MAML++ (Antoniou, Edwards & Storkey
2019, section 4): the multi-step loss (query loss after every inner step), derivative-order
annealing, per-step batch-norm scales and offsets and running statistics; ``--preset maml++``
(:meth:`MAML.preset_defaults`) turns all of them on with the paper's Omniglot settings (with the
trainer's cosine anneal of the meta learning rate). See docs/methods/maml-plus-plus.md.

Example::

    >>> from metalearn.models import MLP
    >>> maml = MAML(MLP(), MAML.Config(inner_lr=0.01, inner_steps=1))
    >>> loss, metrics = maml.meta_loss(batch)      # batch: a TaskBatch of sinusoid tasks
    >>> loss.backward()                            # meta-gradient, second order
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalearn.algorithms.base import (MetaLearner, check_network_fits, require_functional_model, Problem, accuracy,
                                       task_loss, task_losses)
from metalearn.algorithms.inner_loop import (Params, check_inner_loop_options, check_one_task, check_steps,
                                              gradient_descent, gradient_descent_tasks, normalisation_parameters)
from metalearn.datasets import of_photographs
from metalearn.errors import ConfigError, MetalearnError, OptionError
from metalearn.options import option, options
from metalearn.models import build_model, check_network_name, network_help
from metalearn.models.norm import (BatchStatNorm, collect_batch_statistics, first_order_batch_norm, inner_step,
                                   native_batch_norm)
from metalearn.tasks.batch import TaskBatch


@options
class MAMLConfig:
    """inner_lr: the paper's alpha; inner_steps / test_inner_steps: gradient steps on the
    support set during meta-training / at test time; first_order: drop second derivatives;
    first_order_steps: first order for that many meta-steps, then second (MAML++'s derivative-order
    annealing, told the step by ``start_step`` as the multi-step loss is);
    learn_inner_lr: one learned step size per parameter tensor and step (MAML++'s LSLR);
    multi_step_loss: the query loss after every inner step (MAML++), not just the last one's,
    weighted equally, or, with ``multi_step_anneal_steps`` > 0, by MAML++'s schedule (see
    :func:`multi_step_weights`) over that many meta-steps, as told by ``start_step`` (the
    Trainer calls it every step; a loop of your own must too); adapt_norm: the inner loop also
    adapts the normalisation layers' parameters (the reference code's inner loop does not: its
    batch-norm offsets are meta-learned only); per_step_bn_weights / per_step_bn_statistics:
    MAML++'s per-step batch-norm scales and offsets ("BNWB") and running statistics ("BNRS"), see
    :meth:`MAML.__init__`; model: network name (see ``metalearn.models``) for :meth:`MAML.build`;
    a module passed to ``MAML`` is used as it is (made per-step in place by those two options)."""

    inner_lr: float = option(0.4, "step size of the inner-loop gradient steps (MAML's alpha)")
    inner_steps: int = option(1, "inner-loop gradient steps on a task's support set during meta-training",
                              training_only=True, memory="fewer")
    test_inner_steps: int = option(3, "inner-loop gradient steps at validation and test time")
    first_order: bool = option(False, "drop the second derivatives of the inner steps from the meta-gradient",
                               training_only=True)
    learn_inner_lr: bool = option(False, "learn one inner step size per parameter tensor and inner step "
                                         "(MAML++'s LSLR)")
    multi_step_loss: bool = option(False, "the query loss after every inner step, not just the last (MAML++)",
                                   training_only=True)
    multi_step_anneal_steps: int = option(0, "with --multi-step-loss: shift its weight onto the last step over "
                                             "this many meta-updates (MAML++'s schedule; 0: equal weights throughout)",
                                             training_only=True, schedule_step=True)
    first_order_steps: int = option(0, "meta-train first order for this many meta-updates, then second order "
                                       "(MAML++'s derivative-order annealing; 0: as --first-order says throughout)",
                                       training_only=True, schedule_step=True)
    adapt_norm: bool = option(True, "the inner loop adapts the batch-norm parameters too (the reference code's "
                                    "does not: --no-adapt-norm)")
    per_step_bn_weights: bool = option(False, "a batch-norm scale and offset per inner step, each used by its own "
                                              "step's forward passes (MAML++'s BNWB)")
    per_step_bn_statistics: bool = option(False, "batch-norm running statistics per inner step, gathered in "
                                                 "training (MAML++'s BNRS); --eval-bn-statistics says whether "
                                                 "evaluation normalises with them")
    eval_bn_statistics: str = option("running", "with --per-step-bn-statistics, what evaluation normalises with: "
                                                "running (the per-step running statistics, as the MAML++ paper "
                                                "describes) or batch (each task's own, as its authors' code "
                                                "evaluates; the maml++ preset's)")
    model: str = option("conv4", "the network: " + network_help("classifier"))

    def __post_init__(self):
        # the method's own name for its Config (MetaLearner sets owner_name: "ANIL.Config" for a
        # subclass's Config that extends this one)
        owner = getattr(type(self), "owner_name", "MAML.Config")
        check_inner_loop_options(owner, self.inner_lr, self.inner_steps, self.test_inner_steps)
        check_network_name(owner, self.model, "classifier")
        if self.multi_step_anneal_steps < 0:
            raise ConfigError(owner, "multi_step_anneal_steps", f"must be >= 0, got {self.multi_step_anneal_steps}")
        if self.first_order_steps < 0:
            raise ConfigError(owner, "first_order_steps", f"must be >= 0, got {self.first_order_steps}")
        if self.first_order_steps and self.first_order:
            raise ConfigError(owner, "first_order_steps",
                              "switches from first to second order: it does not combine with `first_order`")
        if self.eval_bn_statistics not in ("running", "batch"):
            raise ConfigError(owner, "eval_bn_statistics", f"must be running or batch, got {self.eval_bn_statistics!r}")
        if self.multi_step_anneal_steps and not self.multi_step_loss:
            raise ConfigError(owner, "multi_step_anneal_steps",
                              "anneals the multi-step loss: it needs `multi_step_loss`")


MULTI_STEP_FLOOR = 0.03  # MAML++: each earlier step keeps at least 0.03 / steps of the weight
BN_MOMENTUM = 0.1  # per-step running statistics move by this much per meta-step (torch's, and MAML++'s, default)


def multi_step_weights(steps: int, progress: float) -> Tensor:
    """Weights of the query losses after inner steps 1..steps in MAML++'s multi-step loss
    (Antoniou, Edwards & Storkey 2019, section 4, "multi-step loss optimization"; the schedule of
    their code): equal (1 / steps) at the start; as ``progress`` goes from 0 to 1, every earlier
    step's weight falls by (1 / steps) x progress, clamped at a floor of 0.03 / steps (reached
    at progress 0.97), and the last step takes what they give up; from progress 1 on, only the
    last step's loss counts, plain MAML's. The weights always sum to 1. MAML++ moves the schedule
    once per epoch; here ``progress`` is meta-steps / ``multi_step_anneal_steps``, every step."""
    weights = torch.zeros(steps, dtype=torch.float64)
    if progress >= 1.0:
        weights[-1] = 1.0
        return weights
    start, floor = 1.0 / steps, MULTI_STEP_FLOOR / steps
    weights[:-1] = max(start * (1.0 - progress), floor)
    weights[-1] = 1.0 - weights[:-1].sum()
    return weights


class MAML(MetaLearner):
    """MAML around any ``nn.Module`` without running-statistics buffers (those of its own
    per-step batch norm, ``per_step_bn_statistics``, are state it updates in :meth:`end_step`)."""

    name = "maml"
    Config = MAMLConfig
    fixed_ways = True
    option_requires = {"multi_step_anneal_steps": ("multi_step_loss", True), "first_order_steps": ("first_order", False),
                       "eval_bn_statistics": ("per_step_bn_statistics", True)}

    def __init__(self, model: nn.Module, config: MAMLConfig = MAMLConfig()):
        """Per-step batch norm (MAML++, Antoniou et al. 2019, section 4): with
        ``per_step_bn_weights`` or ``per_step_bn_statistics`` every ``BatchStatNorm`` of ``model``
        gets ``inner_steps`` sets (:meth:`BatchStatNorm.make_per_step`). Set k serves the forward
        passes of inner step k: the support pass at the parameters after k steps, whose gradient
        takes step k, and the query pass that scores the parameters after step k (so the final
        query pass uses the last set, as the authors' code does); test-time steps beyond
        ``inner_steps`` use the last set, and a query pass before any step the first. The sets of
        scales and offsets are meta-learned, and with ``adapt_norm`` also adapted (the authors'
        code keeps them out of the inner loop, ``enable_inner_loop_optimizable_bn_params``
        false: ``adapt_norm=False``). Running statistics are gathered from the training forward
        passes, one update per meta-step (see :meth:`end_step`), and with ``eval_bn_statistics``
        "running" normalise every forward pass in eval mode (validation, test), as the paper
        describes; with "batch" evaluation normalises with each task's own statistics, as the
        authors' code does (their batch norm always runs with ``training=True``). Training
        always normalises with the batch's statistics. The two evaluations differ widely: an
        inner step computed through fixed statistics is not the step the meta-training shaped
        (docs/methods/maml-plus-plus.md)."""
        super().__init__()
        require_functional_model(model, type(self).__name__, not config.first_order)  # a subclass's own name
        self.model = model
        self.config = config
        self.training_step = 0  # set by the trainer (start_step): the multi-step loss schedule
        self._held = frozenset() if config.adapt_norm else normalisation_parameters(model)
        if not config.adapt_norm and not self._held:
            raise OptionError("{adapt_norm} keeps normalisation layers' parameters out of the inner loop, but this "
                              "network has none",
                              adapt_norm=("adapt_norm=False", "--no-adapt-norm (adapt_norm=False)"))
        self._per_step_norms: list[BatchStatNorm] = []
        if config.per_step_bn_weights or config.per_step_bn_statistics:
            self._per_step_norms = [m for m in model.modules() if isinstance(m, BatchStatNorm)]
            if not self._per_step_norms:
                given = "per_step_bn_weights" if config.per_step_bn_weights else "per_step_bn_statistics"
                raise ConfigError(f"{type(self).__name__}.Config", given,
                                  "needs a network with batch norm (metalearn.models.BatchStatNorm layers), and this "
                                  "one has none")
            for norm in self._per_step_norms:
                norm.make_per_step(config.inner_steps, config.per_step_bn_weights, config.per_step_bn_statistics)
                norm.running_at_eval = config.eval_bn_statistics == "running"
        self._pending_statistics: tuple[dict[str, Tensor], int] | None = None
        names = [name for name, _ in model.named_parameters() if name not in self._held]
        self._lr_keys = {name: name.replace(".", "__") for name in names}
        if config.learn_inner_lr:
            steps = config.inner_steps  # test-time steps beyond these reuse the last step size
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
            self.inner_lrs = nn.ParameterDict(
                {key: nn.Parameter(torch.full((steps,), config.inner_lr, dtype=dtype)) for key in self._lr_keys.values()}
            )

    @classmethod
    def build(cls, config: MAMLConfig, problem: Problem) -> "MAML":
        """MAML on the network ``config.model`` (:func:`metalearn.models.build_model`), with one
        output per class of ``problem`` (or its regression output size)."""
        return cls(build_model(config.model, problem.input_shape, problem.output_dim), config)

    @classmethod
    def paper_defaults(cls, task, given: dict | None = None) -> tuple[dict, dict]:
        if not task.classification:
            # Finn et al. 2017, section 5.1: alpha 0.01, meta-batch 25, 70k steps, K query points;
            # 10 test steps on sinusoids, but on sine-or-line the steep lines make steps beyond
            # the trained one diverge, so test with the training step count there.
            test_steps = 10 if task.dataset == "sinusoid" else 1
            return ({"model": "mlp", "inner_lr": 0.01, "inner_steps": 1, "test_inner_steps": test_steps},
                    {"meta_batch_size": 25, "steps": 70000, "val_every": 5000, "checkpoint_every": 5000})
        if of_photographs(task.dataset):
            # mini-ImageNet (section 5.2): 32-filter max-pool Conv4, alpha 0.01, 5 inner steps in
            # training and 10 at test time, meta-batch 4 for 1-shot and 2 for 5-shot
            return ({"model": "conv4-maxpool-32", "inner_lr": 0.01, "inner_steps": 5, "test_inner_steps": 10},
                    {"meta_batch_size": 4 if task.shots == 1 else 2, "steps": 60000})
        if task.ways >= 20:
            # 20-way Omniglot: alpha 0.1, 5 inner steps, meta-batch 16.
            return ({"model": "conv4", "inner_lr": 0.1, "inner_steps": 5, "test_inner_steps": 5},
                    {"meta_batch_size": 16, "steps": 60000})
        # 5-way Omniglot: alpha 0.4, 1 inner step (3 at test time), meta-batch 32.
        return ({"model": "conv4", "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3},
                {"meta_batch_size": 32, "steps": 60000})

    presets = {"maml++": "MAML++ (Antoniou, Edwards & Storkey 2019) at its Omniglot settings, all six of its "
                         "changes to MAML switched on (each is also an option of its own)"}

    @classmethod
    def preset_task_defaults(cls, name: str, dataset: str) -> dict:
        """``maml++`` on Omniglot: one query image per class, at every number of shots, as the
        authors' released Omniglot configurations (``num_target_samples: 1``; their mini-ImageNet
        ones take 15, mini-ImageNet's default here). It changes what is predicted, not only how
        precisely: the preset normalises the query pass with the query set's own batch statistics."""
        return {"query": 1} if dataset == "omniglot" else {}

    @classmethod
    def preset_defaults(cls, name: str, task) -> tuple[dict, dict]:
        """``maml++``: all six MAML++ parts (section 4) with the Omniglot settings of the paper and
        its authors' released configurations (``experiment_config/omniglot_maml++-*.json``), for
        any number of ways and shots. Where the sources differ: derivative-order annealing
        switches after the paper's 50 epochs (the released configurations use second order
        throughout, their README's example switches at epoch 80); 100 epochs of 500 meta-steps
        and meta-batch 8 as released (the README's example: 150 epochs, meta-batch 16). An epoch
        here is 500 meta-steps; the schedules move every step, theirs once per epoch. The 5 best
        validation checkpoints are kept, for their code's model selection (``eval --ensemble``).
        Evaluation normalises with each task's batch statistics, as their code does: the per-step
        running statistics are gathered (``eval --set eval_bn_statistics=running`` uses them, as
        the paper's text describes) but score far lower (docs/methods/maml-plus-plus.md)."""
        if not task.classification:
            raise MetalearnError(f"the maml++ preset is the paper's Omniglot set-up (a batch-norm network); "
                                 f"{task.dataset} is regression: give MAML++'s options one by one")
        epoch = 500
        return ({"model": "conv4-mamlpp", "inner_lr": 0.1, "inner_steps": 5, "test_inner_steps": 5,
                 "learn_inner_lr": True, "multi_step_loss": True, "multi_step_anneal_steps": 10 * epoch,
                 "first_order_steps": 50 * epoch, "per_step_bn_weights": True, "per_step_bn_statistics": True,
                 "eval_bn_statistics": "batch",
                 "adapt_norm": False},
                {"meta_batch_size": 8, "steps": 100 * epoch, "meta_lr": 1e-3, "lr_anneal": "cosine",
                 "min_meta_lr": 1e-5, "val_every": epoch, "val_episodes": 600, "checkpoint_every": epoch,
                 "keep_best": 5})

    # -- the pure functions ------------------------------------------------------------------

    def _forward(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

    def _query_forward(self, params: Params, query_x: Tensor, steps_taken: int) -> Tensor:
        """The query pass at the parameters after ``steps_taken`` inner steps, in the context of
        the step that produced them (per-step batch norm: set ``steps_taken - 1``; 0 before any)."""
        with inner_step(max(steps_taken - 1, 0)):
            return self._forward(params, query_x)

    def _step_size(self, name: str, step: int) -> Tensor | float:
        if not self.config.learn_inner_lr:
            return self.config.inner_lr
        lrs = self.inner_lrs[self._lr_keys[name]]
        return lrs[min(step, self.config.inner_steps - 1)]

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int) -> list[Params]:
        """Gradient steps on one task's support set: the parameters after 0..steps steps.

        support_x: (n_support, *input_shape), support_y: (n_support, ...), no task axis;
        batch over tasks with ``vmap``. Parameters that are no dict, and a set of another shape
        (a task axis left on it, say), are refused in one line (:func:`check_one_task`). A
        subclass may replace it (another inner loss, say): every pass then goes through it,
        not through the network's task-batched forward.
        """
        check_one_task(f"{type(self).__name__}.adapt", params, support_x, support_y)
        check_steps(f"{type(self).__name__}.adapt", steps)
        return gradient_descent(self.model, params, support_x, support_y, steps, self._step_size,
                                self.first_order_now(), self._held)

    # -- the interface -----------------------------------------------------------------------

    def start_step(self, step: int) -> None:
        self.training_step = step
        self._pending_statistics = None  # a fresh step: nothing gathered yet for end_step

    def end_step(self, world) -> None:
        """After the meta-update: move each per-step running statistic towards the mean, over this
        meta-step's tasks (on every rank: summed over ``world``, so torchrun equals one process),
        of the batch statistics that its forward passes saw (:data:`BN_MOMENTUM`). One update per
        meta-step, of the task average; the authors' code moves them after every forward pass,
        task by task. Nothing to do without ``per_step_bn_statistics`` or outside training."""
        pending, self._pending_statistics = self._pending_statistics, None
        if pending is None:
            return
        sums, tasks = pending
        keys = [(norm, k, f"{id(norm)}:{k}") for norm in self._per_step_norms for k in range(norm.steps)]
        keys = [(norm, k, key) for norm, k, key in keys if key in sums]
        if not keys:
            return
        flat = torch.cat([sums[key].reshape(-1) for _, _, key in keys] + [torch.tensor([float(tasks)]).to(sums[keys[0][2]])])
        flat = world.sum(flat)
        total = flat[-1]
        offset = 0
        for norm, k, key in keys:
            size = sums[key].numel()
            mean, var = (flat[offset:offset + size] / total).view(2, -1)
            norm.update_running_statistics(k, mean, var, BN_MOMENTUM)
            offset += size

    @classmethod
    def cost_changes(cls, config: MAMLConfig) -> list[tuple[int, str]]:
        changes = []
        if config.multi_step_loss and config.multi_step_anneal_steps > 0:
            changes.append((config.multi_step_anneal_steps, "the multi-step loss is annealed away: one query pass "
                                                            "per task instead of one per inner step (faster)"))
        if not config.first_order and config.first_order_steps > 0:
            changes.append((config.first_order_steps, "second-order meta-steps (slower, and more memory)"))
        return sorted(changes)

    def first_order_now(self) -> bool:
        """Whether the meta-gradient of the current training step drops second derivatives:
        always with ``first_order``; with ``first_order_steps`` N, for meta-steps 0..N-1
        (MAML++, section 4, "derivative-order annealing": first order as a cheap and stable
        start, then second order). A pure function of the step the trainer announced, so a run
        resumed on either side of the switch matches the uninterrupted one."""
        return self.config.first_order or self.training_step < self.config.first_order_steps

    def step_weights(self) -> Tensor | None:
        """Weights of the query losses after each inner step in the meta-loss at the current
        training step, or None when only the last step counts."""
        config = self.config
        if not config.multi_step_loss:
            return None
        anneal = config.multi_step_anneal_steps
        progress = min(self.training_step / anneal, 1.0) if anneal else 0.0
        return multi_step_weights(config.inner_steps, progress)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The query loss after ``inner_steps`` steps on each task's support set, averaged over
        the batch's tasks (vmapped), or with the multi-step loss (MAML++) the weighted sum of the
        query losses after every step; its gradient is the meta-gradient, second order unless
        ``first_order`` or the first phase of the derivative-order annealing. Metrics: ``loss``,
        and ``accuracy`` after the last step for classification. A malformed batch, or a network
        without one output per class, is refused with a one-line :class:`MetalearnError`."""
        check_network_fits(self, batch, training=True, network=self.model)
        params = dict(self.model.named_parameters())
        steps = self.config.inner_steps
        classification = batch.is_classification
        weights = self.step_weights()
        if weights is not None and not weights[:-1].any():
            weights = None  # after the anneal only the last step counts: skip the others' query passes

        collect = self.config.per_step_bn_statistics and self.training
        # the network's own task-batched forward where it was measured faster than vmap (first
        # order; one task, ``--task-chunk 1``); second order over several tasks stays on vmap,
        # which was as fast or faster there (docs/performance.md)
        if (self._tasks_batched_by_model() and torch.is_grad_enabled() and not collect
                and (self.first_order_now() or batch.num_tasks == 1)):
            return self._meta_loss_tasks_batched(batch, weights)

        def one_task(support_x, support_y, query_x, query_y):
            with collect_batch_statistics() as statistics:
                trajectory = self.adapt(params, support_x, support_y, steps)
                first = 1 if weights is not None else steps  # index in the trajectory of the first scored
                predictions = [self._query_forward(p, query_x, first + i) for i, p in enumerate(trajectory[first:])]
            losses = torch.stack([task_loss(pred, query_y) for pred in predictions])
            loss = losses[0] if weights is None else (weights.to(losses) * losses).sum()
            # the mean over its forward passes of each set's batch statistics (2, C): returned, not stored
            means = {key: torch.stack(values).mean(0) for key, values in statistics.items()} if collect else {}
            if classification:
                return loss, accuracy(predictions[-1], query_y), means
            return loss, torch.zeros(()), means

        if batch.num_tasks == 1:
            # one task (``--task-chunk 1``): no vmap, so that second order too can use torch's
            # native batch norm, right outside vmap (norm.BatchStatNorm); it saves less for the
            # backward pass than the decomposed form and computes the same meta-gradient
            with native_batch_norm():
                loss, correct, statistics = one_task(batch.support_x[0], batch.support_y[0], batch.query_x[0],
                                                     batch.query_y[0])
            losses, accuracies = loss[None], correct[None]
            statistics = {key: value[None] for key, value in statistics.items()}
        else:
            # first order never differentiates twice, so batch norm may use the native kernel (faster)
            with native_batch_norm() if self.first_order_now() else contextlib.nullcontext():
                # randomness="different": a model with dropout draws its own mask for every task
                losses, accuracies, statistics = vmap(one_task, randomness="different")(
                    batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        if collect:  # for end_step, after the meta-update: sums over this rank's tasks, and their number,
            # added up over the chunks of a meta-batch (--task-chunk), so that chunks update the
            # running statistics as the whole batch does
            sums, tasks = {key: value.detach().sum(0) for key, value in statistics.items()}, batch.support_x.shape[0]
            if self._pending_statistics is not None:
                earlier, earlier_tasks = self._pending_statistics
                sums, tasks = {key: earlier[key] + value for key, value in sums.items()}, earlier_tasks + tasks
            self._pending_statistics = (sums, tasks)
        metrics = {"loss": losses.mean().detach()}
        if classification:
            metrics["accuracy"] = accuracies.mean()
        return losses.mean(), metrics

    def _tasks_batched_by_model(self) -> bool:
        """Whether the network offers a task-batched forward (``forward_tasks``, see
        ``Conv4.forward_tasks``) for its current configuration; then a first-order meta-batch,
        or a single task, runs through it instead of ``vmap`` or ``functional_call``: the same
        meta-gradient (tests/test_maml.py), computed faster (docs/performance.md)."""
        can = getattr(self.model, "can_forward_tasks", None)
        # a subclass's own inner loop or forward is taken everywhere: the batched path would skip it
        own = any(getattr(type(self), name) is not getattr(MAML, name)
                  for name in ("adapt", "_forward", "_query_forward"))
        return not own and callable(getattr(self.model, "forward_tasks", None)) and callable(can) and can()

    def _meta_loss_tasks_batched(self, batch: TaskBatch, weights: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`meta_loss` through the network's ``forward_tasks``: every task's weights are
        the meta-parameters expanded along a task axis, so the meta-gradient of each flows back
        into the one shared tensor, summed over the tasks."""
        tasks, steps = batch.num_tasks, self.config.inner_steps
        params = {name: p.expand(tasks, *p.shape) for name, p in self.model.named_parameters()}
        # the native batch norm: outside vmap it is right at both orders (its second derivative
        # is wrong only under vmap, torch 2.13), and it saves less than the decomposed form
        with native_batch_norm():
            trajectory = gradient_descent_tasks(self.model.forward_tasks, params, batch.support_x, batch.support_y,
                                                steps, self._step_size, self.first_order_now(), self._held)
            first = 1 if weights is not None else steps  # index in the trajectory of the first scored
            predictions = [self.model.forward_tasks(p, batch.query_x) for p in trajectory[first:]]
        losses = torch.stack([task_losses(prediction, batch.query_y) for prediction in predictions])  # (scored, tasks)
        losses = losses[0] if weights is None else (weights.to(losses)[:, None] * losses).sum(0)
        metrics = {"loss": losses.mean().detach()}
        if batch.is_classification:
            metrics["accuracy"] = accuracy(predictions[-1], batch.query_y)
        return losses.mean(), metrics

    def _predict_tasks_batched(self, batch: TaskBatch, params: Params, steps: int, final_only: bool) -> Tensor:
        """:meth:`_predictions` through the network's ``forward_tasks``: the inner steps
        differentiate once (gradients recorded for them alone), the predictions without
        gradients."""
        tasks = batch.num_tasks
        with native_batch_norm():
            with torch.enable_grad():
                start = {name: p.requires_grad_(self.model.get_parameter(name).requires_grad).expand(tasks, *p.shape)
                         for name, p in params.items()}
                trajectory = gradient_descent_tasks(self.model.forward_tasks, start, batch.support_x, batch.support_y,
                                                    steps, self._step_size, True, self._held)
            with torch.no_grad():
                return torch.stack([self.model.forward_tasks(p, batch.query_x)
                                    for p in (trajectory[-1:] if final_only else trajectory)])

    def predict(self, batch: TaskBatch) -> Tensor:
        """Query predictions after ``test_inner_steps`` steps on each task's support set, without
        gradients: logits (tasks, n_query, ways) or regression outputs (tasks, n_query, out)."""
        return self._predictions(batch, final_only=True)[0]

    def predict_per_step(self, batch: TaskBatch) -> Tensor:
        """Query predictions after 0, 1, ..., ``test_inner_steps`` steps, (steps + 1, tasks,
        n_query, out): what evaluation's per-step scores are computed from."""
        return self._predictions(batch, final_only=False)

    def _predictions(self, batch: TaskBatch, final_only: bool) -> Tensor:
        """Query predictions after each of ``test_inner_steps`` inner steps, (steps + 1, tasks,
        n_query, out), or with ``final_only`` after the last alone, (1, tasks, n_query, out): the
        same numbers as the last of all, for one query pass instead of steps + 1 (about a quarter
        of a 5-step evaluation, which training's validation and ``predict`` need no more than)."""
        check_network_fits(self, batch, network=self.model)
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        steps = self.config.test_inner_steps

        # the task-batched path records its inner steps with torch.autograd, which inference mode
        # forbids (torch.enable_grad() cannot lift it); torch.func.grad under vmap takes them there
        if self._tasks_batched_by_model() and not torch.is_inference_mode_enabled():
            return self._predict_tasks_batched(batch, params, steps, final_only)
        scored = range(steps, steps + 1) if final_only else range(steps + 1)

        def one_task(support_x, support_y, query_x):
            trajectory = self.adapt(params, support_x, support_y, steps)
            return torch.stack([self._query_forward(trajectory[j], query_x, j) for j in scored])

        # torch.func.grad still differentiates the inner loop, once: the native batch norm is right
        with torch.no_grad(), first_order_batch_norm():
            per_task = vmap(one_task, randomness="different")(batch.support_x, batch.support_y, batch.query_x)
        return per_task.transpose(0, 1)
