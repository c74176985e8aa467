"""Networks: plain ``nn.Module`` s with no running-statistics buffers, so that a method can
apply them as pure functions of a parameter dict (``torch.func.functional_call``). (MAML's
per-step batch-norm statistics are buffers that only the method's own update writes.)"""

from __future__ import annotations

import torch
from torch import nn

from metalearn.errors import MetalearnError
from metalearn.models.conv4 import Conv4, mamlpp_conv4, reference_conv4
from metalearn.models.mlp import MLP
from metalearn.models.norm import BatchStatNorm, first_order_batch_norm

MODELS = ("conv4", "conv4-maxpool", "conv4-embedding", "conv4-reference", "conv4-maxpool-32", "conv4-mamlpp", "mlp")


def build_model(name: str, input_shape: tuple[int, ...], out_features: int | None) -> nn.Module:
    """A network by name for inputs of ``input_shape`` (without the batch axis).

    ``out_features`` None gives an embedding network (no head), for metric-based methods.
    ``conv4-reference`` is ``conv4`` as the MAML authors' code builds and initialises it
    (see :func:`~metalearn.models.conv4.reference_conv4`); ``conv4-mamlpp`` the MAML++ network
    (max-pooling, leaky ReLU: :func:`~metalearn.models.conv4.mamlpp_conv4`). ``conv4-maxpool-32``
    is MAML's mini-ImageNet network (Finn et al. 2017, section 5.2): 32 filters, max-pooling, the
    head on the flattened final map (5x5 on 84x84 inputs). ``input_shape[0]`` is the channel
    count (1 grey, 3 RGB).
    """
    if name == "conv4-maxpool-32":
        if len(input_shape) != 3 or min(input_shape[1:]) < 16:
            raise MetalearnError(f"{name} needs image inputs (C, H, W) of at least 16x16, got shape {input_shape}")
        side = lambda n: n // 2 // 2 // 2 // 2  # four 2x2 max-pools, each rounding down
        return Conv4(input_shape[0], out_features, hidden=32, pooling="max",
                     flat_map=(side(input_shape[1]), side(input_shape[2])))
    if name in ("conv4", "conv4-maxpool", "conv4-embedding", "conv4-reference", "conv4-mamlpp"):
        if len(input_shape) != 3:
            raise MetalearnError(f"model {name} needs image inputs (C, H, W), got shape {input_shape}")
        pooling = "stride" if name in ("conv4", "conv4-reference") else "max"
        if name == "conv4-embedding" and out_features is not None:
            raise MetalearnError("conv4-embedding has no output layer; this method needs conv4 or conv4-maxpool")
        if pooling == "max" and min(input_shape[1:]) < 16:
            raise MetalearnError(f"{name} halves the image four times and needs at least 16x16 inputs, "
                                 f"got {input_shape[1]}x{input_shape[2]}")
        if name in ("conv4-reference", "conv4-mamlpp"):
            if out_features is None:
                raise MetalearnError(f"{name} is a classifier (MAML's network); use conv4-embedding here")
            builder = reference_conv4 if name == "conv4-reference" else mamlpp_conv4
            return builder(input_shape[0], out_features)
        head = None if name == "conv4-embedding" else out_features
        return Conv4(input_shape[0], head, pooling=pooling)
    if name == "mlp":
        if len(input_shape) != 1:
            raise MetalearnError(f"model mlp needs vector inputs, got shape {input_shape}")
        return MLP(input_shape[0], out_features or 1)
    raise MetalearnError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")


def output_size(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The size of ``model``'s output per example (an embedding network's dimension), from one
    forward pass of two zero inputs of ``input_shape`` without gradients."""
    with torch.no_grad():
        return model(torch.zeros(2, *input_shape)).shape[-1]


__all__ = ["BatchStatNorm", "output_size", "Conv4", "MLP", "MODELS", "build_model", "first_order_batch_norm", "mamlpp_conv4",
           "reference_conv4"]
