"""The independent reference that the MAML and PLATIPUS gradient tests compare with: forwards
written with F.linear / F.conv2d / F.batch_norm on explicit weights, and the inner loop with
torch.autograd.grad, sharing no code with the package; and the small Conv4 problem that both
tests differentiate."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from batches import image_batch
from metalearn.models import Conv4


def mlp_forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """metalearn.models.MLP as a function: Linear layers ``net.{i}`` with ReLU between."""
    layers = sorted({name.rsplit(".", 1)[0] for name in params}, key=lambda s: int(s.split(".")[1]))
    for i, layer in enumerate(layers):
        x = F.linear(x, params[f"{layer}.weight"], params[f"{layer}.bias"])
        if i < len(layers) - 1:
            x = F.relu(x)
    return x


def conv4_forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """metalearn.models.Conv4 (stride pooling) as a function; batch norm on batch statistics."""
    for block in range(4):
        x = F.conv2d(x, params[f"features.{block}.0.weight"], params.get(f"features.{block}.0.bias"),
                     stride=2, padding=1)
        x = F.batch_norm(x, None, None, params[f"features.{block}.1.weight"],
                         params[f"features.{block}.1.bias"], training=True, eps=1e-5)
        x = F.relu(x)
    return F.linear(x.mean(dim=(-2, -1)), params["head.weight"], params["head.bias"])


def ref_task_loss(prediction: Tensor, target: Tensor) -> Tensor:
    if target.dtype == torch.long:
        return F.cross_entropy(prediction, target)
    return ((prediction - target) ** 2).mean()


def ref_adapt(forward, params, x, y, steps, lr, first_order):
    """The inner loop by hand: [params after 0..steps gradient steps of size ``lr(name, step)``]
    on one task, with ``torch.autograd.grad`` (second order unless ``first_order``)."""
    trajectory = [params]
    for step in range(steps):
        names = list(params)
        loss = ref_task_loss(forward(params, x), y)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order)
        if first_order:
            grads = [g.detach() for g in grads]
        params = {n: params[n] - lr(n, step) * g for n, g in zip(names, grads)}
        trajectory.append(params)
    return trajectory


def central_difference(loss: Callable[[], Tensor], param: Tensor, index: int, eps: float = 1e-6) -> float:
    """d loss / d param.view(-1)[index] by central finite differences, moving that one entry of
    ``param`` in place by +-eps and putting it back: the ground truth of the gradient tests."""
    with torch.no_grad():
        flat = param.view(-1)
        original = flat[index].item()
        flat[index] = original + eps
        plus = loss().item()
        flat[index] = original - eps
        minus = loss().item()
        flat[index] = original
    return (plus - minus) / (2 * eps)


def conv_problem(tasks=3, ways=3, shots=2, query=2, size=12, seed=0):
    """A float64 Conv4 of the package (its parameters are what :func:`conv4_forward` reads), a
    random image batch for it, and the reference forward."""
    torch.manual_seed(seed)
    model = Conv4(1, ways, hidden=8).double()
    batch = image_batch(tasks, ways, shots, query, size, seed)
    return model, batch, conv4_forward
