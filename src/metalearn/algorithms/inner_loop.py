"""The functional inner loop that MAML, PLATIPUS and Reptile share: gradients of a task loss
with respect to a parameter dict, and plain gradient descent on it, as pure functions that run
under ``torch.func.vmap`` (over tasks, and over samples within a task)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from metalearn.algorithms.base import task_loss, task_losses
from metalearn.errors import ConfigError, MetalearnError, check_count, kind_of, require_number
from metalearn.models.norm import (BatchStatNorm, batch_statistics_collector, collect_batch_statistics, inner_step,
                                   merge_batch_statistics)

Params = dict[str, Tensor]
StepSize = Callable[[str, int], "Tensor | float"]  # (parameter name, step) -> step size


# The most inner steps a task takes: each is a pass over its support set (and an evaluation
# records a score after each), so a mistyped 10**8 in a received config would run for days
# without a word; the papers take 1 to 50, Reptile's evaluation 50.
MAX_INNER_STEPS = 100_000


def check_inner_loop_options(owner: str, inner_lr: float, inner_steps: int, test_inner_steps: int) -> None:
    """The option checks every method with an inner loop makes; ``owner`` names the config
    (``"MAML.Config"``) in the error."""
    if inner_steps < 1:
        raise ConfigError(owner, "inner_steps", f"must be at least 1, got {inner_steps}")
    if test_inner_steps < 0:
        raise ConfigError(owner, "test_inner_steps", f"must be >= 0, got {test_inner_steps}")
    for name, steps in (("inner_steps", inner_steps), ("test_inner_steps", test_inner_steps)):
        if steps > MAX_INNER_STEPS:
            raise ConfigError(owner, name, f"must be at most {MAX_INNER_STEPS} (each step a pass over the support "
                                           f"set), got {steps}")
    require_number(inner_lr, owner, "inner_lr")


def check_one_task(owner: str, params: Params, x: Tensor, y: Tensor) -> None:
    """Refuse, in one line, what an ``adapt`` of one task's set (``owner``: ``"MAML.adapt"``)
    would otherwise take silently or fail on inside torch: parameters that are no dict, a task
    axis left on the set (class ids ``(tasks, n)``: the inner loss would pool the tasks), real
    targets without their output axis (``(n,)`` against predictions ``(n, 1)`` broadcasts to
    ``(n, n)``), class ids of another integer type than torch.long, counts that differ. Under
    ``vmap`` the shapes are those of one task."""
    if not isinstance(params, Mapping):
        raise MetalearnError(f"{owner} takes the parameters as a dict of name -> tensor "
                             f"(dict(model.named_parameters())), got a {kind_of(params)}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise MetalearnError(f"{owner} takes support_x and support_y as tensors, got a {kind_of(x)} and a {kind_of(y)}")
    if torch.is_floating_point(y):
        if y.dim() < 2:
            raise MetalearnError(
                f"{owner}: real targets are (n, outputs), got shape {tuple(y.shape)} (y[:, None] for one output); "
                "class labels are integer ids (torch.long), scored by cross-entropy")
    elif y.dtype != torch.long:
        raise MetalearnError(f"{owner}: class labels are torch.long ids, got {y.dtype} (support_y.long())")
    elif y.dim() != 1:
        raise MetalearnError(
            f"{owner} adapts to one task: its class ids are (n,), got shape {tuple(y.shape)}; for a batch of tasks "
            "vmap over their first axis (torch.func.vmap) or take one task at a time (batch.support_x[t])")
    if x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise MetalearnError(f"{owner}: support_x holds {x.shape[0] if x.dim() else 0} examples and support_y "
                             f"{y.shape[0]}: give one target per example")
    # the parameters' type and device, read off one of them: torch would fail on either inside the
    # first layer (integer inputs, token ids say, are the network's affair)
    weight = next((p for p in params.values() if isinstance(p, Tensor) and p.is_floating_point()), None)
    if weight is not None:
        if torch.is_floating_point(x) and x.dtype != weight.dtype:
            raise MetalearnError(f"{owner}: support_x is {x.dtype} and the parameters {weight.dtype}; convert the "
                                 f"set (support_x.to({weight.dtype})) or the network")
        for name, value in (("support_x", x), ("support_y", y)):
            if value.device != weight.device:
                raise MetalearnError(f"{owner}: {name} is on {value.device} and the parameters on {weight.device}; "
                                     f"move the set ({name}.to({str(weight.device)!r}))")


def check_steps(owner: str, steps: Any) -> None:
    """An inner loop's number of steps: a whole number, 0 or more."""
    check_count(steps, f"{owner}'s steps", 0,
                message="{name} is a whole number of inner steps, 0 or more, got {value!r}")


