"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), batched over tasks.

The inner loop is a pure function ``params -> adapted params`` built on ``torch.func``
(``functional_call`` + ``grad``); a meta-batch is processed with ``vmap`` over the task axis.
Second-order by default: the meta-gradient flows through the inner gradient steps
(Finn et al. 2017, eq. 1 and Algorithm 2). Options: first-order MAML (section 5.2), inner step
sizes learned per parameter tensor and per step ("LSLR" of MAML++, Antoniou et al. 2019; the
per-tensor form of Meta-SGD, Li et al. 2017), and the MAML++ multi-step loss (query loss after
every inner step).

Example::

    >>> from metalearn.models import MLP
    >>> maml = MAML(MLP(), MAML.Config(inner_lr=0.01, inner_steps=1))
    >>> loss, metrics = maml.meta_loss(batch)      # batch: a TaskBatch of sinusoid tasks
    >>> loss.backward()                            # meta-gradient, second order
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalearn.algorithms.base import MetaLearner, check_network_fits, require_functional_model, Problem, accuracy, task_loss
from metalearn.algorithms.inner_loop import (Params, check_inner_loop_options, gradient_descent,
                                              normalisation_parameters)
from metalearn.datasets import NATURAL_IMAGES
from metalearn.errors import ConfigError, MetalearnError
from metalearn.options import option
from metalearn.models import build_model
from metalearn.models.norm import first_order_batch_norm
from metalearn.tasks.batch import TaskBatch


