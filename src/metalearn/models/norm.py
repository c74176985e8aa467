"""Batch normalisation that a meta-learner can differentiate twice under ``vmap``."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchStatNorm(nn.Module):
    """Normalise each channel (axis 1) with the current batch's mean and variance, then scale
    and shift: ``nn.BatchNorm{1,2,3}d(track_running_stats=False)`` in training mode, with the
    same parameter names (``weight``, ``bias``).

    Why not the native layer: in torch 2.13 the second derivative of the native batch-norm
    kernel inside ``torch.func.vmap`` is wrong (a conv bias in front of batch norm, which cannot
    change any output, gets a non-zero second-order MAML meta-gradient). Written with ``mean``
    and ``var`` it agrees with finite differences (tests/test_maml.py). There are no running
    statistics, as in the MAML reference code: statistics of the batch at train and test time.
    ``scale=False`` drops the scale (no ``weight``), as the reference code's
    ``tf.contrib.layers.batch_norm`` does by default.

    The native kernel is also used when gradients are recorded inside
    ``first_order_batch_norm()`` (how ProtoNets, Matching Networks and Reptile run the model:
    they differentiate only once, and it is faster; see docs/performance.md).

    x: (batch, num_features, *spatial) -> same shape
    """

    def __init__(self, num_features: int, eps: float = 1e-5, scale: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features)) if scale else None
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or _FIRST_ORDER.get():  # the fast native kernel
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return batch_stat_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + ("" if self.weight is not None else ", scale=False")


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


_FIRST_ORDER = contextvars.ContextVar("metalearn_first_order_batch_norm", default=False)


@contextlib.contextmanager
def first_order_batch_norm() -> Iterator[None]:
    """Within this block every ``BatchStatNorm`` uses torch's native kernel, for a method that
    never takes a second derivative through the model (ProtoNets, Matching Networks, Reptile).
    Its values and first derivatives equal the twice-differentiable form's, also under ``vmap``
    (tests/test_maml.py). A setting of the block, not of the model: the same module stays
    right for second-order MAML outside it."""
    token = _FIRST_ORDER.set(True)
    try:
        yield
    finally:
        _FIRST_ORDER.reset(token)