def loss_gradient(model: nn.Module, params: Params, x: Tensor, y: Tensor, first_order: bool = False,
                  held: frozenset[str] = frozenset()) -> Params:
    """grad_params L(model(params, x), y) for one task; detached when ``first_order`` (so no
    second derivative flows through it into a meta-gradient). The model's parameters with
    ``requires_grad=False``, and those named in ``held``, are frozen: not differentiated, their
    gradient is zero, so no inner step (SGD or Adam) moves them. (A held parameter still gets a
    meta-gradient: it is meta-learned, only not adapted to each task.)"""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad} | held
    fixed = {name: p for name, p in params.items() if name in frozen}

    outer = batch_statistics_collector()

    def loss(p: Params) -> tuple[Tensor, dict]:
        # batch statistics (running-statistics layers) leave the transform as its aux output
        with collect_batch_statistics() as statistics:
            value = task_loss(functional_call(model, {**p, **fixed}, (x,)), y)
        return value, statistics

    grads, statistics = grad(loss, has_aux=True)({name: p for name, p in params.items() if name not in frozen})
    if outer is not None:
        merge_batch_statistics(outer, statistics)
    if first_order:
        grads = {name: g.detach() for name, g in grads.items()}
    return {name: grads[name] if name in grads else torch.zeros_like(p) for name, p in params.items()}


def sgd_step(params: Params, grads: Params, step_size: StepSize | float, step: int = 0) -> Params:
    """``p - step_size * g`` for every tensor; ``step_size`` a number or a function of the
    parameter's name and the step (learned per-tensor step sizes)."""
    if callable(step_size):
        return {name: p - step_size(name, step) * grads[name] for name, p in params.items()}
    return {name: p - step_size * grads[name] for name, p in params.items()}


def gradient_descent(model: nn.Module, params: Params, x: Tensor, y: Tensor, steps: int,
                     step_size: StepSize | float, first_order: bool = False,
                     held: frozenset[str] = frozenset()) -> list[Params]:
    """``steps`` full-batch gradient steps on one task's (x, y): the parameters after 0..steps
    steps (Finn et al. 2017, eq. 1, repeated). x: (n, *input_shape), no task axis. Step k's
    forward pass runs inside ``inner_step(k)`` (per-step batch norm, MAML++). The
    parameters named in ``held`` keep their values (see :func:`loss_gradient`); ``step_size``
    is never asked for them."""
    trajectory = [params]
    for step in range(steps):
        with inner_step(step):  # per-step batch-norm layers use this step's set (MAML++)
            grads = loss_gradient(model, params, x, y, first_order, held)
        adapted = {name: p for name, p in params.items() if name not in held}
        params = {**params, **sgd_step(adapted, grads, step_size, step)}
        trajectory.append(params)
    return trajectory


def gradient_descent_tasks(forward_tasks: Callable[[Params, Tensor], Tensor], params: Params, x: Tensor, y: Tensor,
                           steps: int, step_size: StepSize | float, first_order: bool = False,
                           held: frozenset[str] = frozenset()) -> list[Params]:
    """:func:`gradient_descent` for a batch of tasks at once, through a model's task-batched
    forward (``Conv4.forward_tasks``): ``params`` and every entry of the returned trajectory
    map each name to a ``(tasks, *shape)`` tensor, one set of weights per task; x ``(tasks, n,
    *input_shape)``, y ``(tasks, n, ...)``. Each step differentiates the sum of the tasks' losses:
    task t's weights enter only task t's loss, so the gradient with respect to them is that
    task's own gradient, as :func:`gradient_descent` takes it task by task. Held parameters,
    and those that do not require gradients (frozen), keep their values. Needs gradients enabled
    (``torch.autograd.grad``; the caller falls back to ``vmap`` without them)."""
    trajectory = [params]
    adapted = [name for name, p in params.items() if name not in held and p.requires_grad]
    for step in range(steps):
        loss = task_losses(forward_tasks(params, x), y).sum()
        # first order: no graph of the gradient, so no second derivative can flow through it
        grads = torch.autograd.grad(loss, [params[name] for name in adapted], create_graph=not first_order)
        params = {**params, **sgd_step({name: params[name] for name in adapted}, dict(zip(adapted, grads)),
                                       step_size, step)}
        trajectory.append(params)
    return trajectory


def normalisation_parameters(model: nn.Module) -> frozenset[str]:
    """The names of ``model``'s parameters that belong to normalisation layers (batch, layer,
    group, instance or RMS norm: scales and offsets), for an inner loop that does not adapt them."""
    # nn.RMSNorm is new in torch 2.4 (pyproject allows 2.3)
    kinds = (BatchStatNorm, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", ()))
    return frozenset(f"{prefix}.{name}" if prefix else name
                     for prefix, module in model.named_modules() if isinstance(module, kinds)
                     for name, _ in module.named_parameters(recurse=False))