@dataclass(frozen=True)
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
    batch-norm offsets are meta-learned only); model: network name (see ``metalearn.models``)
    for :meth:`MAML.build`; a module passed to ``MAML`` is used as it is."""

    inner_lr: float = option(0.4, "step size of the inner-loop gradient steps (MAML's alpha)")
    inner_steps: int = option(1, "inner-loop gradient steps on a task's support set during meta-training")
    test_inner_steps: int = option(3, "inner-loop gradient steps at validation and test time")
    first_order: bool = option(False, "drop the second derivatives of the inner steps from the meta-gradient")
    learn_inner_lr: bool = option(False, "learn one inner step size per parameter tensor and inner step "
                                         "(MAML++'s LSLR)")
    multi_step_loss: bool = option(False, "the query loss after every inner step, not just the last (MAML++)")
    multi_step_anneal_steps: int = option(0, "with --multi-step-loss: shift its weight onto the last step over "
                                             "this many meta-updates (MAML++'s schedule; 0: equal weights throughout)")
    first_order_steps: int = option(0, "meta-train first order for this many meta-updates, then second order "
                                       "(MAML++'s derivative-order annealing; 0: as --first-order says throughout)")
    adapt_norm: bool = option(True, "the inner loop adapts the batch-norm parameters too (the reference code's "
                                    "does not: --no-adapt-norm)")
    model: str = option("conv4", "the network: conv4, conv4-maxpool, conv4-maxpool-32 (mini-ImageNet's), "
                                 "conv4-reference (conv4 as the MAML "
                                 "authors' code builds it) or mlp")

    def __post_init__(self):
        check_inner_loop_options("MAML.Config", self.inner_lr, self.inner_steps, self.test_inner_steps)
        if self.multi_step_anneal_steps < 0:
            raise ConfigError("MAML.Config", "multi_step_anneal_steps",
                              f"must be >= 0, got {self.multi_step_anneal_steps}")
        if self.first_order_steps < 0:
            raise ConfigError("MAML.Config", "first_order_steps", f"must be >= 0, got {self.first_order_steps}")
        if self.first_order_steps and self.first_order:
            raise ConfigError("MAML.Config", "first_order_steps",
                              "switches from first to second order: it does not combine with `first_order`")
        if self.multi_step_anneal_steps and not self.multi_step_loss:
            raise ConfigError("MAML.Config", "multi_step_anneal_steps",
                              "anneals the multi-step loss: it needs `multi_step_loss`")


MULTI_STEP_FLOOR = 0.03  # MAML++: each earlier step keeps at least 0.03 / steps of the weight


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
    """MAML around any ``nn.Module`` without running-statistics buffers."""

    name = "maml"
    Config = MAMLConfig
    fixed_ways = True

    def __init__(self, model: nn.Module, config: MAMLConfig = MAMLConfig()):
        super().__init__()
        require_functional_model(model, "MAML", not config.first_order)
        self.model = model
        self.config = config
        self.training_step = 0  # set by the trainer (start_step): the multi-step loss schedule
        self._held = frozenset() if config.adapt_norm else normalisation_parameters(model)
        if not config.adapt_norm and not self._held:
            raise MetalearnError("--no-adapt-norm (adapt_norm=False) keeps normalisation layers' parameters out of "
                                 "the inner loop, but this network has none")
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
        return cls(build_model(config.model, problem.input_shape, problem.output_dim), config)

    @classmethod
    def paper_defaults(cls, task) -> tuple[dict, dict]:
        if not task.classification:
            # Finn et al. 2017, section 5.1: alpha 0.01, meta-batch 25, 70k steps, K query points;
            # 10 test steps on sinusoids, but on sine-or-line the steep lines make steps beyond
            # the trained one diverge, so test with the training step count there.
            test_steps = 10 if task.dataset == "sinusoid" else 1
            return ({"model": "mlp", "inner_lr": 0.01, "inner_steps": 1, "test_inner_steps": test_steps},
                    {"meta_batch_size": 25, "steps": 70000, "val_every": 5000, "checkpoint_every": 5000})
        if task.dataset in NATURAL_IMAGES:
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

    # -- the pure functions ------------------------------------------------------------------

    def _forward(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

    def _step_size(self, name: str, step: int) -> Tensor | float:
        if not self.config.learn_inner_lr:
            return self.config.inner_lr
        lrs = self.inner_lrs[self._lr_keys[name]]
        return lrs[min(step, self.config.inner_steps - 1)]

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int) -> list[Params]:
        """Gradient steps on one task's support set: the parameters after 0..steps steps.

        support_x: (n_support, *input_shape), support_y: (n_support, ...), no task axis;
        batch over tasks with ``vmap``.
        """
        return gradient_descent(self.model, params, support_x, support_y, steps, self._step_size,
                                self.first_order_now(), self._held)

    # -- the interface -----------------------------------------------------------------------

    def start_step(self, step: int) -> None:
        self.training_step = step

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
        check_network_fits(self, batch)
        params = dict(self.model.named_parameters())
        steps = self.config.inner_steps
        classification = batch.is_classification
        weights = self.step_weights()
        if weights is not None and not weights[:-1].any():
            weights = None  # after the anneal only the last step counts: skip the others' query passes

        def one_task(support_x, support_y, query_x, query_y):
            trajectory = self.adapt(params, support_x, support_y, steps)
            scored = trajectory[1:] if weights is not None else trajectory[-1:]
            predictions = [self._forward(p, query_x) for p in scored]
            losses = torch.stack([task_loss(pred, query_y) for pred in predictions])
            loss = losses[0] if weights is None else (weights.to(losses) * losses).sum()
            if classification:
                return loss, accuracy(predictions[-1], query_y)
            return loss, torch.zeros(())

        # first order never differentiates twice, so batch norm may use the native kernel (faster)
        with first_order_batch_norm() if self.first_order_now() else contextlib.nullcontext():
            # randomness="different": a model with dropout draws its own mask for every task
            losses, accuracies = vmap(one_task, randomness="different")(batch.support_x, batch.support_y,
                                                                        batch.query_x, batch.query_y)
        metrics = {"loss": losses.mean().detach()}
        if classification:
            metrics["accuracy"] = accuracies.mean()
        return losses.mean(), metrics

    def predict(self, batch: TaskBatch) -> Tensor:
        return self.predict_per_step(batch)[-1]

    def predict_per_step(self, batch: TaskBatch) -> Tensor:
        check_network_fits(self, batch)
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        steps = self.config.test_inner_steps

        def one_task(support_x, support_y, query_x):
            trajectory = self.adapt(params, support_x, support_y, steps)
            return torch.stack([self._forward(p, query_x) for p in trajectory])

        # torch.func.grad still differentiates the inner loop, once: the native batch norm is right
        with torch.no_grad(), first_order_batch_norm():
            per_task = vmap(one_task, randomness="different")(batch.support_x, batch.support_y, batch.query_x)
        return per_task.transpose(0, 1)
