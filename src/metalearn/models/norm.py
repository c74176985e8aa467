"""Batch normalisation that a meta-learner can differentiate twice under ``vmap``."""

from __future__ import annotations

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

    ``differentiable_twice=False`` (see ``first_order_only``) uses the native kernel also when
    gradients are recorded (faster: a Reptile training step 1.7x, see the README), which is
    right for methods that differentiate only once.

    x: (batch, num_features, *spatial) -> same shape
    """

    def __init__(self, num_features: int, eps: float = 1e-5, differentiable_twice: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.differentiable_twice = differentiable_twice
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.differentiable_twice):  # the fast native kernel
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dims = (0, *range(2, x.dim()))
        centered = x - x.mean(dim=dims, keepdim=True)
        var = centered.square().mean(dim=dims, keepdim=True)
        shape = (-1, *([1] * (x.dim() - 2)))
        return centered * (torch.rsqrt(var + self.eps) * self.weight.view(shape)) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def first_order_only(model: nn.Module) -> nn.Module:
    """Switch every ``BatchStatNorm`` in ``model`` to the native kernel, for a method that
    never takes a second derivative through the model (ProtoNets, Matching Networks, Reptile).
    Its first derivatives equal the twice-differentiable form's, also under ``vmap``
    (tests/test_maml.py). Returns ``model``."""
    for module in model.modules():
        if isinstance(module, BatchStatNorm):
            module.differentiable_twice = False
    return model
