"""Batch normalisation that a meta-learner can differentiate twice under ``vmap``."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.errors import MetalearnError


class BatchStatNorm(nn.Module):
    """Normalise each channel (axis 1) with the current batch's mean and variance, then scale
    and shift: ``nn.BatchNorm{1,2,3}d(track_running_stats=False)`` in training mode, with the
    same parameter names (``weight``, ``bias``).

    Why not the native layer: in torch 2.13 the second derivative of the native batch-norm
    kernel inside ``torch.func.vmap`` is wrong (a conv bias in front of batch norm, which cannot
    change any output, gets a non-zero second-order MAML meta-gradient; outside ``vmap`` it is
    right). Written with ``mean`` and ``var`` it agrees with finite differences
    (tests/test_maml.py). There are no running
    statistics, as in the MAML reference code: statistics of the batch at train and test time;
    :meth:`make_per_step` adds MAML++'s per-step sets (scales and offsets, running statistics).
    ``scale=False`` drops the scale (no ``weight``), as the reference code's
    ``tf.contrib.layers.batch_norm`` does by default.

    The native kernel is also used when gradients are recorded inside ``native_batch_norm()``
    (``first_order_batch_norm()``: how ProtoNets, Matching Networks and Reptile run the model,
    differentiating only once; and MAML on a single task, outside ``vmap``): it is faster and
    saves less for the backward pass (see docs/performance.md).

    x: (batch, num_features, *spatial) -> same shape
    """

    def __init__(self, num_features: int, eps: float = 1e-5, scale: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features)) if scale else None
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.steps = 0  # > 0: per-step sets (see make_per_step)
        self.per_step_weights = False
        self.running_at_eval = True  # eval mode normalises with the running statistics, where there are any
        self.register_buffer("running_mean", None)  # per-step running statistics: see make_per_step
        self.register_buffer("running_var", None)

    def make_per_step(self, steps: int, weights: bool, statistics: bool) -> None:
        """Give the layer ``steps`` sets, one per inner step, chosen by :func:`inner_step`
        (MAML++, Antoniou et al. 2019, section 4): ``weights``, a scale and offset per step
        ("BNWB": ``weight`` and ``bias`` become (steps, num_features), each row starting at the
        shared value); ``statistics``, running mean and variance per step ("BNRS": buffers
        ``running_mean`` / ``running_var`` of (steps, num_features), starting at 0 and 1),
        used to normalise in eval mode. Running statistics are state: the forward pass never
        writes them (it stays a pure function of parameters and buffers under ``vmap``); it
        reports the batch statistics inside :func:`collect_batch_statistics`, and the owner
        moves the buffers with :meth:`update_running_statistics`."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.steps = steps
        if weights and not self.per_step_weights:
            with torch.no_grad():
                if self.weight is not None:
                    self.weight = nn.Parameter(self.weight.detach().expand(steps, -1).clone())
                self.bias = nn.Parameter(self.bias.detach().expand(steps, -1).clone())
            self.per_step_weights = True
        if statistics and self.running_mean is None:
            like = {"dtype": self.bias.dtype, "device": self.bias.device}
            self.running_mean = torch.zeros(steps, self.num_features, **like)
            self.running_var = torch.ones(steps, self.num_features, **like)

    def set_index(self) -> int:
        """The per-step set the current inner step uses: that step's, or the last set for test-time
        steps beyond the trained count (as learned step sizes are reused)."""
        return min(_STEP.get(), max(self.steps, 1) - 1)

    def forward(self, x: Tensor) -> Tensor:
        k = self.set_index()
        weight, bias = self.weight, self.bias
        if self.per_step_weights:
            weight = None if weight is None else weight[k]
            bias = bias[k]
        if self.running_mean is not None:
            if not self.training and self.running_at_eval:  # the paper's evaluation: this step's running statistics
                shape = (-1, *([1] * (x.dim() - 2)))
                inverse_std = torch.rsqrt(self.running_var[k] + self.eps)
                if weight is not None:
                    inverse_std = inverse_std * weight
                return (x - self.running_mean[k].view(shape)) * inverse_std.view(shape) + bias.view(shape)
            if self.training:
                _record_batch_statistics(self, k, x)
        if native_batch_norm_active(x):  # the fast native kernel
            return F.batch_norm(x, None, None, native_weight(weight, x), bias, True, 0.0, self.eps)
        return batch_stat_norm(x, weight, bias, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.running_mean is None:
            # weights trained with per-step running statistics, loaded to normalise with batch
            # statistics (``--set per_step_bn_statistics=false``: the authors' code's evaluation)
            for name in ("running_mean", "running_var"):
                state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update_running_statistics(self, step: int, mean: Tensor, var: Tensor, momentum: float) -> None:
        """``running <- (1 - momentum) running + momentum batch`` for set ``step``, as torch's
        batch norm moves its running statistics (``var`` the unbiased batch variance)."""
        self.running_mean[step].lerp_(mean.to(self.running_mean), momentum)
        self.running_var[step].lerp_(var.to(self.running_var), momentum)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}" + ("" if self.weight is not None else ", scale=False")
        if self.steps:
            text += f", steps={self.steps}, per_step_weights={self.per_step_weights}, " \
                    f"running_statistics={self.running_mean is not None}"
        return text


def batch_stat_norms(model: nn.Module) -> nn.Module:
    """``model`` with each of torch's ``nn.BatchNorm1d/2d/3d`` layers replaced, in place, by a
    :class:`BatchStatNorm` of its features and ``eps``, its scale and offset copied (a layer
    without them, ``affine=False``, gets none to learn: no scale, an offset held at 0). Running
    statistics are dropped: a meta-learner normalises with each batch's statistics, at test time
    too, as the MAML reference code does. Returns ``model``, so that a network of one's own
    (learn2learn's habit of ``nn.BatchNorm2d``) meta-learns with ``batch_stat_norms(MyCNN())``.
    A batch-norm layer given alone is refused: it cannot be replaced in place."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise MetalearnError("batch_stat_norms replaces the batch-norm layers inside a network; for one layer build "
                             "BatchStatNorm(num_features, eps) in its place")
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            layer = BatchStatNorm(child.num_features, child.eps, scale=child.affine)
            with torch.no_grad():
                if child.affine:
                    layer.weight.copy_(child.weight)
                    layer.bias.copy_(child.bias)
                else:
                    layer.bias.requires_grad_(False)
            like = next(iter((*child.parameters(), *child.buffers())), None)  # its device and dtype
            setattr(model, name, layer if like is None else layer.to(device=like.device, dtype=like.dtype))
        else:
            batch_stat_norms(child)
    return model


def batch_stat_norm(x: Tensor, weight: Tensor | None, bias: Tensor, eps: float) -> Tensor:
    """The twice-differentiable form of :class:`BatchStatNorm`, written with ``mean`` and
    ``var`` over every axis but the channels (1); ``weight`` None: no scale."""
    dims = (0, *range(2, x.dim()))
    centered = x - x.mean(dim=dims, keepdim=True)
    var = centered.square().mean(dim=dims, keepdim=True)
    shape = (-1, *([1] * (x.dim() - 2)))
    inverse_std = torch.rsqrt(var + eps)
    if weight is not None:
        inverse_std = inverse_std * weight.view(shape)
    return centered * inverse_std + bias.view(shape)


_NATIVE = contextvars.ContextVar("metalearn_native_batch_norm", default=False)


@contextlib.contextmanager
def native_batch_norm() -> Iterator[None]:
    """Within this block every ``BatchStatNorm`` uses torch's native kernel. Right wherever the
    model is differentiated once (also under ``vmap``), and for second derivatives outside
    ``vmap`` (MAML on one task: tests/test_maml.py); wrong for second derivatives under ``vmap``
    in torch 2.13 (see :class:`BatchStatNorm`). A setting of the block, not of the model: the same
    module stays right for second-order MAML outside it."""
    token = _NATIVE.set(True)
    try:
        yield
    finally:
        _NATIVE.reset(token)


def native_weight(weight: Tensor | None, x: Tensor) -> Tensor | None:
    """The scale to give torch's native batch norm: ``weight``, or for a layer without a scale
    a constant one where gradients are recorded. In torch 2.13 the native kernel's second
    derivative fails without a weight ("Expected a proper Tensor but got None", MAML second
    order on one task); multiplying by one changes nothing."""
    if weight is None and torch.is_grad_enabled():
        return torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    return weight


def native_batch_norm_active(x: Tensor | None = None) -> bool:
    """Whether a batch norm here should use the native kernel, as :class:`BatchStatNorm` decides:
    without gradients, or inside :func:`native_batch_norm`; never for an input ``x`` of one value
    per channel (one image whose feature map is 1x1: a single query of 16-pixel images after
    Conv4's four poolings), which torch 2.13's kernel refuses in training mode ("Expected more
    than 1 value per channel") where the decomposed form gives what it gives for any batch of
    equal values, the bias."""
    if x is not None and x.dim() >= 2 and x.numel() == x.shape[1]:
        return False
    return not torch.is_grad_enabled() or _NATIVE.get()


def first_order_batch_norm() -> contextlib.AbstractContextManager[None]:
    """A context manager: within its block every :class:`BatchStatNorm` runs torch's native
    kernel (:func:`native_batch_norm`), faster than the twice-differentiable form it otherwise
    computes with gradients on. For a method that never takes a second derivative through the
    model (ProtoNets, Matching Networks, Reptile): the values and first derivatives equal the
    twice-differentiable form's, also under ``vmap`` (tests/test_maml.py). A setting of the
    block, not of the model.

    >>> with first_order_batch_norm():
    ...     support, query = embed_episodes(learner.model, batch)"""
    return native_batch_norm()


_STEP = contextvars.ContextVar("metalearn_inner_step", default=0)


@contextlib.contextmanager
def inner_step(step: int) -> Iterator[None]:
    """Within this block, per-step batch-norm layers use set ``step`` (their last set beyond it):
    set by the inner loop around the forward passes of step ``step`` (the support pass that
    takes the step, and the query pass that scores its result); 0 outside any inner loop."""
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


_STATISTICS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("metalearn_batch_statistics",
                                                                          default=None)


@contextlib.contextmanager
def collect_batch_statistics() -> Iterator[dict[str, list[Tensor]]]:
    """Within this block every training-mode forward of a layer with running statistics adds its
    batch statistics to the yielded dict: key ``"<id(layer)>:<set>"``, a list of (2, num_features)
    tensors (mean, unbiased variance), detached. The dict is plain data, so a function under
    ``vmap`` or ``torch.func.grad`` can return it (``has_aux``) rather than mutate a buffer."""
    collected: dict[str, list[Tensor]] = {}
    token = _STATISTICS.set(collected)
    try:
        yield collected
    finally:
        _STATISTICS.reset(token)


def _record_batch_statistics(layer: BatchStatNorm, step: int, x: Tensor) -> None:
    collected = _STATISTICS.get()
    if collected is None:
        return
    dims = (0, *range(2, x.dim()))
    values = x.detach()
    # the two-pass variance written out: torch 2.13's CPU ``var`` over these axes (all but the
    # channels) takes about ten times as long, a fifth of a MAML++ meta-step
    mean = values.mean(dim=dims, keepdim=True)
    count = values.numel() // values.shape[1]
    var = (values - mean).square().sum(dim=dims) / max(count - 1, 1)
    stats = torch.stack([mean.reshape(-1), var])
    collected.setdefault(f"{id(layer)}:{step}", []).append(stats)


def merge_batch_statistics(into: dict[str, list[Tensor]], more: dict[str, list[Tensor]]) -> None:
    """Add the lists of ``more`` (returned from a transformed function) to those of ``into``."""
    for key, values in more.items():
        into.setdefault(key, []).extend(values)


def batch_statistics_collector() -> dict[str, list[Tensor]] | None:
    """The dict of the innermost :func:`collect_batch_statistics` block, or None outside one."""
    return _STATISTICS.get()
